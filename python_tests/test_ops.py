"""The compiled ops (mindskip_ext.ops) against the plain-PyTorch reference, plus opcheck,
gradcheck, torch.compile, input validation, and the check that ops and reference mirror the op
schemas (names, arguments, returns). Every test runs on CPU, and on CUDA when present."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from mindskip_ext import ops
from mindskip_ext import reference as ref

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
MASKS = ["none", "right", "left", "holes", "empty_row"]


def make_mask(kind: str, batch: int, seqlen: int, device, dtype=torch.bool, seed: int = 0):
    """Padding patterns: none, right / left padding, random holes, and one all-padding row."""
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=gen)
    pos = torch.arange(seqlen)
    if kind == "right":
        real = pos[None, :] < lengths[:, None]
    elif kind == "left":
        real = pos[None, :] >= (seqlen - lengths)[:, None]
    elif kind == "holes":
        real = torch.rand(batch, seqlen, generator=gen) < 0.6
        real[:, 0] = True
    elif kind == "empty_row":
        real = pos[None, :] < lengths[:, None]
        real[batch // 2] = False
    else:
        raise AssertionError(kind)
    return real.to(device=device, dtype=dtype)


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def stable_kept_first(keep: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(keep.numel(), device=keep.device)
    return torch.cat([idx[keep], idx[~keep]])


def check_router(out, expected, threshold, atol):
    score, keep, order, num_kept = out
    e_score = expected[0]
    assert score.dtype == e_score.dtype and score.shape == e_score.shape
    torch.testing.assert_close(score, e_score, atol=atol, rtol=0)
    assert keep.dtype == torch.bool and order.dtype == torch.int64 and num_kept.dtype == torch.int64
    assert num_kept.shape == (1,)
    # The decision is exact except for scores within rounding of the threshold.
    clear = (e_score - threshold).abs() > 4 * atol
    assert torch.equal(keep[clear], expected[1][clear])
    assert torch.equal(keep, score >= threshold)
    assert torch.equal(order, stable_kept_first(keep))
    assert int(num_kept) == int(keep.sum())


# ---------------------------------------------------------------------------------------------
# router_gate correctness


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "shape", [(1, 1, 8), (3, 7, 33), (5, 1, 1), (16, 9, 257), (2, 13, 4099), (64, 3, 64), (33, 31, 130)]
)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_router_gate_matches_reference(device, dtype, shape, mask_kind):
    batch, seqlen, dim = shape
    hidden = randn(batch, seqlen, dim, dtype=dtype, device=device, seed=1)
    weight = randn(dim, device=device, seed=2, scale=dim**-0.5)
    mask = make_mask(mask_kind, batch, seqlen, device)
    out = ops.router_gate(hidden, mask, weight, 0.1, 0.5)
    check_router(out, ref.router_gate(hidden, mask, weight, 0.1, 0.5), 0.5, atol=2e-6)


@pytest.mark.parametrize(
    "mask_dtype", [torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32, torch.bfloat16]
)
def test_router_gate_mask_dtypes_agree(device, mask_dtype):
    hidden = randn(6, 11, 40, device=device, seed=3)
    weight = randn(40, device=device, seed=4)
    mask = make_mask("holes", 6, 11, device, dtype=mask_dtype)
    expected = ops.router_gate(hidden, mask.bool(), weight, 0.0, 0.5)
    for got, want in zip(ops.router_gate(hidden, mask, weight, 0.0, 0.5), expected):
        assert torch.equal(got, want)


def test_router_gate_padding_never_changes_the_decision(device):
    """Whatever sits in padded positions, the scores are those of the real tokens only."""
    hidden = randn(4, 9, 24, device=device, seed=5)
    mask = make_mask("empty_row", 4, 9, device)
    weight = randn(24, device=device, seed=6)
    noisy = hidden.masked_fill(~mask[..., None], 1e4)
    a = ops.router_gate(hidden, mask, weight, 0.3, 0.5)
    b = ops.router_gate(noisy, mask, weight, 0.3, 0.5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # The all-padding sequence pools to zero: its score is sigmoid(bias).
    assert a[0][2].item() == pytest.approx(torch.sigmoid(torch.tensor(0.3)).item(), abs=1e-7)


@pytest.mark.parametrize("dtype", FLOATS)
def test_router_gate_none_all_and_exactly_at_threshold(device, dtype):
    hidden = randn(7, 5, 16, dtype=dtype, device=device, seed=7)
    weight = randn(16, device=device, seed=8)
    _, keep, order, num_kept = ops.router_gate(hidden, None, torch.zeros_like(weight), -20.0, 0.5)
    assert not keep.any() and int(num_kept) == 0 and torch.equal(order, torch.arange(7, device=device))
    _, keep, order, num_kept = ops.router_gate(hidden, None, torch.zeros_like(weight), 20.0, 0.5)
    assert keep.all() and int(num_kept) == 7 and torch.equal(order, torch.arange(7, device=device))
    # Zero weight and zero bias give exactly sigmoid(0) = 0.5, and 0.5 >= 0.5 keeps.
    score, keep, _, num_kept = ops.router_gate(hidden, None, torch.zeros_like(weight), 0.0, 0.5)
    assert torch.all(score == 0.5) and keep.all() and int(num_kept) == 7


def test_router_gate_weight_and_bias_forms_agree(device):
    hidden = randn(5, 6, 12, device=device, seed=9)
    weight = randn(12, device=device, seed=10)
    expected = ops.router_gate(hidden, None, weight, 0.25, 0.5)
    forms = [
        (weight.reshape(1, 12), 0.25),
        (weight, torch.tensor(0.25, device=device)),
        (weight, torch.tensor([0.25], device=device)),
        (weight.double(), torch.tensor([0.25], dtype=torch.float64, device=device)),
    ]
    for w, b in forms:
        for got, want in zip(ops.router_gate(hidden, None, w, b, 0.5), expected):
            assert torch.equal(got, want)


def test_router_gate_float64_computes_in_float64(device):
    hidden = randn(3, 4, 8, dtype=torch.float64, device=device, seed=11)
    weight = randn(8, dtype=torch.float64, device=device, seed=12)
    out = ops.router_gate(hidden, None, weight, 0.0, 0.5)
    assert out[0].dtype == torch.float64
    check_router(out, ref.router_gate(hidden, None, weight, 0.0, 0.5), 0.5, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_gate_low_precision_error_within_2x_of_pytorch(device, dtype):
    """Against an fp32 reference on the fp32 data, our error is at most ~2x PyTorch's own error
    (the eager composition run in the low-precision dtype)."""
    batch, seqlen, dim = 16, 64, 512
    x32 = randn(batch, seqlen, dim, device=device, seed=13)
    w32 = randn(dim, device=device, seed=14, scale=dim**-0.5)
    mask = make_mask("right", batch, seqlen, device)
    truth = ref.router_gate(x32, mask, w32, 0.0, 0.5)[0]
    ours = ops.router_gate(x32.to(dtype), mask, w32, 0.0, 0.5)[0]
    real = mask.to(dtype)
    xl = x32.to(dtype)
    mean = (xl * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    theirs = torch.sigmoid(mean @ w32.to(dtype)).float()
    our_err = (ours - truth).abs().max().item()
    torch_err = (theirs - truth).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-6, (our_err, torch_err)


@pytest.mark.parametrize("varlen", [False, True])
def test_router_gate_does_not_depend_on_thread_count(varlen):
    hidden = randn(3, 257, 300, seed=15)
    weight = randn(300, seed=16)
    if varlen:
        op, args = ops.router_gate_varlen, (hidden.reshape(-1, 300), torch.tensor([0, 300, 301, 771]))
    else:
        op, args = ops.router_gate, (hidden, make_mask("holes", 3, 257, "cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(*args, weight, 0.0, 0.5)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(op(*args, weight, 0.0, 0.5), one):
        assert torch.equal(got, want)


def test_straight_through_passes_the_gradient_to_the_score(device):
    hidden = randn(4, 3, 8, device=device, seed=17)
    weight = randn(8, device=device, seed=18).requires_grad_()
    score, keep, _, _ = ops.router_gate(hidden, None, weight, 0.0, 0.5)
    gate = ops.straight_through(score, keep)
    assert torch.equal(gate, keep.float())
    assert not keep.requires_grad
    (grad,) = torch.autograd.grad(gate.sum(), weight, retain_graph=True)
    (want,) = torch.autograd.grad(score.sum(), weight)
    assert torch.equal(grad, want)


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_router_gate_backward_matches_reference(device, dtype, mask_kind):
    batch, seqlen, dim = 6, 9, 40
    hidden = randn(batch, seqlen, dim, dtype=dtype, device=device, seed=19)
    weight = randn(dim, device=device, seed=20, scale=dim**-0.5)
    mask = make_mask(mask_kind, batch, seqlen, device)
    score = ops.router_gate(hidden, mask, weight, 0.1, 0.5)[0]
    grad_score = randn(batch, device=device, seed=21).to(score.dtype)
    got = ops.router_gate_backward(grad_score, hidden, mask, weight, score)
    want = ref.router_gate_backward(grad_score, hidden, mask, weight, score)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w)


def test_router_gate_backward_reference_is_the_gradient_of_the_reference():
    """The hand-written reference backward is what autograd gives through the reference forward."""
    hidden = randn(4, 6, 10, dtype=torch.float64, seed=22).requires_grad_()
    weight = randn(10, dtype=torch.float64, seed=23).requires_grad_()
    bias = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    mask = make_mask("empty_row", 4, 6, "cpu")
    grad_score = randn(4, dtype=torch.float64, seed=24)
    for m in (mask, None):
        score = ref.router_gate(hidden, m, weight, bias, 0.5)[0]
        want = torch.autograd.grad(score, (hidden, weight, bias), grad_score)
        got = ref.router_gate_backward(grad_score, hidden.detach(), m, weight.detach(), score.detach())
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# router_gate_varlen


def flat_batch(lengths, dim, device, dtype=torch.float32, seed=0, extra_rows=0):
    """A flat ``(N, D)`` batch of sequences of ``lengths`` (plus ``extra_rows`` rows outside every segment) and its
    int32 ``cu_seqlens``."""
    hidden = randn(sum(lengths) + extra_rows, dim, dtype=dtype, device=device, seed=seed)
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    return hidden, cu.to(device)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "lengths, dim",
    [([1], 8), ([3, 7, 1], 33), ([5, 0, 2, 0], 64), ([], 16), ([0], 16), ([9] * 17, 130), ([1100, 3, 257], 257)],
)
def test_router_gate_varlen_matches_reference(device, dtype, lengths, dim):
    hidden, cu = flat_batch(lengths, dim, device, dtype, seed=len(lengths), extra_rows=2)
    weight = randn(dim, device=device, seed=2, scale=dim**-0.5)
    out = ops.router_gate_varlen(hidden, cu, weight, 0.1, 0.5)
    check_router(out, ref.router_gate_varlen(hidden, cu, weight, 0.1, 0.5), 0.5, atol=2e-6)
    assert out[0].shape == (len(lengths),)


def test_router_gate_varlen_is_router_gate_of_each_sequence_alone(device):
    """On the CPU bit for bit (the same chunks summed in the same order), whatever the other segments; on CUDA to
    rounding. So a request routes the same in vLLM's flat batch as alone in the transformers path."""
    lengths, dim = [1, 40, 3, 0, 700, 9], 576
    hidden, cu = flat_batch(lengths, dim, device, seed=3)
    weight, bias = randn(dim, device=device, seed=4, scale=dim**-0.5), torch.tensor(0.05, device=device)
    score, keep, order, num_kept = ops.router_gate_varlen(hidden, cu, weight, bias, 0.5)
    alone = []
    for b in range(len(lengths)):
        segment = hidden[int(cu[b]) : int(cu[b + 1])].unsqueeze(0)
        alone.append(ops.router_gate(segment, None, weight, bias, 0.5)[0])
    alone = torch.cat(alone)
    if device.type == "cpu":
        assert torch.equal(score, alone)
    else:
        torch.testing.assert_close(score, alone, atol=2e-6, rtol=0)
    assert torch.equal(keep, score >= 0.5) and torch.equal(order, stable_kept_first(keep))
    assert int(num_kept) == int(keep.sum())


