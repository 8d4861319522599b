"""MindSkip on Hugging Face models: conversion, real skipping, batch invariance, compact KV cache,
generate(), save/load/unload and bad input. Tiny models built from configs; no downloads."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config

import mindskip_ext as msk
from mindskip_ext.attention import best_fast_backend
from mindskip_ext.cache import kv_bytes
from mindskip_ext.hf_compat import cache_kwargs, output_cache
from mindskip_ext.model import CONFIG_NAME, WEIGHTS_NAME

MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3"]
GRANULARITIES = ["attn", "mlp", "block"]
ATTN_IMPLS = ["eager", "sdpa"]
VOCAB = 96

pytestmark = pytest.mark.hf


def tiny_config(model_type: str, layers: int = 4, hidden: int = 32):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,  # no early stop: batched and single runs generate the same number of tokens
        tie_word_embeddings=False,
    )
    if model_type == "qwen3":
        kwargs["head_dim"] = hidden // 4
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type="llama", attn="sdpa", dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw), attn_implementation=attn)
    return model.to(dtype).eval()


def randomize_routers(model: msk.MindSkipModel, seed: int = 1, std: float = 4.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * std)
            router.bias.zero_()


def padded_batch(lengths, side="left", seed=2):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return seqs, ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def logits_of(model, ids, mask=None):
    with torch.no_grad():
        pos = positions(mask) if mask is not None else None
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


# ---------------------------------------------------------------------------- identity / forced skip


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("attn", ATTN_IMPLS)
def test_fresh_conversion_is_identity(model_type, granularity, attn):
    model = tiny_model(model_type, attn)
    _, ids, mask = padded_batch([5, 9, 7])
    ref = logits_of(model, ids, mask)
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(granularity=granularity))
    assert torch.equal(logits_of(wrapped, ids, mask), ref)
    assert all(c == 1.0 for c in wrapped.last_capacity.values())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("attn", ATTN_IMPLS)
def test_forced_skip_equals_zeroed_sublayer(model_type, granularity, attn):
    layer = 2
    model = tiny_model(model_type, attn)
    _, ids, mask = padded_batch([6, 8])
    reference = copy.deepcopy(model)
    decoder_layer = reference.model.layers[layer]
    handles = []
    if granularity in ("attn", "block"):
        handles.append(decoder_layer.self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), out[1])))
    if granularity in ("mlp", "block"):
        handles.append(decoder_layer.mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
    expected = logits_of(reference, ids, mask)

    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(granularity=granularity, layers=[layer]))
    with torch.no_grad():
        wrapped.routers[layer].bias.fill_(-10.0)
    got = logits_of(wrapped, ids, mask)
    assert wrapped.last_capacity == {layer: 0.0}
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Skipping really changes the output (the test would be vacuous otherwise).
    assert not torch.allclose(got, logits_of(copy.deepcopy(wrapped).unload(), ids, mask))


# ---------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_decisions_are_batch_invariant_logits(model_type, granularity, side):
    model = msk.get_mindskip_model(tiny_model(model_type), msk.MindSkipConfig(granularity=granularity))
    randomize_routers(model)
    lengths = [7, 12, 3, 9, 12, 5]
    seqs, ids, mask = padded_batch(lengths, side)
    batched = logits_of(model, ids, mask)
    capacity = model.last_capacity
    assert any(0.0 < c < 1.0 for c in capacity.values()), capacity
    width = ids.shape[1]
    for i, s in enumerate(seqs):
        alone = logits_of(model, s[None])
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        torch.testing.assert_close(batched[i, span], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("attn", ATTN_IMPLS)
def test_greedy_generate_is_batch_invariant_with_compact_kv(model_type, granularity, attn):
    model = msk.get_mindskip_model(tiny_model(model_type, attn), msk.MindSkipConfig(granularity=granularity))
    randomize_routers(model)
    seqs, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True
    )
    capacity = model.last_capacity
    assert any(0.0 < c < 1.0 for c in capacity.values()), capacity
    width = ids.shape[1]
    for i, s in enumerate(seqs):
        alone = model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long),
                               max_new_tokens=6, do_sample=False)
        assert torch.equal(alone[0, len(s):], out.sequences[i, width:]), f"sequence {i}"

    # KV memory: a MindSkip layer that gates attention stores only its kept rows.
    held = kv_bytes(output_cache(out))
    dense = held[0]  # layer 0 is never a MindSkip layer by default
    for idx, frac in capacity.items():
        expected = dense * frac if granularity in ("attn", "block") else dense
        assert held[idx] == pytest.approx(expected, rel=1e-9), (idx, frac)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_beam_search_and_deterministic_sampling_match_unbatched(granularity):
    model = msk.get_mindskip_model(tiny_model("llama"), msk.MindSkipConfig(granularity=granularity))
    randomize_routers(model)
    seqs, ids, mask = padded_batch([7, 12, 4, 9], "left")
    width = ids.shape[1]
    settings = [
        dict(num_beams=3, do_sample=False, max_new_tokens=5),
        dict(do_sample=True, top_k=1, max_new_tokens=5),
    ]
    for gen_kwargs in settings:
        torch.manual_seed(0)
        batched = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
        for i, s in enumerate(seqs):
            torch.manual_seed(0)
            alone = model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **gen_kwargs)
            assert torch.equal(alone[0, len(s):], batched[i, width:]), (gen_kwargs, i)
    # Real sampling with a fixed seed is reproducible.
    torch.manual_seed(3)
    a = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=5)
    torch.manual_seed(3)
    b = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=5)
    assert torch.equal(a, b)


def test_interleaved_caches_and_two_models_do_not_interfere():
    base = tiny_model("llama")
    model_a = msk.get_mindskip_model(copy.deepcopy(base))
    model_b = msk.get_mindskip_model(copy.deepcopy(base))
    randomize_routers(model_a, seed=1)
    randomize_routers(model_b, seed=7)
    _, ids1, mask1 = padded_batch([6, 9, 4], "left", seed=3)
    _, ids2, mask2 = padded_batch([8, 5], "left", seed=4)

    def decode(model, ids, mask, steps, cache, state=None):
        tokens = []
        with torch.no_grad():
            if state is None:
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                            **cache_kwargs(model, cache))
                state = (mask, out.logits[:, -1].argmax(-1))
                tokens.append(state[1])
                steps -= 1
            mask, last = state
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
                out = model(input_ids=last[:, None], attention_mask=mask, position_ids=positions(mask)[:, -1:],
                            use_cache=True, **cache_kwargs(model, cache))
                last = out.logits[:, -1].argmax(-1)
                tokens.append(last)
        return tokens, (mask, last)

    solo1, _ = decode(model_a, ids1, mask1, 4, DynamicCache())
    solo2, _ = decode(model_b, ids2, mask2, 4, DynamicCache())
    c1, c2 = DynamicCache(), DynamicCache()
    t1, s1 = decode(model_a, ids1, mask1, 2, c1)
    t2, s2 = decode(model_b, ids2, mask2, 2, c2)
    t1b, _ = decode(model_a, None, None, 2, c1, s1)
    t2b, _ = decode(model_b, None, None, 2, c2, s2)
    assert all(torch.equal(x, y) for x, y in zip(t1 + t1b, solo1))
    assert all(torch.equal(x, y) for x, y in zip(t2 + t2b, solo2))


# ---------------------------------------------------------------------------- paths and dtypes


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_packed_path_matches_gathered_path(model_type):
    base = tiny_model(model_type)
    gathered = msk.get_mindskip_model(copy.deepcopy(base), msk.MindSkipConfig(packed_attention="off"))
    packed = msk.get_mindskip_model(copy.deepcopy(base), msk.MindSkipConfig(packed_attention="on"))
    randomize_routers(gathered)
    randomize_routers(packed)
    _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    ref = logits_of(gathered, ids, mask)
    got = logits_of(packed, ids, mask)
    assert packed.last_capacity == gathered.last_capacity
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_identity_and_skipping(dtype):
    model = tiny_model("llama", dtype=dtype)
    _, ids, mask = padded_batch([5, 9, 7])
    ref = logits_of(model, ids, mask)
    wrapped = msk.get_mindskip_model(model)
    assert torch.equal(logits_of(wrapped, ids, mask), ref)
    randomize_routers(wrapped)
    out = logits_of(wrapped, ids, mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert any(0.0 < c < 1.0 for c in wrapped.last_capacity.values())


def test_output_hidden_states_include_mindskip_layers():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    wrapped = msk.get_mindskip_model(model)
    with torch.no_grad():
        got = wrapped(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_flash_varlen_path_matches_sdpa_path():
    if best_fast_backend(torch.device("cuda"), torch.bfloat16) is None:
        pytest.skip("no varlen FlashAttention kernel on this machine")
    base = tiny_model("llama", hidden=64, dtype=torch.bfloat16).cuda()
    sdpa = msk.get_mindskip_model(copy.deepcopy(base), msk.MindSkipConfig(packed_attention="off"))
    flash = msk.get_mindskip_model(copy.deepcopy(base), msk.MindSkipConfig(packed_attention="auto"))
    randomize_routers(sdpa)
    randomize_routers(flash)
    _, ids, mask = padded_batch([37, 64, 11, 50], "left")
    ids, mask = ids.cuda(), mask.cuda()
    ref, got = logits_of(sdpa, ids, mask).float(), logits_of(flash, ids, mask).float()
    real = mask.bool()
    assert flash.last_capacity == sdpa.last_capacity
    err = (got[real] - ref[real]).norm() / ref[real].norm()
    assert err < 2e-2


def _cuda_attn_impls():
    impls = ["sdpa", "eager"]
    try:
        import flash_attn  # noqa: F401

        impls.append("flash_attention_2")
    except ImportError:
        pass
    return impls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn", _cuda_attn_impls())
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cuda_identity_skipping_and_compact_kv(attn, granularity):
    dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32
    base = tiny_model("llama", attn, dtype=dtype).cuda()
    _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    ids, mask = ids.cuda(), mask.cuda()
    ref = logits_of(base, ids, mask)
    model = msk.get_mindskip_model(base, msk.MindSkipConfig(granularity=granularity, packed_attention="off"))
    assert torch.equal(logits_of(model, ids, mask), ref)
    randomize_routers(model)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True)
    capacity = model.last_capacity
    assert any(0.0 < c < 1.0 for c in capacity.values()), capacity
    held = kv_bytes(output_cache(out))
    for idx, frac in capacity.items():
        expected = held[0] * frac if granularity in ("attn", "block") else held[0]
        assert held[idx] == pytest.approx(expected, rel=1e-9)
    if dtype == torch.float32:  # bf16 kernels depend on the batch shape; fp32 must be batch invariant
        for i in range(ids.shape[0]):
            real = mask[i].bool()
            alone = model.generate(input_ids=ids[i:i + 1, real], max_new_tokens=4, do_sample=False)
            assert torch.equal(alone[0, int(real.sum()):], out.sequences[i, ids.shape[1]:])


# ---------------------------------------------------------------------------- save / load / unload


def test_save_load_unload_roundtrip(tmp_path):
    model = tiny_model("llama")
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
    wrapped = msk.get_mindskip_model(tiny_model("qwen2"))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped.routers)
    assert sorted(wrapped.routers) == [1, 2]  # 4 layers: last half except the last


def test_wrapper_behaves_like_the_hf_model():
    wrapped = msk.get_mindskip_model(tiny_model("llama"))
    assert wrapped.config.model_type == "llama"
    assert wrapped.device.type == "cpu"
    assert wrapped.to(torch.float64) is wrapped and wrapped.dtype == torch.float64
    assert wrapped.eval() is wrapped and not wrapped.base_model.training
    assert wrapped.get_input_embeddings() is wrapped.base_model.model.embed_tokens


def test_default_layers_follow_the_paper():
    assert msk.MindSkipConfig().resolve_layers(32) == list(range(15, 31))
    assert msk.MindSkipConfig().resolve_layers(30) == list(range(14, 29))


# ---------------------------------------------------------------------------- bad input


def test_unsupported_model_type_names_supported_ones():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="gpt2.*supported: llama, mistral, qwen2, qwen3"):
        msk.get_mindskip_model(model)


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
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 5))
    before = logits_of(model, ids)
    with pytest.raises(ValueError, match=message):
        msk.get_mindskip_model(model, msk.MindSkipConfig(**kwargs))
    assert not any(isinstance(m, msk.MindSkipDecoderLayer) for m in model.modules())
    assert torch.equal(logits_of(model, ids), before)


def test_unsupported_attention_implementation():
    model = tiny_model("llama", attn="flex_attention")
    with pytest.raises(ValueError, match="attention implementation 'flex_attention' is not supported"):
        msk.get_mindskip_model(model)


def test_converting_twice_is_an_error():
    model = tiny_model("llama")
    msk.get_mindskip_model(model)
    with pytest.raises(ValueError, match="already has MindSkip layers"):
        msk.get_mindskip_model(model)


@pytest.fixture
def saved_routers(tmp_path):
    wrapped = msk.get_mindskip_model(tiny_model("llama"))
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
    base = tiny_model(model_type, **other)
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
        msk.MindSkipModel.from_pretrained(tiny_model("llama"), saved_routers)
    flipped = bytearray(payload)
    flipped[-3] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        msk.MindSkipModel.from_pretrained(tiny_model("llama"), saved_routers)


def test_bad_router_directory(tmp_path, saved_routers):
    with pytest.raises(FileNotFoundError, match="not a MindSkip router directory"):
        msk.MindSkipModel.from_pretrained(tiny_model("llama"), tmp_path / "missing")
    (saved_routers / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        msk.MindSkipModel.from_pretrained(tiny_model("llama"), saved_routers)
    (saved_routers / CONFIG_NAME).write_text(json.dumps({"layers": [1]}))
    with pytest.raises(ValueError, match="lacks"):
        msk.MindSkipModel.from_pretrained(tiny_model("llama"), saved_routers)


def test_prepared_4d_mask_is_rejected():
    wrapped = msk.get_mindskip_model(tiny_model("llama"))
    ids = torch.randint(1, VOCAB, (2, 5))
    mask4d = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2D padding mask"):
        wrapped(input_ids=ids, attention_mask=mask4d)


def test_static_cache_is_rejected_with_a_clear_error():
    wrapped = msk.get_mindskip_model(tiny_model("llama"))
    ids = torch.randint(1, VOCAB, (2, 5))
    with pytest.raises(TypeError, match="dynamic KV cache"):
        wrapped.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static")
