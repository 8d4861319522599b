"""lm-eval integration: a local task (no hub) through stock lm-eval, capacity per task, exact routing under
batching."""

from __future__ import annotations

import pytest
import torch

import mindskip_ext as msk

pytest.importorskip("lm_eval", reason="the lm-eval integration needs the eval extra (pip install mindskip_ext[eval])")

from mindskip_ext.eval.harness import PAPER_TASKS, parse_tasks, run_lm_eval  # noqa: E402
from mindskip_ext.testing import tiny_model

from tiny import DATA_DIR

TASKS_DIR = DATA_DIR / "lm_eval_tasks"
TASK_A, TASK_B = "mindskip_tiny_choice", "mindskip_tiny_choice_qa"


@pytest.fixture
def in_task_dir(monkeypatch):
    monkeypatch.chdir(TASKS_DIR)  # the task YAMLs name their data file relative to the working directory


def routed_model(tok):
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=6), msk.MindSkipConfig())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 3.0)
    return model


def evaluate(model, tok, tasks, batch_size=8):
    return run_lm_eval(model, tok, tasks, batch_size=batch_size, include_path=str(TASKS_DIR), include_defaults=False)[
        "tasks"
    ]


def test_parse_tasks():
    assert parse_tasks("paper") == list(PAPER_TASKS)
    assert dict(PAPER_TASKS) == {
        "boolq": 0, "rte": 0, "openbookqa": 0, "piqa": 0, "mmlu": 5, "winogrande": 5, "gsm8k": 5,
        "hellaswag": 10, "arc_challenge": 25,
    }
    assert parse_tasks("piqa, boolq", num_fewshot=3) == [("piqa", 3), ("boolq", 3)]
    assert parse_tasks("mmlu:5,piqa") == [("mmlu", 5), ("piqa", None)]
    with pytest.raises(ValueError, match="NAME:SHOTS"):
        parse_tasks("mmlu:five")
    with pytest.raises(ValueError, match="no task"):
        parse_tasks(" , ")


def test_local_task_reports_accuracy_and_capacity(tok, in_task_dir):
    model = routed_model(tok)
    report = evaluate(model, tok, [(TASK_A, 0)])[TASK_A]
    assert report["num_fewshot"] == 0
    assert report["metric"] == "acc_norm,none" and 0.0 <= report["score"] <= 1.0
    assert 0.0 < report["capacity"] < 1.0
    assert set(report["capacity_per_layer"]) == {str(i) for i in model.routers}
    assert not model.base_model._forward_hooks and not model.base_model._forward_pre_hooks


def test_batching_does_not_change_scores_or_routing(tok, in_task_dir):
    model = routed_model(tok)
    one = evaluate(model, tok, [(TASK_A, 0)], batch_size=1)[TASK_A]
    many = evaluate(model, tok, [(TASK_A, 0)], batch_size=8)[TASK_A]
    assert many["capacity_per_layer"] == one["capacity_per_layer"]
    assert many["metrics"] == one["metrics"]


def test_capacity_is_attributed_to_each_task(tok, in_task_dir):
    model = routed_model(tok)
    both = evaluate(model, tok, [(TASK_A, 0), (TASK_B, 0)])
    alone_a = evaluate(model, tok, [(TASK_A, 0)])[TASK_A]
    alone_b = evaluate(model, tok, [(TASK_B, 0)])[TASK_B]
    assert both[TASK_A]["capacity_per_layer"] == alone_a["capacity_per_layer"]
    assert both[TASK_B]["capacity_per_layer"] == alone_b["capacity_per_layer"]
    assert alone_a["capacity_per_layer"] != alone_b["capacity_per_layer"]


def test_dense_model_has_no_capacity(tok, in_task_dir):
    report = evaluate(tiny_model(tokenizer=tok, layers=6), tok, [(TASK_A, 0)])[TASK_A]
    assert report["capacity"] is None and report["capacity_per_layer"] == {}
    assert "score" in report
