"""Public op API: one Python function per compiled ``torch.ops.mindskip.*`` op, plus composites.

Importing this module loads ``mindskip_ext._C`` (checking it was built for the running torch)
and registers, next to each wrapper, the op's fake kernel (for ``torch.compile`` and
``torch.library.opcheck``) and its autograd. :mod:`mindskip_ext.reference` holds the
plain-PyTorch semantics the kernels match.

Naming: each schema in ``csrc/registration.cpp`` has a wrapper here of exactly its name, with
its arguments in the same order and as many return values (an in-place op, whose name ends in
``_``, returns its mutated first argument). :mod:`mindskip_ext.reference` mirrors the same
functions. Anything built from several ops has a name of its own, in the "composites" section
at the end: ``straight_through``, ``pack_plan_with_sizes`` (the one host sync of the packed
path), ``pack_sequences`` and ``unpack_add_sequences_``.

Conventions: ``order`` is a ``(B,)`` int64 permutation of ``range(B)`` listing the kept
sequences first (each group in ascending index order) and ``k`` is the number kept;
``mask`` is a ``(B, T)`` padding mask (bool, int or float; nonzero = real token) or ``None``.
Row indices (``order[:k]``, ``token_index[:total]``) must be distinct.

Gradients
---------
``router_gate`` is differentiable through ``score`` only (w.r.t. ``hidden``, ``weight`` and a
tensor ``bias``), by ``router_gate_backward``; ``keep``, ``order`` and ``num_kept`` carry no
gradient, and ``router_gate_varlen`` (serving) none at all. For the straight-through estimator
multiply the sublayer output by ``straight_through(score, keep)``, whose value is the 0/1 keep
decision and whose gradient w.r.t. ``score`` is 1. ``gather_kept`` / ``scatter_add_kept_`` (and
its out-of-place twin ``scatter_add_kept``) and ``pack_kept`` / ``unpack_add_kept_`` are each
other's backward. ``rotary_embedding`` (decoding) has no gradient: its wrapper refuses inputs
that record one.
"""

from __future__ import annotations

import torch

from . import _extension

_extension.load()

_ops = torch.ops.mindskip

__all__ = [
    "gather_kept",
    "pack_kept",
    "pack_plan",
    "pack_plan_with_sizes",
    "pack_sequences",
    "rotary_embedding",
    "router_gate",
    "router_gate_backward",
    "router_gate_varlen",
    "scatter_add_kept",
    "scatter_add_kept_",
    "straight_through",
    "token_decode_attention",
    "unpack_add_kept_",
    "unpack_add_sequences_",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# =============================================================================================
# Schema ops: one wrapper per torch.ops.mindskip op, same name, arguments and return arity.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# router_gate / router_gate_backward


def _bias_tensor(bias, hidden):
    """A router bias given as a float or None (no bias), as the 0-d compute-dtype tensor the schema takes."""
    if isinstance(bias, torch.Tensor):
        return bias
    value = 0.0 if bias is None else float(bias)
    return torch.full((), value, dtype=_compute_dtype(hidden.dtype), device=hidden.device)


def router_gate(hidden, mask, weight, bias, threshold):
    """Fused router: per sequence, ``score = sigmoid(w . mean_real_tokens(hidden) + bias)``.

    Args:
        hidden: ``(B, T, D)`` float32, float16, bfloat16 (or float64, computed in float64).
        mask: ``(B, T)`` padding mask, nonzero = real token, or ``None``. A sequence with no
            real token pools to zero, so its score is ``sigmoid(bias)``.
        weight: ``(D,)`` or ``(1, D)`` router weight.
        bias: a float, a 0-d / 1-element tensor on ``hidden``'s device, or ``None`` (no bias).
        threshold: ``tau`` in (0, 1); ``keep = score >= tau``.

    Returns:
        ``score (B,)`` float32 (float64 for float64 ``hidden``), ``keep (B,)`` bool, ``order
        (B,)`` int64 (stable, kept first) and ``num_kept (1,)`` int64. No host sync: read ``k =
        int(num_kept)`` where the count is needed. Only ``score`` carries gradient.
    """
    return _ops.router_gate(hidden, mask, weight, _bias_tensor(bias, hidden), float(threshold))


def router_gate_backward(grad_score, hidden, mask, weight, score):
    """Gradient of :func:`router_gate`'s ``score`` w.r.t. ``hidden``, ``weight`` and ``bias``.

    ``score`` is the forward's output. Returns ``grad_hidden`` (``hidden``'s shape and dtype, zero
    at padding), ``grad_weight (D,)`` and a 0-d ``grad_bias``, both in the compute dtype (float32,
    float64 for float64 ``hidden``). ``router_gate``'s autograd calls it (and reshapes / casts the
    weight and bias gradients to their parameters'); it is public for tests and for callers that
    run the backward by hand.
    """
    return _ops.router_gate_backward(grad_score, hidden, mask, weight, score)


def _router_outputs_fake(hidden, batch):
    score = hidden.new_empty((batch,), dtype=_compute_dtype(hidden.dtype))
    keep = hidden.new_empty((batch,), dtype=torch.bool)
    order = hidden.new_empty((batch,), dtype=torch.int64)
    num_kept = hidden.new_empty((1,), dtype=torch.int64)
    return score, keep, order, num_kept


@torch.library.register_fake("mindskip::router_gate")
def _router_gate_fake(hidden, mask, weight, bias, threshold):
    return _router_outputs_fake(hidden, hidden.shape[0])


@torch.library.register_fake("mindskip::router_gate_backward")
def _router_gate_backward_fake(grad_score, hidden, mask, weight, score):
    acc = _compute_dtype(hidden.dtype)
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        hidden.new_empty((hidden.shape[2],), dtype=acc),
        hidden.new_empty((), dtype=acc),
    )


