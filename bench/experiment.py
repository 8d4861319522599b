"""What the replication (:mod:`bench.replicate`) and the Pareto study (:mod:`bench.pareto`) share: the record of a
run with its stage timings and resumable partial results, the model and the evaluation data, and the evaluation.

The shared data is read in place (``--data-dir``, default ``../shared/data`` beside the repository) and never
copied into the repository.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .common import ROOT, machine_info, utc_timestamp

DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data"
ALPACA = Path("instruct") / "alpaca_en_demo.json"
WIKITEXT = Path("text") / "wikitext2-test.txt"
TASKS = ("local_piqa", "local_boolq", "local_rte", "local_hellaswag", "local_openbookqa", "local_mmlu")
# acc_norm where lm-eval's stock task defines it (length-normalised choice scores), acc otherwise.
METRIC = {t: "acc_norm" if t in ("local_piqa", "local_hellaswag", "local_openbookqa") else "acc" for t in TASKS}
MACHINE_PACKAGES = ("torch", "transformers", "lm_eval", "datasets", "mindskip_ext")  # versions recorded


def say(message: str, tag: str) -> None:
    print(f"[{tag}] {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """Results and bookkeeping of one experiment run: every model's entry, the stage timings, the metadata."""

    tag: str  # the experiment's name: the prefix of its log lines
    preset: str
    sizes: Any
    timings: dict[str, float] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    partial: Path | None = None  # results so far, rewritten after every evaluation (a crash keeps them)

    def say(self, message: str) -> None:
        say(message, self.tag)

    @contextmanager
    def stage(self, name: str):
        self.say(f"--- {name}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 1)
            self.say(f"--- {name}: {self.timings[name]:.0f} s")

    def announce(self, paths: dict[str, Path], **summary) -> None:
        """Say where each output went; print the one JSON line: ``summary``, the total seconds (null for results
        that never finished, e.g. a report written again from partial results), the paths."""
        for kind, path in paths.items():
            self.say(f"wrote {kind}: {path}")
        print(json.dumps({**summary, "total_seconds": self.timings.get("total"),
                          "outputs": {k: str(v) for k, v in paths.items()}}))

    def save_partial(self) -> None:
        if self.partial is not None:
            # Written beside and renamed over, so that a reader (a side run's --merge) never sees half a file.
            tmp = self.partial.with_name(self.partial.name + ".tmp")
            tmp.write_text(json.dumps({"preset": self.preset, "timings": self.timings, "models": self.models,
                                       "meta": self.meta}, indent=2, sort_keys=True, default=str) + "\n")
            tmp.replace(self.partial)

    def resume(self, finished: Path | None = None) -> None:
        """Take the finished stages of an interrupted run from its partial results (same preset and output), or,
        where there are none (a fresh clone), from ``finished``: the results a completed run wrote (its JSON)."""
        source = self.partial
        if source is None or not source.is_file():
            if finished is None or not finished.is_file():
                also = f" and no finished results at {finished}" if finished is not None else ""
                raise SystemExit(f"--resume: no partial results at {self.partial}{also}")
            source = finished
        kind = "partial" if source == self.partial else "finished"
        models, timings = read_results(source, "--resume", f"{kind} {self.tag}", self.preset)
        self.models.update(models)
        self.timings.update({k: v for k, v in timings.items() if k.startswith(("train ", "evaluate "))})
        self.meta["resumed"] = sorted(models)
        self.say(f"resumed {', '.join(sorted(models))} from {source}")


def read_results(path: Path, flag: str, what: str, preset: str) -> tuple[dict, dict]:
    """The models and timings of the results file ``path`` (partial or finished); ``flag``, the option that reads
    it, names the problem when the file is not ``what`` result or is of another preset than ``preset``."""
    try:
        saved = json.loads(path.read_text())
        models, timings = saved["models"], saved["timings"]
    except (ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{flag}: {path} is not a {what} result ({err})") from None
    if saved.get("preset", preset) != preset:
        raise SystemExit(f"{flag}: {path} is from the {saved['preset']!r} preset, not {preset!r}")
    return models, timings


def start_run(tag: str, args, sizes, results: str, **meta) -> Run:
    """A new run of experiment ``tag`` into ``args.output`` (its partial results there as
    ``<results>.partial.json``), with its start time, machine and data folder in the metadata beside ``meta``;
    torch seeded with ``sizes.seed``."""
    run = Run(tag, args.preset, sizes, partial=args.output / f"{results}.partial.json")
    args.output.mkdir(parents=True, exist_ok=True)
    run.meta.update(started=utc_timestamp(), machine=machine_info(MACHINE_PACKAGES), data_dir=str(args.data_dir),
                    **meta)
    torch.manual_seed(sizes.seed)
    return run


def skip_ratios(parser, text: str) -> list[float]:
    """``--ratios``: comma-separated skip ratios, each in (0, 1), sorted and without repeats (empty: none); a
    parser error names a bad one."""
    try:
        ratios = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        parser.error(f"--ratios takes comma-separated numbers, got {text!r}")
    if not all(0.0 < r < 1.0 for r in ratios):
        parser.error(f"--ratios must be skip ratios in (0, 1), got {ratios}")
    return ratios


def check_data_and_model(parser, args) -> None:
    """The shared data folder (``args.data_dir``, resolved) must be there, and ``--smoke`` builds its own model."""
    if not (args.data_dir / "eval").is_dir():
        parser.error(f"the shared data folder {args.data_dir} is missing (pass --data-dir; see "
                     "../shared/data/README.md)")
    args.data_dir = args.data_dir.resolve()
    if args.smoke and args.model:
        parser.error("--smoke builds its own tiny model; drop --model")


def smoke_model(data_dir: Path, seed: int):
    """A random tiny Llama (8 layers, hidden 64) and a word tokenizer trained on the instruction file."""
    from mindskip_ext.testing import tokenizer_corpus, train_word_tokenizer, word_llama

    records = json.loads((data_dir / ALPACA).read_text())
    tokenizer = train_word_tokenizer(tokenizer_corpus(records))
    model = word_llama(tokenizer, intermediate=128, max_position_embeddings=4096, seed=seed)
    return model, tokenizer, "tiny random Llama (8 layers, hidden 64; --smoke)"


def load_model(smoke: bool, model: str | None, data_dir: Path, seed: int):
    """(model, tokenizer, label): the --smoke model, ``model``, or SmolLM2 (fetched once); fp32, sdpa."""
    from mindskip_ext.devices import pick_device
    from mindskip_ext.loading import load_model as load

    if smoke:
        return smoke_model(data_dir, seed)
    hf_model, tokenizer = load(model or "smollm2", pick_device("auto"), torch.float32)
    return hf_model, tokenizer, str(model) if model else "SmolLM2-135M-Instruct"


def wikitext_examples(path: Path, tokenizer, block: int, blocks: int | None):
    """Non-overlapping ``block``-token windows of the raw test file, every token scored (standard perplexity)."""
    from mindskip_ext.data import Example

    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    windows = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
    windows = windows[:blocks] if blocks is not None else windows
    return [Example(list(w), list(w)) for w in windows]


def binomial_stderr(accuracy: float, items: int) -> float:
    """Standard error of an accuracy over ``items`` independent items (lm-eval's sample-stddev / sqrt(n))."""
    return math.sqrt(accuracy * (1.0 - accuracy) / max(1, items - 1))


def heldout_summary(result: dict) -> dict:
    return {k: result[k] for k in ("loss", "perplexity", "capacity", "capacity_per_layer", "sequences") if k in result}


def evaluate(run: Run, name: str, model, tokenizer, entry: dict, *, batch_size: int, seed: int = 0,
             tasks_dir: Path | None = None, ppl_examples=None, heldout=None) -> dict:
    """Evaluate ``model`` and record it as ``run.models[name]``: stock lm-eval on the local tasks (score, its
    standard error and capacity per task; the average with its standard error), WikiText-2 perplexity and the
    held-out instruction loss, each where given."""
    from mindskip_ext.data import pad_token_id
    from mindskip_ext.eval.harness import run_lm_eval
    from mindskip_ext.eval.perplexity import evaluate_examples

    pad = pad_token_id(tokenizer)
    with run.stage(f"evaluate {name}"):
        if ppl_examples is not None:
            ppl = evaluate_examples(model, ppl_examples, pad, batch_size)
            entry["wikitext2"] = {k: ppl[k] for k in ("perplexity", "loss", "target_tokens", "capacity",
                                                       "capacity_per_layer", "skipped_layers_per_sequence")}
        if heldout is not None:
            entry["heldout"] = heldout_summary(evaluate_examples(model, heldout, pad, batch_size))
        if tasks_dir is not None and (ppl_examples is not None or heldout is not None):
            # The tasks take longest: an evaluation interrupted in them keeps the losses (a resume adds the tasks).
            run.models[name] = entry
            run.save_partial()
        if tasks_dir is not None:
            report = run_lm_eval(model, tokenizer, [(t, None) for t in TASKS], batch_size=batch_size,
                                 include_path=str(tasks_dir), include_defaults=False, seed=seed)["tasks"]
            tasks = {task: {"score": report[task]["metrics"][f"{METRIC[task]},none"],
                            "stderr": binomial_stderr(report[task]["metrics"][f"{METRIC[task]},none"],
                                                      report[task]["metrics"]["sample_len"]),
                            "metric": METRIC[task],
                            **{k: report[task][k] for k in ("metrics", "num_fewshot", "capacity",
                                                            "capacity_per_layer")}}
                     for task in TASKS}
            errors = [t["stderr"] for t in tasks.values()]
            entry.update(tasks=tasks, avg=sum(t["score"] for t in tasks.values()) / len(tasks),
                         avg_stderr=math.sqrt(sum(e * e for e in errors)) / len(errors))
            capacities = [t["capacity"] for t in tasks.values() if t["capacity"] is not None]
            entry["task_capacity"] = sum(capacities) / len(capacities) if capacities else None
    entry["eval_seconds"] = run.timings[f"evaluate {name}"]
    run.models[name] = entry
    run.save_partial()
    parts = []
    if "avg" in entry:
        parts.append(f"avg {100 * entry['avg']:.1f}")
    if "wikitext2" in entry:
        parts.append(f"WikiText-2 ppl {entry['wikitext2']['perplexity']:.2f}")
    if "heldout" in entry:
        parts.append(f"held-out loss {entry['heldout']['loss']:.4f}")
    run.say(f"{name}: " + ", ".join(parts))
    return entry
