"""Section `token_decode`: long-context decode with token-level MindSkip against sequence-level MindSkip and the
unconverted model, each with the dynamic and the static cache, against each variant's ideal.

    python -m bench.run --only token_decode                                  # prompts 2048, 4096; batches 4, 8
    python -m bench.run --only token_decode --token-lengths 512 --token-batches 4 --token-reps 3

For every (prompt length T, batch B) point, one dense prefill (a long prefill costs minutes on a CPU) gives the KV
every variant's cache is built from (:func:`bench.e2e._transplant`), and each timed sample is ``--new-tokens - 1``
greedy decode steps, after which a crop puts the cache back. The variants, each on a ``DynamicCache`` and on a
``StaticCache``:

* ``hf``: the unconverted model;
* ``sequence``: sequence-level MindSkip on the paper's layers, half of the sequences kept per layer (the cache of a
  layer holds only its kept rows; as the e2e section's ``decode-long`` rows);
* ``token``: token-level MindSkip on the same layers, keeping exactly half of the rows' tokens at every step of every
  layer (kept 0.5), and every token (kept 1.0: the cost of routing itself). Its routers have random weights; the bias
  of each (layer, step) is set by a calibration run to sit between the B/2-th and the next logit, and the timed runs
  replay those biases (decode is deterministic, so they make the same decisions; a replay checks it), one ``fill_``
  per layer and step;
* ``hybrid``: the same token routers with ``token_layers`` set to one routed layer, the middle one (the later of
  two: per-sequence layers come before it and after it), the others routed per sequence (kept 0.5): that layer keeps
  exactly half of the rows' tokens at every step as the ``token`` variant's layers do (its biases calibrated in the
  hybrid itself, whose per-sequence layers change its input), and the others keep the ``sequence`` variant's rows,
  their cache holding only those rows (the token layer's slot holds every row). ``measured_kept`` is the replayed
  share over every routed layer, ``token_layer_kept`` the token layer's; ``speedup_vs_sequence`` is against the
  ``sequence`` variant on the same cache, paired per round (the cost of routing one layer per token instead).

Prefill (rows ``prefill-layer`` and ``prefill-attention``, batch 1 at each prompt length): one token-routed decoder
layer at kept 0.5 and 1.0 against the stock layer, and its attention sublayer alone at kept 0.5 against the stock
attention module. Their ideal saves the query side of the skipped half only (q and o projections and the attention
itself; every token still computes its key and value, timed apart as ``kv_ms``).

The ideal of a decode variant at kept fraction ``f`` is the dense time with the same cache times ``1 - (1 - f) * a``,
``a`` the share of the dense decode step spent in the attention sublayers of the routed layers (instrumented steps):
what the variant would take if skipped work cost nothing. ``speedup_vs_fastest`` is against the faster dense variant
of the point (its ideal: ``ideal_vs_fastest``, from that variant's share), and ``frac_of_ideal_vs_fastest`` their
ratio: the goal of token routing's decode is at least 0.8 of it at kept 0.5. Variants are timed round-robin, ratios
are paired per round (median, p20 and p80 over rounds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from dataclasses import dataclass, field

import torch

import mindskip_ext as msk
from mindskip_ext.timing import time_ms
from mindskip_ext.token_routing import _kept_attention, _keys_values, token_keep, token_logits

from .e2e import (
    _converted,
    _decode_attention_shares,
    _decode_steps,
    _does_not_fit,
    _ints,
    _keeps,
    _long_prefill,
    _median,
    _paired_speedup,
    _transplant,
)
from .routing import build_model

DEFAULTS = {"lengths": (2048, 4096), "batches": (4, 8)}
QUICK = {"lengths": (128,), "batches": (4,)}
KEEP_ALL_BIAS = 1.0e4  # sigmoid(1e4) = 1.0: every token kept
# The KV caches a point holds at once, each at most the dense one: the dense prefill's, and per cache kind (dynamic,
# static) hf's, sequence's, the token variants' (one, shared) and the hybrid's.
POINT_CACHES = 9


def add_arguments(parser):
    group = parser.add_argument_group("token_decode section")
    group.add_argument("--token-lengths", default=None, help="comma-separated prompt lengths (default 2048,4096)")
    group.add_argument("--token-batches", default=None, help="comma-separated batch sizes (default 4,8)")
    group.add_argument("--token-reps", type=int, default=None, help="timed rounds over the variants (default 5)")
    group.add_argument("--token-shape", default=None, help="model shape (default: llama3-8b on GPU, cpu-small on CPU)")


@dataclass
class Variant:
    provider: str
    cache: str
    kept: float | None
    keeps: dict | None = None  # per-sequence layers: the rows each layer keeps
    biases: dict | None = None  # per-token layers: layer -> the router bias of each step
    token_layers: list[int] | None = None  # token routers (token, hybrid): the config's token_layers
    measured: dict | None = None  # replayed biases: layer -> the kept fraction of its decisions (_replayed_kept)
    built: object = None
    decode: list[float] = field(default_factory=list)


def run(args, writer):
    device = writer.device
    on_gpu = device.type == "cuda"
    grid = QUICK if args.quick else DEFAULTS
    lengths = _ints(args.token_lengths, grid["lengths"])
    batches = _ints(args.token_batches, grid["batches"])
    new_tokens = args.new_tokens or (4 if args.quick else 16)
    reps = args.token_reps or (2 if args.quick else 5)
    shape = args.token_shape or ("llama3-8b" if on_gpu else "cpu-small")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = build_model(shape, device, dtype, max_len=max(lengths) + new_tokens + 8)
    layer_ids = msk.MindSkipConfig().resolve_layers(model.config.num_hidden_layers)
    gen = torch.Generator().manual_seed(0)
    for seqlen in lengths:
        _prefill_point(model, seqlen, {"shape": shape, "B": 1, "T": seqlen}, reps, writer)
        for batch in batches:
            if reason := _does_not_fit(model, device, batch, seqlen, new_tokens, args.mem_fraction, POINT_CACHES):
                print(f"skip B={batch} T={seqlen}: {reason}")
                continue
            ids = torch.randint(1, model.config.vocab_size, (batch, seqlen), generator=gen).to(device)
            params = {"shape": shape, "B": batch, "T": seqlen, "new_tokens": new_tokens}
            _run_point(model, ids, params, layer_ids, new_tokens, reps, writer)
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    del model


def _interleaved(calls: dict, reps: int, device) -> dict[str, list[float]]:
    """Wall times of each of ``calls`` (name -> function), ``reps`` rounds visiting them in a rotated order, after
    one untimed round."""
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(reps + 1):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            (ms,) = time_ms(calls[name], device, reps=1, warmup=0)
            if r:
                times[name].append(ms)
    return times


def _prefill_point(model, seqlen, params, reps, writer):
    """Prefill of one token-routed decoder layer (the middle one) on ``seqlen`` tokens at kept 0.5 and 1.0, against
    the stock layer; and its attention sublayer alone against the stock attention module. The ideal saves the kept
    fraction's share of the query side only (q and o projections, the attention itself): every token still computes
    its key and value, timed apart (``kv_ms``)."""
    device = writer.device
    idx = model.config.num_hidden_layers // 2
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(layers=[idx], routing="token"))
    try:
        layer = wrapped.mindskip_layers[idx]
        base, attn = layer.base_layer, layer._attn_module()
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(1, seqlen, model.config.hidden_size, generator=gen).to(device, model.dtype)
        pos = torch.arange(seqlen, device=device)[None]
        pe = model.model.rotary_emb(x, pos)
        with torch.no_grad():
            router = layer.router
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) / router.weight.shape[1] ** 0.5)
            router.bias.zero_()
            normed = layer._input_norm(x)
            ordered = token_logits(layer, normed).flatten().double().sort(descending=True).values
            half = seqlen // 2
            median_bias = -(ordered[half - 1] + ordered[half]).item() / 2
            router.bias.fill_(median_bias)
            kept = token_keep(layer, x)
        assert int(kept.sum()) == half

        def layer_call(module, bias=None):
            def call():
                if bias is not None:
                    router.bias.fill_(bias)
                module(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
            return call

        calls = {
            "hf": layer_call(base),
            "token@0.5": layer_call(layer, median_bias),
            "token@1.0": layer_call(layer, KEEP_ALL_BIAS),
            "attention": lambda: attn(hidden_states=normed, attention_mask=None, position_embeddings=pe),
            "kept-attention": lambda: _kept_attention(layer, x, normed, kept, half, None, None, pe, None),
            "kv": lambda: _keys_values(layer, attn, normed, pe, None),
        }
        with torch.no_grad():
            times = _interleaved(calls, reps, device)
    finally:
        wrapped.unload()
    med = {name: _median(t) for name, t in times.items()}
    # Medians of calls timed apart: on a loaded machine their difference can fall outside what it measures (the
    # attention sublayer's time less its K/V projections, within the sublayer and the layer), which would put the
    # ideals out of [1, 2] at kept 0.5; it is clamped there.
    query_side = min(max(med["attention"] - med["kv"], 0.0), med["attention"], med["hf"])
    writer.add("token_decode", "prefill-layer", "hf", params, times["hf"], kv_ms=med["kv"],
               query_side_ms=query_side)
    for kept_fraction, name in ((0.5, "token@0.5"), (1.0, "token@1.0")):
        ideal = med["hf"] / (med["hf"] - (1 - kept_fraction) * query_side)
        speedup = _paired_speedup(times["hf"], times[name])
        writer.add("token_decode", "prefill-layer", "token", dict(params, kept=kept_fraction), times[name],
                   speedup_vs_hf=speedup[0], speedup_p20=speedup[1], speedup_p80=speedup[2], ideal_speedup=ideal,
                   frac_of_ideal=speedup[0] / ideal)
    writer.add("token_decode", "prefill-attention", "hf", params, times["attention"])
    ideal = med["attention"] / (med["attention"] - 0.5 * query_side)
    speedup = _paired_speedup(times["attention"], times["kept-attention"])
    writer.add("token_decode", "prefill-attention", "token", dict(params, kept=0.5), times["kept-attention"],
               speedup_vs_hf=speedup[0], speedup_p20=speedup[1], speedup_p80=speedup[2], ideal_speedup=ideal,
               frac_of_ideal=speedup[0] / ideal)


@contextlib.contextmanager
def _token_model(model, layer_ids, variant: Variant):
    """``model`` converted to token routers on ``layer_ids`` with ``variant.token_layers`` (None: every layer per
    token) and random router weights, keeping every token (no biases) or replaying ``variant.biases`` step by step
    (undone on exit). A layer routed per sequence takes its decision from the cache (``variant.keeps``)."""
    config = msk.MindSkipConfig(layers=layer_ids, routing="token", token_layers=variant.token_layers)
    wrapped = msk.get_mindskip_model(model, config)
    gen = torch.Generator().manual_seed(1)
    hooks = []
    try:
        with torch.no_grad():
            for router in wrapped.routers.values():
                router.weight.copy_(torch.randn(router.weight.shape, generator=gen) / router.weight.shape[1] ** 0.5)
                router.bias.fill_(KEEP_ALL_BIAS)
        for idx, biases in (variant.biases or {}).items():  # the per-token layers
            layer = wrapped.mindskip_layers[idx]
            hooks.append(layer.register_forward_pre_hook(_replay(layer, biases)))
        yield wrapped
    finally:
        for hook in hooks:
            hook.remove()
        wrapped.unload()


def _replay(layer, biases: list[float]):
    step = {"n": 0}

    def hook(module, args):
        layer.router.bias.fill_(biases[step["n"] % len(biases)])
        step["n"] += 1

    return hook


def _per_token(wrapped) -> list:
    """The MindSkip layers of ``wrapped`` that route per token."""
    return [layer for layer in wrapped.mindskip_layers.values() if layer.routing == "token"]


def _calibrate(model, layer_ids, variant: Variant, dense, first, steps, kept: float,
               max_len: int) -> dict[int, list[float]]:
    """Per layer that ``variant`` routes per token, the router bias of each decode step that keeps exactly ``kept``
    of the rows, in ``variant``'s own model (its token layers, and its per-sequence layers keeping
    ``variant.keeps``: they change the token layers' inputs)."""
    with _token_model(model, layer_ids, dataclasses.replace(variant, biases=None)) as wrapped:
        biases = {layer.layer_idx: [] for layer in _per_token(wrapped)}

        def calibrate(layer):
            def hook(module, args):
                logits = token_logits(layer, layer._input_norm(args[0]))[:, -1] - layer.router.bias
                ordered = logits.double().sort(descending=True).values
                k = round(kept * len(ordered))
                bias = -(ordered[k - 1] + ordered[k]).item() / 2 if 0 < k < len(ordered) else (
                    KEEP_ALL_BIAS if k else -KEEP_ALL_BIAS)
                layer.router.bias.fill_(bias)
                biases[layer.layer_idx].append(bias)
            return hook

        hooks = [layer.register_forward_pre_hook(calibrate(layer)) for layer in _per_token(wrapped)]
        try:
            with torch.no_grad():
                _decode_steps(wrapped, _transplant(model, dense, "dynamic", variant.keeps, max_len), first, steps)
        finally:
            for hook in hooks:
                hook.remove()
    return biases


