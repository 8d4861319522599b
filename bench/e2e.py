"""Section `e2e`: a whole model, prefill and decode, against the unconverted model and the ideal.

For every (batch B, prompt length T) point of the grid:

* ``hf``: the unconverted model with its best attention implementation;
* ``mindskip``: MindSkip on the paper's layers (last half except the last), routers set to keep
  exactly a fraction ``f`` of the (layer, sequence) pairs of this batch, for each ``f`` of the sweep;
* ``attn-drop``: static Attention-Drop of the same share of attention sublayers: the MindSkip layers whose
  attention changes this batch's hidden states least (:mod:`mindskip_ext.eval.attention_drop`).

Metrics, separately: prefill time (one forward writing the KV cache); for ``generate()`` with a fixed
number of new tokens, its decode time and tokens/s (the time after the prefill's logits, taken inside
the same call) and its time to last token; KV-cache bytes and (CUDA) peak allocated memory.

All variants of a point are timed round-robin (round ``r`` starts at variant ``r``), converting and unloading
the one model in place for each sample, so that a drift of a shared machine lands on all of them alike.
``speedup_vs_hf`` is the median over rounds of the dense time over the variant's time in the same round, with
its p20 and p80 over rounds (``speedup_p20``, ``speedup_p80``) to show how far the machine's noise reaches.

The ideal speedup is estimated from the dense model itself: instrumented runs (hooks on the attention
sublayers of the MindSkip layers) give the share ``a`` of prefill and of decode time spent there, and the
ideal time is the dense time times ``1 - (1 - f) * a``: what MindSkip would take if skipped work cost
exactly nothing and the rest ran as fast as in the dense model (time to last token: the prefill and decode
ideals weighted by the dense model's split). ``frac_of_ideal`` = measured speedup / ideal speedup.

Long-context decode (``--e2e-long``, rows named ``decode-long``): decode steps only, after one dense prefill per point
(a long prefill costs minutes on a CPU). Each variant's cache is built from that prefill's KV: a ``DynamicCache`` or
the fixed-shape ``StaticCache`` (``cache`` parameter), the MindSkip layers' slots holding only the rows their decisions
keep (``keep_counts`` rows per layer, as the calibrated routers keep; which rows does not change the time). The
variants: dense, MindSkip at each kept fraction, and the static Attention-Drop of the same share (whole MindSkip layers
skipped), each with both caches. Every timed sample is ``--new-tokens`` greedy decode steps, after which ``crop`` puts
the cache back. The ideal comes from the attention share of the dense model's decode with the same cache kind, and
``speedup_vs_hf`` is against the dense model with the same cache kind (``speedup_vs_hf_dynamic``: against the dense
dynamic cache, the stock default).
"""

from __future__ import annotations

import copy
import gc
import itertools
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import mindskip_ext as msk
from mindskip_ext.cache import decode_compile_config, kv_bytes
from mindskip_ext.data import Example
from mindskip_ext.eval.attention_drop import redundancy_scores, select_dropped, set_static_routing
from mindskip_ext.hf_compat import cache_kwargs, output_cache
from mindskip_ext.timing import AttentionTimer, synchronize, time_ms
from mindskip_ext.timing import converted as _converted
from mindskip_ext.timing import decode_steps as _decode_steps
from mindskip_ext.timing import transplant_cache as _transplant

from .common import quantile
from .routing import build_model, calibrate_routers, keep_counts

GPU_GRID = {"batches": (1, 8, 32, 64), "lengths": (512, 2048, 8192), "fractions": (1.0, 0.75, 0.5, 0.25)}
CPU_GRID = {"batches": (1, 4, 8), "lengths": (128, 512), "fractions": (1.0, 0.75, 0.5, 0.25)}
QUICK_GRID = {"batches": (4,), "lengths": (256,), "fractions": (1.0, 0.5)}
# Long-context decode points (--e2e-long): prompt lengths x these batches, at these kept fractions.
LONG_BATCHES = (4, 8)
LONG_FRACTIONS = (1.0, 0.5)
QUICK_LONG = {"batches": (2,), "lengths": (256,)}
# Sequences per Attention-Drop scoring forward: the scores are means over tokens, so this only bounds the fp32
# copies of the hidden states the scoring makes.
DROP_SCORE_BATCH = 8