def _router_gate_setup_context(ctx, inputs, output):
    hidden, mask, weight, bias, _ = inputs
    ctx.save_for_backward(hidden, mask, weight, output[0])
    ctx.bias_shape = bias.shape
    ctx.bias_dtype = bias.dtype


def _router_gate_backward(ctx, grad_score, _grad_keep, _grad_order, _grad_num_kept):
    hidden, mask, weight, score = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = router_gate_backward(grad_score, hidden, mask, weight, score)
    return (
        grad_hidden if ctx.needs_input_grad[0] else None,
        None,
        grad_weight.reshape(weight.shape).to(weight.dtype) if ctx.needs_input_grad[2] else None,
        grad_bias.reshape(ctx.bias_shape).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None,
        None,
    )


torch.library.register_autograd(
    "mindskip::router_gate", _router_gate_backward, setup_context=_router_gate_setup_context
)


# ---------------------------------------------------------------------------------------------
# router_gate_varlen


def router_gate_varlen(hidden, cu_seqlens, weight, bias, threshold):
    """:func:`router_gate` over the sequences of a flat token batch (vLLM's layout), every token real.

    Args:
        hidden: ``(N, D)`` float32, float16, bfloat16 (or float64); sequence ``b`` is the rows
            ``cu_seqlens[b]:cu_seqlens[b+1]``. Rows outside every segment are never read.
        cu_seqlens: ``(B + 1,)`` int32 or int64 offsets, non-decreasing, within ``[0, N]``. An
            empty segment pools to zero, so its score is ``sigmoid(bias)``.
        weight, bias, threshold: as for :func:`router_gate`.

    Returns:
        ``score (B,)``, ``keep (B,)``, ``order (B,)`` and ``num_kept (1,)``, as :func:`router_gate`.
        On the CPU a segment's score is bit for bit :func:`router_gate`'s for that sequence alone
        (unpadded), whatever the other segments. No host sync on CUDA. For serving: it has no
        gradient (train routers with :func:`router_gate`; a backward through it raises).
    """
    return _ops.router_gate_varlen(hidden, cu_seqlens, weight, _bias_tensor(bias, hidden), float(threshold))


@torch.library.register_fake("mindskip::router_gate_varlen")
def _router_gate_varlen_fake(hidden, cu_seqlens, weight, bias, threshold):
    return _router_outputs_fake(hidden, cu_seqlens.shape[0] - 1)


