"""``python -m bench.suite``: its helpers, and the whole comparison end to end on a tiny model (the pipeline, not the
numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import suite

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_counts_projection_order_and_shuffles():
    summary = {"prose": {"skipped_per_token": 7.4}, "code": {"skipped_per_token": 7.0},
               "mix": {"skipped_per_token": 7.25}}
    assert suite.counts_for(summary) == [7, 8]
    routing = {"layers": {"4": {"kept": 1.0}, "9": {"kept": 0.0}, "17": {"kept": 0.6}, "6": {"kept": 0.0}}}
    assert suite.projection_order(routing) == [9, 6, 17, 4]  # least kept first, ties: the later layer first
    keep = {4: torch.tensor([True, False, True, True, False]), 9: torch.tensor([False] * 5)}
    mixed = suite.shuffled(keep, seed=0)
    assert sorted(mixed[4].tolist()) == sorted(keep[4].tolist()) and not mixed[9].any()
    assert all(torch.equal(mixed[i], suite.shuffled(keep, seed=0)[i]) for i in keep)  # seeded
    decoded = suite.decode_keep(suite.encode_keep(keep))
    assert set(decoded) == set(keep) and all(torch.equal(decoded[i], keep[i]) for i in keep)


def test_first_order_bounds_order_the_routings_at_one_budget():
    from mindskip_ext.eval.headroom import SkipCosts

    gen = torch.Generator().manual_seed(0)
    n, layers = 12, [3, 4, 5, 6]
    costs = SkipCosts(layers, torch.rand(n, len(layers), generator=gen, dtype=torch.float64) * 10,
                      torch.full((n,), 10))
    inputs = {i: torch.randn(n, 8, generator=gen) for i in layers}
    lengths = torch.full((n,), 10)
    owner = ["a"] * 6 + ["b"] * 6
    routers = {i: torch.rand(n, generator=gen) < 0.6 for i in layers}
    bounds, routings = suite.first_order_bounds(costs, inputs, lengths, owner, 2.0, [6, 5, 4, 3], routers)
    mix = {label: by_domain["mix"] for label, by_domain in bounds.items()}
    assert all(abs(mix[k]["skips"] - 2.0) < 1e-9 for k in mix if k != "routers")  # one budget for all
    cost = {k: v["cost"] for k, v in mix.items()}
    assert cost["oracle"] <= cost["oracle, fixed count"] <= cost["domain static"] <= cost["best static"] + 1e-12
    assert cost["best static"] <= cost["projection"] + 1e-12
    fixed = torch.stack([~routings["oracle, fixed count"][i] for i in layers], 1)
    assert (fixed.sum(1) == 2).all()  # every sequence its own two cheapest layers
    assert torch.equal(fixed, costs.costs <= costs.costs.sort(1).values[:, 1:2])
    assert set(routings) == {"linear (log)", "linear", "oracle, fixed count", "oracle", "routers"}
    assert set(suite.SCORED_BOUNDS.values()) <= set(routings)


def test_cached_results_are_computed_again_only_for_another_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"value": torch.arange(3) * len(calls)}

    path = tmp_path / "w" / "x.pt"
    first = suite.cached(path, {"tokens": [[1, 2]]}, compute)
    again = suite.cached(path, {"tokens": [[1, 2]]}, compute)
    assert len(calls) == 1 and torch.equal(first["value"], again["value"])
    other = suite.cached(path, {"tokens": [[1, 3]]}, compute)
    assert len(calls) == 2 and torch.equal(other["value"], torch.arange(3) * 2)


@pytest.mark.hf
@pytest.mark.skipif(not (DATA_DIR / "eval").is_dir(), reason="needs the shared data (../shared/data)")
def test_routers_are_read_from_the_router_presets_folder(tmp_path):
    """``--router-preset small`` scores ``bench.pareto --preset small``'s routers (e.g. Gemma 3 270M's) without
    training any: its folder and its results' training-data routing."""
    import mindskip_ext as msk
    from bench.experiment import load_model

    args = suite.parse_args(["--data-dir", str(DATA_DIR), "--router-preset", "small"])
    assert (args.preset, args.router_preset) == ("default", "small")
    assert suite.parse_args(["--data-dir", str(DATA_DIR), "--smoke"]).router_preset == "smoke"
    base, tokenizer, _ = load_model(True, None, DATA_DIR, 0)
    name = f"{suite.DEFAULT_RECIPE}@0.25"
    model = msk.get_mindskip_model(base, msk.MindSkipConfig())
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.normal_()
    saved = {i: r.weight.clone() for i, r in model.routers.items()}
    model.save_pretrained(tmp_path / "pareto_routers" / "small" / name)
    model.unload()
    entry = {"routing_train": {"layers": {"3": {"kept": 0.5}}}}
    (tmp_path / "pareto.json").write_text(json.dumps({"models": {name: entry}}))
    args.output = tmp_path

    def no_training_data():
        raise AssertionError("the routers were trained again")

    loaded, found = suite.routers_of(None, args, base, tokenizer, suite.DEFAULT_RECIPE, 0.25, no_training_data)
    assert found == entry and set(loaded.routers) == set(saved)
    assert all(torch.equal(loaded.routers[i].weight, w) for i, w in saved.items())
    loaded.unload()


