"""Centred router inputs for Router-Tuning: the mean pooled input of every router, to centre the routers on.

A router's input, the normalised hidden state mean-pooled over a sequence, has a part common to every sequence
that is several times its per-sequence part (SmolLM2-135M, Alpaca: a norm of 3.8-7.4 against a mean deviation of
0.8-1.9 at layers 6-26). A weight step of Adam moves every sequence's logit through the common part, 20-40x as much
as it moves their differences: the weights act as a second bias, so the routers either stay static or flip whole
layers. Centring the input on its mean over training sequences (``logit = w . (mean - centre) + b'``, see
:meth:`~mindskip_ext.layer.MindSkipDecoderLayer.set_router_centre`) leaves the weights the per-input part only.
The saved routers are ordinary: the centre is folded into the bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import Example
from ..eval.perplexity import routed_forwards
from ..reference import pooled_mean


@torch.no_grad()
def router_input_means(model, examples: Sequence[Example], pad_id: int, batch_size: int = 16,
                       bf16: bool = False) -> dict[int, torch.Tensor]:
    """Layer index -> the mean over ``examples`` of the router's pooled input (fp32, ``(hidden,)``), under the
    model's current routing: what each router sees, pooled over real tokens as the gate pools them (a token-routed
    router sees each real token: the mean over the real tokens)."""
    layers = model.mindskip_layers
    normed: dict[int, torch.Tensor] = {}
    hooks = [
        getattr(layer.base_layer, layer.spec.input_norm).register_forward_hook(
            lambda module, args, output, idx=idx: normed.__setitem__(idx, output))
        for idx, layer in layers.items()
    ]
    sums = dict.fromkeys(layers, 0.0)
    counts = dict.fromkeys(layers, 0)
    try:
        for _, batch, _, _ in routed_forwards(model, examples, pad_id, batch_size, bf16):
            mask = batch["attention_mask"]
            for idx, layer in layers.items():
                if layer.routing == "token":
                    real = mask.to(torch.bool)
                    sums[idx] = sums[idx] + normed[idx][real].float().sum(0)
                    counts[idx] += int(real.sum())
                    continue
                pooled = pooled_mean(normed[idx], None if layer.pool_padding else mask)
                sums[idx] = sums[idx] + pooled.float().sum(0)
                counts[idx] += mask.shape[0]
            normed.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return {idx: total / counts[idx] for idx, total in sums.items()}
