"""Where a decode step's time goes: the unconverted model, MindSkip at a kept fraction and static Attention-Drop of
the same share, each decoding from one shared prefill.

Per variant it reports the median wall time of a step, the ops it dispatches (top-level ``aten::``/``mindskip::``
calls), the summed time of its device kernels (a step whose kernels add up to far less than its wall time is bound
by the host: dispatch and launches, not the GPU), and the ops that take the most host and device time, with the
change in op counts against the unconverted model, and the Python calls of a step (the host work around the ops; a
count, so it compares across runs and machines where wall time on a busy host does not). On a CPU there is no device
time; there, ``--shape cpu-host`` (Llama-3-8B's depth at tiny widths) has a step that is host time, as the 8B
model's eager step is on a GPU.

Two ways to decode: ``--cache dynamic`` (the default) steps as ``generate()`` does by default, eagerly, with a
growing attention mask, per-sequence positions and a dynamic cache; ``--cache static --compile`` runs the step
``generate(..., cache_implementation="static")`` compiles on a GPU (transformers' compile config: CUDA graphs), on a
static cache (every token is real, so no mask is passed, as in the long-context e2e points).

    python -m bench.decode_profile --device cuda --shape llama3-8b --batch 32 --prompt 2048 --out profile.md
    python -m bench.decode_profile --device cuda --cache static --compile --layers 16 --out static.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

import mindskip_ext as msk
from mindskip_ext.cache import decode_compile_config
from mindskip_ext.hf_compat import cache_kwargs
from mindskip_ext.timing import synchronize, time_ms

from .e2e import _converted, _drop_keeps, _keeps, _transplant
from .routing import SHAPES, build_model

TOP = 8  # ops listed per variant and measure
WARMUP_STEPS = 3  # untimed steps per variant: compilation and CUDA-graph capture happen in these


@dataclass
class Profile:
    provider: str
    step_ms: float
    kept: float | None = None  # MindSkip's kept fraction, or the share Attention-Drop keeps; None for hf
    drop: bool = False  # Attention-Drop
    ops: Counter = field(default_factory=Counter)  # top-level op -> calls in one step
    host_us: Counter = field(default_factory=Counter)  # top-level op -> its host time (with its children) in one step
    device_us: Counter = field(default_factory=Counter)  # op -> self device (kernel) time in one step
    graph_breaks: int | None = None  # compiled: the graph breaks dynamo reported for this variant
    python_calls: int = 0  # Python function calls and calls into C from Python in one step


def _stepper(model, cache, token, seqlen, static: bool, call):
    """A function running the next greedy decode step of ``token`` on ``cache``, which holds ``seqlen`` tokens at
    first. ``call``: the model or its compiled step. Dynamic: as eager ``generate()`` steps, with the attention mask
    of every token so far and each sequence's position; static: input ids only."""
    kwargs = cache_kwargs(model, cache)
    if static:
        return lambda: call(input_ids=token, use_cache=True, logits_to_keep=1, **kwargs)
    batch, seen = token.shape[0], [seqlen]

    def step():
        mask = torch.ones(batch, seen[0] + 1, dtype=torch.long, device=token.device)
        positions = torch.full((batch, 1), seen[0], device=token.device)
        call(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs)
        seen[0] += 1

    return step


def _is_op(event) -> bool:
    return event.name.startswith(("aten::", "mindskip::"))


def _has_op_ancestor(event) -> bool:
    """Whether an op dispatched ``event`` (an op called by an op is not counted again); a compiled region or a
    CUDA-graph replay around it is no op."""
    parent = event.cpu_parent
    while parent is not None:
        if _is_op(parent):
            return True
        parent = parent.cpu_parent
    return False


def _python_calls(step) -> int:
    """The Python function calls, and the calls into C from Python, of one ``step()``: the host work around its
    ops, counted the same on any machine where its wall time on a busy host is not."""
    count = 0

    def tally(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(tally)
    try:
        step()
    finally:
        sys.setprofile(None)
    return count


def _profile_variant(model, provider, cache, token, args, device, call) -> Profile:
    step = _stepper(model, cache, token, args.prompt, args.cache == "static", call)
    with torch.no_grad():
        # Compilation and CUDA-graph capture happen in the warm-up steps.
        times = time_ms(step, device, reps=args.steps, warmup=WARMUP_STEPS)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            synchronize(device)
        calls = _python_calls(step)
    result = Profile(provider, statistics.median(times), python_calls=calls)
    for event in prof.events():
        if _is_op(event) and not _has_op_ancestor(event):
            result.ops[event.name] += 1
            result.host_us[event.name] += event.cpu_time_total
    for avg in prof.key_averages():
        device_us = getattr(avg, "self_device_time_total", 0.0)
        if device_us:
            result.device_us[avg.key] += device_us
    return result


def _compile_config(args):
    """What generate() compiles a static cache's decode step with (CUDA graphs on a GPU), on any device."""
    return decode_compile_config(**({"backend": args.compile_backend} if args.compile_backend else {}))


def run(args) -> list[Profile]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    max_len = args.prompt + WARMUP_STEPS + args.steps + 8
    model = build_model(args.shape, device, dtype, max_len=max_len, num_layers=args.layers)
    layer_ids = msk.MindSkipConfig().resolve_layers(model.config.num_hidden_layers)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt), generator=gen).to(device)
    with torch.no_grad():
        dense = DynamicCache(config=model.config)
        token = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, dense)).logits
        token = token[:, -1:].argmax(-1)
    variants = [("hf", None, None)] + [(f"mindskip kept {k:g}", k, _keeps(layer_ids, args.batch, k))
                                       for k in args.kept]
    drops = [k for k in args.kept if k < 1.0]  # at 1.0 it would drop nothing: the unconverted model again
    variants += [("attn-drop" if len(drops) == 1 else f"attn-drop {k:g}", k, _drop_keeps(layer_ids, args.batch, k))
                 for k in drops]
    compile_config = _compile_config(args) if args.compile else None
    profiles = []
    for provider, kept, keeps in variants:
        cache = _transplant(model, dense, args.cache, keeps, max_len)
        counters.clear()
        with _converted(model, layer_ids, keeps is not None) as m:
            call = torch.compile(m, **compile_config.to_dict()) if compile_config is not None else m
            profiles.append(_profile_variant(m, provider, cache, token, args, device, call))
        profiles[-1].kept, profiles[-1].drop = kept, provider.startswith("attn-drop")
        if compile_config is not None:
            profiles[-1].graph_breaks = sum(counters["graph_break"].values())
        del cache
        torch._dynamo.reset()  # each variant compiles afresh
    return profiles