def add_arguments(parser):
    group = parser.add_argument_group("e2e section")
    group.add_argument("--e2e-shape", default=None, help="model shape (default: llama3-8b on GPU, cpu-small on CPU)")
    group.add_argument("--e2e-batches", default=None, help="comma-separated batch sizes")
    group.add_argument("--e2e-lengths", default=None, help="comma-separated prompt lengths")
    group.add_argument("--e2e-fractions", default=None, help="comma-separated kept fractions")
    group.add_argument("--new-tokens", type=int, default=None,
                       help="tokens generated per sequence (default 32; 8 with --quick)")
    group.add_argument("--e2e-reps", type=int, default=None,
                       help="timed rounds over all variants of a point (default 10 on CPU, 5 on GPU; 12 with --quick)")
    group.add_argument("--e2e-long", default=None,
                       help="comma-separated prompt lengths of long-context decode points (default: none; 256 with "
                            "--quick); batches from --e2e-batches (default 4,8), kept fractions 1.0,0.5")
    group.add_argument("--e2e-long-reps", type=int, default=None,
                       help="timed rounds over all variants of a long-context point (default: --e2e-reps, at most 3; "
                            "a round is --new-tokens decode steps of each variant)")
    group.add_argument("--e2e-grid", default="on", choices=("on", "off"),
                       help="off: only the long-context decode points")
    group.add_argument("--e2e-compile", default="off", choices=("on", "off"),
                       help="on: the long-context decode points also time each static-cache variant with its decode "
                            "step compiled as generate() compiles it (rows with compiled=true; inductor takes "
                            "minutes per variant on a CPU)")
    group.add_argument("--e2e-compile-backend", default=None,
                       help="torch.compile backend of --e2e-compile (default: the decode compile config's, inductor)")
    group.add_argument("--mem-fraction", type=float, default=0.85,
                       help="skip GPU points whose estimated memory exceeds this share")


def _ints(text, default):
    return tuple(int(v) for v in text.split(",")) if text else default


def _floats(text, default):
    return tuple(float(v) for v in text.split(",")) if text else default


def _median(values):
    return statistics.median(values)


def _estimate_bytes(cfg, batch, seqlen, new_tokens, dtype_bytes, caches=1):
    """Rough peak beyond the weights: ``caches`` dense KV caches plus the largest prefill activations."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * batch * (seqlen + new_tokens) * dtype_bytes
    acts = batch * seqlen * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * dtype_bytes
    return caches * kv + acts


def _does_not_fit(model, device, batch, seqlen, new_tokens, mem_fraction, caches=1) -> str | None:
    """Why a GPU point would exceed ``mem_fraction`` (``--mem-fraction``) of the device's memory with ``caches``
    dense KV caches held at once, or None when it fits (or ``device`` is no GPU)."""
    if device.type != "cuda":
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    need = weight_bytes + _estimate_bytes(model.config, batch, seqlen, new_tokens, 2, caches)
    total = torch.cuda.get_device_properties(device).total_memory
    return f"needs ~{need / 2**30:.0f} GiB of {total / 2**30:.0f} GiB" if need > mem_fraction * total else None


def run(args, writer):
    device = writer.device
    on_gpu = device.type == "cuda"
    grid = QUICK_GRID if args.quick else (GPU_GRID if on_gpu else CPU_GRID)
    batches = _ints(args.e2e_batches, grid["batches"])
    lengths = _ints(args.e2e_lengths, grid["lengths"])
    fractions = _floats(args.e2e_fractions, grid["fractions"])
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    shape = args.e2e_shape or ("llama3-8b" if on_gpu else "cpu-small")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    reps = args.e2e_reps or (12 if args.quick else 5 if on_gpu else 10)
    long_lengths = _ints(args.e2e_long, QUICK_LONG["lengths"] if args.quick else ())
    if args.e2e_grid == "off":
        lengths = ()
    model = build_model(shape, device, dtype, max_len=max(lengths + long_lengths) + new_tokens + 8)
    cfg = model.config
    layer_ids = msk.MindSkipConfig().resolve_layers(cfg.num_hidden_layers)
    gen = torch.Generator().manual_seed(0)
    skipped = []

    for seqlen in lengths:
        for batch in batches:
            params = {"shape": shape, "B": batch, "T": seqlen, "new_tokens": new_tokens}
            if reason := _does_not_fit(model, device, batch, seqlen, new_tokens, args.mem_fraction):
                skipped.append((batch, seqlen, reason))
                print(f"skip B={batch} T={seqlen}: {reason}")
                continue
            ids = torch.randint(1, cfg.vocab_size, (batch, seqlen), generator=gen).to(device)
            _run_point(model, ids, params, layer_ids, fractions, new_tokens, reps, writer)
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    long_batches = QUICK_LONG["batches"] if args.quick else _ints(args.e2e_batches, LONG_BATCHES)
    for seqlen in long_lengths:
        for batch in long_batches:
            ids = torch.randint(1, cfg.vocab_size, (batch, seqlen), generator=gen).to(device)
            params = {"shape": shape, "B": batch, "T": seqlen, "new_tokens": new_tokens}
            _run_long_point(model, ids, params, layer_ids, _floats(args.e2e_fractions, LONG_FRACTIONS), new_tokens,
                            args.e2e_long_reps or min(reps, 3), writer, compiled=args.e2e_compile == "on",
                            compile_backend=args.e2e_compile_backend)
            gc.collect()
    for batch, seqlen, reason in skipped:
        print(f"skipped point B={batch} T={seqlen}: {reason}")
    del model


def _prefill(model, ids):
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, DynamicCache()))


class _FirstStepClock(LogitsProcessor):
    """Notes the time at which ``generate()`` first scores logits: the end of its prefill."""

    def __init__(self, device):
        self.device = device
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            synchronize(self.device)
            self.at = time.perf_counter()
        return scores


def _generate(model, ids, new_tokens, device):
    """One greedy ``generate()`` of exactly ``new_tokens``: (output, total ms, decode ms). Decode is the time after
    the prefill's logits, i.e. the ``new_tokens - 1`` decode steps inside this same call."""
    clock = _FirstStepClock(device)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        return_dict_in_generate=True, logits_processor=LogitsProcessorList([clock]),
    )
    synchronize(device)
    end = time.perf_counter()
    return out, (end - start) * 1e3, (end - clock.at) * 1e3


