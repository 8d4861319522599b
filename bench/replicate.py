"""Router-Tuning's Table 1 and Figure 2, replicated at small scale on SmolLM2-135M-Instruct.

    python -m bench.replicate            # about 90 minutes on a 2-core CPU: subsampled, sizes in the output
    python -m bench.replicate --full     # the paper's sizes (every item, HellaSwag 10-shot): for a GPU
    python -m bench.replicate --smoke    # a tiny config model and a handful of items: checks the pipeline

What it does (the paper's setting: MindSkip on the last half of the layers except the last, 14..28 of 30,
target capacity 0.5, Router-Tuning on instruction data):

1. Router-tunes attn, mlp and block MindSkip with our procedure (masked-mean router input, straight-through
   gradient for every sequence, target-capacity control) on the Alpaca-style file of the shared data.
2. Evaluates the unconverted model and each MindSkip model with stock lm-eval on local task definitions
   (:mod:`bench.local_tasks`: PIQA, BoolQ, RTE, HellaSwag, OpenBookQA, MMLU), WikiText-2 perplexity,
   and the capacity reached per task.
3. Static Attention-Drop (:mod:`mindskip_ext.eval.attention_drop`) at a sweep of skip ratios (12.5/25/37.5/50% of the
   attention sublayers) plus the two layer counts around MindSkip-Attn's measured skip ratio: Figure 2.
4. The reference code's procedure (unmasked mean over padding, gradient only through kept sequences, a fixed
   lambda) for attn, brought to the same capacity as ours, against ours.

Writes ``replication.md`` (tables in the layout of the paper's Table 1), ``replication.json`` (every number,
sizes, timings, machine) and ``replication_figure2.png`` to ``--output`` (default ``bench/results``; a
temporary folder for ``--smoke``); :mod:`bench.replicate_report` renders them. The shared data is read in
place (``--data-dir``, default ``../shared/data`` beside the repository) and never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .common import RESULTS_DIR
from .experiment import (
    ALPACA,
    DEFAULT_DATA_DIR,
    METRIC,
    TASKS,
    WIKITEXT,
    Run,
    check_data_and_model,
    evaluate,
    heldout_summary,
    load_model,
    start_run,
    wikitext_examples,
)
from .replicate_report import findings, skip_ratio, write_outputs

TARGET_CAPACITY = 0.5
SWEEP = (0.125, 0.25, 0.375, 0.5)  # Attention-Drop skip ratios (share of all attention sublayers): Figure 2


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the cost of a run; written to the output."""

    train_records: int | None  # instruction records read (None: all)
    heldout_fraction: float  # of those, held out for the loss / capacity of the trained routers
    max_length: int  # tokens per training sequence
    batch_size: int
    steps: int | None  # optimizer steps per Router-Tuning run (None: one epoch)
    learning_rate: float
    calibration_sequences: int  # training sequences for the final capacity calibration
    task_limit: dict[str, int | None]  # scored items per task (None: all)
    mmlu_per_subject: int | None
    mmlu_subjects: list[str] | None  # None: all 57
    num_fewshot: dict[str, int]  # shots that differ from the paper's
    ppl_block: int  # WikiText-2 perplexity: non-overlapping blocks of this many tokens
    ppl_blocks: int | None  # how many blocks (None: the whole test set)
    drop_records: int  # calibration records for Attention-Drop's similarity scores
    eval_batch_size: int
    seed: int = 0


