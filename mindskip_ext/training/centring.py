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


def router_inputs(model, examples: Sequence[Example], pad_id: int, batch_size: int = 16,
                  bf16: bool = False) -> dict[int, torch.Tensor]:
    """Layer index -> ``(len(examples), hidden)`` fp32: each router's pooled input for every example, in the order
    of ``examples``, under the model's current routing: what each router sees, pooled over real tokens as the gate
    pools them (a token-routed router: the mean of its per-token inputs over the example's real tokens)."""
    return _pooled_inputs(model, examples, pad_id, batch_size, bf16)[0]


def router_input_means(model, examples: Sequence[Example], pad_id: int, batch_size: int = 16,
                       bf16: bool = False) -> dict[int, torch.Tensor]:
    """Layer index -> the mean over ``examples`` of the router's pooled input (fp32, ``(hidden,)``), under the
    model's current routing (:func:`router_inputs`); a token-routed router sees each real token, so its mean is over
    the real tokens (each example weighted by its real-token count)."""
    inputs, tokens = _pooled_inputs(model, examples, pad_id, batch_size, bf16)
    weights = tokens / tokens.sum()
    return {idx: (weights @ rows if model.mindskip_layers[idx].routing == "token" else rows.mean(0))
            for idx, rows in inputs.items()}


@torch.no_grad()
def _pooled_inputs(model, examples, pad_id, batch_size, bf16) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """:func:`router_inputs`, and the real-token count of each example ``(len(examples),)`` fp32."""
    layers = model.mindskip_layers
    normed: dict[int, torch.Tensor] = {}
    hooks = [
        layer.router_input_module.register_forward_hook(
            lambda module, args, output, idx=idx: normed.__setitem__(idx, output))
        for idx, layer in layers.items()
    ]
    out = {idx: torch.zeros(len(examples), model.config.hidden_size) for idx in layers}
    tokens = torch.zeros(len(examples))
    try:
        for index, batch, _, _ in routed_forwards(model, examples, pad_id, batch_size, bf16):
            mask = batch["attention_mask"]
            rows = torch.tensor(index)
            tokens[rows] = mask.sum(1).float().cpu()
            for idx, layer in layers.items():
                out[idx][rows] = pooled_mean(normed[idx], None if layer.pool_padding else mask).float().cpu()
            normed.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return out, tokens