def test_router_gate_varlen_reads_only_its_segments(device):
    """Offsets need not start at 0 or reach N (vLLM pads its token batch); other rows are never read."""
    hidden = randn(12, 16, device=device, seed=5)
    cu = torch.tensor([2, 5, 5, 9], device=device)  # int64 offsets work too
    noisy = hidden.clone()
    noisy[:2] = noisy[9:] = float("nan")
    weight = randn(16, device=device, seed=6)
    out = ops.router_gate_varlen(noisy, cu, weight, 0.0, 0.5)
    for got, want in zip(out, ops.router_gate_varlen(hidden, cu, weight, 0.0, 0.5)):
        assert torch.equal(got, want)
    check_router(out, ref.router_gate_varlen(hidden, cu, weight, 0.0, 0.5), 0.5, atol=2e-6)
    assert out[0][1].item() == 0.5  # the empty segment pools to zero: its score is sigmoid(bias)


def test_router_gate_varlen_float64_and_parameter_forms(device):
    hidden, cu = flat_batch([4, 2, 6], 8, device, torch.float64, seed=7)
    weight = randn(8, dtype=torch.float64, device=device, seed=8)
    out = ops.router_gate_varlen(hidden, cu, weight, 0.0, 0.5)
    assert out[0].dtype == torch.float64
    check_router(out, ref.router_gate_varlen(hidden, cu, weight, 0.0, 0.5), 0.5, atol=1e-12)
    hidden = hidden.float()
    expected = ops.router_gate_varlen(hidden, cu, weight.float(), 0.25, 0.5)
    for w, b in [(weight.float().reshape(1, 8), 0.25), (weight.float(), torch.tensor([0.25], device=device))]:
        for got, want in zip(ops.router_gate_varlen(hidden, cu, w, b, 0.5), expected):
            assert torch.equal(got, want)


