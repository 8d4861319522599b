"""Where a decode step's time goes: the unconverted model, MindSkip at a kept fraction and static Attention-Drop of
the same share, each decoding from one shared prefill, step by step as ``generate()`` does (a growing attention
mask, per-sequence positions, a dynamic cache).

Per variant it reports the median wall time of a step, the ops it dispatches (top-level ``aten::``/``mindskip::``
calls), the summed time of its device kernels (a step whose kernels add up to far less than its wall time is bound
by the host: dispatch and launches, not the GPU), and the ops that take the most host and device time, with the
change in op counts against the unconverted model. On a CPU there is no device time.

    python -m bench.decode_profile --device cuda --shape llama3-8b --batch 32 --prompt 2048 --out profile.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

import mindskip_ext as msk
from mindskip_ext.hf_compat import cache_kwargs
from mindskip_ext.timing import synchronize

from .e2e import _converted, _drop_keeps, _keeps, _transplant
from .routing import SHAPES, build_model

TOP = 8  # ops listed per variant and measure


@dataclass
class Profile:
    provider: str
    step_ms: float
    ops: Counter = field(default_factory=Counter)  # top-level op -> calls in one step
    host_us: Counter = field(default_factory=Counter)  # top-level op -> its host time (with its children) in one step
    device_us: Counter = field(default_factory=Counter)  # op -> self device (kernel) time in one step


def _decode(model, cache, token, mask, start, steps):
    """``steps`` greedy decode steps as ``generate()`` takes them; returns the last token."""
    batch = token.shape[0]
    for i in range(steps):
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = torch.full((batch, 1), start + i, device=token.device)
        out = model(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **cache_kwargs(model, cache))
        token = out.logits[:, -1:].argmax(-1)
    return token


def _profile_variant(model, provider, cache, token, seqlen, steps, device) -> Profile:
    mask = torch.ones(token.shape[0], seqlen, dtype=torch.long, device=device)
    with torch.no_grad():
        _decode(model, cache, token, mask, seqlen, 2)  # warm-up
        times = []
        for i in range(steps):
            synchronize(device)
            start = time.perf_counter()
            _decode(model, cache, token, mask, seqlen + 2 + i, 1)
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            _decode(model, cache, token, mask, seqlen + 2 + steps, 1)
            synchronize(device)
    result = Profile(provider, statistics.median(times))
    for event in prof.events():
        if event.cpu_parent is None and event.name.startswith(("aten::", "mindskip::")):
            result.ops[event.name] += 1
            result.host_us[event.name] += event.cpu_time_total
    for avg in prof.key_averages():
        device_us = getattr(avg, "self_device_time_total", 0.0)
        if device_us:
            result.device_us[avg.key] += device_us
    return result


def run(args) -> list[Profile]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.shape, device, dtype, max_len=args.prompt + args.steps + 16)
    layer_ids = msk.MindSkipConfig().resolve_layers(model.config.num_hidden_layers)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt), generator=gen).to(device)
    with torch.no_grad():
        dense = DynamicCache(config=model.config)
        token = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, dense)).logits
        token = token[:, -1:].argmax(-1)
    variants = [("hf", None), (f"mindskip kept {args.kept:g}", _keeps(layer_ids, args.batch, args.kept)),
                ("attn-drop", _drop_keeps(layer_ids, args.batch, args.kept))]
    max_len = args.prompt + args.steps + 16
    profiles = []
    for provider, keeps in variants:
        cache = _transplant(model, dense, "dynamic", keeps, max_len)
        with _converted(model, layer_ids, keeps is not None) as m:
            profiles.append(_profile_variant(m, provider, cache, token, args.prompt, args.steps, device))
        del cache
    return profiles


def _top(counter: Counter, ops: Counter, base: Counter | None) -> str:
    cells = []
    for name, value in counter.most_common(TOP):
        calls = ops.get(name)
        change = f", {calls - base.get(name, 0):+d} vs hf" if base is not None and calls is not None else ""
        cells.append(f"`{name}` {value / 1e3:.2f} ms" + (f" ({calls} calls{change})" if calls is not None else ""))
    return "; ".join(cells) or "-"


def report(args, profiles: list[Profile]) -> str:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"# Decode-step profile on {name}",
        "",
        f"torch {torch.__version__}; shape {args.shape}, batch {args.batch}, prompt {args.prompt}, MindSkip on the "
        f"default layers at kept {args.kept:g}, Attention-Drop of the same share; one step, a dynamic cache, as "
        f"`generate()` takes it (median of {args.steps} timed steps).",
        "",
        "| variant | step ms | ops per step | device kernel ms | ops changed vs hf |",
        "|---|---|---|---|---|",
    ]
    base = profiles[0].ops
    for p in profiles:
        kernels = f"{sum(p.device_us.values()) / 1e3:.2f}" if p.device_us else "-"
        changed = p.ops.copy()
        changed.subtract(base)
        diff = ", ".join(f"`{op}` {n:+d}" for op, n in sorted(changed.items()) if n) or "-"
        lines.append(f"| {p.provider} | {p.step_ms:.2f} | {sum(p.ops.values())} | {kernels} | {diff} |")
    lines.append("")
    for p in profiles:
        lines.append(f"**{p.provider}**: most host time: {_top(p.host_us, p.ops, base)}")
        if p.device_us:
            lines.append(f"most device time: {_top(p.device_us, Counter(), None)}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape (default: llama3-8b on GPU, cpu-small on CPU)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--kept", type=float, default=0.5, help="MindSkip's kept fraction (default 0.5)")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per variant (default 8)")
    parser.add_argument("--out", default=None, help="write the markdown report here too")
    args = parser.parse_args(argv)
    if not 0.0 < args.kept < 1.0:
        parser.error(f"--kept must lie strictly between 0 and 1, got {args.kept}")
    if args.batch < 2 or args.prompt < 1 or args.steps < 1:
        parser.error("--batch must be at least 2 (a mixed routing) and --prompt and --steps at least 1")
    args.shape = args.shape or ("llama3-8b" if args.device.startswith("cuda") else "cpu-small")
    text = report(args, run(args))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