def _router_gate_varlen_backward(ctx, *grads):
    raise RuntimeError(
        "mindskip::router_gate_varlen has no gradient: it routes at serving time; train routers with router_gate"
    )


# Registered so that a backward through it fails with that message rather than autograd's generic warning.
torch.library.register_autograd("mindskip::router_gate_varlen", _router_gate_varlen_backward)


# ---------------------------------------------------------------------------------------------
# Row regroups: gather_kept / scatter_add_kept_ (whole sequences) and pack_kept / unpack_add_kept_
# (single tokens, the varlen layout). In each pair the select op and the in-place add op are each
# other's backward.


def _register_row_pair(select: str, add: str):
    """Register the autograd of the select op ``select(x, index, n) -> (n, ...)`` and the fake of the in-place
    ``add(residual, y, index)``; return an autograd-aware ``add`` (the schema op alone has no autograd for an
    in-place update, so it routes through an autograd.Function when a gradient is needed)."""
    select_op, add_op = getattr(_ops, select), getattr(_ops, add)

    def setup_context(ctx, inputs, output):
        x, index, _ = inputs
        ctx.save_for_backward(index)
        ctx.x_shape = x.shape

    def select_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad_x = grad.new_zeros(ctx.x_shape)
        add_op(grad_x, grad, index)
        return grad_x, None, None

    torch.library.register_autograd(f"mindskip::{select}", select_backward, setup_context=setup_context)
    torch.library.register_fake(f"mindskip::{add}")(lambda residual, y, index: None)

    class AddRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, residual, y, index):
            add_op(residual, y, index)
            ctx.mark_dirty(residual)
            ctx.save_for_backward(index)
            ctx.rows = y.shape[0]
            return residual

        @staticmethod
        def backward(ctx, grad):
            (index,) = ctx.saved_tensors
            grad_y = select_op(grad, index, ctx.rows) if ctx.needs_input_grad[1] else None
            return grad, grad_y, None

    def add_rows(residual, y, index):
        if y.dtype != residual.dtype:
            y = y.to(residual.dtype)
        if torch.is_grad_enabled() and (residual.requires_grad or y.requires_grad):
            return AddRows.apply(residual, y, index)
        add_op(residual, y, index)
        return residual

    return add_rows


def gather_kept(x, order, k):
    """The kept rows ``x[order[:k]]``: ``(B, T, ...) -> (k, T, ...)``, contiguous. Any dtype."""
    return _ops.gather_kept(x, order, k)


@torch.library.register_fake("mindskip::gather_kept")
def _gather_kept_fake(x, order, k):
    return x.new_empty((k, *x.shape[1:]))


_scatter_add_rows = _register_row_pair("gather_kept", "scatter_add_kept_")


def scatter_add_kept_(residual, y, order):
    """``residual[order[j]] += y[j]`` for ``j < y.shape[0]``, in place, accumulated in fp32.

    Rows of ``residual`` not named in ``order[:k]`` are never read or written. ``y`` is cast to
    ``residual``'s dtype first if they differ. Always returns ``residual`` (the same tensor);
    differentiable w.r.t. both ``residual`` and ``y``.
    """
    return _scatter_add_rows(residual, y, order)


@torch.library.register_fake("mindskip::scatter_add_kept")
def _scatter_add_kept_fake(residual, y, order):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


class _AddRowsOut(torch.autograd.Function):
    """Autograd of ``scatter_add_kept``, taken only where a gradient is recorded: a decode step calls the op with no
    Python on the way (an autograd kernel registered on the op would run Python on every call, even without grad)."""

    @staticmethod
    def forward(ctx, residual, y, order):
        ctx.save_for_backward(order)
        ctx.rows = y.shape[0]
        return _ops.scatter_add_kept(residual, y, order)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        grad_y = _ops.gather_kept(grad, order, ctx.rows) if ctx.needs_input_grad[1] else None
        return grad, grad_y, None


