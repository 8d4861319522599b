"""The OpenAI-compatible server, started with the documented command (``python -m mindskip_ext.vllm.serve``), under
load: 64 concurrent clients, plain and streamed completions, some dropped mid-stream, on prompts whose routing
decisions differ. Every completed response equals the offline engine's tokens, which equal transformers MindSkip's;
no request fails; afterwards the server holds no request and no KV block and still answers. This is the short
version of bench/vllm_load.py (the long run's numbers: bench/results/vllm_load.md), run as that script's worker."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from conftest import NEW_TOKENS

LOAD_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "vllm_load.py"
LOAD_SECONDS = 20.0


def load_module():
    # By its path: the repository root is not importable here (its mindskip_ext folder would shadow the package).
    spec = importlib.util.spec_from_file_location("vllm_load", LOAD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_server_under_load_matches_offline_and_transformers(tiny):
    load = load_module()
    # 20 s of load say little about steady memory (the long run's check is 5%); this bounds a leak per request.
    spec = load.spec_for(str(tiny.base), str(tiny.routers), tiny.prompts, clients=64, duration=LOAD_SECONDS,
                         max_tokens=NEW_TOKENS, kind_weights=[0.4, 0.4, 0.2], max_model_len=256,
                         memory_growth_limit=0.15)
    report = load.run_worker(Path(sys.executable), spec, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    assert report["ok"], report
    assert report["offline"] == tiny.expected
    stats = report["stats"]
    assert stats["completed"] > 64 and stats["equal"] == stats["completed"] and stats["cancelled"] > 0, stats
    assert stats["plain"] > 0 and stats["stream"] > 0
    assert report["errors"] == [] and report["mismatches"] == []
