"""Plain-PyTorch reference of every compiled op (``torch.ops.mindskip.*``).

These functions define what the compiled kernels must compute. They are written for clarity,
not speed, and the tests compare the kernels against them. There is one function per schema in
``csrc/registration.cpp``, with the schema's name, its arguments in the same order and its
return values; an in-place op (name ending in ``_``) updates its first argument and returns it,
like its wrapper in :mod:`mindskip_ext.ops`. The composites of ``ops`` (``pack_sequences`` and
the like) have no entry here: the tests compare them with the same compositions of these.

Conventions shared by all ops
-----------------------------
* ``order`` is a permutation of ``range(B)`` (int64) that lists the kept sequences first, in
  ascending index order, then the skipped ones, also ascending. ``k`` is the number kept.
* ``mask`` is a ``(B, T)`` padding mask (nonzero = real token) or ``None`` (every token real).
* A sequence with no real token pools to a zero vector, so its score is ``sigmoid(bias)``.
* Row indices (``order[:k]``, ``token_index[:total]``) are distinct; the in-place adds rely on it.
"""

from __future__ import annotations

import torch

__all__ = [
    "gather_kept",
    "pack_kept",
    "pack_plan",
    "rotary_embedding",
    "router_gate",
    "router_gate_backward",
    "router_gate_varlen",
    "scatter_add_kept",
    "scatter_add_kept_",
    "token_decode_attention",
    "unpack_add_kept_",
]


def _real_token_mask(mask: torch.Tensor | None, batch: int, seqlen: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, seqlen, dtype=torch.bool, device=device)
    return mask != 0


