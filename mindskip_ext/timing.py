"""Wall-clock timing that is right on CUDA, and the decode timing that `mindskip demo` and ``bench/e2e.py`` share.

A CUDA call returns at launch, so timing it with ``perf_counter`` alone measures launch speed. These
helpers synchronise (or use CUDA events) so that the time covers the work itself.

Decode speed against the ideal: :class:`AttentionTimer` measures the share of a dense step spent in the attention
sublayers that MindSkip may skip (the ideal time is the dense time less the skipped share of it);
:func:`transplant_cache` builds a dynamic or static cache holding a dense prefill's KV with MindSkip slots that keep
given rows; :func:`decode_steps` runs greedy steps on it and crops it back; :func:`converted` converts a model in place
for one timed sample and unloads it after.
"""

from __future__ import annotations

import contextlib
import time

import torch
from transformers import DynamicCache, StaticCache

from .cache import Decision, routing_slot
from .config import MindSkipConfig
from .hf_compat import cache_kwargs
from .model import get_mindskip_model


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, reps: int, warmup: int = 1, budget_s: float = 10.0) -> list[float]:
    """Wall times of ``fn()`` in ms: ``warmup`` untimed calls, then up to ``reps`` timed ones
    (at least 3, stopping early once ``budget_s`` is spent). CUDA is timed with events."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - started > budget_s:
            break
    return times


class AttentionTimer:
    """Times the attention sublayers of the given layers: prefill (q_len > 1) and decode steps apart."""

    def __init__(self, model, layer_indices, device):
        self.device = device
        self.handles = []
        self._open = []
        for idx in layer_indices:
            attn = model.model.layers[idx].self_attn
            self.handles.append(attn.register_forward_pre_hook(self._start, with_kwargs=True))
            self.handles.append(attn.register_forward_hook(self._stop, with_kwargs=True))

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._open.append((hidden.shape[1] > 1, self._now()))

    def _stop(self, module, args, kwargs, output):
        self._open[-1] = (*self._open[-1], self._now())

    def collect(self) -> dict[str, float]:
        """Attention ms of the prefill and of the decode steps timed since the last call."""
        synchronize(self.device)
        total = {"prefill": 0.0, "decode": 0.0}
        for is_prefill, start, end in self._open:
            ms = start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3
            total["prefill" if is_prefill else "decode"] += ms
        self._open.clear()
        return total

    def remove(self):
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def converted(model, layer_ids, convert: bool, routers: dict | None = None):
    """``model`` converted to MindSkip on ``layer_ids``, with ``routers`` when given (undone on exit); ``model``
    itself when not ``convert``."""
    if not convert:
        yield model
        return
    wrapped = get_mindskip_model(model, MindSkipConfig(layers=layer_ids))
    try:
        if routers is not None:
            wrapped.load_router_state_dict(routers)
        yield wrapped
    finally:
        wrapped.unload()


def transplant_cache(model, dense: DynamicCache, kind: str, keeps: dict[int, torch.Tensor] | None, max_len: int):
    """A ``kind`` ("dynamic" or "static") cache holding ``dense``'s KV; a layer in ``keeps`` becomes a MindSkip slot
    with that keep mask, holding only the kept rows (every row kept: the dense KV behind a MindSkip decision)."""
    cache = DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(config=model.config,
                                                                                    max_cache_len=max_len)
    for idx, layer in enumerate(dense.layers):
        keys, values = layer.keys, layer.values
        if keeps is None or idx not in keeps:
            cache.layers[idx].update(keys, values)
            continue
        slot = routing_slot(cache, idx, True, keys.device)
        decision = slot.mindskip_decision = Decision.from_keep(keeps[idx].to(keys.device))
        if decision.num_kept:
            slot.update(keys.index_select(0, decision.rows), values.index_select(0, decision.rows))
        else:
            slot.skip_tokens(keys.shape[2])
    return cache


def decode_steps(model, cache, first, steps):
    """``steps`` greedy decode steps from token ``first`` (B, 1) on ``cache``; then a crop puts the cache back."""
    token = first
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        token = out.logits[:, -1:].argmax(-1)
    for layer in cache.layers:
        if hasattr(layer, "crop"):
            layer.crop(-steps)
        else:  # transformers < 5.18: the stock StaticLayer has no crop; its length is this tensor
            layer.cumulative_length.sub_(steps)
