"""``python -m bench.pareto --smoke``: both stages end to end on a tiny model (the pipeline, not the numbers)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import pareto
from bench.pareto_report import best_recipe, drop_at, measured_skip_ratio, skipped_per_sequence
from mindskip_ext.training import SUMMARY_NAME

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
RECIPES = "paper,kd+init+wide,kd+init+wide+hold+slow,kd+joint+wide+hold+slow+mix+margin+centre"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA_DIR / "eval").is_dir(), reason="needs the shared evaluation data (../shared/data)"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("pareto"), tmp_path_factory.mktemp("work")
    common = ["--smoke", "--data-dir", str(DATA_DIR), "--output", str(out), "--work-dir", str(work)]
    ablation_args = ["--stage", "ablation", "--recipes", RECIPES, "--ratios", "0.25,0.125"]
    assert pareto.main([*common, *ablation_args]) == 0
    ablation = json.loads((out / "pareto.json").read_text())
    assert pareto.main([*common, "--stage", "pareto", "--resume"]) == 0
    return out, ablation, json.loads((out / "pareto.json").read_text())


def test_ablation_trains_the_recipes_at_the_ablation_ratios(results):
    out, ablation, _ = results
    models, num_layers = ablation["models"], ablation["meta"]["num_layers"]
    assert ablation["meta"]["ratios"] == [0.125, 0.25]
    nominal = {f"{method}@{ratio}" for ratio in (0.125, 0.25)
               for method in ("paper", "kd+init+wide", "kd+init+wide-static", "kd+init+wide+hold+slow",
                              "kd+init+wide+hold+slow-static", "kd+joint+wide+hold+slow+mix+margin+centre",
                              "kd+joint+wide+hold+slow+mix+margin+centre-static", "attention-drop-all",
                              "attention-drop-restricted")}
    matched = {name for name, e in models.items() if e.get("matched")}
    assert nominal | {"dense"} | matched == set(models)
    # Attention-Drop at the whole layer counts around every MindSkip model's skips, on both sets, and the
    # report's comparison at the same skip ratio from them.
    drops = {len(e["dropped_layers"]) for e in models.values() if e.get("scope") == "all"}
    restricted = {len(e["dropped_layers"]) for e in models.values() if e.get("scope") == "restricted"}
    rows = {r["model"]: r for r in ablation["meta"]["matched"]}
    assert set(rows) == {n for n, e in models.items() if e["kind"] == "mindskip"}
    for name, row in rows.items():
        for where in ("wikitext2", "heldout"):
            skipped = skipped_per_sequence(models[name], where)
            assert row[where]["skip_ratio"] == pytest.approx(skipped / num_layers)
            around = {math.floor(skipped), math.ceil(skipped)} - {0}
            assert around <= drops
            assert {c for c in around if c <= len(ablation["meta"]["layer_sets"]["paper"])} <= restricted
            assert row[where]["drop_loss"] is not None
            assert row[where]["minus_drop"] == pytest.approx(row[where]["loss"] - row[where]["drop_loss"])
    report = (out / "pareto_ablation.md").read_text()  # the Pareto stage's report is pareto.md
    assert "## At the same skip ratio as Attention-Drop" in report
    assert ("| kd+joint+wide+hold+slow+mix+margin+centre | kd, joint init with a margin layer, wide layers (1..6), "
            "mix, centred router inputs, multiplier from 1, lr 0.0005, 4 steps |") in report  # the smoke preset's cap
    margin = models["kd+joint+wide+hold+slow+mix+margin+centre@0.25"]["router_init"]
    assert margin["margin"] == margin["path"][-1]["layer"] not in margin["skipped_layers"]
    # The headroom of per-sequence routing at each model's own budget, over its own router layers.
    for name in rows:
        h, routing = models[name]["headroom_heldout"], models[name]["routing_heldout"]
        assert h["layers"] == models[name]["layers"]
        assert h["skips_per_sequence"] == pytest.approx(routing["skipped_layers_per_sequence"], abs=1e-5)
        assert h["oracle"] <= h["static"] + 1e-6 and h["oracle"] <= h["routers"] + 1e-6
    assert "## How much could per-sequence routing gain?" in report
    best = ablation["meta"]["best_recipe"]
    assert best == best_recipe(models) and best in RECIPES.split(",")
    wide = models["kd+init+wide@0.25"]
    assert wide["recipe"] == asdict(pareto.Recipe(loss="kd", init="redundancy", layers="wide"))
    hold = json.loads((out / models["kd+init+wide+hold+slow@0.25"]["router_dir"] / SUMMARY_NAME).read_text())
    assert hold["config"]["initial_multiplier"] == 1.0 and hold["config"]["learning_rate"] == 5e-4
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
    assert "## Pareto: every method at each skip ratio" in text and "(pareto_ablation.md)" in text
    assert "## Recipes at" not in text  # the ablation's first blocks are not mixed with the whole split
    whole = models["dense"]["wikitext2"]["target_tokens"]
    assert whole > ablation["models"]["dense"]["wikitext2"]["target_tokens"]
    for name, e in models.items():  # the table has every model on the whole split, and only those
        assert (f"| {name} |" in text) == (e["wikitext2"]["target_tokens"] == whole), name
    assert {r["model"] for r in final["meta"]["matched"]} == {
        name for name, e in models.items() if e["kind"] == "mindskip" and e["wikitext2"]["target_tokens"] == whole}
    assert (out / "pareto_ppl.png").stat().st_size > 0 and (out / "pareto_acc.png").stat().st_size > 0
    if best != "paper":
        assert [c["ratio"] for c in final["meta"]["goal_checks"]] == list(pareto.RATIOS)


def test_a_fresh_clone_resumes_from_the_committed_results_and_routers(results, tmp_path, monkeypatch):
    """What a later session has: the committed pareto.json and router folders, no partial results, no work dir."""
    import shutil

    from mindskip_ext.training import RouterTuner

    out, ablation, _ = results
    clone = tmp_path / "results"
    clone.mkdir()
    (clone / "pareto.json").write_text(json.dumps(ablation))  # the ablation's: the Pareto stage's would be refused
    shutil.copytree(out / "pareto_routers", clone / "pareto_routers")

    def no_training(self, *args, **kwargs):
        raise AssertionError("a committed router folder was trained again")

    monkeypatch.setattr(RouterTuner, "train", no_training)
    argv = ["--smoke", "--data-dir", str(DATA_DIR), "--output", str(clone), "--work-dir", str(tmp_path / "work"),
            "--stage", "ablation", "--recipes", "kd+init+wide", "--resume"]
    assert pareto.main(argv) == 0
    again = json.loads((clone / "pareto.json").read_text())
    name = "kd+init+wide@0.25"
    assert again["models"][name]["wikitext2"] == ablation["models"][name]["wikitext2"]  # not evaluated again
    assert again["models"][name]["router_dir"] == f"pareto_routers/smoke/{name}"
    with pytest.raises(SystemExit, match="no partial results at .* and no finished results at "):
        pareto.main([*argv[:4], str(tmp_path / "empty"), *argv[5:]])


def test_the_ablation_refuses_results_of_the_pareto_stage(results, tmp_path):
    """It ranks on the first blocks: run over the Pareto stage's results it would put them in place of the whole
    split's perplexities."""
    out, _, _ = results
    before = (out / "pareto.partial.json").read_bytes()
    argv = ["--smoke", "--data-dir", str(DATA_DIR), "--output", str(out), "--work-dir", str(tmp_path / "work"),
            "--stage", "ablation", "--recipes", "paper", "--resume"]
    with pytest.raises(SystemExit, match=r"--stage ablation: .*dense.* on the whole WikiText-2 split .*own --output"):
        pareto.main(argv)
    assert (out / "pareto.partial.json").read_bytes() == before