def _attention_shares(model, ids, new_tokens, layer_ids, device, reps):
    """Share of prefill and of ``generate()`` decode time spent in the attention sublayers of the MindSkip layers,
    from instrumented runs (medians over ``reps``): a ratio, so it carries over to the uninstrumented timings."""
    shares = {"prefill": [], "decode": []}
    timer = AttentionTimer(model, layer_ids, device)
    try:
        with torch.no_grad():
            for _ in range(reps + 1):  # the first is a warm-up
                (prefill_ms,) = time_ms(lambda: _prefill(model, ids), device, reps=1, warmup=0)
                shares["prefill"].append(timer.collect()["prefill"] / prefill_ms)
                _, _, decode_ms = _generate(model, ids, new_tokens, device)
                shares["decode"].append(timer.collect()["decode"] / decode_ms)
    finally:
        timer.remove()
    return {phase: _median(values[1:]) for phase, values in shares.items()}


@dataclass
class Variant:
    """One model variant of a point: the unconverted model (``routers`` None) or MindSkip with fixed routers."""

    provider: str
    kept: float | None
    routers: dict[str, torch.Tensor] | None
    fraction: float | None = None  # the kept fraction asked for (MindSkip and Attention-Drop of one share pair on it)
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    generate: list[float] = field(default_factory=list)
    kv_bytes: int = 0
    peak_bytes: int | None = None


def _variants(model, ids, layer_ids, fractions) -> list[Variant]:
    """The unconverted model, then per kept fraction MindSkip with calibrated routers and (below 1.0) the static
    Attention-Drop of the same share. Router states are snapshots, so a variant can be re-applied at any time."""
    scores = _redundancy_scores(model, ids)
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(layers=layer_ids))
    variants = [Variant("hf", None, None)]

    def snapshot():
        return {name: t.detach().clone() for name, t in wrapped.router_state_dict().items()}

    try:
        for fraction in fractions:
            with torch.no_grad():
                capacity = calibrate_routers(
                    wrapped, fraction, ids.shape[0],
                    lambda: _prefill(wrapped, ids),
                )
            variants.append(Variant("mindskip", sum(capacity.values()) / len(capacity), snapshot(), fraction))
            if fraction < 1.0:
                n = round((1 - fraction) * len(layer_ids))
                dropped = select_dropped(scores, n, candidates=layer_ids) if n else []
                set_static_routing(wrapped, dropped)
                variants.append(Variant("attn-drop", 1 - len(dropped) / len(layer_ids), snapshot(), fraction))
    finally:
        wrapped.unload()
    return variants