PRESETS = {
    # Sized for ~90 min on a 2-core CPU to itself: ~500 tok/s forward (plain batches; MindSkip's exact same-length
    # batching in lm-eval is slower), ~150 tok/s router-tuning (SmolLM2-135M, fp32). ~130k tokens per evaluation.
    "default": Sizes(
        train_records=None, heldout_fraction=0.05, max_length=256, batch_size=8, steps=24, learning_rate=2e-3,
        calibration_sequences=64,
        task_limit={"local_piqa": 200, "local_boolq": 100, "local_rte": 150, "local_hellaswag": 100,
                    "local_openbookqa": 200},
        mmlu_per_subject=1, mmlu_subjects=None, num_fewshot={"local_hellaswag": 0},
        ppl_block=1024, ppl_blocks=8, drop_records=64, eval_batch_size=8,
    ),
    # The paper's evaluation sizes and shots; one epoch of Router-Tuning over the instruction file.
    "full": Sizes(
        train_records=None, heldout_fraction=0.1, max_length=512, batch_size=8, steps=None, learning_rate=1e-3,
        calibration_sequences=512, task_limit={}, mmlu_per_subject=None, mmlu_subjects=None, num_fewshot={},
        ppl_block=1024, ppl_blocks=None, drop_records=256, eval_batch_size=16,
    ),
    # A tiny config model: checks every stage end to end in a couple of minutes.
    "smoke": Sizes(
        train_records=96, heldout_fraction=0.1, max_length=64, batch_size=8, steps=4, learning_rate=2e-3,
        calibration_sequences=16, task_limit=dict.fromkeys(TASKS, 4), mmlu_per_subject=2,
        mmlu_subjects=["anatomy", "virology"], num_fewshot={"local_hellaswag": 2, "local_mmlu": 2},
        ppl_block=64, ppl_blocks=2, drop_records=16, eval_batch_size=8,
    ),
}


# ------------------------------------------------------------------------------------------ train


def router_tune(run: Run, name: str, base, tokenizer, granularity: str, procedure: str, train, heldout, work: Path,
                l1_lambda: float | None = None):
    """Router-Tuning of ``base`` converted at ``granularity``; returns (MindSkip model, training entry)."""
    import mindskip_ext as msk
    from mindskip_ext.config import default_layers
    from mindskip_ext.data import pad_token_id
    from mindskip_ext.eval.perplexity import evaluate_examples
    from mindskip_ext.training import LOG_NAME, RouterTuner, RouterTuningConfig, calibrate_capacity

    sizes, pad = run.sizes, pad_token_id(tokenizer)
    ours = procedure == "ours"
    config = msk.MindSkipConfig(
        granularity=granularity, layers=default_layers(base.config.num_hidden_layers), threshold=0.5,
        train_all_sequences=ours, pool_padding=not ours,
    )
    model = msk.get_mindskip_model(base, config)
    tuning = RouterTuningConfig(
        target_capacity=TARGET_CAPACITY if ours else None, l1_lambda=None if ours else l1_lambda,
        learning_rate=sizes.learning_rate, batch_size=sizes.batch_size, max_steps=sizes.steps, seed=sizes.seed,
        log_every=1, save_every=0, calibration_sequences=sizes.calibration_sequences,
        eval_batch_size=sizes.eval_batch_size,
    )
    out = work / name
    with run.stage(f"train {name}"):
        summary = RouterTuner(model, train, heldout, tuning, out, pad, progress=True).train()
        entry = {
            "procedure": procedure,
            "granularity": granularity,
            "layers": config.layers,
            "mindskip_config": config.to_dict(),
            "tuning": {k: v for k, v in asdict(tuning).items() if v is not None},
            "train_seconds": summary["train_seconds"],
            "train_tokens_per_s": summary["train_tokens_per_s"],
            "steps": summary["steps"],
            "trainable_parameters": summary["trainable_parameters"],
            "calibration": summary["calibration"],
            "heldout": heldout_summary(summary["heldout"]),
            "curves": [
                {k: e[k] for k in ("step", "ce", "loss", "capacity", "penalty_coefficient") if k in e}
                for e in map(json.loads, (out / LOG_NAME).read_text().splitlines()) if "ce" in e
            ],
        }
        if not ours:
            # Matched capacity: the same common bias shift our procedure ends with, to the same target.
            entry["heldout_before_calibration"] = entry["heldout"]
            entry["calibration"] = calibrate_capacity(
                model, train[: sizes.calibration_sequences], TARGET_CAPACITY, pad, sizes.eval_batch_size)
            entry["heldout"] = heldout_summary(evaluate_examples(model, heldout, pad, sizes.eval_batch_size))
    run.say(f"{name}: held-out capacity {entry['heldout']['capacity']:.3f}, loss {entry['heldout']['loss']:.4f}, "
        f"{entry['train_tokens_per_s']:.0f} tok/s")
    return model, entry