def test_a_recipe_may_cap_its_steps_and_init_sequences():
    joint = pareto.RECIPES["kd+joint+wide+hold+slow+mix+short"]
    full = pareto.tuning_config(joint, pareto.PRESETS["default"], 0.85)
    assert (full.router_init, full.max_steps, full.router_init_sequences, full.calibration_sequences) == (
        "joint", 48, 32, 128)
    smoke = pareto.tuning_config(joint, pareto.PRESETS["smoke"], 0.85)
    assert (smoke.max_steps, smoke.router_init_sequences) == (4, 16)  # the smoke preset's caps win
    paper = pareto.tuning_config(pareto.RECIPES["paper"], pareto.PRESETS["default"], 0.5)
    assert paper.max_steps is None and paper.router_init_sequences is None and paper.router_init == "zero"


def test_the_small_preset_caps_the_recipe_and_scores_no_tasks(tmp_path, monkeypatch):
    joint = pareto.RECIPES["kd+joint+wide+hold+slow+mix+margin+centre"]
    small = pareto.tuning_config(joint, pareto.PRESETS["small"], 0.7)
    assert (small.max_steps, small.router_init_sequences, small.batch_size) == (30, 8, 4)
    assert pareto.parse_args(["--data-dir", str(DATA_DIR), "--preset", "small"]).preset == "small"
    # A preset without tasks evaluates the perplexity and held-out loss only, also for the better drop scope.
    monkeypatch.setitem(pareto.PRESETS, "smoke", dataclasses.replace(pareto.PRESETS["smoke"], tasks=False))
    argv = ["--smoke", "--data-dir", str(DATA_DIR), "--output", str(tmp_path / "out"), "--work-dir",
            str(tmp_path / "work"), "--stage", "pareto", "--ratios", "0.375", "--methods", "attention-drop", "--best",
            "paper"]
    assert pareto.main(argv) == 0
    models = json.loads((tmp_path / "out" / "pareto.json").read_text())["models"]
    assert set(models) == {"dense", "attention-drop-all@0.375", "attention-drop-restricted@0.375"}
    assert all("heldout" in m and "wikitext2" in m and "tasks" not in m for m in models.values())


