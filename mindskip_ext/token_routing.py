"""Token-level MindSkip (``MindSkipConfig(routing="token")``): the official Router-Tuning's ``attn_token`` variant.

Per token, with ``keep_t = 1[sigmoid(router(norm(x_t))) >= threshold]``, the attention sublayer of a routed layer is
``h_t = x_t + keep_t * Attn(norm(x))_t``, then the MLP as usual. Every token computes its key and value (a later
token may attend to it), so the layer's KV cache is complete; only a kept token computes its query, its attention
and the output projection, and a skipped token's output is its residual.

Where the work is saved:

* **prefill** (and any forward of several tokens): the queries of the kept tokens only, attending to every key of
  their sequence, causal by each query's own position. They are laid out per sequence (the ``j``-th kept token of
  row ``b`` in slot ``(b, j)``), so the attention is one SDPA call per block of slots with an explicit mask; each
  block reads the keys up to its last query's position only (what a causal kernel's block skipping saves). The query
  and output projections run for the kept tokens only;
* **decode** (one token per row on a KV cache): every row writes its key and value; the attention reads the KV cache
  of the kept rows only (:func:`mindskip_ext.ops.token_decode_attention`), and a skipped row does not read the
  layer's cache at all. At long context that read is the cost of the step's attention. Everything has a fixed
  shape (the kept count changes every step), so a compiled decode step on a static cache is one graph. The
  projections run for every row: at decode they read their weights once for the whole batch, so fewer rows would
  save almost nothing. On a ``DynamicCache`` the slots append in place to buffers with spare room (the stock slot
  concatenates, reading and rewriting the whole cache at every step, skipped rows included), every layer's: an
  unrouted layer's ``cat`` would cost more than its attention's read of the cache.

Training uses the straight-through estimator per token (gate ``keep + score - score.detach()``); with
``train_all_sequences`` every token's attention is computed so that every token's gate gets a task gradient.
The :class:`~mindskip_ext.layer.RoutingRecord` of a forward of several tokens counts its real tokens as the units
(capacity: the kept fraction of the real tokens); decode steps route without a record (a count would need a host
sync per layer and step).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer, StaticLayer

from . import ops
from .cache import CompactLayerMixin, cache_slot
from .layer import LayerRouting, _rotate_half

# Kept-query slots per SDPA call at prefill: each call reads the keys up to its last query, so smaller blocks read
# less of the causal upper triangle for more calls.
QUERY_BLOCK = 128
# Spare positions a dynamic token-routing slot allocates beyond its length: an eighth (at least 64), so that a regrowth
# (one copy of the cache) comes every length/8 steps.
GROWTH = 8
MIN_SPARE = 64
# The golden ratio's fraction: position t of layer l is kept by a static token pattern when the fractional part of
# t * PHI + l * PHI**2 is below the layer's kept fraction (input independent, evenly spread for any fraction).
PHI = 0.6180339887498949


# ----------------------------------------------------------------------------------------------- the KV cache slot


class AppendDynamicLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends in place: its keys and values are views of buffers with spare positions, so a
    decode step writes its one position and reads nothing else (the stock slot's ``torch.cat`` copies the whole
    cache every step). Everything the stock slot does to its tensors (crop, beam reorder, batch select/repeat,
    offload) still works on the views; an update after a change that made new tensors allocates new buffers."""

    # CacheLayerMixin.__init_subclass__ registers classes that carry a `_layer_type` into a global mapping; never ours.
    _layer_type = None
    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        needed = length + key_states.shape[-2]
        if not self._fits(key_states, value_states, length, needed):
            capacity = needed + max(MIN_SPARE, needed // GROWTH)
            self._buffers = tuple(
                new.new_empty((*new.shape[:2], capacity, new.shape[3])) for new in (key_states, value_states)
            )
            if length:
                self._buffers[0][:, :, :length].copy_(self.keys)
                self._buffers[1][:, :, :length].copy_(self.values)
        keys, values = self._buffers
        keys[:, :, length:needed].copy_(key_states)
        values[:, :, length:needed].copy_(value_states)
        self.keys, self.values = keys[:, :, :needed], values[:, :, :needed]
        return self.keys, self.values

    def _fits(self, key_states, value_states, length: int, needed: int) -> bool:
        """Whether the buffers hold the current tensors as their first ``length`` positions and have room for
        ``needed``."""
        if self._buffers is None:
            return False
        for buffer, current, new in zip(self._buffers, (self.keys, self.values), (key_states, value_states)):
            if (buffer.shape[2] < needed or buffer.dtype != new.dtype or buffer.device != new.device
                    or buffer.shape[:2] != new.shape[:2] or buffer.shape[3] != new.shape[3]):
                return False
            if length and (current.data_ptr() != buffer.data_ptr() or current.stride() != buffer.stride()):
                return False
        return True

    def reset(self) -> None:
        super().reset()
        self._buffers = None


def token_slot(cache, layer_idx: int):
    """The cache slot of a token-routed layer. Where it is a plain ``DynamicLayer`` (first use), every plain
    ``DynamicLayer`` of the cache becomes an :class:`AppendDynamicLayer`, the other layers' too: the stock slot's
    ``torch.cat`` at every decode step would cost an unrouted layer more than reading its cache does. (A cache made
    without the model's config grows its slots as layers first use them; those after the routed layers stay stock.)"""
    layers, slot = cache_slot(cache, layer_idx)
    if isinstance(slot, CompactLayerMixin):
        raise ValueError(f"the cache slot of layer {layer_idx} holds a sequence-routing MindSkip decision; a token-"
                         "routed layer needs a fresh cache")
    if type(slot) is DynamicLayer:
        for i, stock in enumerate(layers):
            if type(stock) is DynamicLayer:
                converted = object.__new__(AppendDynamicLayer)
                converted.__dict__.update(stock.__dict__)
                layers[i] = converted
        slot = layers[layer_idx]
    return slot


# ----------------------------------------------------------------------------------------------- decisions


def token_logits(layer, normed: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` fp32 router logits of every token of ``normed`` (the layer's normalised input). An elementwise
    product and a reduction over the last dimension: each token's logit is the same whatever the batch around it."""
    weight = layer.router.weight.reshape(-1)
    return (normed.to(weight.dtype) * weight).sum(-1) + layer.router_bias()


def static_token_keep(layer_idx: int, fraction: float, positions: torch.Tensor) -> torch.Tensor:
    """Input-independent decisions at kept ``fraction``: position ``t`` of layer ``layer_idx`` is kept when the
    fractional part of ``t * PHI + layer_idx * PHI**2`` is below ``fraction`` (an evenly spread pattern whose kept
    share of any long run of positions is ``fraction``)."""
    phase = (positions.to(torch.float64) * PHI + layer_idx * PHI * PHI) % 1.0
    return phase < fraction


def set_static_token_fractions(model, fractions: dict[int, float] | None) -> None:
    """Make every token-routed layer of ``model`` (a :class:`~mindskip_ext.MindSkipModel`) keep the fraction of
    tokens ``fractions[layer]`` by :func:`static_token_keep`, whatever its input (its static projection: each
    layer's kept fraction as input-independent decisions), or route again (None)."""
    layers = model.mindskip_layers
    if any(layer.routing != "token" for layer in layers.values()):
        raise ValueError("static token fractions need a token-routed model (MindSkipConfig(routing='token'))")
    if fractions is not None:
        unknown = sorted(set(fractions) ^ set(layers))
        if unknown:
            raise ValueError(f"static token fractions are for layers {sorted(fractions)}, the routers are on "
                             f"{sorted(layers)}")
        bad = {i: f for i, f in fractions.items() if not 0.0 <= f <= 1.0}
        if bad:
            raise ValueError(f"a kept fraction must be in [0, 1], got {bad}")
    for idx, layer in layers.items():
        if fractions is None:
            layer.__dict__.pop("static_token_fraction", None)
        else:
            layer.__dict__["static_token_fraction"] = float(fractions[idx])


def _decide(layer, normed, position_ids):
    """``(score, keep)``, both ``(B, T)``: the router's, or the static pattern's (``score`` 0/1) when one is set."""
    fraction = layer.__dict__.get("static_token_fraction")
    if fraction is not None:
        batch, seqlen = normed.shape[:2]
        positions = position_ids if position_ids is not None else torch.arange(seqlen, device=normed.device)
        keep = static_token_keep(layer.layer_idx, fraction, positions.expand(batch, seqlen))
        return keep.to(torch.float32), keep
    score = torch.sigmoid(token_logits(layer, normed))
    return score, score.detach() >= layer.threshold


def varying_layers(kept: dict[int, float], tolerance: float = 0.02) -> list[int]:
    """The token-routed layers worth routing per token: those whose kept fraction of the real tokens (``kept``,
    layer -> fraction, e.g. ``capacity_per_layer`` of ``mindskip eval`` on calibration data) is within
    ``(tolerance, 1 - tolerance)``. The routers of the others decide alike for (nearly) every token: routed per
    sequence (``MindSkipConfig(token_layers=...)``), they keep or skip whole sequences, and a skipped sequence stores
    no KV cache there, where a token-routed layer stores every token's."""
    if not 0.0 <= tolerance < 0.5:
        raise ValueError(f"tolerance must be in [0, 0.5), got {tolerance!r}")
    bad = {i: f for i, f in kept.items() if not 0.0 <= f <= 1.0}
    if bad:
        raise ValueError(f"a kept fraction must be in [0, 1], got {bad}")
    return sorted(i for i, f in kept.items() if tolerance < f < 1.0 - tolerance)


def save_hybrid(router_directory, output, token_layers) -> Path:
    """Write token routers saved in ``router_directory`` to ``output`` (it may be the same directory) with
    ``token_layers`` set: loaded, only those layers route per token and the others per sequence (the hybrid). With no
    token layers every layer routes per sequence, written as sequence routers (the same decisions: a linear router's
    logit of the pooled input is its mean token logit). The router weights are copied unchanged; the source is read
    and checked before anything is written."""
    from ._io import atomic_write_bytes
    from .config import check_token_layers
    from .model import CONFIG_NAME, WEIGHTS_NAME, read_router_directory

    config, meta, _ = read_router_directory(router_directory)
    if config.routing != "token":
        raise ValueError(f"{router_directory} holds {config.routing} routers: a hybrid needs token routers")
    check_token_layers(token_layers, meta["layers"])
    if token_layers:
        config = dataclasses.replace(config, token_layers=list(token_layers))
    else:
        config = dataclasses.replace(config, routing="sequence", token_layers=None)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    atomic_write_bytes(out / WEIGHTS_NAME, (Path(router_directory) / WEIGHTS_NAME).read_bytes())
    atomic_write_bytes(out / CONFIG_NAME, config.to_json(**meta).encode())
    return out


def token_keep(layer, hidden_states: torch.Tensor, position_ids=None) -> torch.Tensor:
    """``(B, T)`` bool: which tokens of ``hidden_states`` (the layer's input) run the attention sublayer of ``layer``
    (a token-routed :class:`~mindskip_ext.layer.MindSkipDecoderLayer`). For benchmarks and reports: the forward makes
    the same decisions."""
    with torch.no_grad():
        return _decide(layer, layer._input_norm(hidden_states), position_ids)[1]


# ----------------------------------------------------------------------------------------------- the forward


def forward(layer, hidden_states, attention_mask, position_ids, use_cache, position_embeddings, cache, state, kwargs):
    """The forward of a token-routed :class:`~mindskip_ext.layer.MindSkipDecoderLayer` (its ``forward`` dispatches
    here): the decoder layer's output ``(B, T, hidden)``."""
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be (batch, seq, hidden), got shape {tuple(hidden_states.shape)}")
    x = hidden_states
    batch, seqlen = x.shape[:2]
    training = layer.training and torch.is_grad_enabled()
    if cache is not None:
        token_slot(cache, layer.layer_idx)
    normed = layer._input_norm(x)
    score, keep = _decide(layer, normed, position_ids)
    if cache is not None and seqlen == 1 and not training:
        h = _decode_step(layer, x, normed, keep[:, 0], attention_mask, position_embeddings, cache)
        out = h + layer._run_mlp(h)
        layer._fire_base_hooks(hidden_states, out)
        return out

    real = _real_tokens(state, batch, seqlen)
    kept = keep if real is None else keep & real
    gate = None
    if score.requires_grad:
        gate = ops.straight_through(score, keep)
    # The one host sync of a token-routed layer's forward: the kept count picks the path and sizes the kept queries.
    units = batch * seqlen if real is None else int(real.sum())
    num_kept = int(kept.sum())
    if state is not None:
        state.record.layers[layer.layer_idx] = LayerRouting(score=score, keep=keep, gate=gate, num_kept=num_kept,
                                                            batch_size=units, real=real)
    sublayers = functools.partial(
        _sublayers, layer, kept=kept, num_kept=num_kept, units=units, attention_mask=attention_mask,
        position_ids=position_ids, position_embeddings=position_embeddings, kwargs=dict(kwargs, use_cache=use_cache),
    )
    if training and getattr(layer.base_layer, "gradient_checkpointing", False):
        # As on the sequence path: the decision stays outside, the sublayers are recomputed from x and the gate in the
        # backward pass, without a KV cache.
        out = layer.base_layer._gradient_checkpointing_func(sublayers, x, gate, None, None)
    else:
        out = sublayers(x, gate, normed, cache)
    layer._fire_base_hooks(hidden_states, out)
    return out


def _real_tokens(state, batch: int, seqlen: int) -> torch.Tensor | None:
    """``(B, T)`` bool real-token mask of this forward's tokens (None: every token is real, or no mask was given)."""
    if state is None:
        return None
    real = state.prefill_padding_mask
    return None if real is None else real.to(torch.bool)


def _sublayers(layer, x, gate, normed, cache, *, kept, num_kept, units, attention_mask, position_ids,
               position_embeddings, kwargs):
    """Attention (gated per token) and the MLP of a forward of several tokens; ``gate`` is the straight-through gate
    when gradients are recorded, else None; ``normed`` is computed from ``x`` when not given (a recomputation)."""
    if normed is None:
        normed = layer._input_norm(x)
    batch = x.shape[0]
    ste = gate is not None
    if (ste and layer.train_all_sequences) or num_kept == units:
        # Every token's attention: the stock attention module, which writes the cache as it does for the stock layer.
        a = layer._run_attention(normed, None, batch, attention_mask, position_ids, position_embeddings, cache, kwargs)
        h = x + (gate.unsqueeze(-1).to(a.dtype) * a if ste else a)
    else:
        h = _kept_attention(layer, x, normed, kept, num_kept, gate, attention_mask, position_embeddings, cache)
    return h + layer._run_mlp(h)


def _projections(attn, spec, hidden, which: str):
    """``q`` or ``k`` of ``hidden (..., hidden)`` as ``(..., heads, head_dim)``, with the per-head norm (Qwen3)."""
    out = getattr(attn, f"{which}_proj")(hidden)
    out = out.view(*out.shape[:-1], -1, attn.head_dim)
    norm = getattr(spec, f"{which}_norm")
    return getattr(attn, norm)(out) if norm is not None else out


def _rotary(t, cos, sin):
    """Rotary embedding of ``t (..., heads, head_dim)`` with ``cos``/``sin`` ``(..., head_dim)``."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return t * cos + _rotate_half(t) * sin


def _keys_values(layer, attn, normed, position_embeddings, cache):
    """Every token's key and value ``(B, Hkv, L, head_dim)``, written to the cache (whose whole contents come back)."""
    cos, sin = position_embeddings
    k = _rotary(_projections(attn, layer.spec, normed, "k"), cos, sin).transpose(1, 2)
    v = attn.v_proj(normed).view(*normed.shape[:-1], -1, attn.head_dim).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, layer.layer_idx)
    return k, v


def _decode_step(layer, x, normed, keep, attention_mask, position_embeddings, cache):
    """One decode step (``T == 1``): every row writes its key and value, the kept rows attend (reading only their own
    rows of the cache), a skipped row's output is its residual. Fixed shapes, no host sync."""
    attn = layer._attn_module()
    batch = x.shape[0]
    cos, sin = position_embeddings
    q = _rotary(_projections(attn, layer.spec, normed, "q"), cos, sin)[:, 0]  # (B, Hq, head_dim)
    keys, values = _keys_values(layer, attn, normed, position_embeddings, cache)
    slot = cache.layers[layer.layer_idx]
    length = slot.cumulative_length if isinstance(slot, StaticLayer) else None
    mask = _decode_mask(attention_mask, batch, keys.shape[2])
    out = ops.token_decode_attention(q, keys, values, keep, mask, length, attn.scaling)
    o = attn.o_proj(out.reshape(batch, 1, -1))
    return x + torch.where(keep.view(batch, 1, 1), o, torch.zeros((), dtype=o.dtype, device=o.device))


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A prepared attention mask as bool (True: attended): sdpa's bool masks as they are, eager's additive ones where
    they add nothing."""
    return mask if mask.dtype == torch.bool else mask == 0


def _decode_mask(attention_mask, batch: int, positions: int) -> torch.Tensor | None:
    """``(B, positions)`` bool of the positions a decode step's token attends to, from the layer's attention mask (4D
    prepared, or flash attention's 2D padding mask), or None (every position)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        mask = attention_mask[:, 0, -1, :positions]
    elif attention_mask.dim() == 2:
        mask = attention_mask[:, :positions]
    else:
        raise ValueError(f"token routing reads a 2D or 4D attention mask, got shape {tuple(attention_mask.shape)}")
    return _allowed(mask).expand(batch, positions)


def _query_masks(attention_mask, flat, batch, seqlen, keys, past):
    """``(N, keys)`` bool: the keys each kept query (flat index ``b * seqlen + t`` in ``flat``) attends to: its rows of
    the layer's 4D mask, or causal by its position ``past + t`` (with flash attention's 2D key padding mask)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        rows = attention_mask[:, 0, :, :keys].expand(batch, seqlen, keys).reshape(batch * seqlen, keys)
        return _allowed(rows.index_select(0, flat))
    causal = torch.arange(keys, device=flat.device) <= (past + flat % seqlen).unsqueeze(1)
    if attention_mask is not None:
        causal = causal & (attention_mask[:, :keys] != 0).index_select(0, flat // seqlen)
    return causal


def _kept_attention(layer, x, normed, kept, num_kept, gate, attention_mask, position_embeddings, cache):
    """The attention sublayer of a forward of several tokens where only ``kept (B, T)`` tokens attend: every token's
    key and value, the kept tokens' queries laid out per sequence, blockwise SDPA, the output projection of the kept
    tokens added to their residual (``gate``: the straight-through gate when training kept-only)."""
    attn = layer._attn_module()
    batch, seqlen = x.shape[:2]
    keys, values = _keys_values(layer, attn, normed, position_embeddings, cache)
    if num_kept == 0:
        return x
    length = keys.shape[2]
    past = int(cache.layers[layer.layer_idx].get_seq_length()) - seqlen if cache is not None else length - seqlen
    rows = torch.arange(batch, device=x.device)
    counts, token_index, total, slots = ops.pack_plan_with_sizes(kept, rows, batch, seqlen)
    flat = token_index[:total]
    cos, sin = position_embeddings
    if cos.shape[0] == batch and batch > 1:
        cos, sin = ops.pack_kept(cos, token_index, total), ops.pack_kept(sin, token_index, total)
    else:
        cos, sin = cos[0].index_select(0, flat % seqlen), sin[0].index_select(0, flat % seqlen)
    q = _rotary(_projections(attn, layer.spec, ops.pack_kept(normed, token_index, total), "q"), cos, sin)
    # Slot (b, j): the j-th kept token of row b. Unused slots attend to key 0 only (a finite output, never read).
    row = flat // seqlen
    slot = row * slots + torch.arange(total, device=x.device) - counts.to(torch.int64).index_select(0, row)
    q_slots = q.new_zeros(batch * slots, *q.shape[1:]).index_copy(0, slot, q)
    q_slots = q_slots.view(batch, slots, *q.shape[1:]).transpose(1, 2)
    allowed = torch.zeros(batch * slots, length, dtype=torch.bool, device=x.device)
    allowed[:, 0] = True
    allowed.index_copy_(0, slot, _query_masks(attention_mask, flat, batch, seqlen, length, past))
    allowed = allowed.view(batch, 1, slots, length)
    # Causal: slot j's queries read no key past the last of their positions, so each block stops there.
    position = torch.full((batch * slots,), -1, dtype=torch.int64, device=x.device)
    position.index_copy_(0, slot, past + flat % seqlen)
    ends = (position.view(batch, slots).amax(0) + 1).cummax(0).values.tolist()
    dropout = attn.attention_dropout if layer.training else 0.0
    blocks = []
    for j0 in range(0, slots, QUERY_BLOCK):
        j1 = min(slots, j0 + QUERY_BLOCK)
        end = max(1, ends[j1 - 1])
        blocks.append(F.scaled_dot_product_attention(
            q_slots[:, :, j0:j1], keys[:, :, :end], values[:, :, :end], attn_mask=allowed[:, :, j0:j1, :end],
            dropout_p=dropout, scale=attn.scaling, enable_gqa=keys.shape[1] != q.shape[1]))
    out = torch.cat(blocks, dim=2).transpose(1, 2).reshape(batch * slots, -1).index_select(0, slot)
    out = attn.o_proj(out)
    if gate is not None:
        out = out * ops.pack_kept(gate.unsqueeze(-1), token_index, total).to(out.dtype)
    return ops.unpack_add_kept_(x.clone(memory_format=torch.contiguous_format), out, token_index)