def _top(counter: Counter, ops: Counter, base: Counter | None) -> str:
    cells = []
    for name, value in counter.most_common(TOP):
        calls = ops.get(name)
        change = f", {calls - base.get(name, 0):+d} vs hf" if base is not None and calls is not None else ""
        cells.append(f"`{name}` {value / 1e3:.2f} ms" + (f" ({calls} calls{change})" if calls is not None else ""))
    return "; ".join(cells) or "-"


def against_static_drop(profiles: list[Profile]) -> dict[str, dict[str, float]]:
    """Per MindSkip variant with an Attention-Drop of its kept share: ``frac_of_static_drop`` (the drop's step time
    over MindSkip's: MindSkip's speed as a share of the drop's) and MindSkip's ops and Python calls per step as a
    ratio to the drop's."""
    drops = {p.kept: p for p in profiles if p.drop}
    out = {}
    for p in profiles:
        drop = drops.get(p.kept) if not p.drop and p.kept is not None else None
        if drop is not None:
            out[p.provider] = {"frac_of_static_drop": drop.step_ms / p.step_ms,
                               "ops_ratio": sum(p.ops.values()) / sum(drop.ops.values()),
                               "python_calls_ratio": p.python_calls / drop.python_calls}
    return out


def _against_static_drop(profiles: list[Profile]) -> list[str]:
    lines = []
    for provider, r in against_static_drop(profiles).items():
        lines.append(f"**{provider} against Attention-Drop of the same share**: frac_of_static_drop "
                     f"{r['frac_of_static_drop']:.3f} (step time); ops per step {r['ops_ratio']:.3f}x, Python calls "
                     f"per step {r['python_calls_ratio']:.3f}x the drop's.")
    return lines + ([""] if lines else [])


def report(args, profiles: list[Profile]) -> str:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    layers = f" with {args.layers} layers" if args.layers else ""
    if args.cache == "static":
        how = "one eager step on a static cache"
        if args.compile:
            config = _compile_config(args).to_dict()
            how = (f"one step on a static cache, compiled as `generate()` compiles it (mode {config.get('mode')}, "
                   f"backend {config.get('backend')})")
    else:
        how = "one eager step on a dynamic cache, as `generate()` takes it"
    lines = [
        f"# Decode-step profile on {name}",
        "",
        f"torch {torch.__version__}; shape {args.shape}{layers}, batch {args.batch}, prompt {args.prompt}, MindSkip "
        f"on the default layers at kept {' and '.join(f'{k:g}' for k in args.kept)}, Attention-Drop of the same "
        f"share; {how} (median of "
        f"{args.steps} timed steps after {WARMUP_STEPS} untimed).",
        "",
        "| variant | step ms | ops per step | device kernel ms | graph breaks | ops changed vs hf | Python calls |",
        "|---|---|---|---|---|---|---|",
    ]
    base = profiles[0].ops
    for p in profiles:
        kernels = f"{sum(p.device_us.values()) / 1e3:.2f}" if p.device_us else "-"
        changed = p.ops.copy()
        changed.subtract(base)
        diff = ", ".join(f"`{op}` {n:+d}" for op, n in sorted(changed.items()) if n) or "-"
        breaks = "-" if p.graph_breaks is None else p.graph_breaks
        lines.append(f"| {p.provider} | {p.step_ms:.2f} | {sum(p.ops.values())} | {kernels} | {breaks} | {diff} "
                     f"| {p.python_calls} |")
    lines.append("")
    lines += _against_static_drop(profiles)
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
    parser.add_argument("--kept", default="0.5",
                        help="MindSkip's kept fractions, comma-separated (default 0.5; 1.0 measures the wrapper's "
                        "overhead), one variant each from the same prefill")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per variant (default 8)")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step as generate() does for a static cache (needs --cache static)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor)")
    parser.add_argument("--out", default=None, help="write the markdown report here too")
    args = parser.parse_args(argv)
    if args.compile and args.cache != "static":
        parser.error("--compile needs --cache static: a compiled step needs the fixed shapes of a static cache")
    if args.layers is not None and args.layers < 2:
        parser.error(f"--layers must be at least 2 (MindSkip routes the last half but the last), got {args.layers}")
    try:
        args.kept = sorted({float(k) for k in args.kept.split(",") if k.strip()})
    except ValueError:
        parser.error(f"--kept takes comma-separated fractions, got {args.kept!r}")
    if not args.kept or not all(0.0 < k <= 1.0 for k in args.kept):
        parser.error(f"--kept must lie in (0, 1], got {args.kept}")
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