def test_attention_drop_is_interpolated_between_layer_counts():
    def drop(count, wiki, heldout):
        return {"kind": "attention-drop", "scope": "all", "dropped_layers": list(range(count)),
                "wikitext2": {"loss": wiki, "target_tokens": 100}, "heldout": {"loss": heldout}}

    models = {"dense": {"kind": "dense", "wikitext2": {"loss": 3.0, "target_tokens": 100}, "heldout": {"loss": 1.0}},
              "a": drop(1, 3.2, 1.1), "b": drop(2, 3.6, 1.5),
              "r": {**drop(3, 9.0, 9.0), "scope": "restricted"}}
    assert drop_at(models, 1.25, "wikitext2", 100) == pytest.approx(3.3)
    assert drop_at(models, 0.5, "heldout") == pytest.approx(1.05)
    assert drop_at(models, 2.0, "heldout") == pytest.approx(1.5)
    assert drop_at(models, 1.5, "wikitext2", 200) is None  # evaluated on other tokens
    assert drop_at(models, 3.5, "heldout") is None  # 4 layers not evaluated
    assert drop_at(models, 2.5, "heldout") == pytest.approx(1.5 + 0.5 * 7.5)  # 3 layers: the restricted scope only
    models["r2"] = {**drop(2, 3.5, 1.3), "scope": "restricted"}  # better than all layers at 2 on held-out only
    assert drop_at(models, 1.5, "heldout") == pytest.approx(1.2)
    assert drop_at(models, 1.5, "wikitext2", 100) == pytest.approx(3.35)


def test_the_best_recipe_is_ranked_at_its_own_skip_ratio():
    def entry(kind, wiki, heldout, skipped, **extra):
        e = {"kind": kind, "wikitext2": {"loss": wiki, "target_tokens": 100}, "heldout": {"loss": heldout}, **extra}
        if kind == "attention-drop":
            e.update(scope="all", dropped_layers=list(range(skipped)))
        else:
            e["wikitext2"]["skipped_layers_per_sequence"] = skipped
            e["routing_heldout"] = {"skipped_layers_per_sequence": skipped}
        return e

    mindskip = {"kind": "mindskip", "ratio": 0.25, "ablation": {}}
    models = {"dense": entry("dense", 3.0, 1.0, 0), "d1": entry("attention-drop", 3.2, 1.2, 1),
              "d2": entry("attention-drop", 3.6, 1.6, 2),
              # lower losses, but it skips one layer where the other skips two: worse than Attention-Drop there
              "less@0.25": {**entry("mindskip", 3.3, 1.3, 1), **mindskip},
              "more@0.25": {**entry("mindskip", 3.5, 1.5, 2), **mindskip}}
    assert best_recipe(models) == "more"
    models["tied@0.25"] = {**entry("mindskip", 3.5, 1.5, 2), **mindskip}
    assert best_recipe(models) == "more"  # a tie goes to the first name
    models["d2"]["heldout"] = None  # held-out not evaluated at 2 layers: the recipes there rank last
    assert best_recipe(models) == "less"


