"""Compact KV cache for MindSkip layers.

A MindSkip layer decides, at prefill, which sequences of the batch run its attention. The
decision is stored in that layer's slot of the transformers ``Cache`` (not on the module), and
every decode step reuses it. The slot's key/value tensors hold only the kept sequences, in
kept-first ``order``, so a skipped layer-sequence costs no KV memory.

The slot is the stock layer class specialised with a mixin that adds the decision and keeps beam
search (``reorder_cache``) and ``crop`` right, and on a dynamic slot ``batch_select_indices`` and
``batch_repeat_interleave`` too. A sliding-window slot (Gemma 2/3, OLMo 3, Mistral with a window) stays one: its
stock class keeps at most the window's positions of the kept rows, and its token count (``cumulative_length``,
which transformers builds every sliding layer's mask from) advances on every layer, one that skipped every row too:

* a dynamic slot (``DynamicLayer``, ``DynamicSlidingWindowLayer``; ``DynamicCache``) grows by
  concatenation, and counts its tokens in a Python int;
* a static slot (``StaticLayer``, ``StaticSlidingWindowLayer``; ``StaticCache``, i.e. ``generate(...,
  cache_implementation="static")``) allocates its tensors at prefill for the ``k_l`` rows the layer kept
  (the batch of the first ``update``, which the layer calls with the kept rows only) and
  ``max_cache_len`` positions, and writes every decode step in place at its token count, a tensor. After
  prefill every shape is fixed and nothing is read back to the host, so the decode step compiles (CUDA
  graphs included), as transformers' own static cache does. Its batch is fixed as well: a beam reorder
  copies in place, while ``batch_select_indices`` and ``batch_repeat_interleave`` are refused, as the stock
  static layers have neither. ``reset`` drops the compact tensors, since the next prefill may keep another
  number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import CompileConfig
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer


@dataclass
class Decision:
    """One layer's routing of one batch: which rows run the gated sublayer."""

    keep: torch.Tensor  # (B,) bool
    order: torch.Tensor  # (B,) int64, kept rows first (ascending), then skipped rows
    num_kept: int
    from_training: bool = False  # made by a training-mode forward that wrote no KV for this layer
    # Taken once here, where every decode step of the layer reads them: the rows order[:num_kept], and B.
    rows: torch.Tensor = field(init=False, repr=False)
    batch_size: int = field(init=False, repr=False)

    def __post_init__(self):
        self.rows = self.order[: self.num_kept]
        self.batch_size = int(self.keep.shape[0])

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> Decision:
        order = torch.sort((~keep).to(torch.int8), stable=True).indices.to(torch.int64)
        return cls(keep=keep, order=order, num_kept=int(keep.sum().item()))


class CompactLayerMixin:
    """Adds a routing decision to a cache layer whose tensors hold only the kept rows.

    The row bookkeeping shared by the dynamic and the static slot; each says how it counts tokens
    (:meth:`skip_tokens`, ``crop``) and how it takes a new set of rows (:meth:`_take_rows`).
    """

    # CacheLayerMixin.__init_subclass__ registers classes that carry a `_layer_type` into a global mapping
    # used by every DynamicCache/StaticCache; ours must never be registered there.
    _layer_type = None

    mindskip_decision: Decision | None
    # True when the tensors hold only the kept rows (the slot's layer gates attention); False when
    # the layer gates only its MLP, so its attention KV is dense and only the decision is added.
    mindskip_compact: bool

    def skip_tokens(self, num_tokens: int) -> None:
        """Advance the length without storing anything: every row skipped this layer."""
        raise NotImplementedError

    def _take_rows(self, rows: torch.Tensor) -> None:
        """Keep tensor rows ``rows``, in that order."""
        raise NotImplementedError

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
            self._take_rows(tensor_rows.to(self.keys.device))
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


