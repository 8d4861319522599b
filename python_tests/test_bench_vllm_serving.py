"""bench/vllm_serving.py's rows and table, from made-up timings (the measurement itself runs in .venv-vllm and is
exercised by running the benchmark; vLLM is never imported here)."""

from __future__ import annotations

import pytest

from bench import common, vllm_serving

RESULT = {"torch": "2.13.0+cpu", "vllm": "0.32.0", "transformers": "5.19.0", "mindskip_ext": "0.1.0"}
NEW_TOKENS = {"short": 8, "long": 4}
KEPT = {"short": 0.5, "long": 0.25}


def rows_of(variant: str, seconds: float) -> list[dict]:
    # Two rounds per prompt set: [prefill_s, total_s]; the median of two is their mean.
    timings = {"short": [[0.5, seconds], [0.5, seconds]], "long": [[1.0, 2 * seconds], [1.0, 2 * seconds]]}
    return vllm_serving._rows(variant, 4, {**RESULT, "timings": timings}, NEW_TOKENS, KEPT)


def test_rows_have_the_bench_schema_and_the_throughputs():
    rows = rows_of("vllm-mindskip", 2.0)
    assert [row["name"] for row in rows] == ["short-c4", "long-c4"]
    for row in rows:
        assert tuple(row) == common.ROW_FIELDS
        assert row["mindskip"] == "0.1.0" and row["transformers"] == "5.19.0"
    short, long = rows
    assert short["metrics"]["tokens_per_s"] == pytest.approx(4 * 8 / 2.0)
    assert short["metrics"]["decode_tokens_per_s"] == pytest.approx(4 * 7 / 1.5)
    assert short["metrics"]["prefill_ms"] == pytest.approx(500)
    assert long["metrics"]["tokens_per_s"] == pytest.approx(4 * 4 / 4.0)
    assert short["params"]["capacity"] == 0.5 and long["params"]["capacity"] == 0.25
    assert rows_of("vllm", 2.0)[0]["params"]["capacity"] is None and rows_of("vllm", 2.0)[0]["mindskip"] is None


def test_table_compares_the_plugin_with_both_baselines():
    rows = rows_of("vllm", 1.0) + rows_of("vllm-mindskip", 2.0) + rows_of("hf-mindskip", 4.0)
    table = vllm_serving._table(rows, "calibrated test routers")
    assert "Routers: calibrated test routers. Kept share" in table and "short 0.50, long 0.25" in table
    lines = [line for line in table.splitlines() if line.startswith("| short") or line.startswith("| long")]
    assert [line.split(" | ")[:2] for line in lines] == [["| short", "4"], ["| long", "4"]]
    for line in lines:
        assert line.endswith("| 0.50x | 2.00x |")  # the plugin takes twice vLLM's time and half transformers'


def test_decode_throughput_is_left_out_when_the_prefill_run_took_longer():
    timings = {"short": [[3.0, 2.0]]}
    (row,) = vllm_serving._rows("vllm", 1, {**RESULT, "timings": timings}, NEW_TOKENS, KEPT)
    assert row["metrics"]["decode_tokens_per_s"] is None
    assert "| 4.0 | n/a | 3000 |" in vllm_serving._table([row], "none")
