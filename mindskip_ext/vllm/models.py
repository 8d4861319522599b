"""MindSkip versions of vLLM's Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE and Gemma 3 causal LMs.

Each is the stock vLLM class, built as usual; then the attention module of every MindSkip layer gets its
router (:func:`~mindskip_ext.vllm.routing.attach_router`). Parameter names are unchanged, so the base
checkpoint loads exactly as it does without the plugin; the routers come from the directory named in the
model's config (``mindskip_routers``).

In each of them the decoder layer hands its attention module the pre-attention norm's output, which the router
pools, and adds what the module returns to the residual: Gemma 3 through its attention-output norm, which keeps a
skipped token's zeros zeros; Qwen3-MoE's expert block runs on every token as usual.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from .checks import read_routers
from .routing import LayerRouter, attach_router


class MindSkipMixin:
    """Adds the routers to a stock vLLM causal LM whose decoder is ``self.model`` with ``.layers``."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = vllm_config.model_config.hf_config
        config, state = read_routers(hf_config)
        decoder = self.model
        for idx in config.resolve_layers(int(hf_config.num_hidden_layers)):
            if not decoder.start_layer <= idx < decoder.end_layer:
                continue  # held by another pipeline stage
            router = LayerRouter(int(hf_config.hidden_size), config.threshold)
            with torch.no_grad():
                router.weight.copy_(state[f"layers.{idx}.router.weight"].reshape(-1))
                router.bias.copy_(state[f"layers.{idx}.router.bias"].reshape(()))
            attach_router(decoder.layers[idx].self_attn, router)


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
