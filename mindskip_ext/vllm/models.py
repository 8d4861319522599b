"""MindSkip versions of vLLM's Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE and Gemma 3 causal LMs.

Each is the stock vLLM class, built as usual; then :class:`MindSkipMixin` applies the router directory named in
the model's config (``mindskip_routers``) to its decoder layers (see :class:`~mindskip_ext.vllm.checks.RoutingPlan`):

* **static** (routers that ignore their input): the attention module of every always-skipped layer is replaced
  by :class:`~mindskip_ext.vllm.static.SkippedAttention`, and its attention layer gets no KV cache;
* **routed per request**: the attention module of the layer gets its router
  (:func:`~mindskip_ext.vllm.routing.attach_router`) and runs as one custom op;
* **routed per token** (token routers): the attention module runs as usual and its output is masked per token
  (:func:`~mindskip_ext.vllm.routing.attach_token_router`).

All work on any vLLM causal LM whose decoder is ``self.model`` with ``.layers`` of decoder layers that call
``self.self_attn(positions=..., hidden_states=...)`` on the pre-attention norm's output (what the router pools)
and add what it returns to the residual: a new model family gets both modes by mixing :class:`MindSkipMixin` into
its stock class. Gemma 3 adds it through its attention-output norm, which keeps a skipped token's zeros zeros (its
decoder also passes its own keyword arguments, which its attention ignores and the routed op refuses if any come);
Qwen3-MoE's expert block runs on every token as usual. Parameter names are unchanged, so the base checkpoint loads
as it does without the plugin (less the dropped layers' attention weights).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import CompilationMode
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from .checks import ROUTED_ATTENTION_OP, RoutingPlan, read_plan
from .routing import LayerRouter, attach_router, attach_token_router
from .static import drop_attention, without_dropped_weights


def attention_layers(self_attn: nn.Module) -> dict[str, nn.Module]:
    """The vLLM attention layers (those that get KV cache) inside an attention module, by layer name."""
    return {m.layer_name: m for m in self_attn.modules() if isinstance(m, AttentionLayerBase)}


class MindSkipMixin:
    """Serves a stock vLLM causal LM whose decoder is ``self.model`` with ``.layers`` with MindSkip routers."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.mindskip_plan = read_plan(vllm_config.model_config.hf_config)
        apply_plan(self.model, self.mindskip_plan, vllm_config)

    def load_weights(self, weights):
        return super().load_weights(without_dropped_weights(weights, self.mindskip_plan.dropped))


def apply_plan(decoder: nn.Module, plan: RoutingPlan, vllm_config) -> None:
    """Drop (static mode) or route (dynamic mode) the attention of ``decoder``'s MindSkip layers, in place."""
    hidden_size = int(vllm_config.model_config.hf_config.hidden_size)
    context = vllm_config.compilation_config.static_forward_context
    for idx in plan.dropped + plan.routed + plan.per_token:
        if not decoder.start_layer <= idx < decoder.end_layer:
            continue  # held by another pipeline stage
        layer = decoder.layers[idx]
        attention = attention_layers(layer.self_attn)
        if idx in plan.dropped:
            drop_attention(layer, idx, list(attention), context)
            continue
        if len(attention) != 1:
            raise ValueError(f"layer {idx}'s attention module holds {len(attention)} attention layers; MindSkip "
                             "routes an attention module with exactly one")
        router = LayerRouter(hidden_size, plan.config.threshold)
        with torch.no_grad():
            router.weight.copy_(plan.state[f"layers.{idx}.router.weight"].reshape(-1))
            router.bias.copy_(plan.state[f"layers.{idx}.router.bias"].reshape(()))
        if idx in plan.per_token:
            attach_token_router(layer.self_attn, router)
        else:
            attach_router(layer.self_attn, next(iter(attention.values())), router, context)
    # The piecewise path: vLLM splits its graph at its attention ops and captures the pieces between them as CUDA
    # graphs. The routed attention is split out the same way (done here, in the engine's process, once the config
    # is final; vLLM reads the list when it compiles the model, after building it).
    splitting = vllm_config.compilation_config.splitting_ops
    piecewise = vllm_config.compilation_config.mode == CompilationMode.VLLM_COMPILE and splitting
    if plan.routed and piecewise and ROUTED_ATTENTION_OP not in splitting:
        splitting.append(ROUTED_ATTENTION_OP)


class MindSkipLlamaForCausalLM(MindSkipMixin, LlamaForCausalLM):
    pass


class MindSkipMistralForCausalLM(MindSkipMixin, MistralForCausalLM):
    pass


class MindSkipQwen2ForCausalLM(MindSkipMixin, Qwen2ForCausalLM):
    pass


class MindSkipQwen3ForCausalLM(MindSkipMixin, Qwen3ForCausalLM):
    pass


class MindSkipQwen3MoeForCausalLM(MindSkipMixin, Qwen3MoeForCausalLM):
    pass


class MindSkipGemma3ForCausalLM(MindSkipMixin, Gemma3ForCausalLM):
    pass
