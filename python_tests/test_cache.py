"""The compact KV cache and generate(): greedy, beam search and sampling equal the unbatched runs, a MindSkip
layer stores only its kept rows, interleaved caches and two models do not interfere; the fixed-shape static cache
(``cache_implementation="static"`` or a ``StaticCache`` object) gives the dynamic cache's tokens with the same kept
fraction of KV, through beam search, batch selection, repetition, crop and reset. Tiny models built from configs; no
downloads."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, StaticCache

import mindskip_ext as msk
from mindskip_ext.cache import kv_bytes
from mindskip_ext.hf_compat import cache_kwargs, output_cache
from mindskip_ext.layer import MindSkipDecoderLayer

from tiny import (
    ATTN_IMPLS,
    GRANULARITIES,
    MODEL_TYPES,
    VOCAB,
    logits_of,
    padded_batch,
    positions,
    randomize_routers,
    tiny_lm,
)

pytestmark = pytest.mark.hf


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("attn", ATTN_IMPLS)
def test_greedy_generate_is_batch_invariant_with_compact_kv(model_type, granularity, attn):
    model = msk.get_mindskip_model(tiny_lm(model_type, attn), msk.MindSkipConfig(granularity=granularity))
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
def test_a_decode_step_normalises_only_for_a_sublayer_that_runs(granularity):
    """The input norm feeds the router at prefill; a decode step reuses the decision, and where every sequence skips
    the gated attention it does not normalise at all (a whole-layer skip costs no norm), with the same tokens."""
    model = msk.get_mindskip_model(tiny_lm("llama", "sdpa", layers=6), msk.MindSkipConfig(granularity=granularity))
    randomize_routers(model)
    skipping = next(iter(model.routers))
    with torch.no_grad():
        model.routers[skipping].weight.zero_()
        model.routers[skipping].bias.fill_(-10.0)  # keeps no sequence
    _, ids, mask = padded_batch([7, 12, 3], "left")
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    calls = dict.fromkeys(model.mindskip_layers, 0)
    hooks = [getattr(layer.base_layer, layer.spec.input_norm).register_forward_hook(
        lambda *_, idx=idx: calls.__setitem__(idx, calls[idx] + 1)) for idx, layer in model.mindskip_layers.items()]
    try:
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(got, want)
    # Prefill and 4 decode steps; a layer that keeps no sequence normalises at prefill only where its decision gates
    # attention.
    capacity = model.last_capacity
    assert capacity[skipping] == 0.0 and any(c > 0.0 for c in capacity.values())
    gated = granularity in ("attn", "block")
    assert calls == {idx: 1 if gated and capacity[idx] == 0.0 else 5 for idx in calls}


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a_decode_step_that_keeps_every_sequence_is_the_stock_layers_step(granularity):
    """Where a layer's prefill kept every sequence, its decode steps call the wrapped stock layer itself (the routed
    path's host calls saved), on the same cache slot: the tokens and the KV are the unconverted model's, and the
    stock layer's hooks fire once per forward."""
    dense = tiny_lm("llama", "sdpa", layers=6)
    _, ids, mask = padded_batch([7, 12, 3], "left")
    want = dense.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    model = msk.get_mindskip_model(dense, msk.MindSkipConfig(granularity=granularity))
    with torch.no_grad():
        for router in model.routers.values():
            router.bias.fill_(10.0)  # keeps every sequence
    stock = dict.fromkeys(model.mindskip_layers, 0)
    hooked = dict.fromkeys(model.mindskip_layers, 0)
    hooks = []
    for idx, layer in model.mindskip_layers.items():
        hooks.append(layer.base_layer.register_forward_pre_hook(
            lambda *_, idx=idx: stock.__setitem__(idx, stock[idx] + 1)))
        hooks.append(layer.base_layer.register_forward_hook(
            lambda *_, idx=idx: hooked.__setitem__(idx, hooked[idx] + 1)))
    try:
        cache = DynamicCache()
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             **cache_kwargs(model, cache))
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(got, want)
    assert model.last_capacity == dict.fromkeys(model.mindskip_layers, 1.0)
    # The prefill routes (the stock layer is not called); the 4 decode steps are the stock layer's.
    assert stock == dict.fromkeys(model.mindskip_layers, 4)
    assert hooked == dict.fromkeys(model.mindskip_layers, 5)
    assert all(layer.keys.shape[0] == ids.shape[0] for layer in cache.layers)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("attn", ATTN_IMPLS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("granularity", ["attn", "block"])
def test_a_mixed_decode_step_runs_the_attention_itself_and_equals_the_attention_modules_step(
    model_type, attn, cache, granularity
):
    """A decode step of a layer that keeps some of the batch runs the stock attention's computation on the kept rows
    itself, with the rotary embedding of q and k as one op: the logits of every step are bit for bit those of the
    general path, which calls the attention module on the gathered rows (taken where the attention module has hooks,
    which then fire). Left padding: each kept row reads its own position's cos/sin."""
    _check_mixed_decode_against_the_attention_module(tiny_lm(model_type, attn), cache, granularity)


@pytest.mark.cuda
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cuda_mixed_decode_step_equals_the_attention_modules_step(model_type, cache):
    """The same on the GPU in bf16: the CUDA kernels of the rotary embedding and the out-of-place scatter-add round
    as the unfused ops do."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _check_mixed_decode_against_the_attention_module(tiny_lm(model_type, "sdpa", dtype=torch.bfloat16).cuda(), cache,
                                                     "attn")


def _check_mixed_decode_against_the_attention_module(base, cache, granularity):
    model = msk.get_mindskip_model(base, msk.MindSkipConfig(granularity=granularity))
    randomize_routers(model)
    _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    device = next(model.parameters()).device
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=5, do_sample=False,
                  return_dict_in_generate=True, output_logits=True,
                  **({"cache_implementation": "static"} if cache == "static" else {}))
    fused = MindSkipDecoderLayer._mixed_decode
    runs = []

    def counting(self, *args, **kw):
        runs.append(self.layer_idx)
        return fused(self, *args, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MindSkipDecoderLayer, "_mixed_decode", counting)
        got = model.generate(**kwargs)
    mixed = [idx for idx, c in model.last_capacity.items() if 0.0 < c < 1.0]
    assert mixed and sorted(runs) == sorted(mixed * 4)  # 4 decode steps after the prefill

    calls = dict.fromkeys(model.mindskip_layers, 0)
    hooks = [getattr(layer.base_layer, layer.spec.attn).register_forward_hook(
        lambda *_, idx=idx: calls.__setitem__(idx, calls[idx] + 1)) for idx, layer in model.mindskip_layers.items()]
    try:
        want = model.generate(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    assert all(calls[idx] == 5 for idx in mixed)  # the hooked attention ran at the prefill and every step
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))


def test_a_mixed_decode_step_under_autocast_is_the_attention_modules_step():
    """Under autocast q and k are computed in another dtype than cos and sin, whose products the stock attention
    promotes: a mixed layer's decode step then calls the attention module, as the general path does."""
    model = msk.get_mindskip_model(tiny_lm("llama", "sdpa"))
    randomize_routers(model)
    _, ids, mask = padded_batch([7, 12, 3, 9], "left")
    runs = []
    fused = MindSkipDecoderLayer._mixed_decode
    with pytest.MonkeyPatch.context() as patch, torch.autocast("cpu", dtype=torch.bfloat16):
        patch.setattr(MindSkipDecoderLayer, "_mixed_decode", lambda *a, **k: runs.append(1) or fused(*a, **k))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert any(0.0 < c < 1.0 for c in model.last_capacity.values()) and not runs
    assert out.shape == (4, ids.shape[1] + 4)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_beam_search_and_deterministic_sampling_match_unbatched(granularity):
    model = msk.get_mindskip_model(tiny_lm("llama"), msk.MindSkipConfig(granularity=granularity))
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
            alone = model.generate(
                input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **gen_kwargs
            )
            assert torch.equal(alone[0, len(s):], batched[i, width:]), (gen_kwargs, i)
    # Real sampling with a fixed seed is reproducible.
    torch.manual_seed(3)
    a = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=5)
    torch.manual_seed(3)
    b = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=5)
    assert torch.equal(a, b)


