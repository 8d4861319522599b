"""The MindSkip decoder layer: a fresh conversion is the identity, routing is per sequence and batch invariant (left
and right padding), the packed varlen path equals the gathered path, low precision, hooks, and the 2D padding mask it
routes on (a skipped sublayer's exactness, for every family: test_families). Tiny models built from configs; no
downloads."""

from __future__ import annotations

import copy

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext.attention import best_fast_backend

from tiny import ATTN_IMPLS, GRANULARITIES, MODEL_TYPES, VOCAB, logits_of, padded_batch, randomize_routers, tiny_lm

pytestmark = pytest.mark.hf


# Token routing (test_token_routing.py) gates the attention sublayer only.
GATES = [(g, "sequence") for g in GRANULARITIES] + [("attn", "token")]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize(("granularity", "routing"), GATES)
@pytest.mark.parametrize("attn", ATTN_IMPLS)
def test_fresh_conversion_is_identity(model_type, granularity, routing, attn):
    model = tiny_lm(model_type, attn)
    _, ids, mask = padded_batch([5, 9, 7])
    ref = logits_of(model, ids, mask)
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(granularity=granularity, routing=routing))
    assert torch.equal(logits_of(wrapped, ids, mask), ref)
    assert all(c == 1.0 for c in wrapped.last_capacity.values())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_decisions_are_batch_invariant_logits(model_type, granularity, side):
    model = msk.get_mindskip_model(tiny_lm(model_type), msk.MindSkipConfig(granularity=granularity))
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


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_packed_path_matches_gathered_path(model_type):
    base = tiny_lm(model_type)
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
    model = tiny_lm("llama", dtype=dtype)
    _, ids, mask = padded_batch([5, 9, 7])
    ref = logits_of(model, ids, mask)
    wrapped = msk.get_mindskip_model(model)
    assert torch.equal(logits_of(wrapped, ids, mask), ref)
    randomize_routers(wrapped)
    out = logits_of(wrapped, ids, mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert any(0.0 < c < 1.0 for c in wrapped.last_capacity.values())


def test_output_hidden_states_include_mindskip_layers():
    model = tiny_lm("llama")
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    wrapped = msk.get_mindskip_model(model)
    with torch.no_grad():
        got = wrapped(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_flash_varlen_path_matches_sdpa_path():
    if best_fast_backend(torch.device("cuda"), torch.bfloat16) is None:
        pytest.skip("no varlen FlashAttention kernel on this machine")
    base = tiny_lm("llama", hidden=64, dtype=torch.bfloat16).cuda()
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


def test_prepared_4d_mask_is_rejected():
    wrapped = msk.get_mindskip_model(tiny_lm("llama"))
    ids = torch.randint(1, VOCAB, (2, 5))
    mask4d = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2D padding mask"):
        wrapped(input_ids=ids, attention_mask=mask4d)


def test_bypass_runs_the_original_layers_and_records_no_routing():
    model = tiny_lm("llama")
    _, ids, mask = padded_batch([5, 9, 7])
    ref = logits_of(model, ids, mask)
    wrapped = msk.get_mindskip_model(model)
    randomize_routers(wrapped)
    record = msk.RoutingRecord()
    with torch.no_grad():
        got = wrapped(input_ids=ids, attention_mask=mask, use_cache=False, mindskip_bypass=True,
                      mindskip_record=record).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-6)
    assert record.layers == {}
    assert not torch.allclose(logits_of(wrapped, ids, mask)[real], ref[real])  # the routers do skip otherwise
