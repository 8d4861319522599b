"""bench/vllm_serving.py's rows, ratios and table, from made-up worker results (the measurement itself runs in
.venv-vllm and is exercised by running the benchmark; vLLM is never imported here)."""

from __future__ import annotations

import pytest

from bench import common, vllm_serving

NUM_LAYERS = 30
REQUESTS = [[[1, 2, 3], 5], [[4, 5], 5]]  # two requests: prompt ids and new tokens
DROPPED = {"static": [1, 2, 3, 4, 5, 6], "floor": list(range(1, NUM_LAYERS))}
# The dynamic run's realised decisions of each request: 3 and 9 of its 4 + 9 routers skip.
SKIPS = [{str(i): i >= 3 for i in range(6)}, {str(i): i >= 9 for i in range(12)}]


def result(variant: str, round_index: int, cpu: float, wall: float) -> dict:
    requests = [{"ttft": 0.1 * (i + 1), "tpot": 0.01, "tokens": [7] * new} for i, (_, new) in enumerate(REQUESTS)]
    return {
        "variant": variant, "round": round_index, "startup_s": 1.0, "load": [1.0, 3.0],
        "kv": {"num_blocks": 100 if variant != "static" else 125, "block_size": 16, "layers": 30, "groups": 1},
        "points": {"4": {"wall_s": wall, "cpu_s": cpu, "requests": requests}},
        "skips": SKIPS if variant == "dynamic" and round_index == 0 else None,
        "torch": "2.13.0+cpu", "vllm": "0.32.0", "transformers": "5.19.0", "mindskip_ext": "0.1.0",
    }


def results() -> list[dict]:
    # CPU seconds per round: plain 10, floor 4.2 (so one attention sublayer costs 0.2), static 9.0, dynamic 9.5.
    # Wall time is twice the CPU time in round 0 and three times in round 1 (a busier machine).
    cpu = {"vllm": 10.0, "floor": 4.2, "static": 9.0, "dynamic": 9.5}
    return [result(v, r, c, c * (2 + r)) for r in (0, 1) for v, c in cpu.items()]


def by_provider(rows: list[dict]) -> dict[str, dict]:
    return {row["provider"]: row for row in rows}


def test_rows_have_the_bench_schema_and_the_ideal_from_the_floor():
    rows = by_provider(vllm_serving.summarise(results(), REQUESTS, DROPPED, NUM_LAYERS))
    for row in rows.values():
        assert tuple(row) == common.ROW_FIELDS
        assert row["params"]["concurrency"] == 4 and row["metrics"]["rounds"] == 2
    static, dynamic, plain = rows["static"]["metrics"], rows["dynamic"]["metrics"], rows["vllm"]["metrics"]
    assert plain["speedup_cpu"] == 1.0 and plain["ideal_share_cpu"] is None and rows["vllm"]["mindskip"] is None
    # 6 skipped sublayers at 0.2 s each: ideal 8.8 s; static took 9.0 s, so it reached 1.0 / 1.2 of the saving.
    assert static["ideal_speedup_cpu"] == pytest.approx(10 / 8.8)
    assert static["speedup_cpu"] == pytest.approx(10 / 9.0)
    assert static["ideal_share_cpu"] == pytest.approx(1.0 / 1.2)
    # The same ratios from wall time (each round scales all variants alike here).
    assert static["ideal_share_wall"] == pytest.approx(1.0 / 1.2)
    assert static["tokens_per_cpu_s"] == pytest.approx(10 / 9.0)
    # Dynamic: the token-weighted mean of the realised skips, (3 * 8 + 9 * 7) / 15 = 5.8 sublayers.
    assert rows["dynamic"]["params"]["skipped_layers"] == pytest.approx(5.8)
    assert dynamic["ideal_speedup_cpu"] == pytest.approx(10 / (10 - 5.8 * 0.2))
    assert static["kv_blocks"] == 125 and static["kv_tokens"] == 2000
    assert static["ttft_p50_ms"] == pytest.approx(150) and static["load_average"] == [1.0, 3.0]


def test_dynamic_rows_need_the_realised_decisions():
    runs = [r for r in results() if r["variant"] != "dynamic" or r["round"] == 1]
    with pytest.raises(ValueError, match="need the realised decisions"):
        vllm_serving.summarise(runs, REQUESTS, DROPPED, NUM_LAYERS)


def test_skip_distribution_and_table():
    sets = {"instruct": [REQUESTS[0][0]], "code": [REQUESTS[1][0]]}
    skips = vllm_serving.skip_distribution(SKIPS, sets, REQUESTS, NUM_LAYERS)
    assert skips["instruct"]["mean"] == pytest.approx(3 / 30) and skips["code"]["histogram"] == {"0.300": 1}
    rows = vllm_serving.summarise(results(), REQUESTS, DROPPED, NUM_LAYERS)
    about = {"routers": "some/routers", "dropped": DROPPED, "skips": skips, "checks": ["static: 1/1 prompts agree"]}
    table = vllm_serving._table(rows, about)
    assert "layers [1, 2, 3, 4, 5, 6] dropped" in table and "Checks: static: 1/1 prompts agree." in table
    lines = [line for line in table.splitlines() if line.startswith("| static |")]
    assert len(lines) == 1 and "| 6.00 | 1.1 | 1.11x | 1.14x | 0.83 |" in lines[0]
    assert "| instruct | 1 | 0.100 |" in table


def test_checks_name_where_a_completion_departs_from_transformers():
    runs = results()
    reference = {"tokens": [[7] * 5, [7, 7, 8, 7, 7]], "gaps": [[1.0] * 5, [1.0, 1.0, 0.004, 1.0, 1.0]],
                 "decisions": None}
    lines = vllm_serving.checks(runs, {"static": reference}, None, None)
    assert lines[0] == ("static: 1/2 prompts give transformers' first 16 tokens (departures: prompt 1 at token 2 "
                        "(logit gap 0.004))")
    assert "vllm: 4/4 completions equal to the same request's other runs (concurrencies and rounds)" in lines


def test_partial_results_resume_the_same_measurement_only(tmp_path):
    path = tmp_path / "vllm_serving.partial.json"
    identity = {"requests": REQUESTS, "concurrency": [4], "variants": ["vllm", "static"]}
    with pytest.raises(SystemExit, match="no partial results"):
        vllm_serving.Partial(path, identity, resume=True)
    run = vllm_serving.Partial(path, identity, resume=False)
    run.references["vllm"] = {"tokens": [[7]]}
    run.results.append(result("vllm", 0, 10.0, 20.0))
    run.save()
    again = vllm_serving.Partial(path, identity, resume=True)
    assert again.references == run.references and again.results == run.results
    assert again.done("vllm", 0) and not again.done("static", 0) and not again.done("vllm", 1)
    with pytest.raises(SystemExit, match="measured another workload"):
        vllm_serving.Partial(path, {**identity, "concurrency": [8]}, resume=True)
    # Without --resume a run starts afresh (and overwrites the file when it saves).
    assert vllm_serving.Partial(path, identity, resume=False).results == []