def pooled_mean(hidden, mask):
    """What a router sees: ``hidden (B, T, H)`` averaged over each sequence's real tokens, ``(B, H)`` in fp32 (fp64
    for fp64 ``hidden``). Not an op of its own: the pooling of :func:`router_gate`, for code that needs the input."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    real = _real_token_mask(mask, hidden.shape[0], hidden.shape[1], hidden.device).to(compute)
    return (hidden.to(compute) * real.unsqueeze(-1)).sum(dim=1) / real.sum(dim=1).clamp_min(1.0).unsqueeze(-1)


def router_gate(hidden, mask, weight, bias, threshold):
    """Masked mean over real tokens, then ``score = sigmoid(w . mean + b)`` in fp32, ``keep = score >= threshold``.

    Returns ``score (B,) fp32``, ``keep (B,) bool``, ``order (B,) int64`` and ``num_kept (1,) int64``.
    Differentiable through ``score`` (w.r.t. ``hidden``, ``weight`` and ``bias``). fp64 ``hidden`` is
    computed in fp64 (and gives an fp64 ``score``) so that gradients can be checked numerically.
    """
    mean = pooled_mean(hidden, mask)
    compute = mean.dtype
    bias_t = torch.as_tensor(0.0 if bias is None else bias, dtype=compute, device=hidden.device).reshape(())
    logit = mean @ weight.to(compute).reshape(-1) + bias_t
    score = torch.sigmoid(logit)
    keep = score.detach() >= threshold
    # Stable sort on "not kept" puts kept rows first, each group in ascending index order.
    order = torch.sort((~keep).to(torch.int8), stable=True).indices.to(torch.int64)
    num_kept = keep.sum().reshape(1).to(torch.int64)
    return score, keep, order, num_kept


def router_gate_backward(grad_score, hidden, mask, weight, score):
    """Gradient of :func:`router_gate`'s ``score`` w.r.t. ``hidden``, ``weight`` and ``bias``, by hand.

    With ``z_b = w . mean_b + bias`` and ``s_b = sigmoid(z_b)``, ``dz_b = grad_score_b * s_b * (1 - s_b)``;
    each real token of sequence ``b`` gets ``dz_b / n_b * w`` (``n_b`` its real-token count, padding
    gets zero), ``grad_weight = sum_b dz_b * mean_b`` and ``grad_bias = sum_b dz_b``. Returns
    ``grad_hidden`` in ``hidden``'s dtype, ``grad_weight (D,)`` and a 0-d ``grad_bias`` in the compute
    dtype (fp32, fp64 for fp64 ``hidden``). ``score`` is the forward's output, as the kernel takes it.
    """
    batch, seqlen = hidden.shape[0], hidden.shape[1]
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    real = _real_token_mask(mask, batch, seqlen, hidden.device).to(compute)
    s = score.reshape(batch).to(compute)
    dz = grad_score.reshape(batch).to(compute) * s * (1 - s)
    # A sequence with no real token has no token to send a gradient to; clamping its count keeps
    # the division finite, and its all-zero mask row zeroes the result.
    per_token = (dz / real.sum(dim=1).clamp_min(1.0)).unsqueeze(1) * real  # (B, T)
    w = weight.to(compute).reshape(-1)
    grad_hidden = (per_token.unsqueeze(-1) * w).to(hidden.dtype)
    grad_weight = torch.einsum("bt,btd->d", per_token, hidden.to(compute))
    return grad_hidden, grad_weight, dz.sum()


def router_gate_varlen(hidden, cu_seqlens, weight, bias, threshold):
    """:func:`router_gate` of the segments ``hidden[cu_seqlens[b]:cu_seqlens[b+1]]`` of a flat ``(N, D)`` batch,
    padded into a ``(B, T, D)`` batch with a padding mask. Same outputs, without gradient."""
    bounds = cu_seqlens.tolist()
    lengths = [end - begin for begin, end in zip(bounds, bounds[1:])]
    seqlen = max(lengths, default=0)
    padded = hidden.new_zeros(len(lengths), seqlen, hidden.shape[1])
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.bool, device=hidden.device)
    for b, (begin, length) in enumerate(zip(bounds, lengths)):
        padded[b, :length] = hidden[begin : begin + length]
        mask[b, :length] = True
    return tuple(t.detach() for t in router_gate(padded, mask, weight, bias, threshold))


def gather_kept(x, order, k):
    """The first ``k`` rows named by ``order``: ``(B, T, ...) -> (k, T, ...)``, contiguous."""
    return x.index_select(0, order[:k]).contiguous()


def scatter_add_kept_(residual, y, order):
    """``residual[order[j]] += y[j]`` for ``j < y.shape[0]``, in place, computed in fp32 (fp64 for
    fp64) and rounded once. Returns ``residual``."""
    k = y.shape[0]
    rows = order[:k]
    compute = torch.float64 if residual.dtype == torch.float64 else torch.float32
    updated = (residual.index_select(0, rows).to(compute) + y.to(compute)).to(residual.dtype)
    residual.index_copy_(0, rows, updated)
    return residual


def scatter_add_kept(residual, y, order):
    """Out of place: :func:`scatter_add_kept_` on a contiguous copy of ``residual``."""
    return scatter_add_kept_(residual.clone(memory_format=torch.contiguous_format), y, order)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(q, k, cos, sin, rows):
    """``x * cos + rotate_half(x) * sin`` for ``x`` = ``q (N, T, Hq, D)`` and ``k (N, T, Hk, D)``, in their dtype,
    with ``cos``/``sin (C, T, D)`` rows ``rows`` (or ``n``, or 0 when ``C == 1``) broadcast over the heads: the
    unfused computation of transformers' ``apply_rotary_pos_emb``. Returns ``(N, H, T, D)`` contiguous tensors."""
    if rows is not None:
        cos, sin = cos.index_select(0, rows), sin.index_select(0, rows)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    q_out, k_out = (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
    return q_out.transpose(1, 2).contiguous(), k_out.transpose(1, 2).contiguous()


def pack_plan(mask, order, k, seqlen):
    """Where each real token of the kept sequences goes in a packed ``(total, ...)`` layout.

    Returns ``cu_seqlens (k+1,) int32`` (cumulative real lengths of the kept sequences, in ``order``),
    ``token_index (k*seqlen,) int64`` whose first ``total = cu_seqlens[-1]`` entries are the flat
    ``b * seqlen + t`` source positions of the packed tokens (the rest is unspecified), and
    ``max_len (1,) int32``.
    """
    device = order.device
    rows = order[:k]
    batch = order.shape[0]
    real = _real_token_mask(mask, batch, seqlen, device)[rows]  # (k, T)
    lengths = real.sum(dim=1).to(torch.int32)
    cu_seqlens = torch.zeros(k + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    flat = rows.unsqueeze(1) * seqlen + torch.arange(seqlen, device=device).unsqueeze(0)
    picked = flat[real]
    token_index = torch.zeros(k * seqlen, dtype=torch.int64, device=device)
    token_index[: picked.numel()] = picked
    max_len = (lengths.max() if k > 0 else torch.zeros((), dtype=torch.int32, device=device)).reshape(1)
    return cu_seqlens, token_index, max_len.to(torch.int32)


def pack_kept(x, token_index, total):
    """Rows of ``x.view(B*T, ...)`` named by ``token_index[:total]``: ``(total, ...)``."""
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return flat.index_select(0, token_index[:total]).contiguous()


def unpack_add_kept_(residual, packed, token_index):
    """``residual.view(B*T, ...)[token_index[i]] += packed[i]`` for ``i < packed.shape[0]``, in place.
    Returns ``residual``."""
    flat = residual.view(residual.shape[0] * residual.shape[1], *residual.shape[2:])
    scatter_add_kept_(flat, packed, token_index)
    return residual


def token_decode_attention(query, key, value, keep, mask, length, scale):
    """One decode step's attention under token routing, for the kept rows only.

    ``query (B, Hq, D)`` (one token per row) attends over ``key``/``value`` ``(B, Hkv, S, D)`` of its own row (each
    key/value head serves ``Hq / Hkv`` query heads), at the positions ``s < length`` (all ``S`` when ``length`` is
    None) where ``mask (B, S)`` is nonzero (all when None), with softmax scale ``scale``, in fp32 (fp64 for fp64).
    Rows where ``keep (B,)`` is False, and rows with no position to attend to, are zero. Returns ``(B, Hq, D)`` in
    ``query``'s dtype.
    """
    batch, q_heads, dim = query.shape
    kv_heads, positions = key.shape[1], key.shape[2]
    limit = positions if length is None else max(0, min(positions, int(length.reshape(()))))
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    groups = q_heads // kv_heads
    k = key[:, :, :limit].to(compute).repeat_interleave(groups, dim=1)  # (B, Hq, L, D)
    v = value[:, :, :limit].to(compute).repeat_interleave(groups, dim=1)
    scores = torch.einsum("bhd,bhld->bhl", query.to(compute), k) * scale
    allowed = torch.ones(batch, limit, dtype=torch.bool, device=query.device)
    if mask is not None:
        allowed = mask[:, :limit] != 0
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no allowed position: all zero
    out = torch.einsum("bhl,bhld->bhd", weights, v)
    rows = keep.to(torch.bool) & allowed.any(dim=-1)
    return torch.where(rows[:, None, None], out, torch.zeros((), dtype=compute, device=query.device)).to(query.dtype)
