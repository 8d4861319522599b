"""The multi-domain suite: which sequences each domain scores, per-sequence scores under a model's routing or given
decisions, per-domain summaries, paired differences and static interpolation."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext import data as D
from mindskip_ext.data.suite import SuiteDomain, load_suite, parse_domain, spread
from mindskip_ext.eval.attention_drop import set_static_routing
from mindskip_ext.eval.perplexity import evaluate_examples
from mindskip_ext.eval.routing import routing_decisions
from mindskip_ext.eval.suite import (
    MIX,
    SequenceScores,
    best_per_domain,
    kept_fractions,
    paired,
    score_sequences,
    static_at,
    summarise,
)
from mindskip_ext.testing import synthetic_instructions, tiny_model
from mindskip_ext.token_routing import set_static_token_fractions, static_token_keep


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("suite")
    words = tok.get_vocab()
    vocab = sorted(w for w in words if w.isalpha())[:40]
    lines = [" ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(13)) for i in range(60)]
    (root / "prose.txt").write_text("\n".join(lines) + "\n")
    (root / "instructions.json").write_text(json.dumps(synthetic_instructions(40, seed=3)))
    qa = [{"question": r["instruction"], "answer": r["output"]} for r in synthetic_instructions(12, seed=4)]
    (root / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    return root


def domains(root):
    return [SuiteDomain("prose", "prose.txt"), SuiteDomain("instructions", "instructions.json", heldout_fraction=0.25),
            SuiteDomain("math", str(root / "math.jsonl"))]


def test_each_domain_scores_its_own_sequences(files, tok):
    suite = load_suite(domains(files), tok, length=32, sequences=5, data_dir=files)
    assert list(suite.domains) == ["prose", "instructions", "math"]
    # Text: full blocks of the packed stream only, spread evenly over it.
    blocks = [e for e in D.load_examples(str(files / "prose.txt"), tok, 32).examples if len(e) == 32]
    assert len(blocks) > 5 and suite.domains["prose"] == spread(blocks, 5)
    assert spread(list(range(10)), 4) == [0, 2, 5, 7] and spread([1, 2], 5) == [1, 2]
    # Instructions: the held-out part of the split Router-Tuning makes with the same fraction and seed.
    prepared = D.load_examples(str(files / "instructions.json"), tok, 32).examples
    held = D.split_heldout(prepared, 0.25, seed=0)[1]
    assert suite.domains["instructions"] == spread(held, 5)
    assert suite.domains["math"] == spread(D.load_examples(str(files / "math.jsonl"), tok, 32).examples, 5)
    stats = suite.stats["domains"]
    assert stats["instructions"]["of"] == len(held) and stats["instructions"]["heldout_fraction"] == 0.25
    assert stats["prose"]["tokens"] == 5 * 32 and stats["prose"]["of"] == len(blocks)
    flat, owner = suite.examples()
    assert len(flat) == len(owner) == 15 and owner[:5] == ["prose"] * 5 and owner[-1] == "math"
    every = load_suite(domains(files), tok, length=32, sequences=None, data_dir=files)
    assert len(every.domains["prose"]) == len(blocks)


def test_bad_suites_are_refused(files, tok):
    with pytest.raises(D.DataError, match="each named once"):
        load_suite([SuiteDomain("a", str(files / "prose.txt"))] * 2, tok)
    with pytest.raises(D.DataError, match="at least one sequence"):
        load_suite(domains(files), tok, sequences=0, data_dir=files)
    with pytest.raises(D.DataError, match="name is letters"):
        SuiteDomain("a b", "x")
    with pytest.raises(D.DataError, match="held-out fraction"):
        SuiteDomain("a", "x", heldout_fraction=1.0)


def test_a_domain_is_a_path_or_a_hub_dataset(files):
    local = parse_domain(f"prose={files / 'prose.txt'}", heldout_fraction=0.1)
    assert local == SuiteDomain("prose", str(files / "prose.txt"), heldout_fraction=0.1)
    assert parse_domain("prose=wikitext:wikitext-2-raw-v1:test") == SuiteDomain(
        "prose", "wikitext", split="test", config="wikitext-2-raw-v1")
    assert parse_domain("math=openai/gsm8k:main:test").config == "main"
    assert parse_domain("x=owner/name:validation") == SuiteDomain("x", "owner/name", split="validation")
    assert parse_domain("x=owner/name").split == "test"
    for bad in ("prose", "prose=", "x=a:b:c:d", "x=a::b"):
        with pytest.raises(D.DataError):
            parse_domain(bad)


@pytest.fixture(scope="module")
def examples(tok):
    return D.prepare_examples(tok, synthetic_instructions(18, seed=9), 96).examples


@pytest.fixture
def model(tok):
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=5), msk.MindSkipConfig(layers=[1, 2, 3]))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 2.0)
    return model


def test_scores_add_up_to_the_perplexity_and_record_the_routing(tok, examples, model):
    pad = D.pad_token_id(tok)
    scores, taken = score_sequences(model, examples, pad, batch_size=5)
    total = evaluate_examples(model, examples, pad, batch_size=5)
    assert float(scores.nll.sum()) / int(scores.targets.sum()) == pytest.approx(total["loss"], rel=1e-6)
    assert int(scores.targets.sum()) == total["target_tokens"]
    assert scores.tokens.tolist() == [len(e) for e in examples]
    decisions = routing_decisions(model, examples, pad, batch_size=5)
    assert {i: k.tolist() for i, k in taken.items()} == {i: k.tolist() for i, k in decisions.items()}
    expected = sum((~k).double() for k in decisions.values())
    assert torch.equal(scores.skipped, expected) and 0 < float(scores.skipped.sum()) < 3 * len(examples)
    # A model without routers skips nothing.
    dense, none = score_sequences(model.base_model, examples, pad, batch_size=5)
    assert none == {} and float(dense.skipped.sum()) == 0.0


def test_given_decisions_score_each_sequence_as_its_own_static_drop(tok, examples, model):
    pad = D.pad_token_id(tok)
    before = {k: v.clone() for k, v in model.router_state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    forced = {i: torch.rand(len(examples), generator=gen) < 0.5 for i in (1, 3)}  # layer 2 always keeps
    scores, taken = score_sequences(model, examples, pad, batch_size=4, decisions=forced)
    assert all(torch.equal(v, model.router_state_dict()[k]) for k, v in before.items())
    assert torch.equal(taken[1], forced[1]) and torch.equal(taken[3], forced[3]) and bool(taken[2].all())
    for row in (0, 7, 11):
        dropped = [i for i in (1, 3) if not forced[i][row]]
        set_static_routing(model, dropped)
        alone = evaluate_examples(model, [examples[row]], pad)
        assert float(scores.nll[row]) == pytest.approx(alone["loss"] * alone["target_tokens"], rel=1e-5)
        assert float(scores.skipped[row]) == len(dropped)
    model.load_router_state_dict(before)
    with pytest.raises(ValueError, match="layer 4, which is not a MindSkip layer"):
        score_sequences(model, examples, pad, decisions={4: forced[1]})
    with pytest.raises(ValueError, match="have shape"):
        score_sequences(model, examples, pad, decisions={1: forced[1][:3]})
    with pytest.raises(TypeError, match="MindSkipModel"):
        score_sequences(model.base_model, examples, pad, decisions={1: forced[1]})


@pytest.fixture
def token_model(tok):
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=5),
                                   msk.MindSkipConfig(layers=[1, 2, 3], routing="token"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 2.0)
    return model


@pytest.mark.hf
def test_a_token_routed_model_counts_skips_per_real_token(tok, examples, token_model):
    pad = D.pad_token_id(tok)
    scores, taken = score_sequences(token_model, examples, pad, batch_size=5)
    total = evaluate_examples(token_model, examples, pad, batch_size=5)
    assert float(scores.nll.sum()) / int(scores.targets.sum()) == pytest.approx(total["loss"], rel=1e-6)
    assert sorted(taken) == [1, 2, 3] and all(t.dtype == torch.float64 for t in taken.values())
    # Each sequence alone (no padding): its kept share of its tokens per layer, and so its skips.
    for row in (0, 5, 17):
        token_model(input_ids=torch.tensor([examples[row].input_ids]))
        keep = {i: r.keep[0] for i, r in token_model.last_record.layers.items()}
        for i, k in keep.items():
            assert float(taken[i][row]) == pytest.approx(float(k.double().mean()))
        assert float(scores.skipped[row]) == pytest.approx(sum(float((~k).double().mean()) for k in keep.values()))
    # The routers decide per token here: neither whole layers nor nothing.
    assert any(0.0 < float(t[row]) < 1.0 for t in taken.values() for row in range(len(examples)))
    # Padding is not counted: one sequence per batch gives the same skips.
    alone, _ = score_sequences(token_model, examples, pad, batch_size=1)
    assert torch.allclose(alone.skipped, scores.skipped) and torch.allclose(alone.nll, scores.nll, rtol=1e-5)
    fractions = kept_fractions(taken, scores.tokens)
    weights = scores.tokens.double()
    assert summarise(scores, ["x"] * len(examples))[MIX]["skipped_per_token"] == pytest.approx(
        sum(1 - f for f in fractions.values()))
    assert fractions[2] == pytest.approx(float((taken[2] * weights).sum() / weights.sum()))


@pytest.mark.hf
def test_a_token_models_static_projection_and_whole_layer_decisions(tok, examples, token_model):
    pad = D.pad_token_id(tok)
    set_static_token_fractions(token_model, {1: 0.5, 2: 1.0, 3: 0.0})
    scores, taken = score_sequences(token_model, examples, pad, batch_size=5)
    set_static_token_fractions(token_model, None)
    # Each sequence keeps the static pattern's share of its own positions (about the fraction, exactly on average
    # over long sequences).
    pattern = torch.tensor([float(static_token_keep(1, 0.5, torch.arange(len(e))).double().mean()) for e in examples])
    assert torch.allclose(taken[1], pattern.double()) and bool((taken[2] == 1).all()) and bool((taken[3] == 0).all())
    assert torch.allclose(scores.skipped, 2.0 - pattern.double())
    fractions = kept_fractions(taken, scores.tokens)
    assert fractions[2] == 1.0 and fractions[3] == 0.0 and fractions[1] == pytest.approx(0.5, abs=0.1)
    # Whole-layer decisions per sequence on a token-routed model: whole counts, and the routers come back.
    forced = {1: torch.arange(len(examples)) % 2 == 0, 3: torch.zeros(len(examples), dtype=torch.bool)}
    before = {k: v.clone() for k, v in token_model.router_state_dict().items()}
    scores, taken = score_sequences(token_model, examples, pad, batch_size=4, decisions=forced)
    assert scores.skipped.tolist() == [1.0 + (row % 2) for row in range(len(examples))]
    assert taken[1].tolist() == forced[1].double().tolist() and bool((taken[2] == 1).all())
    assert all(torch.equal(v, token_model.router_state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="decisions of layer 1 are for 3 sequences"):
        kept_fractions({1: taken[1][:3]}, scores.tokens)


def hand(nll, targets, tokens, skipped):
    return SequenceScores(torch.tensor(nll, dtype=torch.float64), torch.tensor(targets), torch.tensor(tokens),
                          torch.tensor(skipped, dtype=torch.float64))


def test_summaries_and_paired_differences_by_hand():
    owner = ["a", "a", "b"]
    x = hand([2.0, 6.0, 3.0], [2, 4, 3], [4, 4, 8], [1.0, 3.0, 0.0])
    s = summarise(x, owner)
    assert s["a"]["loss"] == pytest.approx(8 / 6) and s["b"]["perplexity"] == pytest.approx(math.e, rel=1e-4)
    assert s["a"]["skipped_per_token"] == 2.0 and s[MIX]["skipped_per_token"] == pytest.approx(16 / 16)
    assert s[MIX]["skipped_per_sequence"] == pytest.approx(4 / 3) and s[MIX]["target_tokens"] == 9
    y = hand([1.0, 6.0, 1.5], [2, 4, 3], [4, 4, 8], [0.0, 0.0, 0.0])
    d = paired(x, y, owner)
    assert d["a"]["delta"] == pytest.approx(1 / 6) and d[MIX]["delta"] == pytest.approx(2.5 / 9)
    assert d["b"]["se"] == 0.0  # one sequence: no spread to estimate
    # Ratio estimator: residuals 1 - (1/6)*2 and 0 - (1/6)*4, times m / (m - 1) = 2.
    assert d["a"]["se"] == pytest.approx(math.sqrt(((2 / 3) ** 2 + (2 / 3) ** 2) * 2) / 6)
    assert d["a"]["ratio"] == pytest.approx(math.expm1(1 / 6), rel=1e-5)
    with pytest.raises(ValueError, match="not of the same sequences"):
        paired(x, hand([1.0, 1.0, 1.0], [2, 4, 2], [4, 4, 8], [0.0] * 3), owner)
    with pytest.raises(ValueError, match="3 scored sequences"):
        summarise(x, owner[:2])


def test_a_static_curve_at_fractional_counts_is_linear_per_domain():
    owner = ["a", "a", "b"]
    low = hand([1.0, 2.0, 3.0], [1, 1, 1], [2, 2, 2], [2.0, 2.0, 2.0])
    high = hand([2.0, 4.0, 5.0], [1, 1, 1], [2, 2, 2], [3.0, 3.0, 3.0])
    mid = static_at({2: low, 3: high}, owner, {"a": 2.25, "b": 3.0})
    assert mid.nll.tolist() == [1.25, 2.5, 5.0] and mid.skipped.tolist() == [2.25, 2.25, 3.0]
    assert summarise(mid, owner)["a"]["skipped_per_token"] == 2.25
    assert static_at({2: low}, owner, {"a": 2.0, "b": 2.0}).nll.tolist() == low.nll.tolist()  # a whole count
    with pytest.raises(ValueError, match="domain b"):
        static_at({2: low, 3: high}, owner, {"a": 2.5})
    with pytest.raises(ValueError, match="static drop of 4 layers"):
        static_at({2: low, 3: high}, owner, {"a": 2.5, "b": 3.5})
    with pytest.raises(ValueError, match="not of the same sequences"):
        static_at({2: low, 3: hand([1.0] * 3, [1, 1, 2], [2, 2, 2], [3.0] * 3)}, owner, {"a": 2.0, "b": 2.0})
    # The better candidate on each domain: `high` nowhere, `low` on both.
    other = hand([0.5, 2.0, 9.0], [1, 1, 1], [2, 2, 2], [2.0, 2.0, 2.0])
    best = best_per_domain([low, other], owner)
    assert best.nll.tolist() == [0.5, 2.0, 3.0]
