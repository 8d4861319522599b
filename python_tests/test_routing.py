"""Is the routing dynamic? Per-layer decisions on held-out data, the disagreement with each layer's majority,
and the static projection (every layer frozen to its majority decision)."""

from __future__ import annotations

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext import data as D
from mindskip_ext.eval.perplexity import evaluate_examples
from mindskip_ext.eval.routing import apply_static_projection, routing_decisions, routing_report
from mindskip_ext.testing import synthetic_instructions, tiny_model


@pytest.fixture(scope="module")
def examples(tok):
    return D.prepare_examples(tok, synthetic_instructions(60, seed=4), 128).examples


def routed(tok, **config):
    """Layers 1 and 2 route on the input (random weights), layer 3 always keeps and layer 4 always skips."""
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=6), msk.MindSkipConfig(layers=[1, 2, 3, 4],
                                                                                           **config))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for idx, router in model.routers.items():
            std = 2.0 if idx in (1, 2) else 0.0
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * std)
            router.bias.fill_({3: 5.0, 4: -5.0}.get(idx, 0.0))
    return model


def test_decisions_follow_each_sequence_and_match_a_routed_forward(tok, examples):
    model = routed(tok)
    pad = D.pad_token_id(tok)
    decisions = routing_decisions(model, examples, pad, batch_size=7)
    assert list(decisions) == [1, 2, 3, 4] and all(d.shape == (len(examples),) for d in decisions.values())
    one = routing_decisions(model, examples[5:6], pad)
    assert all(bool(one[i][0]) == bool(decisions[i][5]) for i in decisions)  # batch invariant, right order
    capacity = evaluate_examples(model, examples, pad)["capacity_per_layer"]
    assert {str(i): float(d.float().mean()) for i, d in decisions.items()} == pytest.approx(capacity)


def test_report_and_static_projection(tok, examples):
    pad = D.pad_token_id(tok)
    model = routed(tok)
    report = routing_report(routing_decisions(model, examples, pad), num_layers=6)
    layers = report["layers"]
    assert layers["3"] == {"kept": 1.0, "majority": "keep", "disagreement": 0.0}
    assert layers["4"] == {"kept": 0.0, "majority": "skip", "disagreement": 0.0}
    assert set(report["dynamic_layers"]) == {i for i in (1, 2) if 0.0 < layers[str(i)]["kept"] < 1.0}
    assert report["dynamic_layers"], "random router weights must route some sequences each way"
    for i in report["dynamic_layers"]:
        kept = layers[str(i)]["kept"]
        assert layers[str(i)]["disagreement"] == pytest.approx(min(kept, 1 - kept))
    skipped = sum(1 - v["kept"] for v in layers.values())
    assert report["skipped_layers_per_sequence"] == pytest.approx(skipped)
    assert report["skip_ratio"] == pytest.approx(skipped / 6, abs=1e-6)  # rounded to 6 places
    dropped = apply_static_projection(model, report)
    assert 4 in dropped and 3 not in dropped
    after = routing_report(routing_decisions(model, examples, pad), num_layers=6)
    assert after["dynamic_layers"] == [] and after["mean_disagreement"] == 0.0
    assert {i for i, v in after["layers"].items() if v["kept"] == 0.0} == {str(i) for i in dropped}
    assert report["static_projection"] == after["static_projection"]
    # At the dynamic model's skip ratio: the least-kept layers, as many as it skips per sequence.
    fresh = routed(tok)
    report = routing_report(routing_decisions(fresh, examples, pad), num_layers=6)
    count = round(report["skipped_layers_per_sequence"])
    least_kept = sorted(report["layers"], key=lambda i: report["layers"][i]["kept"])[:count]
    assert apply_static_projection(fresh, report, num_dropped=count) == sorted(int(i) for i in least_kept)
    assert "4" in least_kept


def test_hybrid_decisions_report_and_static_projection(tok, examples):
    """A hybrid (token routers, layer 2 per token): one decision per real token at that layer, one per sequence at
    the others; the kept fractions are the evaluated capacities, and the static projection freezes every layer."""
    pad = D.pad_token_id(tok)
    model = routed(tok, routing="token", token_layers=[2])
    decisions = routing_decisions(model, examples, pad, batch_size=7)
    assert decisions[2].shape == (sum(len(e) for e in examples),)
    assert all(decisions[i].shape == (len(examples),) for i in (1, 3, 4))
    capacity = evaluate_examples(model, examples, pad)["capacity_per_layer"]
    assert {str(i): float(d.float().mean()) for i, d in decisions.items()} == pytest.approx(capacity)
    report = routing_report(decisions, num_layers=6)
    assert 0.0 < report["layers"]["2"]["kept"] < 1.0 and 2 in report["dynamic_layers"]
    dropped = apply_static_projection(model, report)
    after = routing_report(routing_decisions(model, examples, pad), num_layers=6)
    assert after["dynamic_layers"] == [] and {int(i) for i, v in after["layers"].items() if v["kept"] == 0} == set(
        dropped)
