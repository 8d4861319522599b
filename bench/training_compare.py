"""Router-Tuning measurements: full-STE vs kept-only training, and training throughput.

    python -m bench.training_compare --model tiny --seeds 3            # built-in tiny model + tasks (~2 min CPU)
    python -m bench.training_compare --model smollm2 --steps 40        # SmolLM2-135M on Alpaca (shared data)

1. Full-STE (every sequence computes the gated attention, so skipped ones get a task gradient; the
   paper's eqs. 3-4) against kept-only (the reference code), same data, seed and target capacity:
   per-step training loss and capacity, held-out loss during training, and the final held-out loss
   at the calibrated target capacity. For scale, the dense model and Attention-Drop of the same
   number of layers per sequence (among the MindSkip layers) on the same held-out data.
2. Training throughput on the same batches: a Router-Tuning step (forward, backward to the routers,
   optimizer step) with either variant, against a forward+backward of the same model with all
   weights trainable (no optimizer step).

Writes bench/results/training_compare_<model>.{json,md,png}; the throughput rows also go to the
device's results file (schema: bench/common.py). ``run(args, writer)`` is the bench.run section
interface.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch

from mindskip_ext import data as D
from mindskip_ext.config import MindSkipConfig
from mindskip_ext.eval.attention_drop import dropped_model, redundancy_scores, select_dropped
from mindskip_ext.eval.perplexity import evaluate_examples, token_nll
from mindskip_ext.layer import RoutingRecord
from mindskip_ext.loading import load_model
from mindskip_ext.model import get_mindskip_model
from mindskip_ext.testing import synthetic_instructions, train_tiny_model
from mindskip_ext.timing import time_ms
from mindskip_ext.training import LOG_NAME, RouterTuner, RouterTuningConfig

from . import common
from .common import markdown_table
from .plot import figure

SHARED_ALPACA = common.ROOT.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
VARIANTS = {"full-STE": True, "kept-only": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training_compare")
    g.add_argument("--model", default="tiny", help="'tiny' (built-in model and tasks), 'smollm2', or a model path")
    g.add_argument("--data", default=None, help=f"instruction data for a real model (default: {SHARED_ALPACA})")
    g.add_argument("--steps", type=int, default=None, help="Router-Tuning steps (default: 200 tiny, 40 otherwise)")
    g.add_argument("--batch-size", type=int, default=None, help="default: 16 tiny, 8 otherwise")
    g.add_argument("--max-length", type=int, default=128)
    g.add_argument("--target", type=float, default=0.5)
    g.add_argument("--seeds", type=int, default=1, help="training seeds per variant")
    g.add_argument("--lr", type=float, default=1e-3)


def load_setup(args, device):
    """(model, tokenizer, train examples, held-out examples, label)."""
    if args.model == "tiny":
        model, tokenizer = train_tiny_model(synthetic_instructions(3000, seed=1), progress=False)
        examples = D.prepare_examples(tokenizer, synthetic_instructions(1500, seed=0), args.max_length).examples
        label = "tiny Llama (8 layers, hidden 64), built-in tasks"
    else:
        model, tokenizer = load_model(args.model, device, torch.float32)
        source = args.data or SHARED_ALPACA
        if not Path(source).exists() and args.data is None:
            raise SystemExit(f"{SHARED_ALPACA} not found: pass --data (a local file or a hub dataset name)")
        examples = D.load_examples(source, tokenizer, args.max_length).examples
        label = f"{args.model}, {Path(str(source)).name}"
    train, held = D.split_heldout(examples, 0.1 if len(examples) > 640 else 0.2, seed=0)
    if args.model != "tiny":
        held = held[:64]  # held-out evaluations of a real model dominate the CPU time otherwise
    return model.to(device).eval(), tokenizer, train, held, label


def train_variant(base, train, held, pad, args, full_ste: bool, seed: int, out: Path) -> dict:
    model = get_mindskip_model(copy.deepcopy(base), MindSkipConfig(train_all_sequences=full_ste))
    steps = args.steps
    config = RouterTuningConfig(
        target_capacity=args.target, max_steps=steps, batch_size=args.batch_size, learning_rate=args.lr,
        seed=seed, log_every=1, eval_every=max(1, steps // 5), save_every=0,
        calibration_sequences=256 if args.model == "tiny" else 128,
    )
    summary = RouterTuner(model, train, held, config, out, pad, progress=False).train()
    log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    return {
        "model": model,
        "steps": [e["step"] for e in log if "ce" in e],
        "train_ce": [e["ce"] for e in log if "ce" in e],
        "capacity": [e["capacity"] for e in log if "ce" in e],
        "heldout_steps": [e["step"] for e in log if "heldout" in e and not e.get("final")],
        "heldout_ce": [e["heldout"]["loss"] for e in log if "heldout" in e and not e.get("final")],
        "capacity_before_calibration": summary["calibration"]["capacity_history"][0],
        "final": summary["heldout"],
        "train_tokens_per_s": summary["train_tokens_per_s"],
    }


def throughput(base, variants: dict, train, pad, args, device, writer) -> list[dict]:
    """Median step time on the same batches: Router-Tuning steps vs all-weights forward+backward."""
    index = D.length_batches([len(e) for e in train], args.batch_size, shuffle=True, seed=0)[:6]
    batches = [{k: v.to(device) for k, v in D.collate([train[i] for i in b], pad).items()} for b in index]
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    rows, cursor = [], {"i": 0}

    def next_batch():
        batch = batches[cursor["i"] % len(batches)]
        cursor["i"] += 1
        return batch

    def router_step(model, optimizer):
        def step():
            batch = next_batch()
            record = RoutingRecord()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                           mindskip_record=record).logits
            nll, count = token_nll(logits, batch["labels"])
            gates = torch.stack(list(record.gates().values()))
            (nll / count + 0.1 * gates.mean()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    providers = {}
    for name, result in variants.items():
        model = result["model"]
        model.train()
        providers[f"router-tuning {name}"] = router_step(model, torch.optim.AdamW(model.router_parameters(), lr=0.0))
    full = copy.deepcopy(base).train()
    for p in full.parameters():
        p.requires_grad_(True)

    def full_step():
        batch = next_batch()
        logits = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        nll, count = token_nll(logits, batch["labels"])
        (nll / count).backward()
        full.zero_grad(set_to_none=True)

    providers["all weights fwd+bwd"] = full_step
    reference_ms = None
    for provider, fn in reversed(list(providers.items())):
        times = time_ms(fn, device, reps=len(batches) * 2, warmup=2, budget_s=120.0)
        median = statistics.median(times)
        reference_ms = reference_ms or median
        row = writer.add(
            "training", "train_step", provider,
            {"model": args.model, "batch_size": args.batch_size, "max_length": args.max_length, "target": args.target},
            times, tokens_per_s=tokens / (median / 1e3), speedup_vs_all_weights=reference_ms / median,
        )
        rows.append(row)
    return rows


def plot(results: dict, path: Path, label: str) -> None:
    title = f"Router-Tuning to capacity 0.5: full-STE vs kept-only ({label})"
    with figure(path, 2, (11, 4), title) as (ax_loss, ax_cap):
        for (name, runs), color in zip(results.items(), ("tab:blue", "tab:orange"), strict=False):
            for k, run in enumerate(runs):
                smooth, value = [], None
                for x in run["train_ce"]:
                    value = x if value is None else 0.9 * value + 0.1 * x
                    smooth.append(value)
                tag = name if k == 0 else None
                ax_loss.plot(run["steps"], smooth, color=color, alpha=0.6, label=f"{tag} train (EMA)" if tag else None)
                ax_loss.plot(run["heldout_steps"], run["heldout_ce"], "o--", color=color,
                             label=f"{tag} held-out" if tag else None)
                ax_cap.plot(run["steps"], run["capacity"], color=color, alpha=0.5, label=tag)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("CE (response tokens)")
        ax_loss.legend()
        ax_cap.set_xlabel("step")
        ax_cap.set_ylabel("batch capacity")
        ax_cap.legend()


def run(args, writer) -> None:
    device = writer.device
    if args.steps is None:
        args.steps = 200 if args.model == "tiny" else 40
    if args.batch_size is None:
        args.batch_size = 16 if args.model == "tiny" else 8
    base, tokenizer, train, held, label = load_setup(args, device)
    pad = D.pad_token_id(tokenizer)
    print(f"{label}: {len(train)} training / {len(held)} held-out sequences", flush=True)
    dense = evaluate_examples(base, held, pad, 16)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name, full_ste in VARIANTS.items():
                run_result = train_variant(base, train, held, pad, args, full_ste, seed, Path(tmp) / f"{name}-{seed}")
                results[name].append(run_result)
                final = run_result["final"]
                print(f"seed {seed} {name}: held-out CE {final['loss']:.4f} at capacity {final['capacity']:.3f} "
                      f"(before calibration {run_result['capacity_before_calibration']:.3f}), "
                      f"{run_result['train_tokens_per_s']:.0f} tok/s", flush=True)
    # Static dropping of as many attention layers per sequence as MindSkip skips, among the MindSkip layers.
    first = results["full-STE"][0]
    n_drop = round(first["final"]["skipped_layers_per_sequence"])
    candidates = sorted(first["model"].routers)
    scores = redundancy_scores(base, train[:256], pad, "attn", 16)
    dropped = select_dropped(scores, n_drop, candidates)
    drop = evaluate_examples(dropped_model(copy.deepcopy(base), dropped), held, pad, 16)
    rows = throughput(base, {name: runs[0] for name, runs in results.items()}, train, pad, args, device, writer)

    slug = args.model if args.model in ("tiny", "smollm2") else Path(args.model).name
    out = common.RESULTS_DIR / f"training_compare_{slug}"
    summary = {
        "setup": {"label": label, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                  "target": args.target, "lr": args.lr, "seeds": args.seeds, "train": len(train), "heldout": len(held),
                  "device": common.device_name(device), "git_commit": common.git_commit()},
        "dense": {"heldout_ce": dense["loss"]},
        "attention_drop": {"layers": dropped, "heldout_ce": drop["loss"]},
        "variants": {
            name: [{k: v for k, v in r.items() if k != "model"} for r in runs] for name, runs in results.items()
        },
        "throughput": [{k: row[k] for k in ("provider", "median_ms", "metrics")} for row in rows],
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, out.with_suffix(".png"), label)
    out.with_suffix(".md").write_text(render(summary))
    print(render(summary))


def render(summary: dict) -> str:
    s = summary["setup"]
    variants = []
    for name, runs in summary["variants"].items():
        ce = [r["final"]["loss"] for r in runs]
        cap = [r["final"]["capacity"] for r in runs]
        pre = [r["capacity_before_calibration"] for r in runs]
        tps = [r["train_tokens_per_s"] for r in runs]
        spread = f" ± {statistics.stdev(ce):.4f}" if len(ce) > 1 else ""
        variants.append([name, f"{statistics.mean(ce):.4f}{spread}", f"{statistics.mean(cap):.3f}",
                         f"{statistics.mean(pre):.3f}", f"{statistics.mean(tps):.0f}"])
    variants += [
        ["dense (no skipping)", f"{summary['dense']['heldout_ce']:.4f}", "1.000", "", ""],
        [f"Attention-Drop, layers {summary['attention_drop']['layers']}",
         f"{summary['attention_drop']['heldout_ce']:.4f}", "", "", ""],
    ]
    steps = [[row["provider"], f"{row['median_ms']:.1f}", f"{row['metrics']['tokens_per_s']:.0f}",
              f"{row['metrics']['speedup_vs_all_weights']:.2f}x"] for row in summary["throughput"]]
    lines = [
        f"# Router-Tuning: full-STE vs kept-only ({s['label']})",
        "",
        f"{s['steps']} steps, batch {s['batch_size']}, max length {s['max_length']}, lr {s['lr']}, target capacity "
        f"{s['target']}, {s['seeds']} seed(s); {s['train']} training / {s['heldout']} held-out sequences; "
        f"{s['device']}; commit {s['git_commit']}.",
        "",
        *markdown_table(["variant", "held-out CE (calibrated)", "held-out capacity", "capacity before calibration",
                         "train tok/s"], variants),
        "",
        *markdown_table(["step timing (same batches)", "median ms", "tokens/s", "speed vs all-weights fwd+bwd"],
                        steps),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.training_compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    writer = common.Writer(common.resolve_device(args.device))
    run(args, writer)
    writer.finish()


if __name__ == "__main__":
    main()
