"""``mindskip demo``: what MindSkip is for, measured in one run on one device, offline.

The dense model, static Attention-Drop and MindSkip router-tuned with a recipe (default: ``kd-joint``, the sequence
routers of ``mindskip train``'s default recipe ``hybrid``, with a small search and few steps) skip the same number of
attention sublayers; each is evaluated on held-out text of two kinds. Then: which layers MindSkip skipped for which
prompt, and the decode speed of the static compact KV cache at a long prompt and batch > 1, against the dense model and
against the ideal measured from the dense model's attention share (the timing code of ``bench/e2e.py``,
:mod:`mindskip_ext.timing`).
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .common import add_common, add_model_args, emit_json, say
from .generate import generate_batch

# The model `mindskip demo` uses without --model: "tiny" (built here from a config), a name that
# mindskip_ext.offline_models can fetch (e.g. "smollm2"; falls back to "tiny" when it cannot be fetched), or
# any local path / hub id.
DEMO_DEFAULT_MODEL = "smollm2"
DEMO_TINY = "tiny"
DEMO_RECIPE = "kd-joint"
# How much the demo does. A real model (SmolLM2-135M: about 900 forward tokens/s per CPU core in bf16) gets 128-token
# blocks, a joint-cost search on 4 sequences instead of the recipe's 32, and 4 steps of 4 sequences, to stay within
# about three minutes on 2 CPU cores; the paper recipe (CE from zero-initialised routers, no search) gets more steps.
# The tiny model trains on the built-in tasks in seconds. "search": sequences of the joint-cost search; "calibration":
# training sequences the centring and the final bias calibration run on; "speed": decode batch x prompt tokens.
DEMO_PLANS = {
    "tiny": {"block": 64, "train": 600, "held": 96, "search": 16, "steps": 120, "paper_steps": 200, "batch_size": 16,
             "paper_lr": 1e-3, "calibration": 256, "speed": (8, 192), "speed_steps": 8, "speed_reps": 5},
    "model": {"block": 128, "train": 16, "held": 8, "search": 4, "steps": 4, "paper_steps": 20, "batch_size": 4,
              "paper_lr": 5e-3, "calibration": 16, "speed": (8, 1024), "speed_steps": 4, "speed_reps": 5},
}
PROMPTS_PER_DOMAIN = 2
PROMPT_TOKENS = 24


@dataclass
class Domain:
    """Held-out evaluation text of one kind, with the training text of the same kind."""

    name: str
    train: list
    held: list
    prompts: list[str]


def add_parser(subparsers) -> None:
    from ..training.config import RECIPES

    p = subparsers.add_parser(
        "demo",
        help="Dense vs Attention-Drop vs MindSkip at the same skip ratio, offline: held-out perplexity on two kinds "
             "of text, the layers each prompt skips, and decode speed against the ideal.",
        description="Router-tunes a model's sequence routers with a recipe (default: kd-joint, the sequence-level "
        "training of mindskip train's default recipe hybrid, with a small joint-cost search and few steps), "
        "calibrates static Attention-Drop on the same training text to skip as many attention sublayers, and prints "
        "the held-out perplexity of the dense model, Attention-Drop and MindSkip on two kinds of text, the layers "
        "MindSkip skipped for some prompts, and the decode speed of the static compact KV cache at a long prompt "
        "against the dense model and the ideal. Text: built into Python (its reference documentation and its "
        "standard library's code), or --data. Default model: "
        f"{DEMO_DEFAULT_MODEL!r} ('tiny' is built from a config and first trained for a few seconds on the built-in "
        "word and number tasks, which are then its two kinds of text).",
    )
    add_model_args(p, required=False)
    p.set_defaults(model=DEMO_DEFAULT_MODEL)
    p.add_argument("--recipe", default=DEMO_RECIPE, choices=sorted(n for n, r in RECIPES.items() if not r.hybrid),
                   help=f"Router-Tuning recipe of sequence routers (default {DEMO_RECIPE}; 'paper' is the paper's "
                   "setup).")
    p.add_argument("--skip-ratio", type=float, default=0.2,
                   help="Share of all attention sublayers to skip, rounded to whole layers (default 0.2).")
    p.add_argument("--data", action="append", default=None,
                   help="Text of one kind (a local file or a datasets hub name, as mindskip train takes); repeat for "
                        "each kind. Default: Python's reference documentation and its standard library's code.")
    p.add_argument("--steps", type=int, default=None, help="Router-Tuning steps (default: the plan's, see --help).")
    p.add_argument("--speed-batch", type=int, default=None, help="Decode batch of the speed line (default 8).")
    p.add_argument("--speed-prompt", type=int, default=None,
                   help="Prompt tokens of the speed line (default 1024; 192 for tiny; 0: no speed line).")
    p.add_argument("--output", default=None, help="Router directory to write (default: a temporary folder).")
    p.add_argument("--tiny-steps", type=int, default=800, help="Training steps of the built-in tiny model.")
    p.add_argument("--seed", type=int, default=0)
    add_common(p)
    p.set_defaults(func=run)


def demo_model(name: str, device, dtype, attn: str, seed: int, progress: bool, tiny_steps: int = 800,
               threads: int | None = None):
    """(model, tokenizer, label) for the demo; a fetchable name that cannot be fetched falls back to tiny.

    The tiny model is trained on its own draw of the built-in tasks (not the demo's records).
    """
    from .. import offline_models
    from ..loading import load_model
    from ..testing import synthetic_instructions, train_tiny_model

    label = name
    if name in offline_models.MODELS and not Path(name).exists():
        try:
            label = f"{name}: {offline_models.MODELS[name].description}"
            name = str(offline_models.fetch_model(name, progress=progress))
        except (offline_models.FetchError, OSError) as err:
            say(f"could not get the {name!r} model ({err}); running the demo on the built-in tiny model instead")
            name = DEMO_TINY
    if name == DEMO_TINY:
        import torch

        # Its matrices are far too small for intra-op threads to pay; with other jobs on the cores,
        # threads spinning on each other make it ~10x slower.
        if threads is None:
            torch.set_num_threads(1)
        t0 = time.perf_counter()
        records = synthetic_instructions(3000, seed=seed + 1)
        model, tokenizer = train_tiny_model(records, steps=tiny_steps, seed=seed, progress=progress)
        say(f"built the tiny model (Llama, 8 layers, hidden 64) and trained it for {time.perf_counter() - t0:.0f} s "
            "on the built-in tasks")
        return model.to(device), tokenizer, "tiny Llama (8 layers, hidden 64)"
    model, tokenizer = load_model(name, device, dtype, attn)
    return model, tokenizer, label


def demo_dtype(name: str, device):
    """``--dtype``: ``auto`` is bfloat16 on a CPU that computes it natively (AVX512-BF16 or AMX: about 3x the speed of
    float32 on SmolLM2-135M here), else :func:`~mindskip_ext.devices.pick_dtype`'s choice."""
    import torch

    from ..devices import pick_dtype

    if name == "auto" and device.type == "cpu" and torch.backends.mkldnn.is_available() \
            and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return pick_dtype(name, device)


# ----------------------------------------------------------------------------------- data


def _blocks(tokenizer, texts, block: int, count: int) -> list:
    """Up to ``count`` whole ``block``-token blocks, at most two from each text in turn."""
    from ..data import pack_texts

    out = []
    for text in texts:
        out += [e for e in pack_texts(tokenizer, [text[: block * 16]], block) if len(e) == block][:2]
        if len(out) >= count:
            break
    return out[:count]


def _prompt(tokenizer, example) -> str:
    ids = [t for t in example.input_ids if t not in tokenizer.all_special_ids][:PROMPT_TOKENS]
    return tokenizer.decode(ids)


def builtin_text(tokenizer, plan: dict, seed: int) -> tuple[list[Domain], str]:
    """The two kinds of built-in text (:data:`~mindskip_ext.testing.BUILTIN_TEXT`): training blocks from some
    documents, held-out blocks and prompts from the others."""
    from ..testing import BUILTIN_TEXT, builtin_documents, is_heldout_document

    domains = []
    for kind in BUILTIN_TEXT:
        documents = builtin_documents(kind)
        names = sorted(documents)
        random.Random(seed).shuffle(names)
        train = _blocks(tokenizer, [documents[n] for n in names if not is_heldout_document(n)], plan["block"],
                        plan["train"])
        held = _blocks(tokenizer, [documents[n] for n in names if is_heldout_document(n)], plan["block"], plan["held"])
        domains.append(Domain(kind, train, held, [_prompt(tokenizer, e) for e in held[:PROMPTS_PER_DOMAIN]]))
    what = "; ".join(f"{kind} = {text}" for kind, text in BUILTIN_TEXT.items())
    return domains, (f"built-in text, {what}; held-out blocks come from documents never trained or calibrated on")


def source_text(tokenizer, sources: list[str], plan: dict, seed: int) -> tuple[list[Domain], str]:
    """One kind of text per ``--data`` source, split into training and held-out blocks."""
    from ..data import load_examples, split_heldout

    domains = []
    for source in sources:
        examples = load_examples(source, tokenizer, plan["block"]).examples
        train, held = split_heldout(examples, 0.2, seed)
        name = Path(source).stem if Path(source).exists() else source
        domains.append(Domain(name, train[: plan["train"]], held[: plan["held"]],
                              [_prompt(tokenizer, e) for e in held[:PROMPTS_PER_DOMAIN]]))
    return domains, f"--data: {', '.join(sources)}; held-out: a seeded fifth of each source's blocks"


def builtin_tasks(tokenizer, plan: dict, seed: int) -> tuple[list[Domain], str]:
    """The tiny model's two kinds of text: the built-in word tasks and number tasks (instructions; the loss is on
    the responses), held-out records drawn with their own seed."""
    from ..data import prepare_examples
    from ..testing import SYNTHETIC_KINDS, synthetic_instructions

    domains = []
    for j, kind in enumerate(SYNTHETIC_KINDS):
        train = synthetic_instructions(plan["train"], seed=seed + 10 + j, kind=kind)
        held = synthetic_instructions(plan["held"], seed=seed + 20 + j, kind=kind)
        domains.append(Domain(kind, prepare_examples(tokenizer, train, plan["block"]).examples,
                              prepare_examples(tokenizer, held, plan["block"]).examples,
                              [f"{r['instruction']}\n\n{r['input']}" for r in held[:PROMPTS_PER_DOMAIN]]))
    return domains, "the built-in tasks (mindskip_ext.testing): word tasks and number tasks, held-out draws"


def _interleaved(parts: list[list]) -> list:
    """The items of ``parts`` taken in turn, so that the first few of the result cover every part."""
    out = []
    for i in range(max(len(p) for p in parts)):
        out += [p[i] for p in parts if i < len(p)]
    return out


# ----------------------------------------------------------------------------------- speed


def decode_speed(base, layer_ids, capacity_per_layer: dict, stream: list[int], batch: int, prompt: int, steps: int,
                 reps: int) -> dict:
    """Decode tokens/s of the unconverted ``base`` and of MindSkip on a static compact KV cache, after one dense
    prefill of ``batch`` x ``prompt`` tokens of ``stream`` (cycled), as bench/e2e.py's long-context points:
    MindSkip's cache holds, in each layer, as many rows as its routers kept there on the held-out text. Timed
    round-robin (the speed-up is the ratio of the median times; its range, the lowest and highest of each round's
    ratio); the ideal is the dense time less the skipped share of its attention time in those layers."""
    import torch
    from transformers import DynamicCache

    from ..cache import kv_bytes
    from ..hf_compat import cache_kwargs
    from ..timing import AttentionTimer, converted, decode_steps, time_ms, transplant_cache

    device = next(base.parameters()).device
    ids = torch.tensor([stream[(i * prompt + t) % len(stream)] for i in range(batch) for t in range(prompt)],
                       device=device).view(batch, prompt)
    keeps = {i: torch.arange(batch) < round(capacity_per_layer[i] * batch) for i in layer_ids}
    kept = sum(int(k.sum()) for k in keeps.values()) / (batch * len(layer_ids))
    with torch.no_grad():
        dense = DynamicCache(config=base.config)
        first = base(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(base, dense)).logits
        first = first[:, -1:].argmax(-1)
    caches = {"dense": transplant_cache(base, dense, "static", None, prompt + steps + 8),
              "mindskip": transplant_cache(base, dense, "static", keeps, prompt + steps + 8)}
    del dense
    timer = AttentionTimer(base, layer_ids, device)
    shares = []
    try:
        for _ in range(3):  # the first is a warm-up
            with torch.no_grad():
                (ms,) = time_ms(lambda: decode_steps(base, caches["dense"], first, steps), device, reps=1, warmup=0)
            shares.append(timer.collect()["decode"] / ms)
    finally:
        timer.remove()
    share = statistics.median(shares[1:])
    times = {name: [] for name in caches}
    for r in range(reps + 1):  # round 0 warms up MindSkip
        for name in (list(caches) if r % 2 else list(caches)[::-1]):
            with converted(base, layer_ids, name == "mindskip") as m, torch.no_grad():
                (ms,) = time_ms(lambda m=m, n=name: decode_steps(m, caches[n], first, steps), device, reps=1,
                                warmup=0)
            if r:
                times[name].append(ms)
    dense_ms, mindskip_ms = statistics.median(times["dense"]), statistics.median(times["mindskip"])
    per_round = [d / m for d, m in zip(times["dense"], times["mindskip"], strict=True)]
    tokens = batch * steps
    return {
        "batch": batch, "prompt": prompt, "decode_steps": steps, "rounds": reps, "kept": kept,
        "attention_share": share, "ideal_speedup": 1 / (1 - (1 - kept) * share), "speedup": dense_ms / mindskip_ms,
        "speedup_range": [min(per_round), max(per_round)],
        "dense_tokens_per_s": tokens / (dense_ms / 1e3), "mindskip_tokens_per_s": tokens / (mindskip_ms / 1e3),
        "kv_ratio": sum(kv_bytes(caches["mindskip"]).values()) / sum(kv_bytes(caches["dense"]).values()),
    }


# ----------------------------------------------------------------------------------- the run


def _evaluate(model, domains: list[Domain], pad: int, num_layers: int) -> dict:
    from ..eval.perplexity import evaluate_examples

    out = {}
    for d in domains:
        result = evaluate_examples(model, d.held, pad, 8)
        out[d.name] = {"perplexity": result["perplexity"], "target_tokens": result["target_tokens"],
                       "skip_ratio": result["skipped_layers_per_sequence"] / num_layers}
    return out


def _table(domains: list[Domain], rows: dict[str, dict]) -> list[str]:
    width = max(len(name) for name in rows) + 2
    lines = [" " * width + "".join(f"{d.name:<20}" for d in domains)]
    for name, result in rows.items():
        cells = "".join(f"{result[d.name]['perplexity']:<8.2f}({100 * result[d.name]['skip_ratio']:4.1f}%)     "
                        for d in domains)
        lines.append(f"{name:<{width}}{cells}")
    return lines


class _Clock:
    """Seconds since the demo started: wall-clock, and CPU time of this process (all its threads). On a machine
    shared with other jobs the wall time grows with their load and the CPU time much less so."""

    def __init__(self):
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.started

    def cpu(self) -> float:
        return time.process_time() - self.cpu_started

    def __str__(self) -> str:
        return f"{self.wall():.0f} s, {self.cpu():.0f} s of CPU"


def run(args) -> int:
    import torch

    from .. import data as D
    from ..config import MindSkipConfig
    from ..devices import pick_device
    from ..eval.attention_drop import dropped_model, redundancy_scores, select_dropped
    from ..model import get_mindskip_model
    from ..training import RECIPES, RouterTuner, RouterTuningConfig

    clock = _Clock()
    progress = not args.no_progress
    if not 0.0 < args.skip_ratio < 1.0:
        raise ValueError(f"--skip-ratio must be in (0, 1), got {args.skip_ratio}")
    device = pick_device(args.device)
    busy = device.type == "cpu" and args.threads is None and os.getloadavg()[0] >= (os.cpu_count() or 1)
    if busy:  # intra-op threads that wait on each other behind other jobs cost several times their work
        torch.set_num_threads(1)
    dtype = demo_dtype(args.dtype, device)
    model, tokenizer, label = demo_model(args.model, device, dtype, args.attn_implementation, args.seed, progress,
                                         args.tiny_steps, args.threads)
    tiny = label.startswith("tiny")
    plan = DEMO_PLANS["tiny" if tiny else "model"]
    if args.data:
        domains, data_line = source_text(tokenizer, args.data, plan, args.seed)
    elif tiny:
        domains, data_line = builtin_tasks(tokenizer, plan, args.seed)
    else:
        domains, data_line = builtin_text(tokenizer, plan, args.seed)
    for d in domains:
        if not d.train or not d.held:
            raise ValueError(f"the text {d.name!r} gave {len(d.train)} training and {len(d.held)} held-out blocks of "
                             f"{plan['block']} tokens; give more text")
    pad = D.pad_token_id(tokenizer)
    num_layers = model.config.num_hidden_layers
    n_skip = min(num_layers - 1, max(1, round(args.skip_ratio * num_layers)))
    ratio = n_skip / num_layers
    train = _interleaved([d.train for d in domains])
    held = [e for d in domains for e in d.held]
    say(f"model: {label}; device: {device}; dtype: {str(model.dtype).removeprefix('torch.')}; "
        f"{torch.get_num_threads()} CPU threads" + (f" (the load average is {os.getloadavg()[0]:.1f} on "
                                                     f"{os.cpu_count()} cores; --threads to choose)" if busy else ""))
    say(f"data: {data_line}")
    say("  " + "; ".join(f"{d.name}: {len(d.train)} training and {len(d.held)} held-out blocks" for d in domains))
    say(f"skip ratio: {100 * ratio:.1f}% of the attention sublayers ({n_skip} of {num_layers} per sequence) for "
        "Attention-Drop and MindSkip alike")

    rows = {"dense": _evaluate(model, domains, pad, num_layers)}
    say(f"dense: evaluated ({clock})")

    calibration = train[: plan["calibration"]]
    scores = redundancy_scores(model, calibration, pad, "attn", 8)
    dropped = select_dropped(scores, n_skip)
    drop = dropped_model(model, dropped)
    ad_name = f"Attention-Drop ({', '.join(map(str, dropped))})"
    rows[ad_name] = _evaluate(drop, domains, pad, num_layers)
    drop.unload()
    say(f"Attention-Drop: the {n_skip} most redundant attention sublayers on the same {len(calibration)} training "
        f"blocks: {dropped} ({clock})")

    recipe = RECIPES[args.recipe]
    tuning = dict(recipe.tuning)
    if tuning.get("router_init") in ("cost", "joint"):
        tuning["router_init_sequences"] = plan["search"]
    tuning.setdefault("learning_rate", plan["paper_lr"])
    default_steps = plan["paper_steps"] if args.recipe == "paper" else plan["steps"]
    config = RouterTuningConfig(skip_ratio=ratio, **tuning, max_steps=args.steps or default_steps,
                                batch_size=plan["batch_size"], calibration_sequences=plan["calibration"],
                                save_every=0, seed=args.seed, eval_batch_size=8)
    mindskip = get_mindskip_model(model, MindSkipConfig(layers=recipe.layers(num_layers)))
    layer_ids = sorted(mindskip.routers)
    output = args.output or tempfile.mkdtemp(prefix="mindskip-demo-")
    say(f"MindSkip: routers on layers {layer_ids[0]}..{layer_ids[-1]}, recipe {args.recipe} "
        f"({recipe.description}); here {config.max_steps} steps of {config.batch_size} sequences"
        + (f", the joint-cost search on {plan['search']} sequences" if "router_init_sequences" in tuning else ""))
    summary = RouterTuner(mindskip, train, held, config, output, pad, progress=progress).train()
    say(f"router-tuned in {summary['train_seconds']:.0f} s of steps; routers in {output} "
        f"({clock})")
    ms_name = f"MindSkip ({args.recipe})"
    rows[ms_name] = _evaluate(mindskip, domains, pad, num_layers)

    say("")
    say(f"held-out perplexity (and share of attention sublayers skipped) on {', '.join(d.name for d in domains)}:")
    for line in _table(domains, rows):
        say("  " + line)
    verdicts = []
    for d in domains:
        ours, theirs = rows[ms_name][d.name]["perplexity"], rows[ad_name][d.name]["perplexity"]
        verdicts.append(f"{d.name}: {100 * (ours / theirs - 1):+.1f}% perplexity against Attention-Drop"
                        + ("" if ours <= theirs else " (MindSkip is NOT at or below Attention-Drop here)"))
    say("  " + "; ".join(verdicts))

    prompts = [p for d in domains for p in d.prompts]
    completions, skipped = generate_batch(mindskip, tokenizer, prompts, 12, raw=not tiny)
    say("")
    say("layers whose attention MindSkip skipped, per prompt (one batched generation):")
    for prompt, completion, layers in zip(prompts, completions, skipped, strict=True):
        say(f"  {layers}  {prompt!r} -> {completion!r}")
    if all(layers == skipped[0] for layers in skipped):
        say("  every prompt skipped the same layers: here the trained routers act as a static drop of the layers "
            "Router-Tuning chose (see 'Which mode should I use?' in the README)")

    capacity = {int(i): c for i, c in summary["heldout"]["capacity_per_layer"].items()}
    base = mindskip.unload()
    speed = None
    batch, prompt = plan["speed"]
    batch = args.speed_batch or batch
    prompt = plan["speed"][1] if args.speed_prompt is None else args.speed_prompt
    if prompt:
        stream = [t for e in train for t in e.input_ids]
        speed = decode_speed(base, layer_ids, capacity, stream, batch, prompt, plan["speed_steps"], plan["speed_reps"])
        say("")
        say(f"decode speed, static compact KV cache, batch {batch} x {prompt}-token prompt (the training text), "
            f"{plan['speed_steps']} greedy steps, {speed['rounds']} rounds alternating: dense "
            f"{speed['dense_tokens_per_s']:.1f} tokens/s, MindSkip {speed['mindskip_tokens_per_s']:.1f} tokens/s = "
            f"{speed['speedup']:.2f}x (rounds {speed['speedup_range'][0]:.2f}-{speed['speedup_range'][1]:.2f}x; "
            f"ideal {speed['ideal_speedup']:.2f}x: {100 * (1 - speed['kept']):.0f}% of the "
            f"routed layers' attention skipped, which is {100 * speed['attention_share']:.0f}% of a dense step); "
            f"KV cache {speed['kv_ratio']:.2f} of dense")
    result = {
        "command": "demo",
        "model": label,
        "dtype": str(model.dtype).removeprefix("torch."),
        "recipe": args.recipe,
        "data": data_line,
        "skip_ratio": ratio,
        "skipped_layers": n_skip,
        "attention_drop_layers": dropped,
        "router_layers": layer_ids,
        "heldout": rows,
        "prompts": [{"prompt": p, "skipped_layers": s} for p, s in zip(prompts, skipped, strict=True)],
        "speed": speed,
        "router_dir": output,
        "seconds": clock.wall(),
        "cpu_seconds": clock.cpu(),
    }
    load = f"; the load average is {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if device.type == "cpu" else ""
    say(f"demo finished in {result['seconds']:.0f} s, {result['cpu_seconds']:.0f} s of CPU{load}")
    emit_json(result)
    return 0