def scatter_add_kept(residual, y, order):
    """Out of place: ``residual`` with ``y[j]`` added to row ``order[j]`` for ``j < y.shape[0]``, as a new contiguous
    tensor, in one pass (the other rows are copied). Accumulated in fp32 and rounded once, as
    :func:`scatter_add_kept_`; ``y`` is cast to ``residual``'s dtype first if they differ. ``order`` must be a
    permutation of ``range(B)`` (every row of the result is written through it). Differentiable w.r.t. both
    ``residual`` and ``y``. A mixed layer's residual add: ``x + scatter(a)`` without a clone of ``x``.
    """
    if y.dtype != residual.dtype:
        y = y.to(residual.dtype)
    if torch.is_grad_enabled() and (residual.requires_grad or y.requires_grad):
        return _AddRowsOut.apply(residual, y, order)
    return _ops.scatter_add_kept(residual, y, order)


def pack_plan(mask, order, k, seqlen):
    """Where the real tokens of the kept sequences go in a packed ``(total, ...)`` layout.

    Returns ``cu_seqlens (k+1,) int32`` (cumulative real lengths in ``order``), ``token_index
    (k*seqlen,) int64`` whose first ``total = cu_seqlens[-1]`` entries are the flat
    ``b * seqlen + t`` source rows (the rest is zero), and ``max_len (1,) int32``. All three
    stay on the device: no host sync (:func:`pack_plan_with_sizes` reads the sizes back).
    """
    return _ops.pack_plan(mask, order, k, seqlen)


@torch.library.register_fake("mindskip::pack_plan")
def _pack_plan_fake(mask, order, k, seqlen):
    cu_seqlens = order.new_empty((k + 1,), dtype=torch.int32)
    token_index = order.new_empty((k * seqlen,), dtype=torch.int64)
    max_len = order.new_empty((1,), dtype=torch.int32)
    return cu_seqlens, token_index, max_len


def pack_kept(x, token_index, total):
    """Rows of ``x.view(B*T, ...)`` named by ``token_index[:total]``: ``(total, ...)``."""
    return _ops.pack_kept(x, token_index, total)


@torch.library.register_fake("mindskip::pack_kept")
def _pack_kept_fake(x, token_index, total):
    return x.new_empty((total, *x.shape[2:]))


_unpack_add_rows = _register_row_pair("pack_kept", "unpack_add_kept_")


def unpack_add_kept_(residual, packed, token_index):
    """``residual.view(B*T, ...)[token_index[i]] += packed[i]`` for ``i < packed.shape[0]``.

    In place, fp32 accumulation, other rows untouched; ``packed`` is cast to ``residual``'s dtype
    if they differ. Returns ``residual``; differentiable w.r.t. ``residual`` and ``packed``.
    """
    return _unpack_add_rows(residual, packed, token_index)


# ---------------------------------------------------------------------------------------------
# rotary_embedding


