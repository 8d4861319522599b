"""Static MindSkip in vLLM: layers whose attention sublayer is always skipped have none.

A router directory whose routers ignore their input (zero weights: ``mindskip drop``, ``mindskip eval
--save-static``) makes the same decision for every request, so nothing is routed at run time. The served model
is the stock one with the attention module of each always-skipped layer replaced by :class:`SkippedAttention`:

* **No KV cache.** vLLM gives KV blocks to the attention layers it finds in the engine's static forward context
  (``get_kv_cache_spec`` of the model runner); the dropped layers' ``Attention`` modules are taken out of it, as
  cross-layer KV sharing (``kv_sharing_target_layer_name``) leaves its layers without a spec. The remaining
  layers stay one full-attention KV-cache group, whose blocks hold fewer layers, so the same KV memory holds
  ``layers / kept layers`` times as many blocks.
* **No weights.** The dropped layers' q/k/v/o projections are not built from the checkpoint (their tensors are
  left out of the weight stream).
* **vLLM's compiled path.** :class:`SkippedAttention` returns zeros, which the decoder layer's residual add
  turns into "output = residual", exactly as a skipped transformers layer; torch.compile folds the zeros and
  drops the unused input norm, and CUDA graphs capture the smaller model as any other.
"""

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class SkippedAttention(nn.Module):
    """The attention sublayer of a layer that never runs it: zeros (so the residual passes unchanged)."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def drop_attention(decoder_layer: nn.Module, layer_idx: int, attention_names: list[str],
                   static_forward_context: dict) -> None:
    """Replace ``decoder_layer.self_attn`` by :class:`SkippedAttention` and take its attention layers (named
    ``attention_names``) out of vLLM's static forward context, so that they get no KV cache."""
    for name in attention_names:
        static_forward_context.pop(name)
    decoder_layer.self_attn = SkippedAttention(layer_idx)


def without_dropped_weights(weights: Iterable[tuple[str, torch.Tensor]], dropped: list[int]
                            ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's ``(name, tensor)`` stream without the attention weights of the ``dropped`` layers
    (``...layers.<i>.self_attn.*``)."""
    if not dropped:
        yield from weights
        return
    pattern = re.compile(r"(?:^|\.)layers\.(?:" + "|".join(str(i) for i in dropped) + r")\.self_attn\.")
    for name, tensor in weights:
        if not pattern.search(name):
            yield name, tensor
