"""bench/vllm_serving.py's rows, ratios and table, from made-up worker results (the measurement itself runs in
.venv-vllm and is exercised by running the benchmark; vLLM is never imported here)."""

from __future__ import annotations

import json

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
    lines = vllm_serving.checks(runs, {"static": reference}, {})
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


# The hybrid: its run of round 0 realises the decisions of its per-request layers (here 2 and 5 of them skip); its
# per-token layer (17) keeps 1 of 3 and 2 of 2 prompt tokens (from transformers, per request).
HYBRID_SKIPS = [{str(i): i >= 2 for i in range(4)}, {str(i): i >= 5 for i in range(10)}]
TOKEN_KEPT = [{"17": [1, 3]}, {"17": [2, 2]}]


def hybrid_results() -> list[dict]:
    runs = results()
    for r in (0, 1):
        run = result("hybrid", r, 9.8, 9.8 * (2 + r))
        run["skips"] = HYBRID_SKIPS if r == 0 else None
        runs.append(run)
    return runs


def test_hybrid_rows_count_the_per_request_layers_and_report_the_token_layer_apart():
    rows = by_provider(vllm_serving.summarise(hybrid_results(), REQUESTS, DROPPED, NUM_LAYERS, TOKEN_KEPT))
    hybrid, dynamic = rows["hybrid"], rows["dynamic"]
    assert tuple(hybrid) == common.ROW_FIELDS and hybrid["mindskip"] == "0.1.0"
    # Its own realised decisions, not dynamic's: (2 * 8 + 5 * 7) / 15 = 3.4 sublayers per token.
    assert hybrid["params"]["skipped_layers"] == pytest.approx(3.4)
    assert dynamic["params"]["skipped_layers"] == pytest.approx(5.8)
    # The ideal counts only what vLLM skips; the per-token layer's skips (2 of 5 prompt tokens) are reported apart.
    assert hybrid["metrics"]["ideal_speedup_cpu"] == pytest.approx(10 / (10 - 3.4 * 0.2))
    assert hybrid["metrics"]["ideal_share_cpu"] == pytest.approx(0.2 / (3.4 * 0.2))
    assert hybrid["params"]["token_layers"] == [17]
    assert hybrid["params"]["token_layers_skipped_per_prompt_token"] == pytest.approx(2 / 5)
    assert "token_layers" not in dynamic["params"]


def test_hybrid_rows_need_the_hybrids_realised_decisions():
    runs = [r for r in hybrid_results() if r["variant"] != "hybrid" or r["round"] == 1]
    with pytest.raises(ValueError, match="hybrid rows need the realised decisions"):
        vllm_serving.summarise(runs, REQUESTS, DROPPED, NUM_LAYERS, TOKEN_KEPT)
    # dynamic-eager makes dynamic's decisions.
    assert vllm_serving.skipped_per_request("dynamic-eager", DROPPED, {"dynamic": SKIPS}, 2) == [3, 9]
    assert vllm_serving.skipped_per_request("hybrid", DROPPED, {"dynamic": SKIPS, "hybrid": HYBRID_SKIPS}, 1) == [2]


def test_hybrid_table_checks_and_token_shares():
    runs = hybrid_results()
    sets = {"instruct": [REQUESTS[0][0]], "code": [REQUESTS[1][0]]}
    assert vllm_serving.token_kept_per_set(TOKEN_KEPT, sets, REQUESTS) == {"instruct": pytest.approx(1 / 3),
                                                                             "code": 1.0}
    hybrid = {"routers": "token/routers", "token_layers": [17], "source": "--token-layers", "recipe_layers": [17, 27],
              "skips": vllm_serving.skip_distribution(HYBRID_SKIPS, sets, REQUESTS, NUM_LAYERS),
              "token_kept": vllm_serving.token_kept_per_set(TOKEN_KEPT, sets, REQUESTS)}
    reference = {"tokens": [[7] * 5, [7] * 5], "gaps": [[1.0] * 5] * 2,
                 "decisions": {str(i): [i >= 2, i >= 5] for i in range(10)}}
    decided = dict(reference, decisions={**reference["decisions"], "3": [True, True]})  # prompt 1 differs at 3
    lines = vllm_serving.checks(runs, {"dynamic": reference, "hybrid": decided},
                                {"dynamic": SKIPS, "hybrid": HYBRID_SKIPS})
    assert "hybrid: realised decisions of 1/2 prompts as transformers MindSkip decides them" in lines
    assert "dynamic: realised decisions of 0/2 prompts as transformers MindSkip decides them" in lines
    rows = vllm_serving.summarise(runs, REQUESTS, DROPPED, NUM_LAYERS, TOKEN_KEPT)
    table = vllm_serving._table(rows, {"routers": "r", "dropped": DROPPED, "hybrid": hybrid, "name": "hybrid_run",
                                       "checks": lines})
    assert table.startswith("# vLLM serving, SmolLM2-135M, the default recipe's routers at 25%: static and dynamic "
                            "mode, and the hybrid")
    assert "rows in hybrid_run.jsonl" in table and "gives [17, 27]" in table
    assert "saves no compute in vLLM" in table and "instruct 0.333, code 1.000" in table
    order = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "| 4 |" in line]
    assert order == ["vllm", "static", "dynamic", "hybrid", "floor"]
    assert "Realised skip ratio per request (hybrid;" in table and "| code | 1 | 0.167 |" in table


def test_hybrid_token_layers_as_the_suite_chose_them(tmp_path):
    routers = tmp_path / "token"
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"models": {
        "other": {"router_dir": str(tmp_path / "elsewhere"), "kept_train": {"3": 0.5}},
        "it hybrid": {"router_dir": str(routers), "token_layers": [9]},  # no fractions: not this one
        "it": {"router_dir": str(routers), "kept_train": {"4": 1.0, "9": 0.99, "17": 0.47, "27": 0.01}}}}))
    assert vllm_serving.hybrid_token_layers(routers, suite) == [17]
    with pytest.raises(SystemExit, match="pass --token-layers"):
        vllm_serving.hybrid_token_layers(tmp_path / "unknown", suite)
    # The recipe's rule on the held-out fractions of training_summary.json; None without them.
    assert vllm_serving.recipe_token_layers(routers) is None
    routers.mkdir()
    (routers / "training_summary.json").write_text(json.dumps(
        {"heldout": {"capacity_per_layer": {"4": 1.0, "17": 0.3, "27": 0.979}}}))
    assert vllm_serving.recipe_token_layers(routers) == [17, 27]


def test_the_default_hybrid_is_the_suites(tmp_path):
    """The committed token routers at 25%: layer 17 per token, as the suite's hybrid; written loadable."""
    from mindskip_ext.model import read_router_directory

    layers = vllm_serving.hybrid_token_layers(vllm_serving.TOKEN_ROUTERS)
    assert layers == [17]
    out = vllm_serving.hybrid_routers(vllm_serving.TOKEN_ROUTERS, layers, tmp_path)
    config, meta, _ = read_router_directory(out)
    assert config.routing == "token" and config.token_layers == [17]
    assert vllm_serving.hybrid_routers(vllm_serving.TOKEN_ROUTERS, layers, tmp_path) == out  # made once


def test_arguments_name_the_outputs_and_refuse_unknown_variants():
    args = vllm_serving.parse_args([])
    assert args.output_name == "vllm_serving" and args.token_layers is None
    assert "hybrid" in args.variants.split(",")
    assert vllm_serving.parse_args(["--token-layers", "17,27"]).token_layers == [17, 27]
    with pytest.raises(SystemExit, match="unknown"):
        vllm_serving.main(["--variants", "vllm,hybird"])