def test_router_gate_varlen_has_no_gradient():
    hidden, cu = flat_batch([3, 2], 8, "cpu", seed=11)
    score = ops.router_gate_varlen(hidden.requires_grad_(), cu, randn(8, seed=12), 0.0, 0.5)[0]
    with pytest.raises(RuntimeError, match="router_gate_varlen has no gradient: .* train routers with router_gate"):
        score.sum().backward()


# ---------------------------------------------------------------------------------------------
# gather_kept / scatter_add_kept_


def make_order(batch: int, k: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(batch, dtype=torch.bool)
    keep[torch.randperm(batch, generator=gen)[:k]] = True
    return stable_kept_first(keep).to(device)


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64, torch.int64, torch.bool, torch.uint8])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 7), (8, 1, 64), (6, 17, 129), (3, 5, 4, 16)])
def test_gather_kept_matches_reference(device, dtype, shape):
    batch = shape[0]
    x = randn(*shape, device=device, seed=20, scale=3).to(dtype)
    for k in sorted({0, 1, batch // 2, batch}):
        order = make_order(batch, k, device, seed=k)
        got = ops.gather_kept(x, order, k)
        assert got.is_contiguous()
        assert torch.equal(got, ref.gather_kept(x, order, k))


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 7), (8, 1, 64), (6, 17, 129), (64, 2, 24), (3, 5, 4, 16)])
def test_scatter_add_kept_matches_reference_exactly(device, dtype, shape):
    batch = shape[0]
    for k in sorted({0, 1, batch // 2, batch}):
        order = make_order(batch, k, device, seed=k)
        residual = randn(*shape, dtype=dtype, device=device, seed=21)
        y = randn(k, *shape[1:], dtype=dtype, device=device, seed=22)
        expected = ref.scatter_add_kept_(residual.clone(), y, order)
        out = ops.scatter_add_kept_(residual, y, order)
        assert out is residual
        assert torch.equal(residual, expected)  # fp32 accumulation, one rounding: bit-exact


def test_scatter_add_kept_leaves_other_rows_untouched(device):
    residual = randn(6, 4, 8, device=device, seed=23)
    residual[1] = float("nan")
    residual[4] = float("inf")
    order = torch.tensor([0, 2, 1, 3, 4, 5], device=device)
    before = residual.clone()
    ops.scatter_add_kept_(residual, torch.ones(2, 4, 8, device=device), order)
    assert torch.equal(residual[[0, 2]], before[[0, 2]] + 1)
    assert torch.equal(residual[[1, 3, 4, 5]].isnan(), before[[1, 3, 4, 5]].isnan())
    assert torch.equal(residual[[3, 4, 5]], before[[3, 4, 5]])


def test_scatter_add_kept_casts_y_to_the_residual_dtype(device):
    residual = randn(4, 3, 8, dtype=torch.bfloat16, device=device, seed=24)
    y = randn(2, 3, 8, device=device, seed=25)
    order = make_order(4, 2, device)
    expected = ref.scatter_add_kept_(residual.clone(), y.bfloat16(), order)
    assert torch.equal(ops.scatter_add_kept_(residual, y, order), expected)


def test_scatter_add_kept_is_in_place_under_autograd(device):
    x = randn(5, 3, 4, device=device, seed=26, dtype=torch.float64).requires_grad_()
    y = randn(2, 3, 4, device=device, seed=27, dtype=torch.float64).requires_grad_()
    order = make_order(5, 2, device)
    residual = x * 1.0
    out = ops.scatter_add_kept_(residual, y, order)
    assert out is residual
    torch.testing.assert_close(out, ref.scatter_add_kept_((x * 1.0).detach(), y.detach(), order))
    weights = randn(5, 3, 4, device=device, seed=28, dtype=torch.float64)
    gx, gy = torch.autograd.grad((out * weights).sum(), (x, y))
    assert torch.equal(gx, weights)
    assert torch.equal(gy, weights[order[:2]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scatter_add_low_precision_error_matches_pytorch(device, dtype):
    residual = randn(8, 16, 96, device=device, seed=29)
    y = randn(4, 16, 96, device=device, seed=30)
    order = make_order(8, 4, device)
    truth = ref.scatter_add_kept_(residual.clone(), y, order)
    ours = ops.scatter_add_kept_(residual.to(dtype), y.to(dtype), order).float()
    theirs = residual.to(dtype).index_add(0, order[:4], y.to(dtype)).float()
    assert (ours - truth).abs().max() <= 2 * (theirs - truth).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 7), (8, 1, 64), (6, 17, 129), (3, 5, 4, 16)])
def test_scatter_add_kept_out_of_place_is_the_in_place_op_on_a_copy(device, dtype, shape):
    batch = shape[0]
    for k in sorted({0, 1, batch // 2, batch}):
        order = make_order(batch, k, device, seed=k)
        residual = randn(*shape, dtype=dtype, device=device, seed=31)
        before = residual.clone()
        y = randn(k, *shape[1:], dtype=dtype, device=device, seed=32)
        out = ops.scatter_add_kept(residual, y, order)
        assert out.is_contiguous() and out.data_ptr() != residual.data_ptr()
        assert torch.equal(residual, before)  # its input is left as it was
        assert torch.equal(out, ref.scatter_add_kept(residual, y, order))
        assert torch.equal(out, ops.scatter_add_kept_(residual.clone(), y, order))


def test_scatter_add_kept_out_of_place_reads_any_layout_and_differentiates(device):
    order = make_order(4, 2, device)
    residual = randn(3, 4, 8, device=device, seed=33).transpose(0, 1)  # (4, 3, 8), not contiguous
    y = randn(2, 3, 8, device=device, seed=34)
    assert torch.equal(ops.scatter_add_kept(residual, y, order), ref.scatter_add_kept(residual, y, order))
    # The same gradients as the in-place op on a copy (its autograd runs only where a gradient is recorded).
    x = randn(5, 3, 4, dtype=torch.float64, device=device, seed=35).requires_grad_()
    v = randn(3, 3, 4, dtype=torch.float64, device=device, seed=36).requires_grad_()
    order = make_order(5, 3, device, seed=1)
    if device.type == "cpu":
        assert torch.autograd.gradcheck(lambda r, w: ops.scatter_add_kept(r, w, order), (x, v))
    weights = randn(5, 3, 4, dtype=torch.float64, device=device, seed=37)
    gx, gy = torch.autograd.grad((ops.scatter_add_kept(x, v, order) * weights).sum(), (x, v))
    assert torch.equal(gx, weights) and torch.equal(gy, weights[order[:3]])


# ---------------------------------------------------------------------------------------------
# rotary_embedding


def rotary_inputs(device, dtype, rows: int, seqlen: int, q_heads: int, k_heads: int, dim: int, table: int, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    return draw(rows, seqlen, q_heads, dim), draw(rows, seqlen, k_heads, dim), draw(table, seqlen, dim), draw(
        table, seqlen, dim)


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64])
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1, 2), (3, 1, 4, 2, 8), (5, 3, 8, 2, 64), (2, 7, 3, 3, 6)])
@pytest.mark.parametrize("table", ["rows", "broadcast", "indexed"])
def test_rotary_embedding_matches_reference_exactly(device, dtype, sizes, table):
    n, t, hq, hk, d = sizes
    c = {"rows": n, "broadcast": 1, "indexed": n + 2}[table]
    q, k, cos, sin = rotary_inputs(device, dtype, n, t, hq, hk, d, c)
    rows = torch.randperm(c, generator=torch.Generator().manual_seed(1))[:n].to(device) if table == "indexed" else None
    got_q, got_k = ops.rotary_embedding(q, k, cos, sin, rows)
    want_q, want_k = ref.rotary_embedding(q, k, cos, sin, rows)
    assert got_q.shape == (n, hq, t, d) and got_k.shape == (n, hk, t, d)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    # Each product and the sum rounded as the unfused ops round them: bit for bit, in every dtype.
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.hf
def test_rotary_embedding_is_transformers_apply_rotary_pos_emb(device):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    for dtype in (torch.float32, torch.bfloat16):
        q, k, cos, sin = rotary_inputs(device, dtype, 4, 2, 8, 2, 64, 6, seed=3)
        rows = torch.tensor([5, 0, 3, 1], device=device)
        got = ops.rotary_embedding(q, k, cos, sin, rows)
        want = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos[rows], sin[rows])
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_rotary_embedding_reads_any_layout_and_refuses_gradients(device):
    q, k, cos, sin = rotary_inputs(device, torch.float32, 3, 2, 4, 2, 8, 3)
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # (N, T, H, D) with the heads outermost
    assert not strided.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(ops.rotary_embedding(strided, k, cos, sin, None),
                                                  ref.rotary_embedding(q, k, cos, sin, None)))
    with pytest.raises(RuntimeError, match="rotary_embedding has no gradient"):
        ops.rotary_embedding(q.requires_grad_(), k, cos, sin, None)
    with torch.no_grad():
        ops.rotary_embedding(q, k, cos, sin, None)


