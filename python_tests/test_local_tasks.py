"""bench.local_tasks: lm-eval task definitions built from the shared data folder.

These tests read ``../shared/data`` (beside the clone, as in CI; ``$MINDSKIP_DATA`` overrides) and skip,
saying so, when it is absent. Scoring runs through stock ``lm_eval.simple_evaluate``: an oracle LM that
knows the gold answers must score 1.0 and its opposite 0.0, which checks prompts, choices, targets and
metrics end to end; the real SmolLM2 scores a handful of items when it is in the cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import local_tasks
from mindskip_ext import offline_models

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MINDSKIP_DATA", REPO.parent / "shared" / "data"))
MC_TASKS = ["local_piqa", "local_boolq", "local_rte", "local_hellaswag", "local_openbookqa", "local_mmlu"]


@pytest.fixture(scope="module")
def data_dir():
    if not (DATA_DIR / "eval").is_dir():
        pytest.skip(f"the shared data folder is absent ({DATA_DIR}); CI has it at ../shared/data beside the clone")
    return DATA_DIR


@pytest.fixture(scope="module")
def written(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local_tasks")
    return local_tasks.write_tasks(data_dir, out, limit=6, mmlu_limit=1)


@pytest.fixture(scope="module")
def loaded(written):
    return written.task_manager().load(list(local_tasks.TASKS))


def _first_doc(loaded, name):
    task = loaded["tasks"][name]
    return task, next(iter(task.test_docs()))


def _gold(task, doc):
    return task.doc_to_choice(doc)[task.doc_to_target(doc)]


def test_sizes_subsampling_and_manifest(written, data_dir):
    assert written.totals == {
        "local_piqa": 1838, "local_boolq": 3270, "local_rte": 277,
        "local_hellaswag": 10042 - local_tasks.HELLASWAG_FEWSHOT_POOL, "local_openbookqa": 500,
        "local_mmlu": 14042, "local_gsm8k": 1319,
    }
    assert written.sizes == {**dict.fromkeys(local_tasks.TASKS, 6), "local_mmlu": 57}
    assert len(written.subjects) == 57
    manifest = json.loads((written.path / local_tasks.MANIFEST).read_text())
    assert manifest["sizes"] == written.sizes and manifest["num_fewshot"] == local_tasks.PAPER_SHOTS
    again = local_tasks.write_tasks(data_dir, written.path.parent / "again", limit=6, mmlu_limit=1)
    for name in ("local_piqa.jsonl", "local_mmlu_anatomy.jsonl"):  # the seeded subset is reproducible
        assert (again.path / name).read_text() == (written.path / name).read_text()


def test_tasks_load_with_stock_task_manager(loaded):
    assert set(loaded["tasks"]) == {t for t in local_tasks.TASKS if t != "local_mmlu"} | {
        f"local_mmlu_{s}" for s in _subjects(loaded)
    }
    assert len(loaded["group_map"]["local_mmlu"]) == 57
    for name, task in loaded["tasks"].items():
        assert len(list(task.test_docs())) == 6 if not name.startswith("local_mmlu_") else 1
        shots = local_tasks.PAPER_SHOTS["local_mmlu" if name.startswith("local_mmlu_") else name]
        assert (task.get_config("num_fewshot") or 0) == shots


def _subjects(loaded):
    return [n[len("local_mmlu_"):] for n in loaded["group_map"]["local_mmlu"]]


def test_documents_keep_the_original_labels(data_dir, tmp_path):
    """Known first items of each source file, checked against their published gold answers."""
    tasks = local_tasks.write_tasks(data_dir, tmp_path, tasks=MC_TASKS).task_manager().load(MC_TASKS)
    task, doc = _first_doc(tasks, "local_piqa")
    assert doc["goal"].startswith("How do I ready a guinea pig cage") and "ripped paper strips" in _gold(task, doc)
    task, doc = _first_doc(tasks, "local_boolq")
    assert doc["question"] == "does ethanol take more energy make that produces" and _gold(task, doc) == "no"
    task, doc = _first_doc(tasks, "local_rte")
    assert doc["sentence2"] == "Christopher Reeve had an accident." and _gold(task, doc) == "False"
    task, doc = _first_doc(tasks, "local_hellaswag")
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. he"
    assert _gold(task, doc) == "starts pulling up roofing on a roof."
    task, doc = _first_doc(tasks, "local_openbookqa")
    assert doc["question_stem"].endswith("the best way to save money is to") and len(doc["choices"]) == 4
    assert _gold(task, doc) == "quit eating lunch out"
    task, doc = _first_doc(tasks, "local_mmlu_abstract_algebra")
    assert doc["question"].startswith("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18))")
    assert _gold(task, doc) == "B"  # the degree is 4
    assert task.doc_to_text(doc).endswith("A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")


class _KnowsTheAnswers:
    """An lm-eval LM that gives the gold continuation (or, with ``invert``, every other one) the top score."""

    def __init__(self, tasks, invert=False):
        from lm_eval.api.model import LM

        outer = self

        class Oracle(LM):
            def loglikelihood(self, requests):
                out = []
                for req in requests:
                    task = tasks[req.task_name]
                    outer.contexts.setdefault(req.task_name, []).append(req.args[0])
                    gold = req.idx == task.doc_to_target(req.doc)
                    out.append((0.0 if gold != invert else -50.0, gold != invert))
                return out

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

            def generate_until(self, requests):
                answers = []
                for req in requests:
                    outer.contexts.setdefault(req.task_name, []).append(req.args[0])
                    answers.append("I do not know." if invert else " " + req.doc["answer"])
                return answers

        self.contexts: dict[str, list[str]] = {}
        self.lm = Oracle()


@pytest.mark.parametrize("invert", [False, True], ids=["oracle", "anti-oracle"])
def test_oracle_scores_through_simple_evaluate(written, loaded, invert):
    import lm_eval

    oracle = _KnowsTheAnswers(loaded["tasks"], invert=invert)
    results = lm_eval.simple_evaluate(
        model=oracle.lm, tasks=list(local_tasks.TASKS), task_manager=written.task_manager(), bootstrap_iters=0,
        log_samples=False,
    )["results"]
    expected = 0.0 if invert else 1.0
    for name in MC_TASKS:
        assert results[name]["acc,none"] == expected, name
        if "acc_norm,none" in results[name]:
            assert results[name]["acc_norm,none"] == expected, name
    assert results["local_gsm8k"]["exact_match,strict-match"] == expected
    if not invert:
        contexts = oracle.contexts
        # HellaSwag: 10 examples from the held-out pool, then the item; MMLU: description + 5 dev examples.
        assert all(c.count("\n\n") == 10 for c in contexts["local_hellaswag"])
        mmlu = contexts["local_mmlu_anatomy"][0]
        assert mmlu.startswith("The following are multiple choice questions (with answers) about anatomy.")
        assert mmlu.count("Answer:") == 6
        assert all(c.count("Question:") == 6 for c in contexts["local_gsm8k"])
        assert all("Answer:" not in c.split("\n")[0] for c in contexts["local_piqa"])  # 0-shot: one question


def test_per_task_limits(data_dir, tmp_path):
    written = local_tasks.write_tasks(data_dir, tmp_path, tasks=["local_rte", "local_boolq"], limit={"local_boolq": 5})
    assert written.sizes == {"local_rte": 277, "local_boolq": 5}


def test_mmlu_subject_selection(data_dir, tmp_path):
    written = local_tasks.write_tasks(data_dir, tmp_path, tasks=["local_mmlu"], mmlu_limit=3,
                                      mmlu_subjects=["virology", "anatomy"])
    assert written.subjects == ["anatomy", "virology"] and written.sizes == {"local_mmlu": 6}
    loaded = written.task_manager().load(["local_mmlu"])
    assert sorted(loaded["group_map"]["local_mmlu"]) == ["local_mmlu_anatomy", "local_mmlu_virology"]


def test_fewshot_override_and_bad_arguments(data_dir, tmp_path):
    written = local_tasks.write_tasks(data_dir, tmp_path, tasks=["local_hellaswag"], limit=2,
                                      num_fewshot={"local_hellaswag": 0})
    task = written.task_manager().load(["local_hellaswag"])["tasks"]["local_hellaswag"]
    assert (task.get_config("num_fewshot") or 0) == 0
    with pytest.raises(ValueError, match="local_piqa has no few-shot pool"):
        local_tasks.write_tasks(data_dir, tmp_path, tasks=["local_piqa"], num_fewshot={"local_piqa": 3})
    with pytest.raises(ValueError, match="unknown local task"):
        local_tasks.write_tasks(data_dir, tmp_path, tasks=["piqa"])
    with pytest.raises(ValueError, match=r"limit\['local_piqa'\] must be a positive integer"):
        local_tasks.write_tasks(data_dir, tmp_path, limit=0)
    with pytest.raises(ValueError, match="limit names \\['local_gsm8k'\\]"):
        local_tasks.write_tasks(data_dir, tmp_path, tasks=["local_rte"], limit={"local_gsm8k": 3})
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        local_tasks.write_tasks(data_dir, tmp_path, tasks=["local_mmlu"], mmlu_subjects=["astrology"])
    with pytest.raises(FileNotFoundError, match="no eval/ folder"):
        local_tasks.write_tasks(tmp_path / "nowhere", tmp_path / "out")


def test_smollm2_scores_a_handful_of_items(written):
    """The real model and tokenizer through stock lm-eval's HF backend, on the items the tasks wrote."""
    if not offline_models.is_fetched("smollm2"):
        pytest.skip("SmolLM2 is not in the model cache (python_tests/test_offline_models.py fetches it)")
    import math

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(offline_models.checkpoint_path("smollm2")), batch_size=8, device="cpu")
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["local_piqa", "local_rte"], task_manager=written.task_manager(), bootstrap_iters=0,
    )
    for name, choices in (("local_piqa", 2), ("local_rte", 2)):
        samples = results["samples"][name]
        assert len(samples) == 6
        for sample in samples:
            logliks = [float(r[0][0]) for r in sample["resps"]]
            assert len(logliks) == choices and all(math.isfinite(x) and x < 0 for x in logliks)
            assert sample["acc"] == float(max(range(choices), key=logliks.__getitem__) == sample["target"])