@pytest.mark.parametrize("argv, message", [
    (["--ratios", "0.1,x"], "comma-separated numbers"),
    (["--ratios", "1.5"], "skip ratios in (0, 1)"),
    (["--stage", "pareto", "--ratios", "0.125,0.2"], "the Pareto stage runs some of 0.125, 0.25, 0.375"),
    (["--merge-only"], "--merge-only needs at least one --merge DIR"),
    (["--methods", "best,dropout"], "--methods takes some of attention-drop, paper, best, static, matched, got drop"),
    (["--methods", ","], "got none"),
    (["--drop-scopes", "all,some"], "--drop-scopes takes some of all, restricted, got some"),
    (["--recipes", "paper,kd+nope"], "--recipes takes some of paper, "),
    (["--recipes", "paper,kd+nope"], "got kd+nope"),
    (["--smoke", "--preset", "small"], "--smoke is its own preset; drop --preset"),
])
def test_bad_ratios_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        pareto.parse_args(["--data-dir", str(DATA_DIR), *argv])
    assert message in capsys.readouterr().err


def test_the_pareto_stage_takes_a_subset_of_its_ratios():
    args = pareto.parse_args(["--data-dir", str(DATA_DIR), "--stage", "pareto", "--ratios", "0.375"])
    assert args.ratios == [0.375]
    assert pareto.parse_args(["--data-dir", str(DATA_DIR), "--stage", "pareto"]).ratios == list(pareto.RATIOS)
    assert pareto.parse_args(["--data-dir", str(DATA_DIR)]).ratios == list(pareto.RATIOS)
    assert pareto.parse_args(["--data-dir", str(DATA_DIR), "--stage", "ablation"]).ratios == [pareto.ABLATION_RATIO]


@pytest.mark.parametrize("scopes", ["all,restricted", "all"])
def test_the_pareto_stage_runs_only_the_methods_asked_for(tmp_path, scopes):
    """Attention-Drop alone at one ratio: its scopes on the whole split, the tasks for the better one, no router
    trained and no matched drop."""
    argv = ["--smoke", "--data-dir", str(DATA_DIR), "--output", str(tmp_path / "out"), "--work-dir",
            str(tmp_path / "work"), "--stage", "pareto", "--ratios", "0.375", "--methods", "attention-drop",
            "--best", "paper", "--drop-scopes", scopes]
    assert pareto.main(argv) == 0
    models = json.loads((tmp_path / "out" / "pareto.json").read_text())["models"]
    drops = {f"attention-drop-{scope}@0.375" for scope in scopes.split(",")}
    assert set(models) == {"dense"} | drops
    assert sum("tasks" in models[name] for name in drops) == 1
    assert not (tmp_path / "out" / "pareto_routers").exists()


