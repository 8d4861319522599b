"""Compact KV cache for MindSkip layers.

A MindSkip layer decides, at prefill, which sequences of the batch run its attention. The
decision is stored in that layer's slot of the transformers ``Cache`` (not on the module), and
every decode step reuses it. The slot's key/value tensors hold only the kept sequences, in
kept-first ``order``, so a skipped layer-sequence costs no KV memory.

The slot is the stock dynamic layer class (``DynamicLayer`` or ``DynamicSlidingWindowLayer``)
specialised with :class:`CompactLayerMixin`, which adds the decision and keeps beam search
(``reorder_cache``), ``batch_select_indices``, ``batch_repeat_interleave`` and ``crop`` right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class Decision:
    """One layer's routing of one batch: which rows run the gated sublayer."""

    keep: torch.Tensor  # (B,) bool
    order: torch.Tensor  # (B,) int64, kept rows first (ascending), then skipped rows
    num_kept: int
    from_training: bool = False  # made by a training-mode forward that wrote no KV for this layer

    @property
    def batch_size(self) -> int:
        return int(self.keep.shape[0])

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> Decision:
        order = torch.sort((~keep).to(torch.int8), stable=True).indices.to(torch.int64)
        return cls(keep=keep, order=order, num_kept=int(keep.sum().item()))


class CompactLayerMixin:
    """Adds a routing decision to a dynamic cache layer whose tensors hold only the kept rows."""

    # CacheLayerMixin.__init_subclass__ registers classes that carry a `_layer_type` into a global mapping
    # used by every DynamicCache; ours must never be registered there.
    _layer_type = None

    mindskip_decision: Decision | None
    mindskip_seen_tokens: int
    # True when the tensors hold only the kept rows (the slot's layer gates attention); False when
    # the layer gates only its MLP, so its attention KV is dense and only the decision is added.
    mindskip_compact: bool

    def get_seq_length(self) -> int:
        # With no kept row the tensors are empty, yet positions and masks still need the true length.
        return self.mindskip_seen_tokens

    def update(self, key_states, value_states, *args, **kwargs):
        self.mindskip_seen_tokens += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def skip_tokens(self, num_tokens: int) -> None:
        """Advance the length without storing anything: every row skipped this layer."""
        self.mindskip_seen_tokens += num_tokens
        if hasattr(self, "cumulative_length"):
            self.cumulative_length += num_tokens

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized:
            super().crop(tokens_to_remove)
        elif hasattr(self, "cumulative_length"):
            self.cumulative_length += tokens_to_remove
        self.mindskip_seen_tokens += tokens_to_remove

    def reset(self) -> None:
        super().reset()
        self.mindskip_decision = None
        self.mindskip_seen_tokens = 0

    def _remap_rows(self, source_rows: torch.Tensor) -> None:
        """New batch row ``i`` becomes old batch row ``source_rows[i]`` (beam reorder, select, repeat)."""
        decision = self.mindskip_decision
        keep = decision.keep
        source_rows = source_rows.to(keep.device)
        new_keep = keep.index_select(0, source_rows)
        if self.is_initialized and self.keys is not None and self.keys.numel() > 0:
            if self.mindskip_compact:
                # Position of each old kept row inside the compact tensors.
                compact_pos = torch.cumsum(keep.to(torch.int64), 0) - 1
                tensor_rows = compact_pos.index_select(0, source_rows[new_keep])
            else:
                tensor_rows = source_rows
            tensor_rows = tensor_rows.to(self.keys.device)
            self.keys = self.keys.index_select(0, tensor_rows)
            self.values = self.values.index_select(0, tensor_rows)
        self.mindskip_decision = Decision.from_keep(new_keep)
        self.mindskip_decision.from_training = decision.from_training

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.mindskip_decision is None:
            return super().reorder_cache(beam_idx)
        self._remap_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.mindskip_decision is None:
            return super().batch_select_indices(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._remap_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        decision = self.mindskip_decision
        if decision is None:
            return super().batch_repeat_interleave(repeats)
        rows = torch.arange(decision.batch_size, device=decision.keep.device)
        self._remap_rows(rows.repeat_interleave(repeats))


_COMPACT_CLASSES: dict[type, type] = {}


def _compact_class(layer_cls: type) -> type:
    if layer_cls not in _COMPACT_CLASSES:
        _COMPACT_CLASSES[layer_cls] = type(f"MindSkip{layer_cls.__name__}", (CompactLayerMixin, layer_cls), {})
    return _COMPACT_CLASSES[layer_cls]


def routing_slot(cache: Cache, layer_idx: int, compact: bool) -> CompactLayerMixin:
    """The MindSkip slot of ``layer_idx`` in ``cache``, converting a fresh dynamic slot on first use.

    ``compact``: the slot's tensors hold only kept rows (the layer gates attention).
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"MindSkip needs a transformers Cache with per-layer slots, got {type(cache).__name__}")
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) <= layer_idx:
        if replicate is None:
            raise ValueError(f"the cache has {len(layers)} layers but MindSkip layer {layer_idx} needs a slot")
        layers.append(replicate())
    slot = layers[layer_idx]
    if isinstance(slot, CompactLayerMixin):
        if slot.mindskip_compact != compact:
            raise ValueError(f"the cache slot of layer {layer_idx} was made for a different MindSkip granularity")
        return slot
    if not isinstance(slot, DynamicLayer):
        raise TypeError(
            f"MindSkip layer {layer_idx} needs a dynamic KV cache slot (DynamicCache), but the cache holds "
            f"{type(slot).__name__}: a static or quantized cache cannot store a per-sequence compact KV cache"
        )
    if compact and slot.is_initialized and slot.keys is not None and slot.keys.numel() > 0:
        raise ValueError(
            f"the cache slot of MindSkip layer {layer_idx} already holds keys written without MindSkip routing; "
            "start generation from a fresh cache"
        )
    compact_slot = object.__new__(_compact_class(type(slot)))
    compact_slot.__dict__.update(slot.__dict__)
    compact_slot.mindskip_decision = None
    compact_slot.mindskip_seen_tokens = slot.get_seq_length() if slot.is_initialized else 0
    compact_slot.mindskip_compact = compact
    layers[layer_idx] = compact_slot
    return compact_slot


def kv_bytes(cache: Cache) -> dict[int, int]:
    """Bytes of key + value tensors held per cache layer."""
    out = {}
    for idx, slot in enumerate(cache.layers):
        keys, values = getattr(slot, "keys", None), getattr(slot, "values", None)
        total = 0
        for t in (keys, values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        out[idx] = total
    return out