def _redundancy_scores(model, ids) -> dict[int, float]:
    """Attention-Drop's score per layer of the unconverted ``model`` on this batch (every token real): the batch
    is its own calibration data, as the MindSkip routers are calibrated on it too."""
    examples = [Example(row, row) for row in ids.tolist()]
    return redundancy_scores(model, examples, model.config.pad_token_id, "attn", batch_size=DROP_SCORE_BATCH)


def _sample(model, ids, new_tokens, device, variant: Variant):
    """One timed prefill and one timed ``generate()`` of ``model``, appended to ``variant``'s samples."""
    with torch.no_grad():
        (prefill,) = time_ms(lambda: _prefill(model, ids), device, reps=1, warmup=0)
        _, total, decode = _generate(model, ids, new_tokens, device)
    variant.prefill.append(prefill)
    variant.generate.append(total)
    variant.decode.append(decode)


def _measure_interleaved(model, ids, new_tokens, reps, layer_ids, variants: list[Variant]) -> None:
    """Time every variant ``reps`` times, round-robin: round ``r`` visits the variants in an order rotated by ``r``,
    so a drift of the machine (other tenants, clocks) lands on all of them alike and each variant's ``i``-th
    sample can be paired with the dense model's ``i``-th. A first untimed round warms up each variant and takes
    its KV bytes and (CUDA) peak memory."""
    device = ids.device
    for variant in variants:
        with _converted(model, layer_ids, variant.routers is not None, variant.routers) as m, torch.no_grad():
            _prefill(m, ids)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out, _, _ = _generate(m, ids, new_tokens, device)
            variant.peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            variant.kv_bytes = sum(kv_bytes(output_cache(out)).values())
            del out
    for r in range(reps):
        for i in range(len(variants)):
            variant = variants[(i + r) % len(variants)]
            with _converted(model, layer_ids, variant.routers is not None, variant.routers) as m:
                _sample(m, ids, new_tokens, device, variant)


def _paired_speedup(dense: list[float], samples: list[float]) -> tuple[float, float, float]:
    """Dense time / variant time per round (both taken in the same round): median, p20 and p80 over rounds."""
    ratios = [d / s for d, s in zip(dense, samples, strict=True)]
    return _median(ratios), quantile(ratios, 0.2), quantile(ratios, 0.8)


def _frac_of_static_drop(variants, v, phase: str) -> dict:
    """``frac_of_static_drop`` of a MindSkip variant ``v``: the median over rounds of the time of the Attention-Drop
    of its kept share among ``variants`` (timed the same way) over ``v``'s in the same round, i.e. its speed as a
    share of the static drop's, with the p20 and p80; empty for any other variant."""
    drop = next((w for w in variants if w.provider == "attn-drop" and w.fraction == v.fraction), None)
    if v.provider != "mindskip" or drop is None:
        return {}
    ratio, low, high = _paired_speedup(getattr(drop, phase), getattr(v, phase))
    return {"frac_of_static_drop": ratio, "frac_of_static_drop_p20": low, "frac_of_static_drop_p80": high}


