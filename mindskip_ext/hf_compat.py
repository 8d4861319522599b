"""The one place that knows how transformers names the KV-cache argument (and activation checkpointing).

transformers 5.24 renamed the cache argument of the causal LM, the decoder, the decoder layers and
the attention modules from ``past_key_values`` to ``cache``, and the output field likewise. The old
name is still accepted there, with a deprecation warning. mindskip_ext supports both sides of the
rename, so nothing else in the package spells either name:

* :func:`pop_cache` reads the cache from whichever argument a caller used;
* :func:`cache_kwargs` hands it to a module under the name that module's ``forward`` takes
  (inspected once per class);
* :func:`output_cache` reads it from a model output without touching the deprecated property.

transformers 5.24 also renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
name is deprecated); :func:`enable_activation_checkpointing` calls whichever this release has.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from torch import nn

CACHE_NAMES = ("cache", "past_key_values")  # the current name first


@functools.cache
def _library_cache_name() -> str:
    """The name this transformers release uses: the cache field of its model outputs."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    fields = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    return next(name for name in CACHE_NAMES if name in fields)


@functools.cache
def _forward_cache_name(cls: type) -> str:
    # inspect.signature follows functools.wraps, so transformers' deprecate_kwarg wrapper shows the real signature.
    params = inspect.signature(cls.forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    return _library_cache_name()  # a **kwargs-only forward (e.g. a wrapper) passes it on to transformers


def cache_name(module: nn.Module) -> str:
    """The keyword under which ``module``'s forward takes the KV cache."""
    return _forward_cache_name(type(module))


def cache_kwargs(module: nn.Module, cache) -> dict:
    """``{name: cache}`` for calling ``module`` (a model, decoder layer or attention module)."""
    return {cache_name(module): cache}


def pop_cache(kwargs: dict):
    """Remove the cache from ``kwargs`` under either name and return it (None when absent).

    Both names set to different objects is an error: there would be no telling which one is meant.
    """
    found = None
    for name in CACHE_NAMES:  # a plain loop: this runs in every decoder layer's forward
        cache = kwargs.pop(name, None)
        if cache is None:
            continue
        if found is not None and cache is not found:
            raise ValueError(f"both {CACHE_NAMES[0]!r} and {CACHE_NAMES[1]!r} were given; pass the KV cache once")
        found = cache
    return found


def output_cache(output):
    """The KV cache of a model output (``None`` when it holds none)."""
    for name in CACHE_NAMES:
        if name in output:  # a ModelOutput is a dict of its non-None fields
            return output[name]
    return None


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' activation (gradient) checkpointing of ``model``'s decoder layers, non-reentrant."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