def test_interleaved_caches_and_two_models_do_not_interfere():
    base = tiny_lm("llama")
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


def _cuda_attn_impls():
    impls = ["sdpa", "eager"]
    try:
        import flash_attn  # noqa: F401

        impls.append("flash_attention_2")
    except ImportError:
        pass
    return impls


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn", _cuda_attn_impls())
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cuda_identity_skipping_and_compact_kv(attn, granularity):
    dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32
    base = tiny_lm("llama", attn, dtype=dtype).cuda()
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


def _static_kv_rows(cache) -> dict[int, tuple]:
    return {idx: tuple(slot.keys.shape) for idx, slot in enumerate(cache.layers) if slot.keys is not None}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("attn", ATTN_IMPLS)
def test_static_cache_generate_equals_dynamic_and_holds_only_kept_rows(model_type, granularity, attn):
    model = msk.get_mindskip_model(tiny_lm(model_type, attn), msk.MindSkipConfig(granularity=granularity))
    randomize_routers(model)
    _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    dynamic = model.generate(**kwargs)
    capacity = model.last_capacity
    assert any(0.0 < c < 1.0 for c in capacity.values()), capacity
    static = model.generate(**kwargs, cache_implementation="static")
    assert model.last_capacity == capacity
    assert torch.equal(static.sequences, dynamic.sequences)

    cache = output_cache(static)
    assert isinstance(cache, StaticCache)
    held, rows = kv_bytes(cache), _static_kv_rows(cache)
    width = rows[0][2]  # every layer is preallocated to the same max_cache_len
    for idx, frac in capacity.items():
        compact = granularity in ("attn", "block")
        assert held[idx] == pytest.approx(held[0] * frac if compact else held[0], rel=1e-9), (idx, frac)
        assert rows[idx][2] == width
        assert rows[idx][0] == (round(frac * ids.shape[0]) if compact else ids.shape[0])


