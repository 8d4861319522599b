"""``python bench/run.py --quick`` end to end on CPU with small shapes: the smoke run CI does, typed as a user types
it, from the repository root (``python -m bench.run``, the same module inside its package, is what
test_bench_long.py and the GPU session's rehearsal run).

Timings are not checked (performance is measured, never asserted); what is checked is that every
section runs, every row has the schema of ``bench/common.py``, and the measured quantities that do not
depend on timing (KV bytes, kept fractions) are right.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mindskip_ext as msk
from bench import common, e2e, routing

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.hf

SMALL = ["--layer-batch", "4", "--layer-len", "16", "--e2e-batches", "4", "--e2e-lengths", "16", "--new-tokens", "3",
         "--e2e-reps", "3"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--device", "cpu", "--results-dir", str(out),
                           *SMALL], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "error::FutureWarning"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    (jsonl,) = out.glob("*.jsonl")
    (markdown,) = out.glob("*.md")
    assert markdown.read_text().strip()
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


@pytest.mark.slow  # a subprocess runs the whole thing
def test_every_section_writes_rows_with_the_schema(rows):
    assert {r["section"] for r in rows} == {"micro", "layer", "e2e", "token_decode"}
    for row in rows:
        assert tuple(row) == common.ROW_FIELDS
        assert row["device"] == "cpu"
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        for key, value in row["metrics"].items():
            # A number, or a label (token_decode's fastest_dense: the dense cache kind the row compares to).
            ok = value in ("dynamic", "static") if isinstance(value, str) else value is None or math.isfinite(value)
            assert ok, (row["name"], key, value)


@pytest.mark.slow  # a subprocess runs the whole thing
def test_layer_rows_cover_every_kept_fraction(rows):
    layer = [r for r in rows if r["section"] == "layer"]
    kept = {r["params"]["kept"] for r in layer if r["provider"] == "mindskip"}
    assert kept == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert {(r["name"], r["provider"]) for r in layer} >= {("prefill", "hf"), ("decode", "hf")}
    assert all(r["metrics"]["speedup_vs_hf"] > 0 for r in layer if r["provider"] == "mindskip")


@pytest.mark.slow  # a subprocess runs the whole thing
def test_e2e_kv_bytes_follow_the_kept_fraction(rows):
    e2e = {(r["name"], r["provider"], r["params"].get("kept")): r for r in rows if r["section"] == "e2e"}
    dense_kv = e2e[("prefill", "hf", None)]["metrics"]["kv_bytes"]
    assert dense_kv > 0
    # 8-layer model, MindSkip on layers 3..6: keeping half of those layer-sequences stores 3/4 of the dense KV.
    assert e2e[("prefill", "mindskip", 1.0)]["metrics"]["kv_ratio"] == 1.0
    assert e2e[("prefill", "mindskip", 0.5)]["metrics"]["kv_ratio"] == pytest.approx(0.75)
    assert e2e[("prefill", "attn-drop", 0.5)]["metrics"]["kv_ratio"] == pytest.approx(0.75)
    for provider, kept in (("mindskip", 0.5), ("attn-drop", 0.5)):
        decode = e2e[("decode", provider, kept)]["metrics"]
        assert 1.0 <= decode["ideal_speedup"] < 2.0 and decode["tokens_per_s"] > 0
    for (name, provider, kept), row in e2e.items():
        if provider != "hf":  # per-round paired speedups: the median lies inside its own p20-p80 band
            m = row["metrics"]
            assert 0 < m["speedup_p20"] <= m["speedup_vs_hf"] <= m["speedup_p80"], (name, provider, kept)
    hf_decode = e2e[("decode", "hf", None)]["metrics"]
    assert 0.0 < hf_decode["attn_share"] < 1.0
    # MindSkip against Attention-Drop of its share, round by round, in every phase; no other row has it.
    for name in ("prefill", "decode", "ttlt"):
        m = e2e[(name, "mindskip", 0.5)]["metrics"]
        assert 0 < m["frac_of_static_drop_p20"] <= m["frac_of_static_drop"] <= m["frac_of_static_drop_p80"], name
    assert all("frac_of_static_drop" not in row["metrics"] for (_, provider, kept), row in e2e.items()
               if (provider, kept) != ("mindskip", 0.5))


def test_e2e_interleaving_times_every_variant_and_restores_the_model(monkeypatch):
    """Round-robin timing: every variant gets one sample per round, rounds start at a rotating variant, each
    variant runs with its own routers, and the model comes back unconverted."""
    monkeypatch.setitem(routing.SHAPES, "test-tiny", {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2,
    })
    model = routing.build_model("test-tiny", torch.device("cpu"), torch.float32, max_len=32)
    layer_ids = msk.MindSkipConfig().resolve_layers(4)
    ids = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    variants = e2e._variants(model, ids, layer_ids, (1.0, 0.5))
    assert [(v.provider, v.kept) for v in variants] == [
        ("hf", None), ("mindskip", 1.0), ("mindskip", 0.5), ("attn-drop", 0.5),
    ]

    visits = []
    sample = e2e._sample

    def recording_sample(m, ids_, new_tokens, device, variant):
        converted = isinstance(m, msk.MindSkipModel)
        visits.append((variant.provider, converted))
        if converted:  # the variant's own routers are in place while it is timed
            torch.testing.assert_close(m.router_state_dict(), variant.routers)
        sample(m, ids_, new_tokens, device, variant)

    monkeypatch.setattr(e2e, "_sample", recording_sample)
    e2e._measure_interleaved(model, ids, 3, 3, layer_ids, variants)
    assert [provider for provider, _ in visits] == [v.provider for r in range(3) for v in variants[r:] + variants[:r]]
    assert all(converted == (provider != "hf") for provider, converted in visits)
    assert all(len(v.prefill) == len(v.decode) == len(v.generate) == 3 for v in variants)
    kv = {(v.provider, v.kept): v.kv_bytes for v in variants}
    assert kv[("mindskip", 0.5)] == kv[("attn-drop", 0.5)] == 0.75 * kv[("hf", None)]
    assert not any(isinstance(layer, msk.MindSkipDecoderLayer) for layer in model.model.layers)


def test_decode_profile_counts_the_ops_that_mindskip_adds_and_attention_drop_removes(tmp_path, capsys):
    from bench import decode_profile

    out = tmp_path / "profile.md"
    assert decode_profile.main(["--device", "cpu", "--batch", "2", "--prompt", "8", "--steps", "1",
                                "--out", str(out)]) == 0
    text = out.read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith(("| hf", "| mindskip", "| attn-drop"))}
    assert set(rows) == {"hf", "mindskip kept 0.5", "attn-drop"}
    # cpu-small routes layers 3..6; at batch 2 and kept 0.5 each keeps one sequence: its decode step gathers that
    # row, runs the rotary embedding of q and k as one op (rotate_half's two concatenations a layer gone) and
    # scatter-adds the attention into the residual out of place, while Attention-Drop skips 2 layers whole.
    for op in ("`aten::index_select` +4", "`mindskip::rotary_embedding` +4", "`mindskip::scatter_add_kept` +4",
               "`aten::cat` -8"):
        assert op in rows["mindskip kept 0.5"][5]
    assert "`aten::scaled_dot_product_attention` -2" in rows["attn-drop"][5]
    assert "`aten::rsqrt` -2" in rows["attn-drop"][5]  # a layer that skips every sequence does not normalise
    assert rows["hf"][5].strip(" |") == "-"
    assert all(float(row[1]) > 0 and row[4] == "-" for row in rows.values())  # eager: no graph breaks to count


def test_decode_profile_at_kept_1_dispatches_the_same_ops_as_the_unconverted_model(capsys):
    """Every sequence kept: the wrapper adds no op to a decode step (its cost is host time), and there is no
    Attention-Drop to compare at 1.0. On cpu-host, the shape whose step is host time on a CPU."""
    from bench import decode_profile

    assert decode_profile.main(["--device", "cpu", "--shape", "cpu-host", "--batch", "2", "--prompt", "8",
                                "--steps", "1", "--kept", "1.0,0.5"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| hf", "| mindskip", "| attn-drop"))}
    assert set(rows) == {"hf", "mindskip kept 0.5", "mindskip kept 1", "attn-drop"}
    assert rows["mindskip kept 1"][2] == rows["hf"][2] and rows["mindskip kept 1"][5].strip(" |") == "-"
    # Its host work: a routed layer's decode step that keeps every sequence is the stock layer's step behind a few
    # calls of the wrapper: its own module call, the cache and state popped from the keywords, the slot read
    # without a call, the compact slot's update (about 8 Python calls; 16 before the slot lookup and the cache's
    # keyword were read without calls, 35 when it ran the sublayers itself).
    calls = {name: int(row[6].strip(" |")) for name, row in rows.items()}
    routed = len(msk.MindSkipConfig().resolve_layers(32))
    assert 0 < calls["mindskip kept 1"] - calls["hf"] < 10 * routed


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_mixed_decode_step_costs_the_host_at_most_a_tenth_more_than_attention_drop(cache, capsys):
    """cpu-host (Llama-3-8B's 32 layers at tiny widths) at kept 0.5: every routed layer is mixed (half its sequences
    kept), where Attention-Drop runs half of those layers whole and skips the rest. A mixed layer's decode step
    dispatches fewer ops than the stock layer's (the rotary embedding is one op; one gather, one out-of-place
    scatter-add) and makes about as many Python calls, so the step stays within 10% of the drop's in both: counts,
    the same on any machine. A row selection, a copy or a wrapper added to the mixed path fails here."""
    from bench import decode_profile

    assert decode_profile.main(["--device", "cpu", "--shape", "cpu-host", "--batch", "2", "--prompt", "8",
                                "--steps", "1", "--cache", cache]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| hf", "| mindskip", "| attn-drop"))}
    ops = {name: int(row[2]) for name, row in rows.items()}
    calls = {name: int(row[6].strip(" |")) for name, row in rows.items()}
    assert ops["attn-drop"] < ops["mindskip kept 0.5"] <= 1.1 * ops["attn-drop"]
    assert calls["attn-drop"] < calls["mindskip kept 0.5"] <= 1.1 * calls["attn-drop"]
    assert ops["mindskip kept 0.5"] < ops["hf"]


@pytest.mark.slow  # dynamo traces three models
def test_decode_profile_compiles_the_static_cache_step_without_graph_breaks(capsys):
    from bench import decode_profile

    # The "eager" backend runs what dynamo captured: the graphs and their breaks, without inductor's compile time.
    assert decode_profile.main(["--device", "cpu", "--batch", "2", "--prompt", "8", "--steps", "1", "--layers", "6",
                                "--cache", "static", "--compile", "--compile-backend", "eager"]) == 0
    text = capsys.readouterr().out
    assert "compiled as `generate()` compiles it (mode reduce-overhead, backend eager)" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| hf", "| mindskip", "| attn-drop"))]
    assert len(rows) == 3 and all(row[4] == "0" for row in rows)
    assert "`mindskip::rotary_embedding` +" in rows[1][5] and "`mindskip::scatter_add_kept` +" in rows[1][5]


@pytest.mark.parametrize("args, message", [
    (["--kept", "0"], "--kept must lie in (0, 1], got [0.0]"),
    (["--kept", "0.5,1.5"], "--kept must lie in (0, 1], got [0.5, 1.5]"),
    (["--kept", "half"], "--kept takes comma-separated fractions, got 'half'"),
    (["--batch", "1"], "--batch must be at least 2"),
    (["--compile"], "--compile needs --cache static"),
    (["--layers", "1"], "--layers must be at least 2"),
])
def test_decode_profile_rejects_bad_arguments(args, message, capsys):
    from bench import decode_profile

    with pytest.raises(SystemExit):
        decode_profile.main(["--device", "cpu", *args])
    assert message in capsys.readouterr().err


@pytest.mark.slow  # a subprocess runs the whole thing
def test_token_decode_rows_cover_the_variants_at_exactly_the_kept_fraction(rows):
    token = {(r["provider"], r["params"]["cache"], r["params"].get("kept")): r["metrics"] for r in rows
             if r["section"] == "token_decode" and r["name"] == "decode"}
    variants = {("hf", None), ("sequence", 0.5), ("token", 0.5), ("token", 1.0), ("hybrid", 0.5)}
    assert set(token) == {(p, c, k) for p, k in variants for c in ("dynamic", "static")}
    for cache in ("dynamic", "static"):
        # The replayed router biases keep exactly half of the rows at every step of every layer.
        assert token[("token", cache, 0.5)]["measured_kept"] == 0.5
        assert 1.0 < token[("token", cache, 0.5)]["ideal_speedup"] < 2.0
        assert token[("hf", cache, None)]["fastest_dense"] in ("dynamic", "static")
        # The hybrid: its one per-token layer (the middle of layers 3..6) calibrated in the hybrid itself keeps
        # exactly half of the rows, as its per-sequence layers do; the same ideal as the other variants at 0.5, and
        # its speed against the sequence variant paired per round.
        hybrid = token[("hybrid", cache, 0.5)]
        assert hybrid["token_layer"] == 5 and hybrid["token_layer_kept"] == 0.5 and hybrid["measured_kept"] == 0.5
        assert hybrid["ideal_speedup"] == token[("token", cache, 0.5)]["ideal_speedup"]
        low, mid, high = (hybrid[f"speedup_vs_sequence{end}"] for end in ("_p20", "", "_p80"))
        assert 0 < low <= mid <= high
    assert all("speedup_vs_sequence" not in m for (provider, _, _), m in token.items() if provider != "hybrid")
    assert all(m["tokens_per_s"] > 0 and m["frac_of_ideal_vs_fastest"] > 0 for m in token.values())
    prefill = {(r["name"], r["provider"], r["params"].get("kept")): r["metrics"] for r in rows
               if r["section"] == "token_decode" and r["name"] != "decode"}
    assert set(prefill) == {("prefill-layer", "hf", None), ("prefill-layer", "token", 0.5),
                            ("prefill-layer", "token", 1.0), ("prefill-attention", "hf", None),
                            ("prefill-attention", "token", 0.5)}
    for key in (("prefill-layer", "token", 0.5), ("prefill-attention", "token", 0.5)):
        assert 1.0 <= prefill[key]["ideal_speedup"] <= 2.0 and prefill[key]["frac_of_ideal"] > 0
