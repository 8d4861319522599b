"""Which Hugging Face architectures MindSkip can convert, and where the parts of their decoder layers live.

One :class:`ArchSpec` per ``config.model_type``, naming the parts of one decoder layer by the attribute names of
the stock layer. Every supported layer computes, per token, two residual sublayers::

    h   = x + scale * out_norm_a(Attn(in_norm_a(x)))
    out = h + scale * out_norm_m(MLP(in_norm_m(h)))

with any of the four norms possibly absent and ``scale`` 1 unless the layer has a residual multiplier. The families
differ only in which norms they have:

* pre-norm (Llama and most others): ``in_norm_a`` = ``input_layernorm``, ``in_norm_m`` = ``post_attention_layernorm``;
* sandwich norms (Gemma 2/3): all four, and here ``post_attention_layernorm`` normalises the *attention output*, while
  the pre-MLP norm is ``pre_feedforward_layernorm``;
* post-norm only (OLMo 2/3): only the two output norms; the sublayers read the residual stream itself.

A model type not in the table gets a clear error rather than a guess (a layer of another structure would be
converted silently wrong), and a table entry is checked against the layer it is applied to
(:func:`check_layer`): a named part that is missing, or a norm that the spec does not name, is refused. Families whose
attention and MLP read the same input in parallel (``out = x + Attn(n(x)) + MLP(n(x))``) are refused by name: there
is no attention-only residual to skip to.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


@dataclass(frozen=True)
class ArchSpec:
    """Names of the parts of one decoder layer (attributes of the stock layer), and of the decoder that holds the
    layers. A norm that a family does not have is None."""

    decoder_attr: str = "model"  # attribute of the *ForCausalLM that is the decoder (holds .layers)
    layers_attr: str = "layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    # The four norms around the two sublayers.
    input_norm: str | None = "input_layernorm"  # before the attention (None: the attention reads the residual)
    attn_out_norm: str | None = None  # on the attention's output, before the residual add (Gemma 2/3, OLMo 2)
    mlp_norm: str | None = "post_attention_layernorm"  # before the MLP (Llama's name for it)
    mlp_out_norm: str | None = None  # on the MLP's output, before the residual add
    # Dropout modules on each sublayer's output (Phi-3's resid_*_dropout); identities in eval mode.
    attn_out_dropout: str | None = None
    mlp_out_dropout: str | None = None
    # Attribute of the layer that scales each sublayer's output before the residual add (Granite).
    residual_scale: str | None = None
    # The attention's projections, as the packed varlen path recomputes them: separate q/k/v_proj, or one fused
    # projection holding q, then k, then v (Phi-3's qkv_proj).
    qkv_proj: str | None = None
    # Norms on q and k before the rotary embedding: per head (Qwen3, Gemma 3) or over all heads at once (OLMo 2).
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_per_head: bool = True
    # The MLP is (or may be, per layer) a sparse mixture-of-experts block whose router logits the model's auxiliary
    # loss reads: MindSkip gates the attention only, and leaves the block and its router logits as they are.
    moe: bool = False

    @property
    def norms(self) -> tuple[str, ...]:
        """The names of every norm of a layer of this family (q/k norms live in the attention)."""
        return tuple(n for n in (self.input_norm, self.attn_out_norm, self.mlp_norm, self.mlp_out_norm) if n)

    @property
    def post_norm(self) -> bool:
        """The sublayers read the residual stream itself (no norm before the attention)."""
        return self.input_norm is None

    def residual_branch(self, layer: nn.Module, sublayer: str) -> tuple[nn.Module, nn.Module, float]:
        """For ``sublayer`` ``"attn"`` or ``"mlp"`` of the stock ``layer``: the module whose input is the residual
        stream that the sublayer adds to, the module whose output is what it adds (before the residual scale), and
        that scale. Hooks on these two see the sublayer's ``x`` and ``x + scale * delta`` in every family."""
        if sublayer == "attn":
            first, last = self.input_norm or self.attn, self.attn_out_norm or self.attn
        elif sublayer == "mlp":
            first, last = self.mlp_norm or self.mlp, self.mlp_out_norm or self.mlp
        else:
            raise ValueError(f"sublayer must be 'attn' or 'mlp', got {sublayer!r}")
        scale = float(getattr(layer, self.residual_scale)) if self.residual_scale else 1.0
        return getattr(layer, first), getattr(layer, last), scale


