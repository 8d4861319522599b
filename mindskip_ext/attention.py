"""Variable-length (packed) causal attention for the kept sequences of a MindSkip layer.

The kept sequences are packed with their padding removed into ``(total_tokens, ...)`` and run
through one variable-length causal attention call. Backends, in order of preference:

* ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` when the package is installed (CUDA);
* ``torch``: ``torch.nn.attention.varlen.varlen_attn``, PyTorch's own FlashAttention (CUDA);
* ``reference``: one ``scaled_dot_product_attention`` call per sequence; runs anywhere and is
  what the tests compare the fast backends against.

``flash_attn`` is imported lazily: the package works without it.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "torch", "reference")


@functools.cache
def _flash_attn_varlen():
    try:
        module = importlib.import_module("flash_attn")
    except ImportError:
        return None
    return getattr(module, "flash_attn_varlen_func", None)


@functools.cache
def _torch_varlen():
    """``(fn, causal_kwargs, supports_gqa)`` for this torch's ``varlen_attn``, or None.

    The signature changed across releases: 2.10 takes ``is_causal``; later releases take
    ``window_size=(-1, 0)`` for causal, and ``enable_gqa`` exists from 2.12 on.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends that can run packed attention for tensors of this device and dtype."""
    out = []
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _flash_attn_varlen() is not None:
            out.append("flash_attn")
        if _torch_varlen() is not None:
            out.append("torch")
    out.append("reference")
    return out


def best_fast_backend(device: torch.device, dtype: torch.dtype) -> str | None:
    """The fastest real FlashAttention backend for this device/dtype, or None if there is none."""
    fast = [b for b in available_backends(device, dtype) if b != "reference"]
    return fast[0] if fast else None


def _repeat_kv_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def varlen_causal_attention(q, k, v, cu_seqlens, max_len: int, scale: float, backend: str):
    """Causal attention of packed sequences.

    ``q (N, Hq, d)``, ``k``/``v`` ``(N, Hkv, d)`` with ``Hq % Hkv == 0`` (grouped-query attention),
    ``cu_seqlens (S+1,) int32`` the sequence boundaries. Returns ``(N, Hq, d)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown packed-attention backend {backend!r}; choose from {BACKENDS}")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    groups = hq // hkv
    if backend == "flash_attn":
        fn = _flash_attn_varlen()
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=scale, causal=True)
    if backend == "torch":
        fn, causal, supports_gqa = _torch_varlen()
        extra = dict(causal)
        if supports_gqa:
            extra["enable_gqa"] = groups > 1
        else:
            k, v = _repeat_kv_heads(k, groups), _repeat_kv_heads(v, groups)
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, **extra)
    bounds = cu_seqlens.tolist()
    out = q.new_empty(q.shape)
    k, v = _repeat_kv_heads(k, groups), _repeat_kv_heads(v, groups)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, L, d)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out
