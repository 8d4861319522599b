"""Section `layer`: one decoder layer at kept fractions 0 .. 1 against the unconverted layer.

Prefill shapes (B x T, no cache) and decode shapes (B x 1 with a KV cache of length T). The
MindSkip layer's router keeps exactly round(f * B) sequences; the unconverted layer is the same
module (``base_layer``) called directly.
"""

from __future__ import annotations

import statistics

import torch
from transformers import DynamicCache

import mindskip_ext as msk
from mindskip_ext.hf_compat import cache_kwargs
from mindskip_ext.layer import STATE_KWARG, ForwardState, RoutingRecord
from mindskip_ext.timing import time_ms

from .routing import build_model, keep_exactly

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def add_arguments(parser):
    group = parser.add_argument_group("layer section")
    group.add_argument("--layer-shape", default=None, help="model shape (default: llama3-8b on GPU, cpu-small on CPU)")
    group.add_argument("--layer-batch", type=int, default=None, help="batch size (default: 16 on CPU, 32 on GPU)")
    group.add_argument("--layer-len", type=int, default=None,
                       help="prompt / KV length T (default: 512 on CPU, 2048 on GPU)")


def run(args, writer):
    device = writer.device
    on_gpu = device.type == "cuda"
    shape = args.layer_shape or ("llama3-8b" if on_gpu else "cpu-small")
    batch = args.layer_batch or (32 if on_gpu else (4 if args.quick else 16))
    seqlen = args.layer_len or (2048 if on_gpu else (128 if args.quick else 512))
    dtype = torch.bfloat16 if on_gpu else torch.float32
    reps = 5 if args.quick else 20
    model = build_model(shape, device, dtype, max_len=seqlen + 8)
    cfg = model.config
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(layers=[cfg.num_hidden_layers // 2]))
    layer = next(iter(wrapped.mindskip_layers.values()))
    base = layer.base_layer
    rotary = model.model.rotary_emb
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, seqlen, cfg.hidden_size, generator=gen).to(device, dtype)
    x1 = torch.randn(batch, 1, cfg.hidden_size, generator=gen).to(device, dtype)
    pos = torch.arange(seqlen, device=device)[None]
    pos1 = torch.full((1, 1), seqlen, device=device)
    pe, pe1 = rotary(x, pos), rotary(x1, pos1)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen).to(layer.router.weight))
        normed = base.input_layernorm(x)

    def call(module, hidden, pe_, pos_, cache, mindskip):
        kwargs = dict(attention_mask=None, position_ids=pos_, use_cache=cache is not None, position_embeddings=pe_,
                      **cache_kwargs(module, cache))
        if mindskip:
            kwargs[STATE_KWARG] = ForwardState(None, hidden.shape[1], RoutingRecord())
        return module(hidden, **kwargs)

    def prefill_times(module, mindskip):
        return time_ms(lambda: call(module, x, pe, pos, None, mindskip), device, reps=reps)

    def decode_times(module, mindskip):
        """One decode step against a KV cache of length T (the step's own entry is cropped after it)."""
        cache = DynamicCache()
        call(module, x, pe, pos, cache, mindskip)

        def step():
            call(module, x1, pe1, pos1, cache, mindskip)
            cache.layers[layer.layer_idx].crop(-1)  # only this layer's slot holds anything

        return time_ms(step, device, reps=reps * 5)

    params = {"shape": shape, "B": batch, "T": seqlen, "dtype": str(dtype).replace("torch.", "")}
    with torch.no_grad():
        dense = {"prefill": prefill_times(base, False), "decode": decode_times(base, False)}
        for name, times in dense.items():
            writer.add("layer", name, "hf", params, times)
        for fraction in FRACTIONS:
            count = round(fraction * batch)
            keep_exactly(layer, normed, count)
            p = dict(params, kept=round(count / batch, 4))
            for name, measure in (("prefill", prefill_times), ("decode", decode_times)):
                times = measure(layer, True)
                speedup = statistics.median(dense[name]) / statistics.median(times)
                writer.add("layer", name, "mindskip", p, times, speedup_vs_hf=speedup)
    del wrapped, model