# ---------------------------------------------------------------------------------------------
# token_decode_attention (token routing's decode step)


def decode_inputs(device, batch=5, q_heads=6, kv_heads=2, positions=37, dim=16, dtype=torch.float32, spare=9, seed=70):
    """query (B, Hq, D) and key/value views (B, Hkv, S, D) of longer buffers (as a token-routing cache slot holds)."""
    query = randn(batch, q_heads, dim, device=device, dtype=dtype, seed=seed)
    key = randn(batch, kv_heads, positions + spare, dim, device=device, dtype=dtype, seed=seed + 1)[:, :, :positions]
    value = randn(batch, kv_heads, positions + spare, dim, device=device, dtype=dtype, seed=seed + 2)[:, :, :positions]
    return query, key, value


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("with_length", [False, True])
def test_token_decode_attention_matches_reference(device, dtype, heads, mask_kind, with_length):
    query, key, value = decode_inputs(device, q_heads=heads[0], kv_heads=heads[1], dtype=dtype)
    keep = torch.tensor([True, False, True, True, False], device=device)
    mask = make_mask(mask_kind, 5, 37, device)
    length = torch.tensor(30, device=device) if with_length else None
    got = ops.token_decode_attention(query, key, value, keep, mask, length, 0.25)
    want = ref.token_decode_attention(query, key, value, keep, mask, length, 0.25)
    assert got.dtype == dtype and got.shape == query.shape
    atol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))


def test_token_decode_attention_never_reads_skipped_rows_masked_or_later_positions(device):
    """NaN in a skipped row's keys and values, at masked positions and past ``length`` would poison any sum that read
    them: the kept rows are still the reference's, the skipped rows zero."""
    query, key, value = decode_inputs(device)
    keep = torch.tensor([True, False, True, False, True], device=device)
    mask = make_mask("holes", 5, 37, device)
    length = torch.tensor(31, device=device)
    want = ops.token_decode_attention(query, key, value, keep, mask, length, 0.5)
    poisoned_k, poisoned_v = key.clone(), value.clone()
    for t in (poisoned_k, poisoned_v):
        t[~keep] = float("nan")
        t[:, :, 31:] = float("nan")
        t.masked_fill_(~mask[:, None, :, None], float("nan"))
    got = ops.token_decode_attention(query, poisoned_k, poisoned_v, keep, mask, length, 0.5)
    assert torch.equal(got, want) and torch.isfinite(got).all()


def test_token_decode_attention_edge_cases(device):
    query, key, value = decode_inputs(device)
    none = torch.zeros(5, dtype=torch.bool, device=device)
    assert torch.equal(ops.token_decode_attention(query, key, value, none, None, None, 1.0), torch.zeros_like(query))
    every = torch.ones(5, dtype=torch.bool, device=device)
    empty = torch.zeros(5, 37, dtype=torch.bool, device=device)
    empty[0, 3] = True  # row 0 attends to one position: its value row
    out = ops.token_decode_attention(query, key, value, every, empty, None, 1.0)
    torch.testing.assert_close(out[0], value[0, :, 3].repeat_interleave(3, dim=0))
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))  # no position to attend to
    zero = torch.tensor(0, device=device)
    assert torch.equal(ops.token_decode_attention(query, key, value, every, None, zero, 1.0), torch.zeros_like(query))
    # A length past the positions reads all of them.
    past = torch.tensor(99, device=device)
    whole = ops.token_decode_attention(query, key, value, every, None, None, 1.0)
    torch.testing.assert_close(ops.token_decode_attention(query, key, value, every, None, past, 1.0), whole)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_token_decode_attention_low_precision_error_within_2x_of_pytorch(device, dtype):
    query, key, value = decode_inputs(device, batch=4, q_heads=8, kv_heads=2, positions=300, dim=64)
    keep = torch.ones(4, dtype=torch.bool, device=device)
    truth = ref.token_decode_attention(query.double(), key.double(), value.double(), keep, None, None, 0.125)
    ours = ops.token_decode_attention(query.to(dtype), key.to(dtype), value.to(dtype), keep, None, None, 0.125)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        query.to(dtype)[:, :, None], key.to(dtype), value.to(dtype), scale=0.125, enable_gqa=True)[:, :, 0]
    err = (ours.double() - truth).abs().max()
    assert err <= 2 * (theirs.double() - truth).abs().max() + 1e-6, err