class DynamicCompactMixin(CompactLayerMixin):
    """The decision on a dynamic slot, whose tensors grow by concatenation."""

    mindskip_seen_tokens: int

    def get_seq_length(self) -> int:
        # With no kept row the tensors are empty, yet positions and masks still need the true length.
        return self.mindskip_seen_tokens

    def update(self, key_states, value_states, *args, **kwargs):
        self.mindskip_seen_tokens += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def skip_tokens(self, num_tokens: int) -> None:
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

    def _take_rows(self, rows: torch.Tensor) -> None:
        self.keys = self.keys.index_select(0, rows)
        self.values = self.values.index_select(0, rows)


class StaticCompactMixin(CompactLayerMixin):
    """The decision on a static slot: tensors of ``k_l`` rows x ``max_cache_len`` positions, written in place.

    The token count is the stock slot's ``cumulative_length``, a device tensor, on every layer (one that
    skipped every row too), so that a compiled decode step reads no Python count that changes each step.
    """

    def get_seq_length(self):
        # The stock static slot says 0 until it stores a row; one that skipped every row still has a length.
        if hasattr(self, "cumulative_length_int"):  # the sliding-window slot counts in a Python int as well
            return self.cumulative_length_int
        return self.cumulative_length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # The tensors have the kept rows only; the slot still serves the whole batch (Cache.batch_size).
        if self.mindskip_decision is not None:
            self.batch_size = self.mindskip_decision.batch_size

    def bind_length(self, device: torch.device) -> None:
        """Keep the token count on ``device`` at a fixed address, also when no row is ever stored here."""
        if self.cumulative_length.device != device:
            self.cumulative_length = self.cumulative_length.to(device)
            torch._dynamo.mark_static_address(self.cumulative_length)

    # Whether the stock slot's update is StaticLayer's own (set per compact class by _compact_class): then a decode
    # step's one token is written at the token count itself, without the stock update's arange and add (two ops a
    # layer a step on the host-bound decode path). The sliding-window slot keeps its own update.
    _writes_at_count = False

    def update(self, key_states, value_states, *args, **kwargs):
        if not (self._writes_at_count and key_states.shape[-2] == 1 and self.is_initialized):
            return super().update(key_states, value_states, *args, **kwargs)
        # The writes are queued before the count moves on.
        self.keys.index_copy_(2, self.cumulative_length, key_states)
        self.values.index_copy_(2, self.cumulative_length, value_states)
        self.cumulative_length.add_(1)
        return self.keys, self.values

    def skip_tokens(self, num_tokens: int) -> None:
        self.cumulative_length.add_(num_tokens)  # in place: a compiled step keeps its address
        if hasattr(self, "cumulative_length_int"):
            self.cumulative_length_int += num_tokens

    def crop(self, tokens_to_remove: int) -> None:
        # Positions past the new length are overwritten by the next update and masked until then.
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.cumulative_length.sub_(-tokens_to_remove)
        if hasattr(self, "cumulative_length_int"):
            self.cumulative_length_int += tokens_to_remove

    def reset(self) -> None:
        # The next prefill may keep another number of rows: drop the tensors, the next update allocates them.
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length.zero_()
        if hasattr(self, "cumulative_length_int"):
            self.cumulative_length_int = 0
        self.mindskip_decision = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError(_FIXED_BATCH)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(_FIXED_BATCH)

    def _take_rows(self, rows: torch.Tensor) -> None:
        # Beam search keeps each sequence's beams together, and its beams share the sequence's decision, so the kept
        # count stays: copy in place, at the addresses a compiled (CUDA graph) decode step reads.
        if rows.shape[0] != self.keys.shape[0]:
            raise RuntimeError(
                f"a static MindSkip cache slot holds {self.keys.shape[0]} kept rows, fixed at prefill; a reorder to "
                f"{rows.shape[0]} kept rows needs a DynamicCache"
            )
        self.keys.copy_(self.keys.index_select(0, rows))
        self.values.copy_(self.values.index_select(0, rows))


