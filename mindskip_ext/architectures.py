"""Which Hugging Face architectures MindSkip can convert, and where their parts live.

One entry per ``config.model_type``. An architecture not in the table gets a clear error rather
than a guess: a decoder layer with a different structure would be converted silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


@dataclass(frozen=True)
class ArchSpec:
    """Names of the parts of one pre-norm decoder layer, and of the decoder that holds the layers."""

    decoder_attr: str = "model"  # attribute of the *ForCausalLM that is the decoder (holds .layers)
    layers_attr: str = "layers"
    input_norm: str = "input_layernorm"
    attn: str = "self_attn"
    post_attn_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"
    # Per-head norms applied to q and k before rotary embedding (Qwen3); None when absent.
    q_norm: str | None = None
    k_norm: str | None = None


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "mistral": ArchSpec(),
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(q_norm="q_norm", k_norm="k_norm"),
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def arch_for(config) -> ArchSpec:
    """The spec for a model config, or a ValueError naming the supported model types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model type {model_type!r} is not supported by MindSkip; supported: {', '.join(supported_model_types())}"
        )
    return ARCHITECTURES[model_type]


def check_attn_implementation(config) -> str:
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {impl!r} is not supported by MindSkip; use one of "
            f"{', '.join(SUPPORTED_ATTN_IMPLEMENTATIONS)} (from_pretrained(..., attn_implementation='sdpa'))"
        )
    return impl


def decoder_of(model: nn.Module, spec: ArchSpec) -> nn.Module:
    """The module that holds the decoder layers (e.g. ``LlamaModel`` inside ``LlamaForCausalLM``)."""
    decoder = getattr(model, spec.decoder_attr, None)
    if decoder is None or not hasattr(decoder, spec.layers_attr):
        raise ValueError(
            f"{type(model).__name__} has no '{spec.decoder_attr}.{spec.layers_attr}': pass a causal LM "
            "(e.g. AutoModelForCausalLM) whose decoder layers MindSkip can find"
        )
    return decoder


def layer_list(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return getattr(decoder_of(model, spec), spec.layers_attr)
