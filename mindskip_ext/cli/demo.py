"""``mindskip demo``: the end-to-end job on one device, offline: convert, router-tune, evaluate, generate, time."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .common import add_common, add_model_args, emit_json, say
from .generate import generate_batch

# The model `mindskip demo` uses without --model: "tiny" (built here from a config), a name that
# mindskip_ext.offline_models can fetch (e.g. "smollm2"; falls back to "tiny" when it cannot be fetched), or
# any local path / hub id.
DEMO_DEFAULT_MODEL = "smollm2"
DEMO_TINY = "tiny"
# How much the demo does: the tiny model is cheap; a real model (e.g. SmolLM2-135M, about 150 Router-
# Tuning tokens/s per CPU core) gets fewer, smaller steps to stay within a few minutes on 2 CPU cores.
DEMO_PLANS = {
    "tiny": {"records": 1500, "steps": 200, "batch_size": 16, "lr": 1e-3, "calibration": 256, "repeats": 3},
    "model": {"records": 240, "steps": 20, "batch_size": 8, "lr": 5e-3, "calibration": 96, "repeats": 3},
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="End to end, offline: convert, router-tune to a capacity, evaluate before/after, generate, time.",
        description="Router-tunes a small model to a target capacity on the package's built-in instruction data "
        "(ten small word and number tasks), then prints held-out perplexity before and after, the "
        "capacity per layer, a generation sample with the skipped layers, and the measured speed of the "
        f"MindSkip model against the unconverted one on this device. Default model: {DEMO_DEFAULT_MODEL!r} "
        "('tiny' is built from a config and first trained for a few seconds on the same tasks, so "
        "skipping attention has a measurable cost).",
    )
    add_model_args(p, required=False)
    p.set_defaults(model=DEMO_DEFAULT_MODEL)
    p.add_argument("--target-capacity", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=None, help="Router-Tuning steps (default: 200 tiny, 20 otherwise).")
    p.add_argument(
        "--records", type=int, default=None, help="Built-in records to use (default: 1500 tiny, 240 otherwise)."
    )
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

    if name in offline_models.MODELS and not Path(name).exists():
        try:
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
    return model, tokenizer, name


def time_generation(model, tokenizer, prompts: list[str], max_new_tokens: int, repeats: int = 3) -> float:
    """Median seconds of one greedy generation of ``prompts`` (after one warm-up; synchronised on CUDA)."""
    import statistics

    from ..timing import time_ms

    device = next(model.parameters()).device
    times = time_ms(lambda: generate_batch(model, tokenizer, prompts, max_new_tokens), device, reps=repeats)
    return statistics.median(times) / 1e3


def time_forward(model, examples, pad_id: int, batch_size: int = 32, repeats: int = 3) -> float:
    """Median seconds of no-cache forwards over ``examples`` (after one warm-up; synchronised on CUDA)."""
    import statistics

    import torch

    from ..data import collate, length_batches
    from ..eval.perplexity import forward_routed
    from ..timing import time_ms

    device = next(model.parameters()).device
    batches = [
        {k: v.to(device) for k, v in collate([examples[i] for i in index], pad_id).items()}
        for index in length_batches([len(e) for e in examples], batch_size, shuffle=False)
    ]
    model.eval()

    def run():
        with torch.no_grad():
            for batch in batches:
                forward_routed(model, batch, None)

    return statistics.median(time_ms(run, device, reps=repeats)) / 1e3


def run(args) -> int:
    import random

    from .. import data as D
    from ..config import MindSkipConfig
    from ..devices import pick_device, pick_dtype
    from ..eval.perplexity import evaluate_examples
    from ..model import get_mindskip_model
    from ..testing import synthetic_instructions
    from ..training import RouterTuner, RouterTuningConfig

    started = time.perf_counter()
    progress = not args.no_progress
    device = pick_device(args.device)
    model, tokenizer, label = demo_model(
        args.model,
        device,
        pick_dtype(args.dtype, device),
        args.attn_implementation,
        args.seed,
        progress,
        args.tiny_steps,
        args.threads,
    )
    plan = DEMO_PLANS["tiny" if label.startswith("tiny") else "model"]
    records = synthetic_instructions(args.records or plan["records"], seed=args.seed)
    random.Random(args.seed).shuffle(records)
    n_held = max(32, len(records) // 5)
    held_records, train_records = records[:n_held], records[n_held:]
    pad = D.pad_token_id(tokenizer)
    train = D.prepare_examples(tokenizer, train_records, 256).examples
    held = D.prepare_examples(tokenizer, held_records, 256).examples
    bf16 = device.type == "cuda"
    prompts = [f"{r['instruction']}\n\n{r['input']}" for r in held_records[:8]]

    say(f"model: {label}; device: {device}; {len(train)} training / {len(held)} held-out sequences")
    before = evaluate_examples(model, held, pad, 16, bf16)
    dense_forward = time_forward(model, held, pad, repeats=plan["repeats"])
    dense_generate = time_generation(model, tokenizer, prompts, 16, repeats=plan["repeats"])
    say(f"before: held-out perplexity {before['perplexity']:.3f} (all attention layers run)")

    mindskip = get_mindskip_model(model, MindSkipConfig())
    trainable, total = mindskip.get_nb_trainable_parameters()
    say(f"converted: MindSkip on layers {sorted(mindskip.routers)}; {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.4f}%)")
    output = args.output or tempfile.mkdtemp(prefix="mindskip-demo-")
    config = RouterTuningConfig(
        target_capacity=args.target_capacity,
        max_steps=args.steps or plan["steps"],
        batch_size=plan["batch_size"],
        learning_rate=plan["lr"],
        save_every=0,
        seed=args.seed,
        calibration_sequences=plan["calibration"],
    )
    summary = RouterTuner(mindskip, train, held, config, output, pad, progress=progress).train()
    after = summary["heldout"]
    say(f"router-tuned {summary['steps']} steps in {summary['train_seconds']:.0f} s "
        f"({summary['train_tokens_per_s']:.0f} tokens/s); routers in {output}")
    say(f"after:  held-out perplexity {after['perplexity']:.3f} at capacity {after['capacity']:.3f} "
        f"(target {args.target_capacity})")
    say("capacity per layer: " + ", ".join(f"{k}: {v:.2f}" for k, v in after["capacity_per_layer"].items()))

    completions, skipped = generate_batch(mindskip, tokenizer, prompts[:3], 16)
    for prompt, completion, layers in zip(prompts[:3], completions, skipped):
        say(f"  {prompt!r}\n    -> {completion!r}\n    skipped attention in layers {layers}")

    sparse_forward = time_forward(mindskip, held, pad, repeats=plan["repeats"])
    sparse_generate = time_generation(mindskip, tokenizer, prompts, 16, repeats=plan["repeats"])
    say(f"speed on {device}: forward {dense_forward / sparse_forward:.2f}x, generation "
        f"{dense_generate / sparse_generate:.2f}x the unconverted model (>1 is faster)")
    result = {
        "command": "demo",
        "model": label,
        "perplexity_before": before["perplexity"],
        "perplexity_after": after["perplexity"],
        "capacity": after["capacity"],
        "capacity_per_layer": after["capacity_per_layer"],
        "target_capacity": args.target_capacity,
        "forward_speed_ratio": dense_forward / sparse_forward,
        "generate_speed_ratio": dense_generate / sparse_generate,
        "router_dir": output,
        "seconds": time.perf_counter() - started,
    }
    say(f"demo finished in {result['seconds']:.0f} s")
    emit_json(result)
    return 0