def _replayed_kept(model, layer_ids, variant: Variant, first, steps) -> dict[int, float]:
    """Per routed layer, the kept fraction of its (step, row) decisions when ``variant`` decodes (an untimed run):
    a per-token layer's from its router, a per-sequence layer's from its keep mask (its decision in the cache)."""
    counts = {idx: [] for idx in layer_ids}
    with _token_model(model, layer_ids, variant) as wrapped:
        hooks = [layer.register_forward_pre_hook(lambda m, args, layer=layer: counts[layer.layer_idx].append(
            token_keep(layer, args[0]).float().mean().item()), prepend=False) for layer in _per_token(wrapped)]
        try:
            with torch.no_grad():
                _decode_steps(wrapped, variant.built, first, steps)
        finally:
            for hook in hooks:
                hook.remove()
    for idx, keep in (variant.keeps or {}).items():
        counts[idx] = [keep.float().mean().item()]
    return {idx: sum(c) / len(c) for idx, c in counts.items()}


def _context(model, layer_ids, v: Variant):
    if v.provider in ("token", "hybrid"):
        return _token_model(model, layer_ids, v)
    return _converted(model, layer_ids, v.keeps is not None)  # the sequence level's decisions are in its cache


def _run_point(model, ids, params, layer_ids, new_tokens, reps, writer):
    device = writer.device
    batch, seqlen = ids.shape
    steps = new_tokens - 1
    max_len = seqlen + new_tokens + 8
    dense, first = _long_prefill(model, ids)
    keeps = _keeps(layer_ids, batch, 0.5)
    # The hybrid: one layer per token, the others per sequence keeping the sequence variant's rows.
    token_layers = [_hybrid_token_layer(layer_ids)]
    hybrid_keeps = {idx: keep for idx, keep in keeps.items() if idx not in token_layers}
    biases = _calibrate(model, layer_ids, Variant("token", "dynamic", 0.5), dense, first, steps, 0.5, max_len)
    hybrid_biases = _calibrate(model, layer_ids, Variant("hybrid", "dynamic", 0.5, keeps=hybrid_keeps,
                                                         token_layers=token_layers), dense, first, steps, 0.5, max_len)
    variants = []
    for kind in ("dynamic", "static"):
        variants += [Variant("hf", kind, None), Variant("sequence", kind, 0.5, keeps=keeps),
                     Variant("token", kind, 0.5, biases=biases), Variant("token", kind, 1.0),
                     Variant("hybrid", kind, 0.5, keeps=hybrid_keeps, biases=hybrid_biases, token_layers=token_layers)]
    shared = {}  # the token variants of a cache kind share one cache: each sample's crop puts it back
    for v in variants:
        key = (v.cache, "token") if v.provider == "token" else id(v)
        if key not in shared:
            shared[key] = _transplant(model, dense, v.cache, v.keeps, max_len)
        v.built = shared[key]
    del dense, shared

    share = _decode_attention_shares(model, layer_ids, [v for v in variants if v.provider == "hf"], first, steps, 2,
                                     device)

    for v in variants:  # warm-up (a token layer's dynamic slot takes its buffers here), and the replay check
        if v.biases is not None:
            v.measured = _replayed_kept(model, layer_ids, v, first, steps)
        with _context(model, layer_ids, v) as m, torch.no_grad():
            _decode_steps(m, v.built, first, steps)
    for r in range(reps):
        for i in range(len(variants)):
            v = variants[(i + r) % len(variants)]
            with _context(model, layer_ids, v) as m, torch.no_grad():
                (ms,) = time_ms(lambda m=m, v=v: _decode_steps(m, v.built, first, steps), device, reps=1, warmup=0)
            v.decode.append(ms)

    tokens = batch * steps
    dense = {v.cache: v for v in variants if v.provider == "hf"}
    fastest = min(dense.values(), key=lambda v: _median(v.decode))
    sequence = {v.cache: v for v in variants if v.provider == "sequence"}
    for v in variants:
        base = dense[v.cache]
        kept = sum(v.measured.values()) / len(v.measured) if v.measured else v.kept
        extra = {}
        if v.provider == "hybrid":  # against pure per-sequence routing of the same keeps, round by round
            vs_sequence = _paired_speedup(sequence[v.cache].decode, v.decode)
            extra = {"token_layer": v.token_layers[0], "token_layer_kept": v.measured[v.token_layers[0]],
                     "speedup_vs_sequence": vs_sequence[0], "speedup_vs_sequence_p20": vs_sequence[1],
                     "speedup_vs_sequence_p80": vs_sequence[2]}
        factor = 1 - (1 - kept) * share[v.cache] if kept is not None else 1.0
        factor_fastest = 1 - (1 - kept) * share[fastest.cache] if kept is not None else 1.0
        speedup, low, high = _paired_speedup(base.decode, v.decode)
        vs_fastest = _paired_speedup(fastest.decode, v.decode)[0]
        row = dict(params, cache=v.cache) | ({"kept": v.kept} if v.kept is not None else {})
        writer.add("token_decode", "decode", v.provider, row, v.decode,
                   tokens_per_s=tokens / (_median(v.decode) / 1e3), attn_share=share[v.cache], measured_kept=kept,
                   speedup_vs_hf=speedup, speedup_p20=low, speedup_p80=high, ideal_speedup=1 / factor,
                   frac_of_ideal=speedup * factor,
                   fastest_dense=fastest.cache, speedup_vs_fastest=vs_fastest, ideal_vs_fastest=1 / factor_fastest,
                   frac_of_ideal_vs_fastest=vs_fastest * factor_fastest, **extra)
        v.built = None


def _hybrid_token_layer(layer_ids) -> int:
    """The hybrid's one per-token layer: the middle routed layer (the later of two), so that per-sequence layers
    come before it (its input depends on their keeps) and after it."""
    return layer_ids[len(layer_ids) // 2]