def test_an_evaluation_interrupted_in_the_tasks_keeps_its_losses(tmp_path, monkeypatch):
    """The tasks run last: a run stopped in them has the perplexity and held-out loss saved, and a resume adds only
    the tasks."""
    import mindskip_ext.eval.harness as harness
    import mindskip_ext.eval.perplexity as perplexity

    out = tmp_path / "out"
    argv = ["--smoke", "--data-dir", str(DATA_DIR), "--output", str(out), "--work-dir", str(tmp_path / "work"),
            "--stage", "pareto", "--ratios", "0.375", "--methods", "attention-drop", "--best", "paper",
            "--drop-scopes", "all"]
    run_lm_eval = harness.run_lm_eval

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_lm_eval", stopped)
    with pytest.raises(KeyboardInterrupt):
        pareto.main(argv)
    dense = json.loads((out / "pareto.partial.json").read_text())["models"]["dense"]
    assert dense["wikitext2"]["target_tokens"] > 0 and dense["heldout"]["loss"] > 0
    assert "tasks" not in dense

    def scored_again(*args, **kwargs):
        raise AssertionError("a saved loss was evaluated again")

    monkeypatch.setattr(harness, "run_lm_eval", run_lm_eval)
    monkeypatch.setattr(perplexity, "evaluate_examples", scored_again)
    with pytest.raises(AssertionError, match="evaluated again"):  # the Attention-Drop model has no losses yet
        pareto.main([*argv, "--resume"])
    resumed = json.loads((out / "pareto.partial.json").read_text())["models"]["dense"]
    assert resumed["wikitext2"] == dense["wikitext2"] and resumed["heldout"] == dense["heldout"]
    assert set(resumed["tasks"]) == set(pareto.TASKS)


def _results(folder: Path, models: dict, timings: dict, name: str = "pareto.partial.json", preset="default"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"preset": preset, "timings": timings, "models": models}))


def test_merging_takes_what_another_run_evaluated_further_with_its_routers(tmp_path, capsys):
    """Two runs of different ratios side by side: the second's models and routers join the first's results."""
    ours, theirs = tmp_path / "results", tmp_path / "side"
    _results(ours, {"dense": {"kind": "dense", "wikitext2": {"target_tokens": 100}, "heldout": {"loss": 1.0}},
                    "x@0.25": {"kind": "mindskip", "wikitext2": {"target_tokens": 100}}},
             {"evaluate dense": 1.0}, name="pareto.json")
    routers = theirs / pareto.router_folder("default", "y@0.375")
    routers.mkdir(parents=True)
    (routers / "routers.safetensors").write_bytes(b"weights")
    _results(theirs, {
        "dense": {"kind": "dense", "wikitext2": {"target_tokens": 100}, "heldout": {"loss": 2.0}},  # not further
        "x@0.25": {"kind": "mindskip", "wikitext2": {"target_tokens": 300}, "tasks": {}},  # the whole split, tasks
        "y@0.375": {"kind": "mindskip", "wikitext2": {"target_tokens": 300}, "router_dir": "/elsewhere/y"},
    }, {"evaluate dense": 9.0, "evaluate x@0.25": 5.0, "train y@0.375": 7.0, "stage": 3.0})
    argv = ["--data-dir", str(DATA_DIR), "--output", str(ours), "--merge", str(theirs), "--merge-only"]
    assert pareto.main(argv) == 0
    merged = json.loads((ours / "pareto.partial.json").read_text())
    assert merged["models"]["dense"]["heldout"] == {"loss": 1.0}
    assert merged["models"]["x@0.25"]["tasks"] == {}
    assert merged["models"]["y@0.375"]["router_dir"] == "pareto_routers/default/y@0.375"
    assert (ours / "pareto_routers/default/y@0.375/routers.safetensors").read_bytes() == b"weights"
    assert merged["timings"] == {"evaluate dense": 1.0, "evaluate x@0.25": 5.0, "train y@0.375": 7.0}
    assert "merged from" in capsys.readouterr().err
    # Merging again takes nothing; the partial results are now where a --resume continues.
    assert pareto.main(argv) == 0
    again = json.loads((ours / "pareto.partial.json").read_text())
    assert (again["models"], again["timings"]) == (merged["models"], merged["timings"])
    assert again["meta"]["merged"] == {str(theirs): []}  # the run's metadata says what this run took: nothing

    with pytest.raises(SystemExit, match="no pareto.partial.json or pareto.json in"):
        pareto.main([*argv[:5], str(tmp_path / "empty"), "--merge-only"])
    _results(tmp_path / "smoke", {}, {}, preset="smoke")
    with pytest.raises(SystemExit, match="is from the 'smoke' preset, not 'default'"):
        pareto.main([*argv[:5], str(tmp_path / "smoke"), "--merge-only"])