def test_token_decode_attention_does_not_depend_on_thread_count():
    query, key, value = decode_inputs("cpu", batch=3, positions=200)
    keep = torch.tensor([True, True, False])
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(ops.token_decode_attention(query, key, value, keep, None, None, 0.3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_token_decode_attention_rejects_bad_input(device):
    query, key, value = decode_inputs(device)
    keep = torch.ones(5, dtype=torch.bool, device=device)
    cases = [
        (lambda: ops.token_decode_attention(query[0], key, value, keep, None, None, 1.0), r"query must have shape"),
        (lambda: ops.token_decode_attention(query, key[0], value, keep, None, None, 1.0), r"key must have shape"),
        (lambda: ops.token_decode_attention(query, key, value[:, :, :3], keep, None, None, 1.0), "they must match"),
        (lambda: ops.token_decode_attention(query[:, :5], key, value, keep, None, None, 1.0),
         r"query heads \(5\) must be a multiple of key/value heads \(2\)"),
        (lambda: ops.token_decode_attention(query, key.double(), value.double(), keep, None, None, 1.0),
         "must have query's dtype"),
        (lambda: ops.token_decode_attention(query, key.transpose(2, 3), value.transpose(2, 3), keep, None, None, 1.0),
         "key has shape"),
        (lambda: ops.token_decode_attention(query, key.transpose(1, 2).contiguous().transpose(1, 2).transpose(-1, -2)
                                            .contiguous().transpose(-1, -2), value, keep, None, None, 1.0),
         "last dimension of key and value must be contiguous"),
        (lambda: ops.token_decode_attention(query, key, value, keep.int(), None, None, 1.0), "keep must be a bool"),
        (lambda: ops.token_decode_attention(query, key, value, keep[:3], None, None, 1.0), "keep must be a bool"),
        (lambda: ops.token_decode_attention(query, key, value, keep, torch.ones(5, 9, device=device), None, 1.0),
         r"mask must have shape \(B, T\) = \(5, 37\)"),
        (lambda: ops.token_decode_attention(query, key, value, keep, None, torch.tensor([1.0], device=device), 1.0),
         "length must be one integer element"),
        (lambda: ops.token_decode_attention(query, key, value, keep, None, None, float("inf")),
         "scale must be finite"),
    ]
    if device.type == "cpu":
        cases.append((lambda: ops.token_decode_attention(query, key, value, keep, None, torch.tensor(-1), 1.0),
                      "length must be non-negative"))
    for fn, message in cases:
        with pytest.raises(RuntimeError, match=message):
            fn()


def test_token_decode_attention_has_no_gradient():
    query, key, value = decode_inputs("cpu")
    out = ops.token_decode_attention(query.requires_grad_(), key, value, torch.ones(5, dtype=torch.bool), None, None,
                                     1.0)
    with pytest.raises(RuntimeError, match="token_decode_attention has no gradient"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------
# packed layout


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (9, 33), (64, 5), (3, 1100)])
def test_pack_plan_matches_reference(device, mask_kind, shape):
    batch, seqlen = shape
    mask = make_mask(mask_kind, batch, seqlen, device, seed=batch)
    for k in sorted({0, 1, batch // 2, batch}):
        order = make_order(batch, k, device, seed=k + 1)
        cu, index, max_len = ops.pack_plan(mask, order, k, seqlen)
        e_cu, e_index, e_max = ref.pack_plan(mask, order, k, seqlen)
        assert cu.dtype == torch.int32 and index.dtype == torch.int64 and max_len.dtype == torch.int32
        assert torch.equal(cu, e_cu) and torch.equal(index, e_index) and torch.equal(max_len, e_max)
        assert ops.pack_plan_with_sizes(mask, order, k, seqlen)[2:] == (int(e_cu[-1]), int(e_max))


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64])
@pytest.mark.parametrize("mask_kind", ["none", "left", "holes", "empty_row"])
@pytest.mark.parametrize("inner", [(1,), (24,), (37,), (3, 8)])
def test_pack_and_unpack_match_reference(device, dtype, mask_kind, inner):
    batch, seqlen, k = 6, 9, 4
    x = randn(batch, seqlen, *inner, dtype=dtype, device=device, seed=31)
    mask = make_mask(mask_kind, batch, seqlen, device, seed=3)
    order = make_order(batch, k, device, seed=4)
    packed, cu, max_len = ops.pack_sequences(x, mask, order, k)
    e_cu, e_index, e_max = ref.pack_plan(mask, order, k, seqlen)
    total = int(e_cu[-1])
    assert torch.equal(cu, e_cu) and max_len == int(e_max)
    assert torch.equal(packed, ref.pack_kept(x, e_index, total))

    residual = randn(batch, seqlen, *inner, dtype=dtype, device=device, seed=32)
    update = randn(total, *inner, dtype=dtype, device=device, seed=33)
    expected = ref.unpack_add_kept_(residual.clone(), update, e_index)
    out = ops.unpack_add_sequences_(residual, update, mask, order, k)
    assert out is residual and torch.equal(out, expected)


def test_pack_kept_unpack_add_kept_round_trip(device):
    x = randn(5, 6, 2, 8, device=device, seed=34)
    mask = make_mask("holes", 5, 6, device)
    order = make_order(5, 3, device)
    _, index, _ = ops.pack_plan(mask, order, 3, 6)
    total = int(mask[order[:3]].sum())
    packed = ops.pack_kept(x, index, total)
    assert packed.shape == (total, 2, 8)
    rebuilt = ops.unpack_add_kept_(torch.zeros_like(x), packed, index)
    selected = torch.zeros(5, 6, dtype=torch.bool, device=device)
    selected[order[:3]] = mask[order[:3]]
    assert torch.equal(rebuilt, x * selected[..., None, None])


@pytest.mark.parametrize("mask_kind", MASKS)
def test_composites_equal_reference_compositions(device, mask_kind):
    """pack_plan_with_sizes, pack_sequences and unpack_add_sequences_ are pack_plan followed by
    pack_kept / unpack_add_kept_, with total and max_len read back as ints."""
    batch, seqlen, dim = 6, 7, 16
    x = randn(batch, seqlen, dim, device=device, seed=35)
    mask = make_mask(mask_kind, batch, seqlen, device, seed=5)
    for k in sorted({0, 1, batch // 2, batch}):
        order = make_order(batch, k, device, seed=k)
        e_cu, e_index, e_max = ref.pack_plan(mask, order, k, seqlen)
        total = int(e_cu[-1])

        cu, index, got_total, got_max = ops.pack_plan_with_sizes(mask, order, k, seqlen)
        assert torch.equal(cu, e_cu) and torch.equal(index, e_index)
        assert type(got_total) is int and type(got_max) is int and (got_total, got_max) == (total, int(e_max))

        packed, cu, max_len = ops.pack_sequences(x, mask, order, k)
        assert torch.equal(packed, ref.pack_kept(x, e_index, total))
        assert torch.equal(cu, e_cu) and max_len == int(e_max)

        residual = randn(batch, seqlen, dim, device=device, seed=36)
        update = randn(total, dim, device=device, seed=37)
        expected = ref.unpack_add_kept_(residual.clone(), update, e_index)
        out = ops.unpack_add_sequences_(residual, update, mask, order, k)
        assert out is residual and torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------
# opcheck, gradcheck, torch.compile


def opcheck_cases(device):
    hidden = randn(4, 5, 24, device=device, seed=40).requires_grad_()
    weight = randn(24, device=device, seed=41).requires_grad_()
    bias = torch.tensor([0.1], device=device, requires_grad=True)
    mask = make_mask("empty_row", 4, 5, device)
    order = make_order(4, 2, device)
    x = randn(4, 5, 24, device=device, seed=42).requires_grad_()
    cu, index, _ = torch.ops.mindskip.pack_plan(mask, order, 2, 5)
    total = int(cu[-1])
    flat = randn(12, 24, device=device, seed=43)
    segments = torch.tensor([0, 3, 3, 11], dtype=torch.int32, device=device)
    query, key, value = randn(4, 6, 8, device=device), randn(4, 2, 7, 8, device=device, seed=44), randn(
        4, 2, 7, 8, device=device, seed=45)
    keep, length = torch.tensor([True, False, True, True], device=device), torch.tensor(6, device=device)
    m = torch.ops.mindskip
    return [
        (m.router_gate.default, (hidden, mask, weight, bias, 0.5)),
        (m.router_gate.default, (hidden, None, weight, bias, 0.5)),
        (
            m.router_gate_backward.default,
            (randn(4, device=device), hidden.detach(), mask, weight.detach(), randn(4, device=device).sigmoid()),
        ),
        # Inference only (a backward through it raises): no input requires grad.
        (m.router_gate_varlen.default, (flat, segments, weight.detach(), bias.detach(), 0.5)),
        (m.router_gate_varlen.default, (flat, segments[:1], weight.detach(), bias.detach(), 0.5)),
        (m.gather_kept.default, (x, order, 2)),
        (m.scatter_add_kept_.default, (randn(4, 5, 24, device=device), randn(2, 5, 24, device=device), order)),
        (m.pack_plan.default, (mask, order, 2, 5)),
        (m.pack_plan.default, (None, order, 3, 5)),
        (m.pack_kept.default, (x, index, total)),
        (m.unpack_add_kept_.default, (randn(4, 5, 24, device=device), randn(total, 24, device=device), index)),
        # Autograd of both runs in their wrappers, only where a gradient is recorded (none registered on the ops).
        (m.scatter_add_kept.default, (randn(4, 5, 24, device=device), randn(2, 5, 24, device=device), order)),
        (m.rotary_embedding.default, (*rotary_inputs(device, torch.float32, 2, 3, 4, 2, 8, 4), order[:2])),
        (m.rotary_embedding.default, rotary_inputs(device, torch.float32, 2, 3, 4, 2, 8, 1) + (None,)),
        (m.token_decode_attention.default, (query, key, value, keep, make_mask("holes", 4, 7, device), length, 0.3)),
        (m.token_decode_attention.default, (query, key, value, keep, None, None, 0.3)),
    ]


def test_opcheck_every_op(device):
    seen = set()
    for op, args in opcheck_cases(device):
        torch.library.opcheck(op, args)
        seen.add(op.name())
    defined = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("mindskip::")}
    assert len(defined) == 11
    assert defined <= seen, f"ops without an opcheck case: {defined - seen}"


def mindskip_schemas():
    """Every schema of the mindskip library, by op name (e.g. ``scatter_add_kept_``)."""
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mindskip::")]
    return {name: getattr(torch.ops.mindskip, name).default._schema for name in sorted(names)}


def test_ops_and_reference_mirror_every_schema():
    """Each schema op has a function of its exact name in ops and in reference, taking the schema's
    arguments in the schema's order; reference has nothing else."""
    schemas = mindskip_schemas()
    assert len(schemas) == 11
    for name, schema in schemas.items():
        want = [arg.name for arg in schema.arguments]
        for module in (ops, ref):
            fn = getattr(module, name, None)
            assert callable(fn), f"{module.__name__} has no {name}"
            assert list(inspect.signature(fn).parameters) == want, f"{module.__name__}.{name}"
    assert sorted(ref.__all__) == sorted(schemas)
    assert set(schemas) <= set(ops.__all__)


def test_ops_and_reference_return_what_the_schema_returns(device):
    """As many values as the schema returns; an in-place op (``-> ()``) returns its mutated first argument."""
    for op, args in opcheck_cases(device):
        name = op.name().split("::", 1)[1]
        returns = op._schema.returns
        for module in (ops, ref):
            fresh = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            out = getattr(module, name)(*fresh)
            if not returns:
                assert out is fresh[0], f"{module.__name__}.{name}"
            elif len(returns) == 1:
                assert isinstance(out, torch.Tensor), f"{module.__name__}.{name}"
            else:
                assert isinstance(out, tuple) and len(out) == len(returns), f"{module.__name__}.{name}"


def test_gradcheck_router_gate_through_score():
    hidden = randn(3, 4, 5, dtype=torch.float64, seed=50).requires_grad_()
    weight = randn(5, dtype=torch.float64, seed=51).requires_grad_()
    bias = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    mask = make_mask("empty_row", 3, 4, "cpu")
    for m in (mask, None):
        assert torch.autograd.gradcheck(
            lambda h, w, b, m=m: ops.router_gate(h, m, w, b, 0.5)[0], (hidden, weight, bias)
        )
    # A (1, D) weight (nn.Linear(D, 1).weight) and a (1,) bias get gradients of their own shape.
    w2 = weight.detach().reshape(1, 5).requires_grad_()
    b2 = bias.detach().reshape(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w, b: ops.router_gate(h, mask, w, b, 0.5)[0], (hidden, w2, b2))


def test_gradcheck_regroup_ops():
    order = make_order(5, 3, "cpu", seed=1)
    x = randn(5, 3, 4, dtype=torch.float64, seed=52).requires_grad_()
    y = randn(3, 3, 4, dtype=torch.float64, seed=53).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.gather_kept(t, order, 3), (x,))
    assert torch.autograd.gradcheck(lambda r, v: ops.scatter_add_kept_(r * 1.0, v, order), (x, y))
    mask = make_mask("holes", 5, 3, "cpu")
    _, index, _ = ops.pack_plan(mask, order, 3, 3)
    total = int(mask[order[:3]].sum())
    packed = randn(total, 4, dtype=torch.float64, seed=54).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.pack_kept(t, index, total), (x,))
    assert torch.autograd.gradcheck(lambda r, p: ops.unpack_add_kept_(r * 1.0, p, index), (x, packed))
    assert torch.autograd.gradcheck(lambda t: ops.pack_sequences(t, mask, order, 3)[0], (x,))
    assert torch.autograd.gradcheck(lambda r, p: ops.unpack_add_sequences_(r * 1.0, p, mask, order, 3), (x, packed))


