"""The long-context decode points of the e2e benchmark (``--e2e-long``) end to end on CPU at a small length: rows for
the dense model, MindSkip and Attention-Drop on both the dynamic and the static cache, the static ones compiled too,
with the kept share of KV and MindSkip's speed as a share of Attention-Drop's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.hf, pytest.mark.slow]  # a subprocess runs the benchmark


def test_long_decode_rows_cover_both_caches_with_the_kept_kv(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "e2e", "--device", "cpu", "--results-dir",
         str(tmp_path), "--e2e-grid", "off", "--e2e-long", "32", "--new-tokens", "3", "--e2e-reps", "2",
         # dynamo's capture run as it is: the compiled variants without inductor's compile time
         "--e2e-compile", "on", "--e2e-compile-backend", "eager"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "error::FutureWarning"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (jsonl,) = tmp_path.glob("*.jsonl")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {r["name"] for r in rows} == {"decode-long"}
    long = {(r["provider"], r["params"]["cache"] + ("-compiled" if r["params"].get("compiled") else ""),
             r["params"].get("kept")): r["metrics"] for r in rows}
    variants = {("hf", None), ("mindskip", 1.0), ("mindskip", 0.5), ("attn-drop", 0.5)}
    caches = ("dynamic", "static", "static-compiled")
    assert set(long) == {(p, c, k) for p, k in variants for c in caches}
    for cache in caches:
        m = long[("mindskip", cache, 0.5)]
        assert 0 < m["frac_of_static_drop_p20"] <= m["frac_of_static_drop"] <= m["frac_of_static_drop_p80"], cache
        assert "frac_of_static_drop" not in long[("mindskip", cache, 1.0)]
    for cache in ("dynamic", "static"):
        dense = long[("hf", cache, None)]["kv_bytes"]
        # 8-layer model, MindSkip on 4 layers: keeping half of those layer-sequences stores 3/4 of the dense KV.
        assert long[("mindskip", cache, 1.0)]["kv_bytes"] == dense
        assert long[("mindskip", cache, 0.5)]["kv_bytes"] == pytest.approx(0.75 * dense)
        assert long[("attn-drop", cache, 0.5)]["kv_bytes"] == pytest.approx(0.75 * dense)
        assert 1.0 < long[("mindskip", cache, 0.5)]["ideal_speedup"] < 2.0
    assert all(m["tokens_per_s"] > 0 and m["speedup_vs_hf_dynamic"] > 0 for m in long.values())