@pytest.mark.skipif(not (DATA_DIR / "eval").is_dir(), reason="needs the shared data (../shared/data)")
def test_bad_arguments_are_refused_by_name(capsys):
    for argv in (["--ratios", "0.25,1"], ["--ratios", "x"], ["--ratios", ","], ["--recipes", "nope"],
                 ["--smoke", "--model", "m"]):
        with pytest.raises(SystemExit):
            suite.parse_args(["--data-dir", str(DATA_DIR), *argv])
    assert "--smoke builds its own tiny model" in capsys.readouterr().err
    for argv, message in ((["--token-routers", str(DATA_DIR)], "not a router folder"),
                          (["--token-routers", str(DATA_DIR), "--ratios", "0.25,0.375"], "one recipe at one ratio"),
                          (["--resume-from", str(DATA_DIR / "nothing.json")], "no results file")):
        with pytest.raises(SystemExit):
            suite.parse_args(["--data-dir", str(DATA_DIR), *argv])
        assert message in capsys.readouterr().err
    assert suite.parse_args(["--data-dir", str(DATA_DIR), "--ratios", "0.375,0.25,0.25"]).ratios == [0.25, 0.375]


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "eval").is_dir(), reason="needs the shared data (../shared/data)")
def test_the_smoke_run_compares_every_model_on_the_same_sequences(tmp_path):
    common = ["--smoke", "--data-dir", str(DATA_DIR), "--output", str(tmp_path), "--work-dir", str(tmp_path / "w")]
    # The recipe's routers are trained by bench.pareto's code when missing; cost-supervised ones fit alone.
    assert suite.main([*common, "--recipes", "path+wide+mix4+margin+cost", "--costs", "--threads", "1"]) == 0
    results = json.loads((tmp_path / "suite.json").read_text())
    models, owner = results["models"], results["meta"]["owner"]
    name = "path+wide+mix4+margin+cost@0.25"
    assert models[name]["kind"] == "routed" and models[name]["cost_fit"]["sequences"] == 16
    assert {e["kind"] for e in models.values()} == {"dense", "routed", "shuffled", "static-projection",
                                                    "attention-drop", *suite.SCORED_BOUNDS}
    assert all(len(e["scores"]["nll"]) == len(owner) for e in models.values())
    counts = suite.counts_for(models[name]["summary"])
    assert {e["count"] for e in models.values() if e["kind"] == "static-projection"} == set(counts)
    assert {(e["scope"], e["count"]) for e in models.values() if e["kind"] == "attention-drop"} >= {
        ("all", c) for c in counts if c > 0}
    compared = results["meta"]["comparisons"][name]
    assert set(compared["vs_projection"]) == {"prose", "instructions", "math", "code", "mix"}
    assert set(compared["vs_attention_drop"]) == {"mix4"}
    head = models[name]["headroom"]["domains"]
    assert all(h["oracle"] <= h["static"] + 1e-6 for h in head.values())
    assert all(compared[f"{kind}_vs_projection"] for kind in suite.SCORED_BOUNDS)
    report = (tmp_path / "suite.md").read_text()
    assert "against its static projection" in report and "| mix |" in report
    # The report is written again from the results alone, and a resumed run scores nothing again.
    assert suite.main([*common, "--report-only"]) == 0
    assert (tmp_path / "suite.md").read_text() == report
    assert suite.main([*common, "--recipes", "path+wide+mix4+margin+cost", "--costs", "--resume"]) == 0
    again = json.loads((tmp_path / "suite.json").read_text())
    assert not [k for k in again["timings"] if k.startswith(("evaluate", "train")) and k not in results["timings"]]


