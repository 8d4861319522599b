"""Serve MindSkip models with vLLM: the router-tuned attention skipping inside vLLM's batched engine.

    from mindskip_ext.vllm import llm
    engine = llm("path/to/base", "path/to/routers", max_num_seqs=32)   # a vllm.LLM
    outputs = engine.generate(prompts, SamplingParams(max_tokens=64))

or the OpenAI-compatible server: ``python -m mindskip_ext.vllm.serve BASE --routers ROUTERS [vLLM options]``.

Installed with ``pip install "mindskip_ext[vllm]"``, the plugin is registered through the
``vllm.general_plugins`` entry point: vLLM calls :func:`register` in each of its processes, which names the
MindSkip architectures (``MindSkipLlamaForCausalLM`` and the Mistral, Qwen2, Qwen3, Qwen3-MoE and Gemma 3 ones). A
model is served with one of them through ``hf_overrides`` (:func:`hf_overrides` writes them), so the base
checkpoint's files stay as they are. This package is not imported by ``import mindskip_ext``.

A router directory is served in one of three modes (:func:`serving_mode`): **static** when its routers ignore their
input (``mindskip drop``, ``mindskip eval --save-static``): the always-skipped layers have no attention and no KV
cache, under any vLLM setting; **dynamic** where a layer routes per sequence: each request is routed at its prefill,
with chunked prefill and prefix caching off; **per-token** where every routed layer routes per token (token routers):
under any vLLM setting. A hybrid's per-token layers (``token_layers``) are served beside its per-request ones, in
dynamic mode. Every mode runs on vLLM's compiled path by default (``enforce_eager=True`` runs them eagerly).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .checks import ROUTERS_KEY, SUPPORTED_VLLM, check_vllm_version

__all__ = [
    "ROUTERS_KEY", "SUPPORTED_VLLM", "check_vllm_version", "engine_kwargs", "hf_overrides", "llm", "register",
    "serving_mode",
]

# model_type -> the stock vLLM class; the MindSkip architecture is "MindSkip" + its name.
BASE_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# What a MindSkip model needs from the engine, by mode (see checks.serving_problems for why). Static mode is a
# stock model with fewer attention layers, and per-token mode one whose routed layers mask their attention output per
# token: vLLM's defaults. Every mode runs compiled unless enforce_eager is set.
ENGINE_DEFAULTS = {
    "static": {},
    "per-token": {},
    "dynamic": {"enable_chunked_prefill": False, "enable_prefix_caching": False},
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the MindSkip architectures and their config check.

    Under another vLLM release it registers nothing and warns: vLLM runs it in every process, whatever the model,
    so an error here would stop every use of vLLM. Asking for a MindSkip model then fails as unknown, and
    :func:`llm` and ``serve`` name the release to install.
    """
    try:
        check_vllm_version()
    except RuntimeError as err:
        logging.getLogger(__name__).warning("%s. The MindSkip architectures are not registered.", err)
        return
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .checks import ServingConfigCheck

    for name in BASE_CLASSES.values():
        # The lazy "module:class" form: the model module (and vLLM's model code) loads only where a model is built.
        ModelRegistry.register_model(f"MindSkip{name}", f"mindskip_ext.vllm.models:MindSkip{name}")
        MODELS_CONFIG_MAP[f"MindSkip{name}"] = ServingConfigCheck


def hf_overrides(base: str | os.PathLike, routers: str | os.PathLike) -> dict:
    """The ``hf_overrides`` that serve ``base`` with ``routers``: its MindSkip architecture and router directory."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(os.fspath(base)).model_type
    if model_type not in BASE_CLASSES:
        raise ValueError(
            f"model type {model_type!r} has no MindSkip vLLM architecture; "
            f"supported: {', '.join(sorted(BASE_CLASSES))}"
        )
    return {"architectures": [f"MindSkip{BASE_CLASSES[model_type]}"], ROUTERS_KEY: str(Path(routers).resolve())}


def serving_mode(routers: str | os.PathLike) -> str:
    """How ``routers`` are served: ``"static"`` (every router ignores its input: ``mindskip drop`` and ``mindskip
    eval --save-static`` output), ``"dynamic"`` (some layer routes per request) or ``"per-token"`` (every routed layer
    routes per token)."""
    from .checks import RoutingPlan

    return RoutingPlan.read(routers).mode


def engine_kwargs(base: str | os.PathLike, routers: str | os.PathLike, **vllm_kwargs) -> dict:
    """Keyword arguments of ``vllm.LLM(model=base, ...)`` that serve ``base`` with ``routers``.

    ``vllm_kwargs`` pass through (``hf_overrides`` are merged); the settings the routers' mode needs are the
    defaults, and one set against them is refused by the config check when the engine is created.
    """
    check_vllm_version()
    overrides = {**(vllm_kwargs.pop("hf_overrides", None) or {}), **hf_overrides(base, routers)}
    return {**ENGINE_DEFAULTS[serving_mode(routers)], **vllm_kwargs, "hf_overrides": overrides}


def llm(base: str | os.PathLike, routers: str | os.PathLike, **vllm_kwargs):
    """A ``vllm.LLM`` serving ``base`` with the MindSkip routers saved in ``routers`` (``save_pretrained``'s output).

    Offline scripts that create one need an ``if __name__ == "__main__":`` guard (vLLM starts its engine in a
    spawned process).
    """
    from vllm import LLM

    return LLM(model=os.fspath(base), **engine_kwargs(base, routers, **vllm_kwargs))