def mindskip_block(hidden, mask, weight, bias, residual, k):
    """A MindSkip-style step: route, run a sublayer on the kept rows, add back in place."""
    score, keep, order, num_kept = ops.router_gate(hidden, mask, weight, bias, 0.5)
    kept = ops.gather_kept(hidden, order, k)
    gate = ops.straight_through(score, keep)
    update = torch.tanh(kept) * gate.index_select(0, order[:k]).view(k, 1, 1)
    out = ops.scatter_add_kept_(residual * 1.0, update, order)
    _, index, _ = ops.pack_plan(mask, order, k, hidden.shape[1])
    total = 2  # any count up to the real tokens of the kept rows
    packed = ops.pack_kept(out, index, total)
    return ops.unpack_add_kept_(out, packed.sin(), index), num_kept


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    hidden = randn(6, 5, 16, device=device, seed=60).requires_grad_()
    weight = randn(16, device=device, seed=61).requires_grad_()
    bias = torch.tensor(0.0, device=device)
    mask = make_mask("right", 6, 5, device)
    residual = randn(6, 5, 16, device=device, seed=62)
    k = int(ops.router_gate(hidden, mask, weight, bias, 0.5)[3])
    assert k > 0
    compiled = torch.compile(mindskip_block, fullgraph=True, backend=backend)
    got, got_kept = compiled(hidden, mask, weight, bias, residual, k)
    want, want_kept = mindskip_block(hidden, mask, weight, bias, residual, k)
    torch.testing.assert_close(got, want)
    assert torch.equal(got_kept, want_kept)
    g_got = torch.autograd.grad(got.sum(), (hidden, weight))
    g_want = torch.autograd.grad(want.sum(), (hidden, weight))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Bad input