def _run_point(model, ids, params, layer_ids, fractions, new_tokens, reps, writer):
    device = writer.device
    batch = ids.shape[0]
    decode_tokens = batch * (new_tokens - 1)

    share = _attention_shares(model, ids, new_tokens, layer_ids, device, min(reps, 5))
    variants = _variants(model, ids, layer_ids, fractions)
    _measure_interleaved(model, ids, new_tokens, reps, layer_ids, variants)
    dense, runs = variants[0], variants[1:]

    pre_ms, dec_ms = _median(dense.prefill), _median(dense.decode)
    writer.add("e2e", "prefill", "hf", params, dense.prefill, attn_share=share["prefill"], kv_bytes=dense.kv_bytes,
               peak_bytes=dense.peak_bytes)
    writer.add("e2e", "decode", "hf", params, dense.decode, tokens_per_s=decode_tokens / (dec_ms / 1e3),
               attn_share=share["decode"])
    writer.add("e2e", "ttlt", "hf", params, dense.generate)

    for v in runs:
        pre_factor = 1 - (1 - v.kept) * share["prefill"]  # ideal time / dense time
        dec_factor = 1 - (1 - v.kept) * share["decode"]
        ttlt_factor = (pre_ms * pre_factor + dec_ms * dec_factor) / (pre_ms + dec_ms)
        md = _median(v.decode)
        for name, base, samples, factor, extra in (
            ("prefill", dense.prefill, v.prefill, pre_factor,
             {"kv_bytes": v.kv_bytes, "kv_ratio": v.kv_bytes / dense.kv_bytes, "peak_bytes": v.peak_bytes}),
            ("decode", dense.decode, v.decode, dec_factor,
             {"tokens_per_s": decode_tokens / (md / 1e3),
              "ideal_tokens_per_s": decode_tokens / (dec_ms * dec_factor / 1e3)}),
            ("ttlt", dense.generate, v.generate, ttlt_factor, {}),
        ):
            speedup, low, high = _paired_speedup(base, samples)
            ideal_speedup = 1 / factor
            phase = {"prefill": "prefill", "decode": "decode", "ttlt": "generate"}[name]
            writer.add("e2e", name, v.provider, dict(params, kept=round(v.kept, 4)), samples, speedup_vs_hf=speedup,
                       speedup_p20=low, speedup_p80=high, ideal_speedup=ideal_speedup,
                       frac_of_ideal=speedup / ideal_speedup, **_frac_of_static_drop(runs, v, phase), **extra)


# ------------------------------------------------------------------ long-context decode


def _keeps(layer_ids, batch, fraction) -> dict[int, torch.Tensor]:
    """Per MindSkip layer, a keep mask of ``keep_counts`` rows, a different rotation of the batch on each layer."""
    keeps = {}
    for j, (idx, count) in enumerate(zip(layer_ids, keep_counts(len(layer_ids), batch, fraction), strict=True)):
        keep = torch.zeros(batch, dtype=torch.bool)
        keep[(torch.arange(count) + j) % batch] = True
        keeps[idx] = keep
    return keeps


def _drop_keeps(layer_ids, batch, fraction) -> dict[int, torch.Tensor]:
    """Static Attention-Drop of the same share: whole MindSkip layers skip every row (the last ones; which layers
    does not change the decode time)."""
    n = round((1 - fraction) * len(layer_ids))
    return {idx: torch.full((batch,), i >= len(layer_ids) - n) == 0 for i, idx in enumerate(layer_ids)}


@dataclass
class LongVariant:
    provider: str
    cache: str
    kept: float | None
    keeps: dict[int, torch.Tensor] | None
    fraction: float | None = None  # the kept fraction asked for (MindSkip and Attention-Drop of one share pair on it)
    compiled: bool = False  # the decode step compiled (static cache), on the variant's own copy of the model
    built: object = None  # the variant's cache
    step: object = None  # compiled: the compiled copy of the model (converted for MindSkip and Attention-Drop)
    decode: list[float] = field(default_factory=list)

    def same_step(self, other: LongVariant) -> bool:
        """Whether ``other`` decodes with the same cache kind, compiled or not."""
        return (self.cache, self.compiled) == (other.cache, other.compiled)

def _long_prefill(model, ids):
    """The dense prefill a long-context point decodes from: its ``DynamicCache`` and the first greedy token (B, 1)."""
    with torch.no_grad():
        dense = DynamicCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, dense))
    return dense, out.logits[:, -1:].argmax(-1)


def _decode_attention_shares(model, layer_ids, dense, first, steps, reps, device) -> dict[str, float]:
    """The dense model's attention share of a decode step per cache kind, for each of the ``dense`` variants (their
    ``cache`` kind and ``built`` cache): instrumented steps, untimed otherwise; the median of ``reps`` after one."""
    share = {}
    timer = AttentionTimer(model, layer_ids, device)
    try:
        for v in dense:
            fractions_of_step = []
            for _ in range(reps + 1):
                with torch.no_grad():
                    (ms,) = time_ms(lambda v=v: _decode_steps(model, v.built, first, steps), device, reps=1, warmup=0)
                fractions_of_step.append(timer.collect()["decode"] / ms)
            share[v.cache] = _median(fractions_of_step[1:])
    finally:
        timer.remove()
    return share