def reference_lambda(entry: dict) -> float:
    """The fixed lambda for the reference procedure: our controller's mean coefficient over its last half of steps.

    That is the lambda which held our run at the target, so the reference starts from a value known to balance
    the task loss at this capacity instead of a hand-tuned one.
    """
    coefficients = [c["penalty_coefficient"] for c in entry["curves"]]
    tail = coefficients[len(coefficients) // 2 :] or coefficients
    return max(0.0, sum(tail) / len(tail))


# -------------------------------------------------------------------------------------------- run


def replicate(args) -> Run:
    from mindskip_ext.data import load_examples, pad_token_id, split_heldout
    from mindskip_ext.eval.attention_drop import dropped_model, redundancy_scores, select_dropped

    from . import local_tasks

    sizes = PRESETS[args.preset]
    run = start_run("replicate", args, sizes, "replication", train_data=str(args.train_data),
                    load_average_start=os.getloadavg())
    started, cpu_started = time.perf_counter(), time.process_time()
    work = Path(args.work_dir)

    with run.stage("load model"):
        base, tokenizer, label = load_model(args.smoke, args.model, args.data_dir, sizes.seed)
    num_layers = base.config.num_hidden_layers
    run.meta.update(model=label, num_layers=num_layers)
    with run.stage("write task definitions"):
        written = local_tasks.write_tasks(
            args.data_dir, work / "tasks", tasks=list(TASKS), limit=sizes.task_limit, num_fewshot=sizes.num_fewshot,
            mmlu_limit=sizes.mmlu_per_subject, mmlu_subjects=sizes.mmlu_subjects, seed=1234,
        )
        ppl_examples = wikitext_examples(args.data_dir / WIKITEXT, tokenizer, sizes.ppl_block, sizes.ppl_blocks)
        prepared = load_examples(args.train_data, tokenizer, sizes.max_length, max_records=sizes.train_records)
        train, heldout = split_heldout(prepared.examples, sizes.heldout_fraction, sizes.seed)
    run.meta.update(
        items=written.sizes, items_available=written.totals, num_fewshot=written.num_fewshot,
        paper_shots={t: local_tasks.PAPER_SHOTS[t] for t in TASKS}, metric=METRIC,
        wikitext2={"blocks": len(ppl_examples), "block_tokens": sizes.ppl_block,
                   "tokens": sum(len(e) for e in ppl_examples)},
        train_examples=len(train), heldout_examples=len(heldout), train_data_stats=prepared.stats,
    )

    task_eval = {"batch_size": sizes.eval_batch_size, "seed": sizes.seed, "tasks_dir": written.path,
                 "ppl_examples": ppl_examples}
    if args.resume:
        run.resume()
    if "dense" not in run.models:
        evaluate(run, "dense", base, tokenizer, {"kind": "dense", "label": label}, **task_eval)

    trained = {}
    for granularity in ("attn", "mlp", "block"):
        name = f"mindskip-{granularity}"
        if name in run.models:
            trained[granularity] = run.models[name]
            continue
        model, entry = router_tune(run, name, base, tokenizer, granularity, "ours", train, heldout, work)
        evaluate(run, name, model, tokenizer, {"kind": "mindskip", **entry}, **task_eval)
        trained[granularity] = entry
        model.unload()

    lam = reference_lambda(trained["attn"])
    if "reference-attn" not in run.models:
        model, entry = router_tune(run, "reference-attn", base, tokenizer, "attn", "reference", train, heldout, work,
                                   l1_lambda=lam)
        evaluate(run, "reference-attn", model, tokenizer, {"kind": "mindskip", **entry}, **task_eval)
        model.unload()

    with run.stage("attention-drop scores"):
        scores = redundancy_scores(base, train[: sizes.drop_records], pad_token_id(tokenizer), "attn",
                                   sizes.eval_batch_size)
    attn_ratio = skip_ratio(run.models["mindskip-attn"], num_layers)
    counts = sorted({max(1, round(r * num_layers)) for r in SWEEP}
                    | {max(1, math.floor(attn_ratio * num_layers)), max(1, math.ceil(attn_ratio * num_layers))})
    run.meta["attention_drop"] = {"similarity": {str(k): v for k, v in scores.items()}, "counts": counts,
                                  "calibration_sequences": min(len(train), sizes.drop_records)}
    for n in counts:
        if f"attention-drop-{n}" in run.models:
            continue
        dropped = select_dropped(scores, n)
        model = dropped_model(base, dropped, "attn")
        # Its routing does not depend on the input (always skip), so the converted model runs exactly through the
        # plain (padded-batch) evaluation path, which is faster than MindSkip's same-length batching; capacity is
        # 0 on the dropped layers by construction.
        entry = evaluate(run, f"attention-drop-{n}", model.base_model, tokenizer,
                         {"kind": "attention-drop", "n": n, "dropped_layers": dropped, "skip_ratio": n / num_layers},
                         **task_eval)
        for task in entry["tasks"].values():
            task["capacity"] = 0.0
        entry["task_capacity"] = 0.0
        model.unload()

    run.meta["findings"] = findings(run.models, num_layers)
    run.timings["total"] = round(time.perf_counter() - started, 1)
    # Other processes on the machine slow a run down: its CPU share says how much it had to itself.
    cpu_seconds = time.process_time() - cpu_started
    run.meta.update(load_average_end=os.getloadavg(), process_cpu_seconds=round(cpu_seconds, 1),
                    cpu_share=round(cpu_seconds / run.timings["total"] / torch.get_num_threads(), 3))
    return run


# -------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.replicate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="Tiny config model, a handful of items (minutes).")
    size.add_argument("--full", action="store_true", help="The paper's sizes: every item, paper shots (GPU).")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"Shared data folder (default: {DEFAULT_DATA_DIR}).")
    p.add_argument("--train-data", default=None,
                   help="Router-Tuning data: a local file or a datasets name "
                        "(default: <data-dir>/instruct/alpaca_en_demo.json).")
    p.add_argument("--model", default=None,
                   help="Model folder (default: SmolLM2-135M-Instruct via mindskip_ext.offline_models).")
    p.add_argument("--output", type=Path, default=None,
                   help="Results folder (default: bench/results; a temporary folder with --smoke).")
    p.add_argument("--work-dir", default=None, help="Routers and task files (default: a temporary folder).")
    p.add_argument("--resume", action="store_true",
                   help="Reuse the models already evaluated in <output>/replication.partial.json "
                        "(an interrupted run).")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice). Use 1 when other jobs share the cores: "
                        "multi-threaded ops slow down many-fold when a thread is descheduled.")
    args = p.parse_args(argv)
    args.preset = "smoke" if args.smoke else "full" if args.full else "default"
    check_data_and_model(p, args)
    args.train_data = args.train_data or str(args.data_dir / ALPACA)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    output = args.output = args.output or (
        Path(tempfile.mkdtemp(prefix="mindskip-smoke-")) if args.smoke else RESULTS_DIR)
    with tempfile.TemporaryDirectory(prefix="mindskip-replicate-") as tmp:
        args.work_dir = args.work_dir or tmp
        run = replicate(args)
    paths = write_outputs(run, output)
    run.partial.unlink(missing_ok=True)
    run.announce(paths, findings=run.meta["findings"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
