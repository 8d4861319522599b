"""The compact KV cache and generate(): greedy, beam search and sampling equal the unbatched runs, a MindSkip
layer stores only its kept rows, interleaved caches and two models do not interfere, and a static cache is
refused. Tiny models built from configs; no downloads."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import mindskip_ext as msk
from mindskip_ext.cache import kv_bytes
from mindskip_ext.hf_compat import cache_kwargs, output_cache

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


def test_static_cache_is_rejected_with_a_clear_error():
    wrapped = msk.get_mindskip_model(tiny_lm("llama"))
    ids = torch.randint(1, VOCAB, (2, 5))
    with pytest.raises(TypeError, match="dynamic KV cache"):
        wrapped.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static")
