"""Benchmark helpers: models of a given shape with random weights, and routers that keep an exact
fraction of the (layer, sequence) pairs on a given batch."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig

import mindskip_ext as msk
from mindskip_ext.layer import STATE_KWARG
from mindskip_ext.reference import router_gate
from mindskip_ext.testing import random_model

# Shapes are what matters for speed; weights are random (no hub is needed).
SHAPES = {
    # Llama-3-8B: 32 layers, hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocab 128256.
    "llama3-8b": {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
    },
    # A small Llama that runs in seconds on a 2-core CPU.
    "cpu-small": {
        "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
        "num_attention_heads": 8, "num_key_value_heads": 4,
    },
    # Llama-3-8B's depth at tiny widths: on a CPU its eager decode step is almost all host time (Python and dispatch),
    # as the 8B model's is on a GPU, so the wrapper's host overhead per step can be measured without one.
    "cpu-host": {
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 32,
        "num_attention_heads": 4, "num_key_value_heads": 2,
    },
}


def best_attn_implementation(device: torch.device) -> str:
    """The unconverted model's best attention implementation on this device."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_model(shape: str, device: torch.device, dtype: torch.dtype, max_len: int, attn: str | None = None,
                num_layers: int | None = None):
    """A Llama of ``shape`` with random weights (seed 0), built directly on ``device`` in ``dtype`` (eval mode);
    ``num_layers`` overrides the shape's layer count."""
    dims = dict(SHAPES[shape], **({"num_hidden_layers": num_layers} if num_layers else {}))
    config = LlamaConfig(**dims, max_position_embeddings=max_len, pad_token_id=0, eos_token_id=None)
    return random_model(config, attn=attn or best_attn_implementation(device), dtype=dtype, device=device)


def keep_counts(num_layers: int, batch: int, fraction: float) -> list[int]:
    """Sequences to keep per layer so that the kept share of all (layer, sequence) pairs is ``fraction``,
    spread evenly over the layers (at batch 1, every other layer keeps its one sequence)."""
    total = [math.floor(fraction * batch * i + 0.5) for i in range(num_layers + 1)]
    return [total[i + 1] - total[i] for i in range(num_layers)]


def keep_exactly(layer, normed: torch.Tensor, count: int, mask: torch.Tensor | None = None) -> None:
    """Set ``layer``'s router bias so that it keeps exactly ``count`` sequences of ``normed`` (B, T, D) with padding
    mask ``mask`` (None: every token real): the bias sits halfway between the count-th and the next router logit.

    The logits are the router's own (:func:`mindskip_ext.reference.router_gate`: masked mean, fp32), without the bias.
    """
    score = router_gate(normed, mask, layer.router.weight, None, 0.5)[0]
    ordered = torch.logit(score.double(), eps=1e-7).sort(descending=True).values
    if count <= 0:
        bias = -(ordered[0].item() + 1.0)
    elif count >= len(ordered):
        bias = -(ordered[-1].item() - 1.0)
    else:
        bias = -(ordered[count - 1].item() + ordered[count].item()) / 2
    layer.router.bias.fill_(bias)


def calibrate_routers(model: msk.MindSkipModel, fraction: float, batch: int, run, seed: int = 0) -> dict[int, float]:
    """Give every router random weights and a bias that keeps an exact number of the ``batch`` sequences
    that ``run()`` feeds the model (one calibration forward). Returns the capacity of a routed run.

    Decisions are deterministic, so later runs on the same batch keep exactly the same sequences.
    """
    layers = model.mindskip_layers
    gen = torch.Generator().manual_seed(seed)

    def set_bias(count):
        def hook(layer, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            state = kwargs.get(STATE_KWARG)
            # The mask the layer itself routes on: none when it pools over padding too.
            mask = state.padding_mask if state is not None and not layer.pool_padding else None
            keep_exactly(layer, layer.router_input(x), count, mask)

        return hook

    with torch.no_grad():
        for layer in layers.values():
            hidden = layer.router.weight.shape[1]
            w = torch.randn(1, hidden, generator=gen) / math.sqrt(hidden)
            layer.router.weight.copy_(w.to(layer.router.weight))
        counts = keep_counts(len(layers), batch, fraction)
        handles = [
            layer.register_forward_pre_hook(set_bias(count), with_kwargs=True)
            for count, layer in zip(counts, layers.values(), strict=True)
        ]
        try:
            run()
        finally:
            for h in handles:
                h.remove()
        run()  # a routed run without hooks, so last_capacity reports what the timed runs will do
    return model.last_capacity