def rotary_embedding(q, k, cos, sin, rows):
    """Rotate-half rotary embedding of queries and keys in one op: ``x * cos + rotate_half(x) * sin``.

    What transformers' ``apply_rotary_pos_emb`` computes (``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``),
    bit for bit: each product and the sum are rounded to the input dtype as the unfused ops round them. It reads
    the projections' layout and writes the attention layout, so the heads need no transpose of their own.

    Args:
        q: ``(N, T, Hq, D)`` float32, float16, bfloat16 or float64, ``D`` even.
        k: ``(N, T, Hk, D)``, ``q``'s dtype.
        cos, sin: ``(C, T, D)`` in ``q``'s dtype (the rotary embedding module's output).
        rows: ``(N,)`` int64, the row of ``cos``/``sin`` each row of ``q`` takes (a gathered subset of a batch whose
            positions differ per row), or ``None``: row ``n`` takes row ``n``, or row 0 when ``C == 1``.

    Returns:
        ``q_out (N, Hq, T, D)`` and ``k_out (N, Hk, T, D)``: new contiguous tensors in the attention layout (the
        projections' heads transposed, as attention and the KV cache take them). Inference only: it has no
        gradient, and refuses inputs that record one (no autograd kernel is registered on the op, so that a decode
        step calls it with no Python on the way).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin)):
        raise RuntimeError(
            "mindskip::rotary_embedding has no gradient (it serves decoding): call it under torch.no_grad(), or use "
            "transformers' apply_rotary_pos_emb where gradients are needed"
        )
    return _ops.rotary_embedding(q, k, cos, sin, rows)


@torch.library.register_fake("mindskip::rotary_embedding")
def _rotary_embedding_fake(q, k, cos, sin, rows):
    return q.new_empty(q.transpose(1, 2).shape), k.new_empty(k.transpose(1, 2).shape)


# ---------------------------------------------------------------------------------------------
# token_decode_attention (token routing's decode step)


def token_decode_attention(query, key, value, keep, mask, length, scale):
    """The attention of one decode step under token routing, reading the KV cache of the kept rows only.

    Args:
        query: ``(B, Hq, D)``, one query token per row (float32, float16, bfloat16 or float64).
        key, value: ``(B, Hkv, S, D)`` of ``query``'s dtype, ``Hq`` a multiple of ``Hkv``: the layer's cache after
            this step's write. Only the last dimension must be contiguous: a view of a longer buffer is read in
            place.
        keep: ``(B,)`` bool, the rows whose token runs the attention sublayer this step.
        mask: ``(B, S)`` (nonzero = the row attends to that position: padding and future positions are zero), or
            None (every position).
        length: a 1-element integer tensor on ``query``'s device, or None: only positions ``s < length`` are read
            (a static cache's filled length; its tensors are ``max_cache_len`` long).
        scale: the softmax scale.

    Returns:
        ``(B, Hq, D)`` in ``query``'s dtype, accumulated in fp32: a kept row's attention output, zero for a skipped
        row (whose key and value rows are never read) and for a row with no position to attend to. Fixed shapes and
        no host sync (the CPU kernel reads ``length`` where it runs), so a compiled decode step stays one graph
        whatever the kept count. No gradient (a decode step); training computes every token's attention.
    """
    return _ops.token_decode_attention(query, key, value, keep, mask, length, float(scale))


@torch.library.register_fake("mindskip::token_decode_attention")
def _token_decode_attention_fake(query, key, value, keep, mask, length, scale):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def _token_decode_attention_backward(ctx, *grads):
    raise RuntimeError(
        "mindskip::token_decode_attention has no gradient: it runs decode steps; a training-mode forward computes "
        "every token's attention"
    )


torch.library.register_autograd("mindskip::token_decode_attention", _token_decode_attention_backward)


# =============================================================================================
# Composites: built from the ops above; not schema ops, so their names are their own.
# =============================================================================================


def straight_through(score, keep):
    """Value of ``keep`` (0/1, in ``score``'s dtype) with ``d out / d score = 1``."""
    return keep.to(score.dtype) + (score - score.detach())


def pack_plan_with_sizes(mask, order, k, seqlen):
    """:func:`pack_plan`, plus its sizes as Python ints: ``cu_seqlens, token_index, total, max_len``.

    ``total`` (the packed row count, ``cu_seqlens[-1]``) and ``max_len`` are read back together:
    this is the one place the packed path syncs with the host. Shapes downstream (the packed
    tensor, FlashAttention's ``max_seqlen``) need them as ints.
    """
    cu_seqlens, token_index, max_len = pack_plan(mask, order, k, seqlen)
    total, longest = torch.cat([cu_seqlens[-1:], max_len]).tolist()
    return cu_seqlens, token_index, total, longest


def pack_sequences(x, mask, order, k):
    """Real tokens of the kept sequences, packed: ``(packed (total, ...), cu_seqlens, max_len)``.

    The layout FlashAttention's varlen interface takes; ``max_len`` is a Python int. One host
    sync, in :func:`pack_plan_with_sizes`.
    """
    cu_seqlens, token_index, total, longest = pack_plan_with_sizes(mask, order, k, x.shape[1])
    return pack_kept(x, token_index, total), cu_seqlens, longest


def unpack_add_sequences_(residual, packed, mask, order, k):
    """Add a :func:`pack_sequences` layout back into the kept rows of ``residual``, in place.

    No host sync (the packed length is ``packed.shape[0]``). Returns ``residual``.
    """
    _, token_index, _ = pack_plan(mask, order, k, residual.shape[1])
    return unpack_add_kept_(residual, packed, token_index)
