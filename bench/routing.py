"""Benchmark helpers: models of a given shape with random weights, and routers that keep an exact
fraction of the (layer, sequence) pairs on a given batch."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import mindskip_ext as msk

# Shapes are what matters for speed; weights are random (no hub is needed).
SHAPES = {
    # Llama-3-8B: 32 layers, hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocab 128256.
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
    ),
    # A small Llama that runs in seconds on a 2-core CPU.
    "cpu-small": dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4,
    ),
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


def build_model(shape: str, device: torch.device, dtype: torch.dtype, max_len: int, attn: str | None = None):
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_len, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=dtype, attn_implementation=attn or best_attn_implementation(device)
        )
    return model.eval()


def keep_counts(num_layers: int, batch: int, fraction: float) -> list[int]:
    """Sequences to keep per layer so that the kept share of all (layer, sequence) pairs is ``fraction``,
    spread evenly over the layers (at batch 1, every other layer keeps its one sequence)."""
    total = [math.floor(fraction * batch * i + 0.5) for i in range(num_layers + 1)]
    return [total[i + 1] - total[i] for i in range(num_layers)]


def keep_exactly(layer, normed: torch.Tensor, count: int) -> None:
    """Set ``layer``'s router bias so that it keeps exactly ``count`` sequences of ``normed`` (B, T, D):
    the bias sits halfway between the count-th and the next router logit (inputs without padding)."""
    logits = normed.float().mean(dim=1) @ layer.router.weight.float().reshape(-1)
    ordered = logits.sort(descending=True).values
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
            keep_exactly(layer, getattr(layer.base_layer, layer.spec.input_norm)(x), count)

        return hook

    with torch.no_grad():
        for layer in layers.values():
            hidden = layer.router.weight.shape[1]
            w = torch.randn(1, hidden, generator=gen) / math.sqrt(hidden)
            layer.router.weight.copy_(w.to(layer.router.weight))
        counts = keep_counts(len(layers), batch, fraction)
        handles = [
            layer.register_forward_pre_hook(set_bias(count), with_kwargs=True)
            for count, layer in zip(counts, layers.values())
        ]
        try:
            run()
        finally:
            for h in handles:
                h.remove()
        run()  # a routed run without hooks, so last_capacity reports what the timed runs will do
    return model.last_capacity


def force_static_drop(model: msk.MindSkipModel, num_dropped: int) -> list[int]:
    """Static Attention-Drop through the same layers: the last ``num_dropped`` MindSkip layers skip every
    sequence, the others keep every sequence (zero weight, bias of +-20)."""
    layers = sorted(model.mindskip_layers)
    dropped = layers[len(layers) - num_dropped :] if num_dropped else []
    with torch.no_grad():
        for idx, router in model.routers.items():
            router.weight.zero_()
            router.bias.fill_(-20.0 if idx in dropped else 20.0)
    return dropped