def router_args(device, **overrides):
    args = {
        "hidden": randn(2, 3, 4, device=device),
        "mask": torch.ones(2, 3, dtype=torch.bool, device=device),
        "weight": randn(4, device=device),
        "bias": 0.0,
        "threshold": 0.5,
    }
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden": torch.zeros(2, 4)}, r"hidden must have shape \(B, T, D\), got rank 2"),
        (
            {"hidden": torch.zeros(2, 3, 4, dtype=torch.int32)},
            "hidden must be float32, float16, bfloat16 or float64, got Int",
        ),
        ({"weight": torch.zeros(5)}, "weight has D = 5 but hidden has D = 4"),
        ({"weight": torch.zeros(2, 4)}, r"weight must have shape \(D,\) or \(1, D\)"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, r"mask must have shape \(B, T\) = \(2, 3\)"),
        ({"mask": torch.ones(3, dtype=torch.bool)}, r"mask must have shape \(B, T\)"),
        ({"bias": torch.zeros(2)}, "bias must be a 0-d or 1-element tensor"),
        ({"threshold": 0.0}, r"threshold must lie strictly between 0 and 1, got 0"),
        ({"threshold": 1.0}, r"threshold must lie strictly between 0 and 1, got 1"),
        ({"threshold": -0.5}, r"threshold must lie strictly between 0 and 1"),
    ],
    ids=["hidden-rank-2", "hidden-int32", "weight-size", "weight-rank-2", "mask-size", "mask-rank-1", "bias-size",
         "threshold-0", "threshold-1", "threshold-negative"],
)
def test_router_gate_rejects_bad_input(device, overrides, message):
    args = router_args(
        device, **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in overrides.items()}
    )
    with pytest.raises(RuntimeError, match=message):
        ops.router_gate(**args)


@pytest.mark.parametrize(
    "hidden, cu_seqlens, weight, message",
    [
        (torch.zeros(2, 3, 4), torch.tensor([0, 2]), torch.zeros(4), r"hidden must have shape \(N, D\), got rank 3"),
        (torch.zeros(5, 4), torch.tensor([0, 2.0]), torch.zeros(4), "cu_seqlens must be int32 or int64, got Float"),
        (torch.zeros(5, 4), torch.tensor([], dtype=torch.int32), torch.zeros(4), r"shape \(B \+ 1,\) with B >= 0"),
        (torch.zeros(5, 4), torch.tensor([[0, 2]]), torch.zeros(4), r"cu_seqlens must have shape \(B \+ 1,\)"),
        (torch.zeros(5, 4), torch.tensor([0, 2]), torch.zeros(3), "weight has D = 3 but hidden has D = 4"),
        (torch.zeros(5, 4), torch.tensor([0, 6]), torch.zeros(4), r"cu_seqlens spans \[0, 6\), outside the 5 rows"),
        (torch.zeros(5, 4), torch.tensor([-1, 2]), torch.zeros(4), r"cu_seqlens spans \[-1, 2\)"),
        (torch.zeros(5, 4), torch.tensor([0, 3, 1]), torch.zeros(4), r"non-decreasing, but cu_seqlens\[1\] = 3 >"),
    ],
    ids=["hidden-rank-3", "cu_seqlens-float", "cu_seqlens-empty", "cu_seqlens-rank-2", "weight-size",
         "cu_seqlens-past-the-rows", "cu_seqlens-negative", "cu_seqlens-decreasing"],
)
def test_router_gate_varlen_rejects_bad_input(device, hidden, cu_seqlens, weight, message):
    if device.type == "cuda" and ("spans" in message or "non-decreasing" in message):
        pytest.skip("offsets out of order are a device-side assert on CUDA")
    with pytest.raises(RuntimeError, match=message):
        ops.router_gate_varlen(hidden.to(device), cu_seqlens.to(device), weight.to(device), 0.0, 0.5)


def test_cuda_entries_check_their_inputs_in_host_compiled_code():
    """Every CUDA kernel is registered from a host-compiled csrc/cuda/*.cpp (ops.cpp; token_attention.cpp for token
    routing's op), which checks the inputs before any CUDA call: sent
    bad inputs (on the CPU, so this runs without a GPU), the CUDA entries raise the CPU kernels' messages. On the
    first GPU session a check that threw from nvcc-compiled code crashed the process instead."""
    from mindskip_ext import _extension

    if not _extension.cuda_kernels_built():
        pytest.skip("the CUDA kernels were not built")
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for name in ref.__all__:  # one per schema (test_ops_and_reference_mirror_every_schema)
        (line,) = [line for line in torch._C._dispatch_dump(f"mindskip::{name}").splitlines()
                   if line.startswith("CUDA:")]
        assert re.search(r"csrc/cuda/\w+\.cpp", line), line
    x, order = randn(4, 3, 8), torch.arange(4)
    calls = [
        (lambda: torch.ops.mindskip.router_gate.default.redispatch(cuda, randn(2, 4), None, torch.zeros(4),
                                                                     torch.zeros(()), 0.5),
         r"router_gate: hidden must have shape \(B, T, D\), got rank 2"),
        (lambda: torch.ops.mindskip.router_gate_backward.default.redispatch(
            cuda, torch.ones(3), x, None, torch.zeros(8), torch.ones(2)), "grad_score and score must have B = 4"),
        (lambda: torch.ops.mindskip.router_gate_varlen.default.redispatch(
            cuda, randn(5, 4), torch.tensor([0, 2.0]), torch.zeros(4), torch.zeros(()), 0.5),
         "cu_seqlens must be int32 or int64"),
        (lambda: torch.ops.mindskip.gather_kept.default.redispatch(cuda, x, order, 5), r"k = 5 is out of range"),
        (lambda: torch.ops.mindskip.scatter_add_kept_.default.redispatch(cuda, x, x.double(), order),
         "y is Double but residual is Float"),
        (lambda: torch.ops.mindskip.pack_plan.default.redispatch(cuda, None, order.int(), 2, 3),
         "order must be int64"),
        (lambda: torch.ops.mindskip.pack_kept.default.redispatch(cuda, x, order, 9), "the row count = 9"),
        (lambda: torch.ops.mindskip.unpack_add_kept_.default.redispatch(cuda, x, randn(2, 7), order),
         "their trailing dimensions must match"),
        (lambda: torch.ops.mindskip.scatter_add_kept.default.redispatch(cuda, x, randn(5, 3, 8), order),
         r"y.size\(0\) = 5 is out of range"),
        (lambda: torch.ops.mindskip.rotary_embedding.default.redispatch(
            cuda, randn(2, 1, 4, 7), randn(2, 1, 2, 7), randn(2, 1, 7), randn(2, 1, 7), None), "must be even"),
        (lambda: torch.ops.mindskip.token_decode_attention.default.redispatch(
            cuda, randn(4, 6, 8), randn(4, 4, 5, 8), randn(4, 4, 5, 8), torch.ones(4, dtype=torch.bool), None, None,
            1.0), r"query heads \(6\) must be a multiple of key/value heads \(4\)"),
    ]
    for call, message in calls:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.cuda
