"""MindSkipModel: conversion of a stock HF model, save/load of the routers, unload back to the original, and
bad input (bad configs, wrong or corrupted router directories) that leaves the model as it
was. Tiny models built from configs; no downloads."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext.model import CONFIG_NAME, WEIGHTS_NAME

from tiny import VOCAB, logits_of, padded_batch, randomize_routers, tiny_lm

pytestmark = pytest.mark.hf


def test_save_load_unload_roundtrip(tmp_path):
    model = tiny_lm("llama")
    pristine = copy.deepcopy(model)
    _, ids, mask = padded_batch([5, 9, 7])
    original = logits_of(model, ids, mask)
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(granularity="attn", layers=[1, 2]))
    randomize_routers(wrapped)
    routed = logits_of(wrapped, ids, mask)
    wrapped.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 1024 * 2
    umask = os.umask(0)
    os.umask(umask)
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in tmp_path.iterdir())

    loaded = msk.MindSkipModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    assert torch.equal(logits_of(loaded, ids, mask), routed)
    assert loaded.mindskip_config == wrapped.mindskip_config

    originals = list(model.model.layers)
    back = wrapped.unload()
    assert back is model
    assert all(a is b for a, b in zip(back.model.layers, [getattr(m, "base_layer", m) for m in originals]))
    assert "forward" not in back.model.__dict__
    assert torch.equal(logits_of(back, ids, mask), original)
    assert all(p.requires_grad for p in back.parameters())


def test_only_router_parameters_require_grad():
    wrapped = msk.get_mindskip_model(tiny_lm("qwen2"))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped.routers)
    assert sorted(wrapped.routers) == [1, 2]  # 4 layers: last half except the last


def test_wrapper_behaves_like_the_hf_model():
    wrapped = msk.get_mindskip_model(tiny_lm("llama"))
    assert wrapped.config.model_type == "llama"
    assert wrapped.device.type == "cpu"
    assert wrapped.to(torch.float64) is wrapped and wrapped.dtype == torch.float64
    assert wrapped.eval() is wrapped and not wrapped.base_model.training
    assert wrapped.get_input_embeddings() is wrapped.base_model.model.embed_tokens


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[1, 4]), "out of range"),
        (dict(threshold=1.0), r"threshold must be in \(0, 1\)"),
        (dict(threshold=0.0), r"threshold must be in \(0, 1\)"),
        (dict(granularity="head"), "granularity must be one of"),
    ],
)
def test_bad_config_is_rejected_and_model_stays_usable(kwargs, message):
    model = tiny_lm("llama")
    ids = torch.randint(1, VOCAB, (2, 5))
    before = logits_of(model, ids)
    with pytest.raises(ValueError, match=message):
        msk.get_mindskip_model(model, msk.MindSkipConfig(**kwargs))
    assert not any(isinstance(m, msk.MindSkipDecoderLayer) for m in model.modules())
    assert torch.equal(logits_of(model, ids), before)


def test_unsupported_attention_implementation():
    model = tiny_lm("llama", attn="flex_attention")
    with pytest.raises(ValueError, match="attention implementation 'flex_attention' is not supported"):
        msk.get_mindskip_model(model)


def test_converting_twice_is_an_error():
    model = tiny_lm("llama")
    msk.get_mindskip_model(model)
    with pytest.raises(ValueError, match="already has MindSkip layers"):
        msk.get_mindskip_model(model)


@pytest.fixture
def saved_routers(tmp_path):
    wrapped = msk.get_mindskip_model(tiny_lm("llama"))
    randomize_routers(wrapped)
    wrapped.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(model_type="llama", hidden=64), "trained for"),
        (dict(model_type="llama", layers=6), "trained for"),
        (dict(model_type="qwen2"), "trained for"),
    ],
)
def test_loading_routers_onto_a_different_model_fails_cleanly(saved_routers, other, message):
    model_type = other.pop("model_type")
    base = tiny_lm(model_type, **other)
    ids = torch.randint(1, VOCAB, (2, 5))
    before = logits_of(base, ids)
    with pytest.raises(ValueError, match=message):
        msk.MindSkipModel.from_pretrained(base, saved_routers)
    assert torch.equal(logits_of(base, ids), before)
    assert not any(isinstance(m, msk.MindSkipDecoderLayer) for m in base.modules())


def test_truncated_or_corrupted_router_file_fails_cleanly(saved_routers):
    weights = saved_routers / WEIGHTS_NAME
    payload = weights.read_bytes()
    weights.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        msk.MindSkipModel.from_pretrained(tiny_lm("llama"), saved_routers)
    flipped = bytearray(payload)
    flipped[-3] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        msk.MindSkipModel.from_pretrained(tiny_lm("llama"), saved_routers)


def test_bad_router_directory(tmp_path, saved_routers):
    with pytest.raises(FileNotFoundError, match="not a MindSkip router directory"):
        msk.MindSkipModel.from_pretrained(tiny_lm("llama"), tmp_path / "missing")
    (saved_routers / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        msk.MindSkipModel.from_pretrained(tiny_lm("llama"), saved_routers)
    (saved_routers / CONFIG_NAME).write_text(json.dumps({"layers": [1]}))
    with pytest.raises(ValueError, match="lacks"):
        msk.MindSkipModel.from_pretrained(tiny_lm("llama"), saved_routers)
