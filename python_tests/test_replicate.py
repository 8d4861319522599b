"""bench.replicate end to end in its ``--smoke`` configuration (a tiny config model, a handful of items).

Needs the shared data folder (``../shared/data`` beside the clone; ``$MINDSKIP_DATA`` overrides) and skips,
saying so, without it. The full replication is an experiment, not a test.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from bench import replicate

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MINDSKIP_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if not (DATA_DIR / "eval").is_dir():
        pytest.skip(f"the shared data folder is absent ({DATA_DIR}); CI has it at ../shared/data beside the clone")
    out = tmp_path_factory.mktemp("replication")
    assert replicate.main(["--smoke", "--data-dir", str(DATA_DIR), "--output", str(out)]) == 0
    return out, json.loads((out / "replication.json").read_text())


@pytest.mark.slow  # a subprocess runs the whole thing
def test_smoke_run_writes_table_json_and_plot(smoke):
    out, result = smoke
    assert sorted(p.name for p in out.iterdir()) == ["replication.json", "replication.md", "replication_figure2.png"]
    assert (out / "replication_figure2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "replication.md").read_text()
    for row in ("| MindSkip | Block |", "| MindSkip | MLP |", "| MindSkip | Attn |", "| Attention-Drop | 50.0% |",
                "| ours |", "| reference |", "Scored items", "Wall-clock per stage"):
        assert row in markdown, row
    assert set(result["timings"]) >= {"load model", "evaluate dense", "train mindskip-attn", "total"}


@pytest.mark.slow  # a subprocess runs the whole thing
def test_smoke_run_numbers(smoke):
    _, result = smoke
    models, meta = result["models"], result["meta"]
    num_layers = meta["num_layers"]
    assert {"dense", "mindskip-attn", "mindskip-mlp", "mindskip-block", "reference-attn"} <= set(models)
    for name, entry in models.items():
        assert set(entry["tasks"]) == set(replicate.TASKS), name
        for task, got in entry["tasks"].items():
            assert 0.0 <= got["score"] <= 1.0 and got["metric"] == replicate.METRIC[task]
        assert math.isfinite(entry["wikitext2"]["perplexity"]) and entry["wikitext2"]["perplexity"] > 1.0
        assert math.isclose(entry["avg"], sum(t["score"] for t in entry["tasks"].values()) / len(replicate.TASKS))
    assert all(t["capacity"] is None for t in models["dense"]["tasks"].values())  # the unconverted model
    for name in ("mindskip-attn", "mindskip-mlp", "mindskip-block", "reference-attn"):
        entry = models[name]
        assert entry["layers"] == list(range(num_layers // 2 - 1, num_layers - 1))
        assert abs(entry["calibration"]["capacity"] - replicate.TARGET_CAPACITY) <= 0.05, name
        assert all(0.0 <= t["capacity"] <= 1.0 for t in entry["tasks"].values())
    assert models["reference-attn"]["mindskip_config"]["pool_padding"] is True
    assert models["reference-attn"]["mindskip_config"]["train_all_sequences"] is False
    assert models["reference-attn"]["tuning"]["l1_lambda"] == meta["findings"]["reference_lambda"]
    assert models["mindskip-attn"]["tuning"]["target_capacity"] == replicate.TARGET_CAPACITY
    drops = {e["n"]: e for e in models.values() if e["kind"] == "attention-drop"}
    assert {round(r * num_layers) for r in replicate.SWEEP} <= set(drops)
    for n, entry in drops.items():
        assert len(entry["dropped_layers"]) == n and entry["skip_ratio"] == n / num_layers
        assert all(t["capacity"] == 0.0 for t in entry["tasks"].values())  # dropped layers never run attention
    ratio = meta["findings"]["attn_skip_ratio"]
    assert min(e["skip_ratio"] for e in drops.values()) <= ratio <= max(e["skip_ratio"] for e in drops.values())
    assert meta["items"]["local_piqa"] == replicate.PRESETS["smoke"].task_limit["local_piqa"]


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        replicate.parse_args(["--smoke", "--data-dir", str(tmp_path / "nowhere")])
    assert "shared data folder" in capsys.readouterr().err


def test_resume_reuses_finished_models_and_reruns_the_rest(smoke, tmp_path):
    out, result = smoke
    models = result["models"]
    last_drop = max((e["n"], name) for name, e in models.items() if e["kind"] == "attention-drop")[1]
    finished = {name: e for name, e in models.items() if name != last_drop}
    (tmp_path / "replication.partial.json").write_text(
        json.dumps({"preset": "smoke", "timings": {"evaluate dense": 1.0}, "models": finished}))
    assert replicate.main(["--smoke", "--resume", "--data-dir", str(DATA_DIR), "--output", str(tmp_path)]) == 0
    resumed = json.loads((tmp_path / "replication.json").read_text())
    assert resumed["meta"]["resumed"] == sorted(finished)
    assert f"evaluate {last_drop}" in resumed["timings"] and resumed["timings"]["evaluate dense"] == 1.0
    for name, entry in finished.items():
        assert resumed["models"][name] == entry, name
    # The one stage run again reproduces the first run's numbers: evaluation is deterministic.
    assert resumed["models"][last_drop]["tasks"] == models[last_drop]["tasks"]
    assert "Resumed from an interrupted run" in (tmp_path / "replication.md").read_text()
    assert not (tmp_path / "replication.partial.json").exists()


@pytest.mark.parametrize("content, message", [
    (None, "no partial results"),
    ("{not json", "not a partial replicate result"),
    (json.dumps({"preset": "default", "timings": {}, "models": {}}), "from the 'default' preset"),
])
def test_resume_rejects_a_missing_corrupt_or_foreign_partial(tmp_path, content, message):
    partial = tmp_path / "replication.partial.json"
    if content is not None:
        partial.write_text(content)
    run = replicate.Run("replicate", "smoke", replicate.PRESETS["smoke"], partial=partial)
    with pytest.raises(SystemExit, match=message):
        run.resume()
    assert run.models == {}