_FIXED_BATCH = (
    "a static KV cache has a fixed batch (transformers' StaticCache layers do not change it either): use a "
    "DynamicCache where generation selects or repeats cache rows (e.g. contrastive search, assisted decoding)"
)


_COMPACT_CLASSES: dict[type, type] = {}


def _compact_class(layer_cls: type) -> type:
    if layer_cls not in _COMPACT_CLASSES:
        static = issubclass(layer_cls, StaticLayer)
        mixin = StaticCompactMixin if static else DynamicCompactMixin
        attrs = {"_writes_at_count": layer_cls.update is StaticLayer.update} if static else {}
        _COMPACT_CLASSES[layer_cls] = type(f"MindSkip{layer_cls.__name__}", (mixin, layer_cls), attrs)
    return _COMPACT_CLASSES[layer_cls]


def cache_slot(cache: Cache, layer_idx: int):
    """``(cache.layers, the slot of layer_idx)``, adding the slots a lazily grown cache does not have yet."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"MindSkip needs a transformers Cache with per-layer slots, got {type(cache).__name__}")
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) <= layer_idx:
        if replicate is None:
            raise ValueError(f"the cache has {len(layers)} layers but MindSkip layer {layer_idx} needs a slot")
        layers.append(replicate())
    return layers, layers[layer_idx]


def routing_slot(cache: Cache, layer_idx: int, compact: bool, device: torch.device | None = None) -> CompactLayerMixin:
    """The MindSkip slot of ``layer_idx`` in ``cache``, converting a fresh dynamic or static slot on first use.

    ``compact``: the slot's tensors hold only kept rows (the layer gates attention). ``device``: where the layer
    computes (a static slot keeps its token count there).
    """
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers):  # every step after the first: the slot is converted already
        slot = layers[layer_idx]
        if isinstance(slot, CompactLayerMixin) and slot.mindskip_compact == compact:
            return slot
    layers, slot = cache_slot(cache, layer_idx)
    if isinstance(slot, CompactLayerMixin):
        if slot.mindskip_compact != compact:
            raise ValueError(f"the cache slot of layer {layer_idx} was made for a different MindSkip granularity")
        return slot
    if not isinstance(slot, (DynamicLayer, StaticLayer)):
        raise TypeError(
            f"MindSkip layer {layer_idx} needs a dynamic or static KV cache slot (DynamicCache or StaticCache), but "
            f"the cache holds {type(slot).__name__}, which cannot store a per-sequence compact KV cache"
        )
    seen = int(slot.get_seq_length()) if slot.is_initialized else 0
    if compact and seen > 0:
        raise ValueError(
            f"the cache slot of MindSkip layer {layer_idx} already holds keys written without MindSkip routing; "
            "start generation from a fresh cache"
        )
    compact_slot = object.__new__(_compact_class(type(slot)))
    compact_slot.__dict__.update(slot.__dict__)
    compact_slot.mindskip_decision = None
    compact_slot.mindskip_compact = compact
    if isinstance(slot, StaticLayer):
        if compact and slot.is_initialized:
            # Preallocated for every row (Cache.early_initialization); the prefill allocates the kept rows instead.
            compact_slot.keys = compact_slot.values = None
            compact_slot.is_initialized = False
        if device is not None:
            compact_slot.bind_length(device)
    else:
        compact_slot.mindskip_seen_tokens = seen
    layers[layer_idx] = compact_slot
    return compact_slot


def decode_compile_config(**kwargs) -> CompileConfig:
    """transformers' ``CompileConfig`` for ``generate(..., compile_config=...)`` that compiles the decode step on any
    device, the CPU included (transformers compiles it by itself only on accelerators). ``kwargs``: its fields
    (``mode``, ``backend``, ``fullgraph``, ...)."""
    config = CompileConfig(**kwargs)
    config._compile_all_devices = True  # the switch transformers' own tests use; not a constructor argument
    return config


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
