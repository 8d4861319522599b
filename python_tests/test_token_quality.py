"""``python -m bench.token_quality --smoke``: the token variant's quality study end to end on a tiny model (the
pipeline, not the numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import token_quality
from mindskip_ext.training import RouterTuner

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA_DIR / "eval").is_dir(), reason="needs the shared evaluation data (../shared/data)"),
]


def test_the_study_evaluates_the_token_model_its_projections_and_headroom_and_resumes(tmp_path, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--smoke", "--threads", "1", "--data-dir", str(DATA_DIR), "--output", str(out), "--work-dir", str(work)]
    assert token_quality.main(argv) == 0
    result = json.loads((out / "token_quality.json").read_text())
    models = result["models"]
    assert set(models) == {"token", "token-static", "token-layers"}
    token = models["token"]
    assert token["kind"] == "token" and (out / token["router_dir"] / "routers.safetensors").is_file()
    # The static projection keeps each layer's kept fraction (by position, so about it) with fixed decisions.
    kept, static = token["kept_train"], models["token-static"]["heldout"]["capacity_per_layer"]
    assert all(abs(static[i] - kept[i]) < 0.1 for i in kept)
    least_kept = sorted(kept, key=lambda i: (kept[i], -int(i)))[: round(token["skipped_per_token_train"])]
    assert models["token-layers"]["dropped_layers"] == sorted(map(int, least_kept))
    h = token["headroom_heldout"]
    assert h["oracle"] <= h["sequence_oracle"] + 1e-9 <= h["static"] + 2e-9 and h["oracle"] <= h["routers"] + 1e-9
    assert (work / "smoke" / "skip_costs_heldout_per_token.pt").is_file()
    report = (out / "token_quality.md").read_text()
    assert "| token-static |" in report and "token oracle" in report

    # Resumed from the finished results alone (a fresh clone's), it trains nothing and evaluates nothing again.
    def no_training(self, *args, **kwargs):
        raise AssertionError("trained routers were trained again")

    (out / "token_quality.partial.json").unlink()
    monkeypatch.setattr(RouterTuner, "train", no_training)
    assert token_quality.main([*argv, "--resume"]) == 0
    again = json.loads((out / "token_quality.json").read_text())["models"]
    assert again["token"]["wikitext2"] == token["wikitext2"] and again["token"]["headroom_heldout"] == h
    # Another --ratio trains its own routers (token@<ratio>); it does not resume results of another ratio.
    assert token["router_dir"].endswith("token@0.25")
    with pytest.raises(SystemExit, match="another skip ratio"):
        token_quality.main([*argv, "--resume", "--ratio", "0.375"])
    with pytest.raises(SystemExit):
        token_quality.parse_args(["--ratio", "1.5"])