@pytest.mark.slow
@pytest.mark.hf
@pytest.mark.skipif(not (DATA_DIR / "eval").is_dir(), reason="needs the shared data (../shared/data)")
def test_the_smoke_run_scores_token_routers_beside_the_sequence_variant(tmp_path):
    import mindskip_ext as msk
    from bench.experiment import load_model

    base, _, _ = load_model(True, None, DATA_DIR, 0)
    for routing in ("token", "sequence"):
        model = msk.get_mindskip_model(base, msk.MindSkipConfig(routing=routing))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for router in model.routers.values():
                router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
            constant = min(model.routers)
            model.routers[constant].weight.zero_()  # skips every token: routed per sequence in the hybrid
            model.routers[constant].bias.fill_(-20.0)
        model.save_pretrained(tmp_path / routing)
        model.unload()
    common = ["--smoke", "--data-dir", str(DATA_DIR), "--work-dir", str(tmp_path / "w"), "--threads", "1"]
    first = tmp_path / "first"
    assert suite.main([*common, "--output", str(first), "--token-routers", str(tmp_path / "token")]) == 0
    results = json.loads((first / "suite.json").read_text())
    models, owner = results["models"], results["meta"]["owner"]
    name = f"{suite.DEFAULT_RECIPE}@0.25 token"
    assert {e["kind"] for e in models.values()} == {"dense", "token-routed", "token-static", "token-shuffled",
                                                    "attention-drop"}
    token, hybrid = models[name], models[f"{name} hybrid"]
    # The hybrid routes the constant layer per sequence: the same losses, and no KV cache there.
    assert set(hybrid["token_layers"]) == set(map(int, token["kept_train"])) - {constant}
    assert hybrid["scores"]["nll"] == pytest.approx(token["scores"]["nll"], rel=1e-5)
    assert set(token["kept_train"]) == set(token["kept"]["mix"]) and 0 < token["summary"]["mix"][
        "skipped_per_token"] < results["meta"]["num_layers"]
    # The input-independent decisions at the suite's fractions spend about the routers' compute.
    assert models[f"{name} shuffled"]["summary"]["mix"]["skipped_per_token"] == pytest.approx(
        token["summary"]["mix"]["skipped_per_token"], abs=0.1)
    compared = results["meta"]["token_comparisons"][name]
    assert set(compared["vs_static"]) == set(compared["vs_attention_drop"]["mix"]) == {*owner, "mix"}
    assert "vs_sequence" not in compared
    layers = results["meta"]["num_layers"]
    assert all(k == layers for k in compared["kv_layers"].values())  # every token-routed layer stores every token
    mixed = results["meta"]["token_comparisons"][f"{name} hybrid"]
    assert all(k == pytest.approx(layers - 1) for k in mixed["kv_layers"].values())
    assert mixed["vs_token"]["mix"]["ratio"] == pytest.approx(0.0, abs=1e-5) and "vs_static" in mixed
    # A sequence variant from another run (here: the dense scores under its name, with a training-data routing that
    # ranks its projection) is reused with --resume-from; the token models are not scored again.
    seq = f"{suite.DEFAULT_RECIPE}@0.25"
    layers = {i: {"kept": 1.0 - 0.1 * int(i)} for i in token["kept_train"]}
    models[seq] = {**models["dense"], "kind": "routed", "recipe": suite.DEFAULT_RECIPE, "ratio": 0.25,
                   "router_dir": "x", "routing_train": {"layers": layers}, "decisions": {}}
    (first / "suite.json").write_text(json.dumps(results))
    second = tmp_path / "second"
    assert suite.main([*common, "--output", str(second), "--token-routers", str(tmp_path / "token"),
                       "--resume-from", str(first / "suite.json")]) == 0
    again = json.loads((second / "suite.json").read_text())
    scored = [k for k in again["timings"] if k.startswith("evaluate") and k not in results["timings"]]
    counts = suite.counts_for(token["summary"])
    assert sorted(scored) == sorted(f"evaluate {suite.DEFAULT_RECIPE}-static@0.25/{c}" for c in counts)
    compared = again["meta"]["token_comparisons"][name]
    assert set(compared["vs_sequence"]) == set(compared["vs_projection"]) == {*owner, "mix"}
    assert "against the sequence variant" in (second / "suite.md").read_text()
    # Sequence routers are refused by name.
    with pytest.raises(SystemExit, match="holds sequence routers"):
        suite.main([*common, "--output", str(tmp_path / "third"), "--token-routers", str(tmp_path / "sequence")])
