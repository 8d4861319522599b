"""``python -m bench.pareto --smoke``: both stages end to end on a tiny model (the pipeline, not the numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import pareto
from bench.pareto_report import best_recipe, measured_skip_ratio

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA_DIR / "eval").is_dir(), reason="needs the shared evaluation data (../shared/data)"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("pareto"), tmp_path_factory.mktemp("work")
    common = ["--smoke", "--data-dir", str(DATA_DIR), "--output", str(out), "--work-dir", str(work)]
    assert pareto.main([*common, "--stage", "ablation", "--recipes", "paper,kd+init+wide"]) == 0
    ablation = json.loads((out / "pareto.json").read_text())
    assert pareto.main([*common, "--stage", "pareto", "--resume"]) == 0
    return out, ablation, json.loads((out / "pareto.json").read_text())


def test_ablation_trains_the_recipes_at_the_ablation_ratio(results):
    _, ablation, _ = results
    models = ablation["models"]
    assert {"paper@0.25", "kd+init+wide@0.25", "attention-drop-all@0.25", "attention-drop-restricted@0.25",
            "dense"} == set(models)
    best = ablation["meta"]["best_recipe"]
    assert best == best_recipe(models) and best in ("paper", "kd+init+wide")
    wide = models["kd+init+wide@0.25"]
    assert wide["recipe"] == {"loss": "kd", "init": "redundancy", "layers": "wide", "data": "alpaca"}
    assert wide["layers"] == ablation["meta"]["layer_sets"]["wide"]
    assert wide["target_capacity"] == pytest.approx(1 - 0.25 * 8 / len(wide["layers"]))
    assert wide["router_init"]["skipped_layers"]  # it started from the static drop
    for entry in models.values():
        assert "tasks" not in entry and entry["wikitext2"]["perplexity"] > 1 and entry["heldout"]["loss"] > 0


def test_pareto_compares_every_method_at_every_ratio(results):
    out, ablation, final = results
    models, num_layers = final["models"], final["meta"]["num_layers"]
    best = final["meta"]["best_recipe"]
    for ratio in pareto.RATIOS:
        for method in ("paper", best):
            entry = models[f"{method}@{ratio}"]
            assert 0.0 <= entry["avg"] <= 1.0 and entry["avg_stderr"] >= 0.0
            se = [t["stderr"] for t in entry["tasks"].values()]
            assert entry["avg_stderr"] == pytest.approx(sum(x * x for x in se) ** 0.5 / len(se))
            assert set(entry["routing_heldout"]["layers"]) == {str(i) for i in entry["layers"]}
        drops = [models[f"attention-drop-{scope}@{ratio}"] for scope in ("all", "restricted")]
        assert sum("tasks" in d for d in drops) == 1  # the better one by perplexity gets the tasks
        assert all(d["skip_ratio"] == round(ratio * num_layers) / num_layers for d in drops)
        if best != "paper":
            static = models[f"{best}-static@{ratio}"]
            assert static["kind"] == "static-projection" and static["of"] == f"{best}@{ratio}"
            skipped = models[f"{best}@{ratio}"]["routing_train"]["skipped_layers_per_sequence"]
            assert len(static["dropped_layers"]) == round(skipped)
    assert "tasks" in models["dense"] and measured_skip_ratio(models["dense"], num_layers) == 0.0
    # The ablation's models came back from the partial results, not trained again.
    assert models["paper@0.25"]["curves"] == ablation["models"]["paper@0.25"]["curves"]
    text = (out / "pareto.md").read_text()
    assert "## Pareto: every method at each skip ratio" in text and "## Recipes at a 25% skip ratio" in text
    assert (out / "pareto_ppl.png").stat().st_size > 0 and (out / "pareto_acc.png").stat().st_size > 0
    if best != "paper":
        assert [c["ratio"] for c in final["meta"]["goal_checks"]] == list(pareto.RATIOS)