_QK_NORMS = dict(q_norm="q_norm", k_norm="k_norm")
_SANDWICH = dict(attn_out_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                 mlp_out_norm="post_feedforward_layernorm")
_POST_NORM = dict(input_norm=None, attn_out_norm="post_attention_layernorm", mlp_norm=None,
                  mlp_out_norm="post_feedforward_layernorm", qk_norm_per_head=False, **_QK_NORMS)

ARCHITECTURES: dict[str, ArchSpec] = {
    # Pre-norm, Llama-like.
    "llama": ArchSpec(),
    "mistral": ArchSpec(),
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(**_QK_NORMS),
    "granite": ArchSpec(residual_scale="residual_multiplier"),
    "gemma": ArchSpec(),
    "smollm3": ArchSpec(),
    "olmo": ArchSpec(),
    "starcoder2": ArchSpec(),
    "phi3": ArchSpec(qkv_proj="qkv_proj", attn_out_dropout="resid_attn_dropout", mlp_out_dropout="resid_mlp_dropout"),
    # Pre-norm with a mixture-of-experts MLP.
    "mixtral": ArchSpec(moe=True),
    "qwen3_moe": ArchSpec(moe=True, **_QK_NORMS),
    "olmoe": ArchSpec(moe=True, qk_norm_per_head=False, **_QK_NORMS),
    # Sandwich norms.
    "gemma2": ArchSpec(**_SANDWICH),
    "gemma3_text": ArchSpec(**_SANDWICH, **_QK_NORMS),
    # Post-norm only.
    "olmo2": ArchSpec(**_POST_NORM),
    "olmo3": ArchSpec(**_POST_NORM),
}

# Families whose attention token routing recomputes correctly (mindskip_ext/token_routing.py): separate q/k/v
# projections, per-head q/k norms if any, the rotary embedding in every layer, and the attention output added to the
# residual as it is. The others are refused for token routing by name (a sandwich or post-norm output norm, a fused
# projection, a residual scale, q/k norms over all heads, clipped projections, layers without RoPE).
TOKEN_ROUTING_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "starcoder2", "mixtral", "qwen3_moe")

# Families refused by name, with the reason.
_PARALLEL = (
    "its attention and MLP read the same normalised input in parallel (out = x + Attn(n(x)) + MLP(n(x))), so there "
    "is no attention-only residual to skip to"
)
REFUSED: dict[str, str] = {
    "cohere": _PARALLEL,
    "cohere2": _PARALLEL,
    "stablelm": _PARALLEL + " (with use_parallel_residual; MindSkip does not take StableLM either way)",
    "phi": _PARALLEL,
    "gptj": _PARALLEL,
    "gpt_neox": _PARALLEL + " (with use_parallel_residual; MindSkip does not take GPT-NeoX either way)",
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def arch_for(config) -> ArchSpec:
    """The spec for a model config, or a ValueError naming the supported model types."""
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(supported_model_types())
    if model_type in REFUSED:
        raise ValueError(f"model type {model_type!r} is not supported by MindSkip: {REFUSED[model_type]}. "
                         f"Supported: {supported}")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model type {model_type!r} is not supported by MindSkip; supported: {supported}")
    return ARCHITECTURES[model_type]


def check_layer(layer: nn.Module, spec: ArchSpec, model_type: str) -> None:
    """Refuse a decoder layer that does not have the structure ``spec`` describes: a named part missing, or a norm
    that the spec does not name (a transformers release that changed the family's layer)."""
    names = (spec.attn, spec.mlp, *spec.norms, spec.attn_out_dropout, spec.mlp_out_dropout, spec.residual_scale)
    missing = [name for name in names if name is not None and not hasattr(layer, name)]
    attn = getattr(layer, spec.attn, None)
    missing += [f"{spec.attn}.{name}" for name in (spec.q_norm, spec.k_norm, spec.qkv_proj)
                if name is not None and not hasattr(attn, name)]
    unnamed = [name for name, child in layer.named_children()
               if "norm" in type(child).__name__.lower() and name not in spec.norms]
    if missing or unnamed:
        problems = ([f"has no {', '.join(missing)}"] if missing else []) + (
            [f"has norms MindSkip does not know where to apply: {', '.join(unnamed)}"] if unnamed else [])
        raise ValueError(
            f"the {model_type!r} decoder layer ({type(layer).__name__}) {' and '.join(problems)}: this transformers "
            "release changed its structure, and MindSkip would convert it wrong"
        )


def takes_use_cache(layer: nn.Module) -> bool:
    """Whether the layer's forward takes ``use_cache`` (Gemma's layers do not: it is then never passed on)."""
    return "use_cache" in inspect.signature(type(layer).forward).parameters


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
