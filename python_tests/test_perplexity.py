"""Perplexity and capacity: exact loss, batch invariance, capacity bookkeeping, dataset entry point."""

from __future__ import annotations

import math

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext import data as D
from mindskip_ext.eval.perplexity import evaluate_dataset, evaluate_examples
from mindskip_ext.layer import CapacityMeter, LayerRouting, RoutingRecord
from mindskip_ext.testing import synthetic_instructions, tiny_model

from tiny import DATA_DIR


@pytest.fixture(scope="module")
def examples(tok):
    return D.prepare_examples(tok, synthetic_instructions(40, seed=3), 128).examples


def set_routers(model, bias=None, seed=None):
    with torch.no_grad():
        for router in model.routers.values():
            if seed is not None:
                gen = torch.Generator().manual_seed(seed + router.weight.shape[1])
                router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 3.0)
                seed += 1
            if bias is not None:
                router.weight.zero_()
                router.bias.fill_(bias)


def test_loss_matches_hugging_face_per_example(tok, examples):
    model = tiny_model(tokenizer=tok, layers=4)
    pad = D.pad_token_id(tok)
    result = evaluate_examples(model, examples[:6], pad, batch_size=4)
    nll, count = 0.0, 0
    for e in examples[:6]:
        ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        n = e.num_targets
        nll += float(out.loss) * n
        count += n
    assert result["target_tokens"] == count
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["capacity"] is None and result["capacity_per_layer"] == {}


def test_mindskip_results_do_not_depend_on_batching(tok, examples):
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=6), msk.MindSkipConfig())
    set_routers(model, seed=0)
    pad = D.pad_token_id(tok)
    one = evaluate_examples(model, examples, pad, batch_size=1)
    many = evaluate_examples(model, examples, pad, batch_size=16)
    assert 0.0 < one["capacity"] < 1.0, "random routers should keep some sequences and skip others"
    assert many["capacity_per_layer"] == one["capacity_per_layer"]
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_forced_routing_gives_capacity_zero_or_one(tok, examples):
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=6), msk.MindSkipConfig(layers=[1, 2, 4]))
    pad = D.pad_token_id(tok)
    set_routers(model, bias=30.0)
    kept = evaluate_examples(model, examples, pad)
    dense = evaluate_examples(model.unload(), examples, pad)
    assert kept["capacity"] == 1.0 and kept["skipped_layers_per_sequence"] == 0.0
    assert kept["loss"] == pytest.approx(dense["loss"], rel=1e-6)
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=6), msk.MindSkipConfig(layers=[1, 2, 4]))
    set_routers(model, bias=-30.0)
    skipped = evaluate_examples(model, examples, pad)
    assert skipped["capacity"] == 0.0
    assert skipped["capacity_per_layer"] == {"1": 0.0, "2": 0.0, "4": 0.0}
    assert skipped["skipped_layers_per_sequence"] == 3.0
    assert skipped["loss"] != pytest.approx(dense["loss"], rel=1e-3)


def test_capacity_meter_counts_pairs():
    def routing(kept, total):
        keep = torch.tensor([True] * kept + [False] * (total - kept))
        return LayerRouting(score=keep.float(), keep=keep, gate=None, num_kept=kept, batch_size=total)

    a, b = RoutingRecord(), RoutingRecord()
    a.layers = {3: routing(2, 4), 5: routing(4, 4)}
    b.layers = {3: routing(0, 2), 5: routing(1, 2)}
    meter = CapacityMeter()
    meter.add(a)
    other = CapacityMeter()
    other.add(b)
    meter.merge(other)
    assert meter.per_layer() == {3: 2 / 6, 5: 5 / 6}
    assert meter.overall() == pytest.approx(7 / 12)
    assert meter.summary()["skipped_layers_per_sequence"] == pytest.approx(1 - 2 / 6 + 1 - 5 / 6, abs=1e-6)
    assert CapacityMeter().overall() is None


def test_evaluate_dataset_on_text_and_instructions(tok):
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=4), msk.MindSkipConfig())
    text = evaluate_dataset(model, tok, DATA_DIR / "text_small.txt", max_length=32, batch_size=4)
    assert text["data"]["formats"] == {"text": len(D.load_records(DATA_DIR / "text_small.txt"))}
    assert text["capacity"] == 1.0  # zero-initialised routers keep everything
    assert math.isfinite(text["perplexity"]) and text["perplexity"] > 1.0
    instruct = evaluate_dataset(model, tok, DATA_DIR / "alpaca_small.json", max_length=128, max_records=10)
    assert instruct["sequences"] == 10 and instruct["data"]["formats"] == {"alpaca": 10}