def _model_copy(model):
    """A copy of ``model``'s modules that shares its parameters and buffers: a second model to convert and compile
    while ``model`` is converted and unloaded around the eager samples, without a second copy of the weights."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


def _compiled_variant(model, layer_ids, v: LongVariant, backend: str | None) -> LongVariant:
    """``v`` (a static-cache variant) with its decode step compiled as ``generate()`` compiles a static cache's (the
    decode compile config; ``backend``, or its own: inductor), on its own model copy, converted without routers where
    ``v`` routes, and on ``v``'s cache."""
    copied = _model_copy(model)
    if v.keeps is not None:
        copied = msk.get_mindskip_model(copied, msk.MindSkipConfig(layers=layer_ids))
    step = torch.compile(copied, **decode_compile_config(**({"backend": backend} if backend else {})).to_dict())
    return LongVariant(v.provider, v.cache, v.kept, v.keeps, v.fraction, compiled=True, built=v.built, step=step)


def _time_long(model, layer_ids, v: LongVariant, first, steps, device) -> float:
    """Milliseconds of ``steps`` decode steps of ``v`` (its compiled copy, or ``model`` converted around them)."""
    if v.compiled:
        return time_ms(lambda: _decode_steps(v.step, v.built, first, steps), device, reps=1, warmup=0)[0]
    # The decisions live in the variant's cache: converted without routers.
    with _converted(model, layer_ids, v.keeps is not None) as m:
        return time_ms(lambda: _decode_steps(m, v.built, first, steps), device, reps=1, warmup=0)[0]


def _run_long_point(model, ids, params, layer_ids, fractions, new_tokens, reps, writer, compiled=False,
                    compile_backend=None):
    device = writer.device
    batch, seqlen = ids.shape
    steps = new_tokens - 1
    max_len = seqlen + new_tokens + 8
    dense, first = _long_prefill(model, ids)
    variants = []
    for kind in ("dynamic", "static"):
        variants.append(LongVariant("hf", kind, None, None))
        for fraction in fractions:
            variants.append(LongVariant("mindskip", kind, fraction, _keeps(layer_ids, batch, fraction), fraction))
            if fraction < 1.0:
                keeps = _drop_keeps(layer_ids, batch, fraction)
                kept = sum(int(k.sum()) for k in keeps.values()) / (batch * len(layer_ids))
                variants.append(LongVariant("attn-drop", kind, kept, keeps, fraction))
    for v in variants:
        v.built = _transplant(model, dense, v.cache, v.keeps, max_len)
    del dense
    if compiled:  # each static-cache variant again, compiled, on the same cache
        variants += [_compiled_variant(model, layer_ids, v, compile_backend) for v in variants if v.cache == "static"]

    share = _decode_attention_shares(model, layer_ids, [v for v in variants if v.provider == "hf"], first, steps,
                                     reps, device)

    with torch.no_grad():
        for v in variants:  # warm-up (a compiled variant compiles here)
            _time_long(model, layer_ids, v, first, steps, device)
        for r in range(reps):
            for i in range(len(variants)):
                v = variants[(i + r) % len(variants)]
                v.decode.append(_time_long(model, layer_ids, v, first, steps, device))

    tokens = batch * steps
    dense_dynamic = variants[0]
    dense_bytes = sum(kv_bytes(dense_dynamic.built).values())
    for v in variants:
        same = [w for w in variants if w.same_step(v)]
        base = next(w for w in same if w.provider == "hf")
        row_params = dict(params, cache=v.cache) | ({"kept": round(v.kept, 4)} if v.kept is not None else {})
        if v.compiled:
            row_params["compiled"] = True
        held = sum(kv_bytes(v.built).values())
        # A compiled step takes the attention share of the eager one with the same cache (no hooks in a graph).
        factor = 1 - (1 - v.kept) * share[v.cache] if v.kept is not None else 1.0
        speedup, low, high = _paired_speedup(base.decode, v.decode)
        writer.add("e2e", "decode-long", v.provider, row_params, v.decode,
                   tokens_per_s=tokens / (_median(v.decode) / 1e3), attn_share=share[v.cache],
                   speedup_vs_hf=speedup, speedup_p20=low, speedup_p80=high,
                   speedup_vs_hf_dynamic=_paired_speedup(dense_dynamic.decode, v.decode)[0],
                   ideal_speedup=1 / factor, frac_of_ideal=speedup * factor,
                   **_frac_of_static_drop(same, v, "decode"), kv_bytes=held,
                   kv_ratio=held / dense_bytes if v.cache == "dynamic" else None)
    for v in variants:
        v.built = v.step = None