def test_ops_reject_mixed_devices():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    args = router_args("cuda", mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="mask is on cpu but hidden is on cuda"):
        ops.router_gate(**args)
    args = router_args("cuda", weight=randn(4))
    with pytest.raises(RuntimeError, match="weight is on cpu but hidden is on cuda"):
        ops.router_gate(**args)
    with pytest.raises(RuntimeError, match="order is on cpu but x is on cuda"):
        ops.gather_kept(randn(3, 2, device="cuda"), torch.arange(3), 1)


def test_regroup_ops_reject_bad_input(device):
    x = randn(4, 3, 8, device=device)
    order = torch.arange(4, device=device)
    m = torch.ops.mindskip
    cases = [
        (lambda: ops.gather_kept(x, order[:3], 1), r"order must have shape \(B,\) = \(4,\)"),
        (lambda: ops.gather_kept(x, order.int(), 1), "order must be int64, got Int"),
        (lambda: ops.gather_kept(x, order, 5), r"k = 5 is out of range \[0, B = 4\]"),
        (lambda: ops.gather_kept(x, order, -1), r"k = -1 is out of range"),
        (lambda: ops.scatter_add_kept_(x, randn(2, 3, 7, device=device), order), "trailing dimensions must match"),
        (lambda: ops.scatter_add_kept_(x, randn(5, 3, 8, device=device), order), r"y.size\(0\) = 5 is out of range"),
        (
            lambda: ops.scatter_add_kept_(x.transpose(1, 2), randn(2, 8, 3, device=device), order),
            "residual must be contiguous",
        ),
        (
            lambda: ops.scatter_add_kept_(x.int(), randn(2, 3, 8, device=device).int(), order),
            "residual must be float32",
        ),
        (
            lambda: m.scatter_add_kept_(x, randn(2, 3, 8, device=device).half(), order),
            "y is Half but residual is Float",
        ),
        (
            lambda: ops.pack_plan(torch.ones(4, 2, device=device), order, 2, 3),
            r"mask must have shape \(B, T\) = \(4, 3\)",
        ),
        (lambda: ops.pack_plan(None, order, 7, 3), r"k = 7 is out of range"),
        (
            lambda: ops.pack_kept(x, torch.zeros(3, dtype=torch.long, device=device), 4),
            r"the row count = 4 is out of range",
        ),
        (lambda: ops.pack_kept(x[0, 0], order, 1), r"x must have shape \(B, T, ...\)"),
        (lambda: ops.unpack_add_kept_(x, randn(2, 7, device=device), order), "trailing dimensions must match"),
        (lambda: ops.scatter_add_kept(x, randn(2, 3, 7, device=device), order), "trailing dimensions must match"),
        (lambda: ops.scatter_add_kept(x, randn(2, 3, 8, device=device), order[:3]), r"order must have shape \(B,\)"),
        (lambda: m.scatter_add_kept(x, randn(2, 3, 8, device=device).half(), order), "y is Half but residual is"),
    ]
    q, k, cos, sin = rotary_inputs(device, torch.float32, 2, 3, 4, 2, 8, 2)
    cases += [
        (lambda: ops.rotary_embedding(q[0], k, cos, sin, None), r"q must have shape \(N, T, heads, D\)"),
        (lambda: ops.rotary_embedding(q, k[:1], cos, sin, None), r"k must have shape \(N, T, heads, D\) = \(2, 3,"),
        (lambda: ops.rotary_embedding(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7], None), "must be even"),
        (lambda: ops.rotary_embedding(q, k, cos[:, :2], sin, None), r"cos must have shape \(C, T, D\) = \(C, 3, 8\)"),
        (lambda: ops.rotary_embedding(q, k, cos, sin[:1], None), "sin must have cos's shape"),
        (lambda: ops.rotary_embedding(q, k.double(), cos, sin, None), "k is Double but q is Float"),
        (lambda: ops.rotary_embedding(q, k, cos.half(), sin, None), "cos is Half but q is Float"),
        (lambda: ops.rotary_embedding(q.int(), k.int(), cos.int(), sin.int(), None), "q must be float32"),
        (lambda: ops.rotary_embedding(q, k, torch.cat([cos] * 2), torch.cat([sin] * 2)[:4], None),
         "cos has 4 rows for 2 rows of q; pass rows"),
        (lambda: ops.rotary_embedding(q, k, cos, sin, torch.zeros(3, dtype=torch.long, device=device)),
         r"rows must have shape \(N,\) = \(2,\)"),
        (lambda: ops.rotary_embedding(q, k, cos, sin, torch.zeros(2, dtype=torch.int32, device=device)),
         "rows must be int64"),
    ]
    if device.type == "cpu":  # out-of-range rows are a device-side assert on CUDA
        bad = torch.tensor([0, 9, 1, 2], device=device)
        cases.append((lambda: ops.gather_kept(x, bad, 2), r"order\[1\] = 9 is out of range \[0, 4\)"))
        cases.append(
            (
                lambda: ops.pack_kept(x, torch.tensor([12], device=device), 1),
                r"token_index\[0\] = 12 is out of range \[0, 12\)",
            )
        )
        cases.append((lambda: ops.scatter_add_kept(x, randn(2, 3, 8), bad), r"order\[1\] = 9 is out of range"))
        cases.append((lambda: ops.rotary_embedding(q, k, cos, sin, torch.tensor([0, 2])),
                      r"rows\[1\] = 2 is out of range \[0, 2\)"))
    for fn, message in cases:
        with pytest.raises(RuntimeError, match=message):
            fn()


# ---------------------------------------------------------------------------------------------
# The portable CPU path (no AVX) gives the same answers.


def test_portable_cpu_path_matches_reference():
    script = textwrap.dedent(
        """
        import torch
        from mindskip_ext import ops, reference as ref
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            h = torch.randn(5, 7, 37).to(dtype)
            w = torch.randn(37) * 0.2
            mask = torch.rand(5, 7) < 0.7
            got, want = ops.router_gate(h, mask, w, 0.1, 0.5), ref.router_gate(h, mask, w, 0.1, 0.5)
            torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=0)
            order = torch.tensor([3, 1, 0, 2, 4])
            r, y = torch.randn(5, 7, 37).to(dtype), torch.randn(2, 7, 37).to(dtype)
            assert torch.equal(ops.scatter_add_kept_(r.clone(), y, order), ref.scatter_add_kept_(r.clone(), y, order))
        print("ok")
        """
    )
    env = dict(os.environ, MINDSKIP_CPU_SIMD="0")
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