def test_static_cache_object_is_reusable_after_reset():
    model = msk.get_mindskip_model(tiny_lm("llama"))
    randomize_routers(model)
    cache = StaticCache(config=model.config, max_cache_len=24)
    kept = []
    for seed in (2, 3, 4):  # the same batch size (as for transformers' own static cache), other prompts
        _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left", seed=seed)
        dynamic = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        capacity = model.last_capacity
        static = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                **cache_kwargs(model.base_model, cache))
        assert torch.equal(static, dynamic)
        assert model.last_capacity == capacity
        kept.append(tuple(capacity.values()))
        # The next prefill may keep another number of rows: reset drops the compact tensors, the prefill reallocates.
        cache.reset()
        assert int(cache.get_seq_length()) == 0
    assert len(set(kept)) > 1, kept


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_static_cache_beam_search_equals_dynamic(granularity):
    model = msk.get_mindskip_model(tiny_lm("llama"), msk.MindSkipConfig(granularity=granularity))
    randomize_routers(model)
    _, ids, mask = padded_batch([7, 12, 4, 9], "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, num_beams=3, do_sample=False, max_new_tokens=5)
    assert torch.equal(model.generate(**kwargs, cache_implementation="static"), model.generate(**kwargs))


def _prefill(model, ids, mask, cache):
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
              **cache_kwargs(model, cache))


def _step(model, ids, mask, cache):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)[:, -ids.shape[1]:],
                     use_cache=True, **cache_kwargs(model, cache)).logits


def test_static_cache_crop_equals_dynamic_and_batch_edits_are_refused():
    model = msk.get_mindskip_model(tiny_lm("llama"))
    randomize_routers(model)
    _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    caches = DynamicCache(), StaticCache(config=model.config, max_cache_len=32)
    nxt = torch.randint(1, VOCAB, (ids.shape[0], 2), generator=torch.Generator().manual_seed(5))
    step_mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    logits = []
    for cache in caches:  # decode two tokens, crop them away, decode them again
        _prefill(model, ids, mask, cache)
        _step(model, nxt, step_mask, cache)
        for layer in cache.layers:  # the MindSkip slots crop; transformers < 5.18's own StaticLayer has no crop
            layer.crop(-2) if hasattr(layer, "crop") else layer.cumulative_length.sub_(2)
        assert int(cache.get_seq_length()) == ids.shape[1]
        logits.append(_step(model, nxt, step_mask, cache))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)

    slot = caches[1].layers[1]
    assert slot.mindskip_decision is not None
    with pytest.raises(NotImplementedError, match="fixed batch"):
        slot.batch_select_indices(torch.tensor([4, 0, 3]))
    with pytest.raises(NotImplementedError, match="fixed batch"):
        slot.batch_repeat_interleave(2)


def test_static_cache_filled_without_routing_is_refused():
    base = tiny_lm("llama")
    _, ids, mask = padded_batch([5, 7], "left")
    cache = StaticCache(config=base.config, max_cache_len=16)
    _prefill(base, ids, mask, cache)
    wrapped = msk.get_mindskip_model(base)
    with pytest.raises(ValueError, match="start generation from a fresh cache"):
        _step(wrapped, ids[:, :1], torch.cat([mask, torch.ones_like(mask[:, :1])], 1), cache)
