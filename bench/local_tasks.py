"""lm-eval task definitions built from local copies of the evaluation data, for machines without a dataset hub.

:func:`write_tasks` reads the files of a data folder laid out like ``../shared/data`` (PIQA, BoolQ, RTE,
HellaSwag, OpenBookQA, MMLU, GSM8K; see that folder's README), writes each task's items as JSON lines and
writes lm-eval YAML task configs next to them. Stock lm-eval loads them with
``TaskManager(include_path=folder)``. Prompts, answer choices and metrics are those of lm-eval's own
``piqa``, ``boolq``, ``rte``, ``hellaswag``, ``openbookqa``, ``mmlu`` and ``gsm8k`` tasks; the names carry a
``local_`` prefix so they never shadow the stock tasks.

Differences from the stock tasks, forced by the local files:

* HellaSwag: the file keeps ``ctx`` as one string (stock joins ``ctx_a`` and a capitalised ``ctx_b``), and it
  has no training split, so few-shot examples come from a pool of validation items that are never scored.
* OpenBookQA: the local copy of the test set is instruction-formatted; question and choices are parsed back out.
* Subsampling (``limit``, ``mmlu_limit``) draws a seeded random subset, recorded in ``manifest.json``.
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "local_"
MMLU_GROUP = "local_mmlu"
#: The paper's shot counts (Router-Tuning, Table 1 setup) for the tasks defined here.
PAPER_SHOTS = {
    "local_piqa": 0,
    "local_boolq": 0,
    "local_rte": 0,
    "local_openbookqa": 0,
    "local_hellaswag": 10,
    "local_mmlu": 5,
    "local_gsm8k": 5,
}
TASKS = tuple(PAPER_SHOTS)
FEWSHOT_TASKS = ("local_hellaswag", "local_mmlu", "local_gsm8k")  # tasks with a few-shot pool
HELLASWAG_FEWSHOT_POOL = 100  # validation items set aside as HellaSwag's few-shot examples
MANIFEST = "manifest.json"

_MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_MC_NORM_METRICS = _MC_METRICS + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
_OBQA_PATTERN = re.compile(
    r"^Please choose the correct answer to the question: (?P<q>.*)\n\n"
    r"Answer1: (?P<a1>.*) Answer2: (?P<a2>.*) Answer3: (?P<a3>.*) Answer4: (?P<a4>.*)\n\n"
    r"Answer format: answer1/answer2/answer3/answer4$",
    re.S,
)


@dataclass
class LocalTasks:
    """What :func:`write_tasks` wrote: the folder for ``TaskManager(include_path=...)`` and the task sizes."""

    path: Path
    tasks: list[str]
    num_fewshot: dict[str, int] = field(default_factory=dict)  # shots each task's config carries
    sizes: dict[str, int] = field(default_factory=dict)  # scored items per task (MMLU: summed over subjects)
    totals: dict[str, int] = field(default_factory=dict)  # items available per task before subsampling
    subjects: list[str] = field(default_factory=list)  # MMLU subjects (task local_mmlu_<subject>)

    def task_manager(self, include_defaults: bool = False):
        """An lm-eval ``TaskManager`` that knows these tasks (and the stock ones with ``include_defaults``)."""
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=str(self.path), include_defaults=include_defaults)


def write_tasks(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    tasks: list[str] | tuple[str, ...] = TASKS,
    limit: int | dict[str, int | None] | None = None,
    mmlu_limit: int | None = None,
    num_fewshot: dict[str, int] | None = None,
    mmlu_subjects: list[str] | None = None,
    seed: int = 1234,
) -> LocalTasks:
    """Write lm-eval task configs for ``tasks`` from the data files under ``data_dir`` into ``output_dir``.

    ``limit`` keeps a seeded random subset of at most that many scored items per task (a dict: per task, tasks
    it does not name are not subsampled); MMLU is subsampled per subject with ``mmlu_limit``; ``mmlu_subjects``
    keeps only those subjects (default: all 57). Few-shot pools are never subsampled.
    Each task's config carries its shot count: :data:`PAPER_SHOTS`, or ``num_fewshot[task]`` when given
    (only tasks with a few-shot pool, HellaSwag, MMLU and GSM8K, can take more than 0).
    """
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown local task(s) {unknown}; known: {', '.join(TASKS)}")
    limits = dict(limit) if isinstance(limit, dict) else dict.fromkeys(tasks, limit)
    stray = sorted(set(limits) - set(tasks))
    if stray:
        raise ValueError(f"limit names {stray}, which are not among the tasks {list(tasks)}")
    for name, value in [*((f"limit[{t!r}]", v) for t, v in limits.items()), ("mmlu_limit", mmlu_limit)]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    shots = {task: PAPER_SHOTS[task] for task in tasks}
    for task, n in (num_fewshot or {}).items():
        if task not in shots:
            raise ValueError(f"num_fewshot names {task!r}, which is not among the tasks {list(tasks)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_fewshot[{task!r}] must be an integer >= 0, got {n!r}")
        if n > 0 and task not in FEWSHOT_TASKS:
            raise ValueError(f"{task} has no few-shot pool in the local data; it runs 0-shot only")
        shots[task] = n
    if not (data_dir / "eval").is_dir():
        raise FileNotFoundError(
            f"{data_dir} has no eval/ folder: not a data folder laid out like ../shared/data (see its README)"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    result = LocalTasks(path=output_dir, tasks=list(tasks), num_fewshot=shots)
    writers = {
        "local_piqa": _piqa,
        "local_boolq": _boolq,
        "local_rte": _rte,
        "local_hellaswag": _hellaswag,
        "local_openbookqa": _openbookqa,
        "local_gsm8k": _gsm8k,
    }
    for task in tasks:
        rng = random.Random(f"{seed}-{task}")
        if task == MMLU_GROUP:
            _mmlu(data_dir / "eval" / "mmlu", output_dir, mmlu_limit, mmlu_subjects, shots[task], rng, result)
            continue
        scored, fewshot, config = writers[task](data_dir / "eval")
        result.totals[task] = len(scored)
        scored = _subsample(scored, limits.get(task), rng)
        result.sizes[task] = len(scored)
        files = {"test": _write_jsonl(output_dir / f"{task}.jsonl", scored)}
        if fewshot is not None:
            files["train"] = _write_jsonl(output_dir / f"{task}_fewshot.jsonl", fewshot)
            config = {"training_split": "train", "fewshot_split": "train", **config}
        if shots[task]:
            config["num_fewshot"] = shots[task]  # 0 stays unset: lm-eval ignores a --num_fewshot over a 0 here
        _write_yaml(output_dir / f"{task}.yaml",
                    {"task": task, **_json_dataset(files), "test_split": "test", **config})
    manifest = {
        "data_dir": str(data_dir.resolve()),
        "seed": seed,
        "limit": limits,
        "mmlu_limit": mmlu_limit,
        "mmlu_subjects": result.subjects,
        "sizes": result.sizes,
        "totals": result.totals,
        "num_fewshot": shots,
        "paper_shots": {t: PAPER_SHOTS[t] for t in tasks},
    }
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return result


# ------------------------------------------------------------------------------------------- tasks


def _multiple_choice(text, choice, metrics, source, target="label", version=1.0) -> dict:
    """An lm-eval multiple-choice task config."""
    return {
        "output_type": "multiple_choice",
        "doc_to_text": text,
        "doc_to_target": target,
        "doc_to_choice": choice,
        "metric_list": metrics,
        "metadata": {"version": version, "source": source},
    }


def _piqa(eval_dir: Path):
    folder = eval_dir / "piqa"
    docs = _read_jsonl(folder / "valid.jsonl")
    labels = [int(line) for line in _read_text(folder / "valid-labels.lst").split()]
    if len(labels) != len(docs):
        raise ValueError(f"{folder}: {len(docs)} questions but {len(labels)} labels")
    items = [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": label}
             for d, label in zip(docs, labels, strict=True)]
    config = _multiple_choice("Question: {{goal}}\nAnswer:", "{{[sol1, sol2]}}", _MC_NORM_METRICS,
                              "piqa valid (original)")
    return items, None, config


def _boolq(eval_dir: Path):
    docs = _read_jsonl(eval_dir / "boolq" / "dev.jsonl")
    items = [{"passage": d["passage"], "question": d["question"], "label": int(bool(d["answer"]))} for d in docs]
    config = _multiple_choice("{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"], _MC_METRICS,
                              "boolq dev (original)", version=2.0)
    return items, None, config


def _rte(eval_dir: Path):
    path = eval_dir / "rte" / "dev.tsv"
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    items = [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": int(r["label"])} for r in rows]
    config = _multiple_choice("{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
                              ["True", "False"], [{"metric": "acc"}], "GLUE rte dev")  # GLUE label 0 = entailment
    return items, None, config


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing (WikiHow bracket artifacts removed)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(eval_dir: Path):
    path = eval_dir / "hellaswag" / "hellaswag_val_full.txt.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold index, 4 endings)")
    items = []
    for start in range(0, len(lines), 6):
        context, gold, *endings = lines[start : start + 6]
        items.append({
            "query": _hellaswag_clean(context),
            "choices": [_hellaswag_clean(e) for e in endings],
            "label": int(gold),
        })
    pool = items[-HELLASWAG_FEWSHOT_POOL:]
    source = f"hellaswag validation (text format); the last {HELLASWAG_FEWSHOT_POOL} items are the few-shot pool"
    config = _multiple_choice("{{query}}", "choices", _MC_NORM_METRICS, source, target="{{label}}")
    return items[:-HELLASWAG_FEWSHOT_POOL], pool, config


def _openbookqa(eval_dir: Path):
    path = eval_dir / "openbookqa" / "test.json"
    docs = json.loads(_read_text(path))
    items = []
    for i, doc in enumerate(docs):
        match = _OBQA_PATTERN.match(doc["instruction"])
        answer = re.fullmatch(r"answer([1-4])", doc.get("answer", "").strip())
        if match is None or answer is None:
            raise ValueError(f"{path}: item {i} is not in the expected instruction format")
        items.append({
            "question_stem": match["q"].strip(),
            "choices": [match[f"a{k}"].strip() for k in range(1, 5)],
            "label": int(answer.group(1)) - 1,
        })
    config = _multiple_choice("question_stem", "{{choices}}", _MC_NORM_METRICS,
                              "openbookqa test (parsed from an instruction-formatted copy)")
    return items, None, config


def _gsm8k(eval_dir: Path):
    folder = eval_dir / "gsm8k"
    keep = ("question", "answer")
    test = [{k: d[k] for k in keep} for d in _read_jsonl(folder / "test.jsonl")]
    train = [{k: d[k] for k in keep} for d in _read_jsonl(folder / "train.jsonl")]
    config = {
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "metric_list": [{
            "metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
            "ignore_punctuation": False, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
        }],
        "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0},
        "repeats": 1,
        "filter_list": [
            {"name": "strict-match", "filter": [
                {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [
                {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                {"function": "take_first"}]},
        ],
        "metadata": {"version": 3.0, "source": "openai grade-school-math test; few-shot from train"},
    }
    return test, train, config


def _mmlu(folder: Path, output_dir: Path, per_subject: int | None, only: list[str] | None, shots: int,
          rng: random.Random, result: LocalTasks) -> None:
    subjects = sorted(p.name[: -len("_test.csv")] for p in (folder / "test").glob("*_test.csv"))
    if not subjects:
        raise FileNotFoundError(f"{folder / 'test'} has no <subject>_test.csv files")
    if only is not None:
        unknown = sorted(set(only) - set(subjects))
        if unknown or not only:
            raise ValueError(f"unknown MMLU subject(s) {unknown or only}; known: {', '.join(subjects)}")
        subjects = sorted(set(only))
    subtasks = []
    scored = total = 0
    for subject in subjects:
        test = _read_mmlu_csv(folder / "test" / f"{subject}_test.csv")
        dev = _read_mmlu_csv(folder / "dev" / f"{subject}_dev.csv")
        total += len(test)
        test = _subsample(test, per_subject, rng)
        scored += len(test)
        task = f"{MMLU_GROUP}_{subject}"
        files = {
            "test": _write_jsonl(output_dir / f"{task}.jsonl", test),
            "dev": _write_jsonl(output_dir / f"{task}_dev.jsonl", dev),
        }
        words = subject.replace("_", " ")
        _write_yaml(output_dir / f"{task}.yaml", {
            "task": task,
            "task_alias": subject,
            **_json_dataset(files),
            "test_split": "test",
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            **({"num_fewshot": shots} if shots else {}),
            "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about {words}.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                           "D. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "answer",
            "metric_list": _MC_METRICS,
            "metadata": {"version": 1.0, "source": f"mmlu {subject} test; dev for few-shot"},
        })
        subtasks.append(task)
    _write_yaml(output_dir / f"{MMLU_GROUP}.yaml", {
        "group": MMLU_GROUP,
        "task": subtasks,
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 2},
    })
    result.sizes[MMLU_GROUP], result.totals[MMLU_GROUP], result.subjects = scored, total, subjects


def _read_mmlu_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [
        {"question": r["question"], "choices": [r[f"choice{k}"] for k in range(4)], "answer": int(r["answer"])}
        for r in rows
    ]


# ---------------------------------------------------------------------------------------- helpers


def _subsample(items: list, limit: int | None, rng: random.Random) -> list:
    """A seeded random subset of at most ``limit`` items, in their original order."""
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(rng.sample(range(len(items)), limit))]


def _json_dataset(files: dict[str, str]) -> dict:
    return {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}}


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected the layout of ../shared/data; see its README)")
    return path.read_text(encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]


def _write_jsonl(path: Path, items: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    return str(path.resolve())


def _write_yaml(path: Path, config: dict) -> None:
    """lm-eval reads YAML; JSON is valid YAML, and keeps the prompt templates' escapes exact."""
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
