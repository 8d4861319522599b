"""MindSkip against static Attention-Drop at the same skip ratio on SmolLM2-135M: which Router-Tuning recipe wins,
and the Pareto curves that show it (perplexity and accuracy against the share of attention sublayers skipped).

    python -m bench.pareto --stage ablation          # every recipe at 25%: held-out loss, WikiText-2, dynamics
    python -m bench.pareto --stage ablation --ratios 0.125,0.375 --recipes kd+init+wide   # a recipe at more ratios
    python -m bench.pareto --stage pareto            # every method at 12.5/25/37.5%, with the six tasks
    python -m bench.pareto --smoke                   # a tiny model and a handful of items: checks every stage

Recipes (the levers of Router-Tuning; ``paper`` is the paper's: CE, zero init, layers 14..28, Alpaca):

* ``loss``: ``ce``, or ``kd``: self-distillation from the same model with its routers bypassed;
* ``init``: ``zero``, or ``redundancy``: router biases from Attention-Drop's scores (the static drop as the start),
  or ``cost``: from the measured cost of skipping each layer alone (the cheapest static drop by that measure), or
  ``joint``: a greedy search on the joint cost of the skipped set; ``margin``: the whole layers of the target start
  skipped and the next-ranked one at the threshold;
* ``centre``: the routers train on their input less its mean over the calibration sequences;
* ``layers``: ``paper`` (the last half but the last), or ``wide`` (every layer but the first few and the last);
* ``data``: ``alpaca``, or ``mix``: Alpaca with GSM8K's train split and WikiText-2's validation text, as many
  examples as Alpaca alone (the same budget), or ``mix4``: the same with Python code (its train split);
* ``path``: the start is kd-joint's recorded search path (``JOINT_PATH``), without searching again; ``cost``: the
  routers are fitted to the per-sequence skip costs around the start (cost-supervised routers), then trained for
  the recipe's steps (0: the fit alone);
* ``hold``: the capacity multiplier starts at 1 instead of 0, so that a redundancy init, already at the target, is
  held there from the first step (with 0 the task loss first pulls every router to keep); ``slow``: lr 5e-4.

Every model is trained for one epoch to a target capacity that gives the skip ratio: capacity =
1 - ratio * num_layers / len(layers). Methods per ratio: dense; Attention-Drop over all layers and restricted to
the paper's layers (the better one by WikiText-2 perplexity gets the tasks); the paper recipe; the best recipe
(``--best``, default: the ablation's furthest below Attention-Drop at its own skip ratio, WikiText-2 and held-out
averaged); and the best recipe's static projection (its least-kept layers always skipped, as many as it skips per
sequence on training data, the others always kept).
Metrics: WikiText-2 test perplexity (the whole split), the held-out Alpaca loss, the six local tasks with the
standard error of their average, the capacity and the measured skip ratio, and how dynamic the routing is.

A MindSkip model skips a different share on each evaluation set (its routers see the input), so a nominal ratio
does not match it to Attention-Drop. Every stage therefore also evaluates Attention-Drop, over all layers and
restricted to the paper's, with the whole numbers of layers around each MindSkip model's measured skips per
sequence, on WikiText-2 and on the held-out set (``attention-drop-<scope>@<k>/<layers>``), and the report
interpolates between the better of the two at each count: the comparison at the same skip ratio, set by set.
How much per-sequence routing could gain over the best static drop at all, and how much of it each model takes,
is measured on the held-out set (:mod:`mindskip_ext.eval.headroom`).

Everything is resumable (``--resume``): finished models come from ``<output>/pareto.partial.json`` (or, on a
fresh clone, from the committed ``<output>/pareto.json``), trained routers and their checkpoints from
``<output>/pareto_routers/<preset>/<model>`` (committed with the results: a few KB each, so that a later session
evaluates them again without training them again), the task files and cached skip costs from ``--work-dir``.
Writes ``pareto.json`` (every model of both stages), the stage's report (the ablation's ``pareto_ablation.md``, the
Pareto stage's ``pareto.md``: the models on its whole split) and two figures.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    load_model,
    read_results,
    skip_ratios,
    start_run,
    wikitext_examples,
)
from .pareto_report import best_recipe, counts_around, skipped_per_sequence, write_outputs

RATIOS = (0.125, 0.25, 0.375)
ABLATION_RATIO = 0.25
METHODS = ("attention-drop", "paper", "best", "static", "matched")  # what the Pareto stage evaluates at each ratio
DROP_SCOPES = ("all", "restricted")
GSM8K = Path("eval") / "gsm8k" / "train.jsonl"
WIKITEXT_TRAIN = Path("text") / "wikitext2-valid.txt"
CODE_TRAIN = Path("text") / "code-python-train.jsonl"
DEFAULT_WORK_DIR = Path.home() / ".cache" / "mindskip_ext" / "pareto-work"


@dataclass(frozen=True)
class Recipe:
    loss: str = "ce"
    init: str = "zero"
    layers: str = "paper"
    data: str = "alpaca"
    multiplier: float = 0.0  # the capacity multiplier's start (``initial_multiplier``)
    learning_rate: float | None = None  # None: the preset's
    steps: int | None = None  # None: the preset's (one epoch)
    init_sequences: int | None = None  # calibration sequences of a static init (None: the preset's)
    margin: bool = False  # the static init's next-ranked layer starts at the threshold (``router_init_margin``)
    centre: bool = False  # centred router inputs (``centre_router_inputs``)
    cost: bool = False  # cost-supervised routers fitted after the start (``cost_routers``)


RECIPES = {
    "paper": Recipe(),
    "kd": Recipe(loss="kd"),
    "init": Recipe(init="redundancy"),
    "kd+init": Recipe(loss="kd", init="redundancy"),
    "wide": Recipe(layers="wide"),
    "kd+init+wide": Recipe(loss="kd", init="redundancy", layers="wide"),
    "kd+init+wide+mix": Recipe(loss="kd", init="redundancy", layers="wide", data="mix"),
    "kd+init+wide+hold": Recipe(loss="kd", init="redundancy", layers="wide", multiplier=1.0),
    "kd+init+wide+hold+slow": Recipe(loss="kd", init="redundancy", layers="wide", multiplier=1.0, learning_rate=5e-4),
    "kd+init+wide+hold+slow+mix": Recipe(loss="kd", init="redundancy", layers="wide", data="mix", multiplier=1.0,
                                         learning_rate=5e-4),
    "kd+cost+wide+hold+slow": Recipe(loss="kd", init="cost", layers="wide", multiplier=1.0, learning_rate=5e-4),
    "kd+joint+wide+hold+slow+mix+short": Recipe(loss="kd", init="joint", layers="wide", data="mix", multiplier=1.0,
                                                learning_rate=5e-4, steps=48, init_sequences=32),
    "kd+joint+wide+hold+slow+mix+margin+centre": Recipe(
        loss="kd", init="joint", layers="wide", data="mix", multiplier=1.0, learning_rate=5e-4, steps=60,
        init_sequences=32, margin=True, centre=True),
    # Issue 34's levers, from kd-joint's recorded search path (``init="path"``, no search again): the 4-domain mix
    # (with Python code), cost-supervised routers alone (``steps=0``: the fit and the calibration) and with kd-joint's
    # training after the fit.
    "kd+path+wide+hold+slow+mix4+margin+centre": Recipe(
        loss="kd", init="path", layers="wide", data="mix4", multiplier=1.0, learning_rate=5e-4, steps=60,
        margin=True, centre=True),
    "path+wide+mix4+margin+cost": Recipe(loss="kd", init="path", layers="wide", data="mix4", steps=0, margin=True,
                                         cost=True),
    "path+wide+mix+margin+cost": Recipe(loss="kd", init="path", layers="wide", data="mix", steps=0, margin=True,
                                        cost=True),
    "kd+path+wide+hold+slow+mix4+margin+centre+cost": Recipe(
        loss="kd", init="path", layers="wide", data="mix4", multiplier=1.0, learning_rate=5e-4, steps=60,
        margin=True, centre=True, cost=True),
}
# The greedy joint-cost search path of kd-joint on SmolLM2-135M (kd+joint+wide+hold+slow+mix+margin+centre, on 32
# sequences of the mixture): 12.5%, 25% and 37.5% took its first 4, 8 and 12 layers (the last one the margin).
JOINT_PATH = (7, 6, 25, 9, 28, 26, 22, 17, 4, 12, 14, 8)


@dataclass(frozen=True)
class Sizes:
    heldout_fraction: float  # of the Alpaca records, held out for the instruction loss
    max_length: int
    batch_size: int
    steps: int | None  # None: one epoch
    learning_rate: float
    calibration_sequences: int
    mix_weights: tuple[float, float, float]  # Alpaca, GSM8K, WikiText-2 valid
    mix4_weights: tuple[float, float, float, float]  # the same and Python code (train split)
    cost_sequences: int  # training sequences the cost-supervised routers are fitted on
    joint_path: tuple[int, ...] | None  # the start of ``init="path"`` recipes (None: search it, ``init="joint"``)
    task_limit: dict[str, int | None]
    mmlu_per_subject: int | None
    mmlu_subjects: list[str] | None
    num_fewshot: dict[str, int]
    ppl_block: int
    ppl_blocks: int | None  # None: the whole test split
    ablation_ppl_blocks: int  # the ablation ranks recipes on the first blocks only
    drop_records: int  # calibration sequences of Attention-Drop's scores
    projection_records: int  # training sequences that decide the static projection
    eval_batch_size: int
    seed: int = 0
    tasks: bool = True  # the Pareto stage scores the six tasks (the small preset leaves them out)


ITEMS = 350  # per task: the standard error of the six tasks' average is then about 1.1 points at 50% accuracy
PRESETS = {
    "default": Sizes(
        heldout_fraction=0.05, max_length=256, batch_size=8, steps=None, learning_rate=2e-3,
        calibration_sequences=128, mix_weights=(0.5, 0.25, 0.25), mix4_weights=(0.4, 0.2, 0.2, 0.2),
        cost_sequences=128, joint_path=JOINT_PATH, task_limit={t: ITEMS for t in TASKS if t != "local_mmlu"},
        mmlu_per_subject=6, mmlu_subjects=None,
        num_fewshot={"local_hellaswag": 0}, ppl_block=1024, ppl_blocks=None, ablation_ppl_blocks=48, drop_records=128,
        projection_records=256, eval_batch_size=8,
    ),
    "smoke": Sizes(
        heldout_fraction=0.1, max_length=160, batch_size=8, steps=4, learning_rate=2e-3, calibration_sequences=16,
        mix_weights=(0.5, 0.25, 0.25), mix4_weights=(0.4, 0.2, 0.2, 0.2), cost_sequences=16,
        joint_path=None,
        task_limit=dict.fromkeys(TASKS, 4), mmlu_per_subject=2,
        mmlu_subjects=["anatomy", "virology"], num_fewshot={"local_hellaswag": 2, "local_mmlu": 2}, ppl_block=64,
        ppl_blocks=4, ablation_ppl_blocks=2, drop_records=16, projection_records=16, eval_batch_size=8,
    ),
    # A model whose every forward costs several times SmolLM2's on a CPU (Gemma 3 270M: its 262k vocabulary's
    # output layer is most of it): short sequences, a capped recipe (30 steps, 8 calibration sequences for the joint
    # search), the first 8 WikiText-2 test blocks of 512 tokens, 30 held-out examples, no tasks.
    "small": Sizes(
        heldout_fraction=0.03, max_length=128, batch_size=4, steps=30, learning_rate=2e-3, calibration_sequences=8,
        mix_weights=(0.5, 0.25, 0.25), mix4_weights=(0.4, 0.2, 0.2, 0.2), cost_sequences=32, joint_path=None,
        task_limit={}, mmlu_per_subject=None, mmlu_subjects=None, num_fewshot={},
        ppl_block=512, ppl_blocks=8, ablation_ppl_blocks=8, drop_records=32, projection_records=32,
        eval_batch_size=4, tasks=False,
    ),
}


def layer_sets(num_layers: int) -> dict[str, list[int]]:
    from mindskip_ext.config import default_layers, wide_layers

    return {"paper": default_layers(num_layers), "wide": wide_layers(num_layers)}


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    train: dict[str, list]  # data name -> training examples
    heldout: list  # the Alpaca held-out examples
    ppl: list  # WikiText-2 test blocks
    stats: dict


def load_data(args, sizes: Sizes, tokenizer) -> Data:
    from mindskip_ext.data import load_training_data, mix_examples

    def source(path: Path, heldout_fraction: float = 0.0, max_records: int | None = None):
        return load_training_data([str(args.data_dir / path)], tokenizer, sizes.max_length, seed=sizes.seed,
                                  heldout_fraction=heldout_fraction, max_records=max_records)

    alpaca, heldout, (alpaca_stats,) = source(ALPACA, sizes.heldout_fraction)
    small = 64 if args.smoke else None
    gsm8k, _, (gsm8k_stats,) = source(GSM8K, max_records=small)
    wiki, _, (wiki_stats,) = source(WIKITEXT_TRAIN, max_records=small)
    code, _, (code_stats,) = source(CODE_TRAIN, max_records=small)
    mix = mix_examples([alpaca, gsm8k, wiki], sizes.mix_weights, seed=sizes.seed, total=len(alpaca))
    mix4 = mix_examples([alpaca, gsm8k, wiki, code], sizes.mix4_weights, seed=sizes.seed, total=len(alpaca))
    ppl = wikitext_examples(args.data_dir / WIKITEXT, tokenizer, sizes.ppl_block, sizes.ppl_blocks)
    return Data(
        train={"alpaca": alpaca, "mix": mix, "mix4": mix4},
        heldout=heldout,
        ppl=ppl,
        stats={"alpaca": alpaca_stats, "gsm8k": gsm8k_stats, "wikitext2_valid": wiki_stats, "code_train": code_stats,
               "mix": {"examples": len(mix), "weights": list(sizes.mix_weights)},
               "mix4": {"examples": len(mix4), "weights": list(sizes.mix4_weights)},
               "wikitext2_test": {"blocks": len(ppl), "block_tokens": sizes.ppl_block,
                                  "tokens": sum(len(e) for e in ppl)}},
    )


# ------------------------------------------------------------------------------------------------ training


def tuning_config(recipe: Recipe, sizes: Sizes, capacity: float):
    """The Router-Tuning settings of ``recipe`` at ``capacity`` under preset ``sizes`` (whose step cap, the smoke
    preset's, wins over the recipe's own)."""
    from mindskip_ext.training import RouterTuningConfig

    steps = [s for s in (recipe.steps, sizes.steps) if s is not None]
    path = recipe.init == "path" and sizes.joint_path is not None
    init = "ranking" if path else "joint" if recipe.init == "path" else recipe.init
    return RouterTuningConfig(
        target_capacity=capacity, loss=recipe.loss, router_init=init,
        router_init_ranking=list(sizes.joint_path) if path else None, initial_multiplier=recipe.multiplier,
        learning_rate=recipe.learning_rate or sizes.learning_rate,
        batch_size=sizes.batch_size, max_steps=min(steps, default=None), seed=sizes.seed, log_every=5,
        save_every=20, calibration_sequences=sizes.calibration_sequences, eval_batch_size=sizes.eval_batch_size,
        router_init_sequences=recipe.init_sequences and min(recipe.init_sequences, sizes.calibration_sequences),
        router_init_margin=recipe.margin, centre_router_inputs=recipe.centre, cost_routers=recipe.cost,
        cost_sequences=sizes.cost_sequences,
    )


def train_recipe(run: Run, name: str, base, tokenizer, recipe: Recipe, ratio: float, data: Data, output: Path):
    """Router-tune ``recipe`` at skip ``ratio`` into ``output``'s router folder (or reload the finished router
    directory there); (model, entry)."""
    import mindskip_ext as msk
    from mindskip_ext.config import capacity_for_skip_ratio
    from mindskip_ext.data import pad_token_id
    from mindskip_ext.eval.routing import routing_decisions, routing_report
    from mindskip_ext.training import LOG_NAME, SUMMARY_NAME, RouterTuner

    sizes, pad, num_layers = run.sizes, pad_token_id(tokenizer), base.config.num_hidden_layers
    layers = layer_sets(num_layers)[recipe.layers]
    capacity = capacity_for_skip_ratio(ratio, num_layers, len(layers))
    router_dir = router_folder(run.preset, name)
    out = output / router_dir
    tuning = tuning_config(recipe, sizes, capacity)
    if (out / SUMMARY_NAME).is_file():
        model = msk.MindSkipModel.from_pretrained(base, out)
        summary = json.loads((out / SUMMARY_NAME).read_text())
        run.say(f"{name}: routers reloaded from {out}")
    else:
        model = msk.get_mindskip_model(base, msk.MindSkipConfig(layers=layers))
        with run.stage(f"train {name}"):
            summary = RouterTuner(model, data.train[recipe.data], data.heldout, tuning, out, pad,
                                  progress=False).train(resume=True)
    projection = routing_report(
        routing_decisions(model, data.train[recipe.data][: sizes.projection_records], pad, sizes.eval_batch_size),
        num_layers,
    )
    log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    entry = {
        "kind": "mindskip", "recipe": asdict(recipe), "recipe_name": name.rsplit("@", 1)[0], "ratio": ratio,
        "layers": layers, "target_capacity": capacity, "router_dir": str(router_dir),
        "train_seconds": summary["train_seconds"], "train_tokens_per_s": summary["train_tokens_per_s"],
        "steps": summary["steps"], "router_init": summary.get("router_init"), "calibration": summary["calibration"],
        "routing_train": projection,
        "curves": [{k: e[k] for k in ("step", "ce", "kd", "loss", "capacity") if k in e} for e in log if "ce" in e],
    }
    fits = [e["cost_fit"] for e in log if "cost_fit" in e]
    if fits:
        entry["cost_fit"] = fits[0]
    return model, entry


def router_folder(preset: str, name: str) -> Path:
    """Where model ``name``'s routers are kept, relative to the results folder (the entry's ``router_dir``)."""
    return Path("pareto_routers") / preset / name


def heldout_costs(run: Run, base, data: Data, pad: int, layers: list[int], work: Path, per_token: bool = False,
                  model=None):
    """The held-out set's per-sequence (``per_token``: per supervised position) cost of skipping each of ``layers``
    alone (computed once, kept in ``work``), on ``model`` (a MindSkip model with routers on ``layers``; default:
    ``base`` converted for it and back). A skip is of every token either way, so the routing level does not matter."""
    import mindskip_ext as msk
    from mindskip_ext.eval.headroom import SkipCosts, skip_costs

    name = "skip_costs_heldout_per_token.pt" if per_token else "skip_costs_heldout.pt"
    path, key = work / name, [e.input_ids for e in data.heldout]
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["key"] == key and saved["layers"] == layers:
            return SkipCosts(saved["layers"], saved["costs"], saved["tokens"], saved.get("sequence"))
    wrapped = model if model is not None else msk.get_mindskip_model(base, msk.MindSkipConfig(layers=layers))
    with run.stage("held-out skip costs" + (" per token" if per_token else "")):
        costs = skip_costs(wrapped, data.heldout, pad, layers, run.sizes.eval_batch_size, per_token=per_token)
    if model is None:
        wrapped.unload()
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "layers": costs.layers, "costs": costs.costs, "tokens": costs.tokens,
                "sequence": costs.sequence}, path)
    return costs


def _progress(entry: dict) -> tuple:
    """How far a model's evaluation went: the WikiText-2 tokens scored (the whole split over the ablation's first
    blocks), then the tasks, then the held-out loss."""
    return entry.get("wikitext2", {}).get("target_tokens", 0), "tasks" in entry, "heldout" in entry


def merge_results(run: Run, source: Path, output: Path) -> list[str]:
    """Take into ``run`` the models of another run's results folder ``source`` (its partial results, else its
    finished ones) that ``run`` lacks or that were evaluated further there, with their router folders (copied into
    ``output``). Runs of different ``--ratios`` can go side by side, one core each, and be merged. Returns the names
    taken."""
    import shutil

    path = next((p for p in (source / "pareto.partial.json", source / "pareto.json") if p.is_file()), None)
    if path is None:
        raise SystemExit(f"--merge: no pareto.partial.json or pareto.json in {source}")
    models, timings = read_results(path, "--merge", "pareto", run.preset)
    taken = []
    for name, entry in sorted(models.items()):
        have = run.models.get(name)
        if have is not None and _progress(entry) <= _progress(have):
            continue
        routers = router_folder(run.preset, name)
        if (source / routers).is_dir():
            if (source / routers).resolve() != (output / routers).resolve():
                shutil.copytree(source / routers, output / routers, dirs_exist_ok=True)
            entry = {**entry, "router_dir": str(routers)}
        run.models[name] = entry
        run.timings.update({k: v for k, v in timings.items() if k in (f"train {name}", f"evaluate {name}")})
        taken.append(name)
    run.meta.setdefault("merged", {})[str(source)] = taken
    run.say(f"merged from {path}: {', '.join(taken) or 'nothing new'}")
    return taken


def merge_only(args) -> Run:
    """``--merge-only``: this results folder's partial (else finished) results, if any, with the ``--merge``
    folders' models taken in, written as its partial results; no model is loaded, nothing is evaluated."""
    run = Run("pareto", args.preset, PRESETS[args.preset], partial=args.output / "pareto.partial.json")
    args.output.mkdir(parents=True, exist_ok=True)
    if run.partial.is_file() or (args.output / "pareto.json").is_file():
        run.resume(finished=args.output / "pareto.json")
    for source in args.merge:
        merge_results(run, source, args.output)
    run.save_partial()
    run.say(f"wrote {run.partial} ({len(run.models)} models); --resume continues from it")
    return run


# ---------------------------------------------------------------------------------------------------- run


def run_stage(args) -> Run:
    from mindskip_ext.data import pad_token_id
    from mindskip_ext.eval.attention_drop import dropped_model, redundancy_scores, select_dropped
    from mindskip_ext.eval.headroom import headroom
    from mindskip_ext.eval.routing import routing_decisions, routing_report

    from . import local_tasks

    sizes = PRESETS[args.preset]
    run = start_run("pareto", args, sizes, "pareto", stage=args.stage, ratios=list(args.ratios),
                    ablation_ratio=ABLATION_RATIO, recipes={k: asdict(v) for k, v in RECIPES.items()})
    started = time.perf_counter()
    work = Path(args.work_dir) / args.preset
    with run.stage("load model and data"):
        base, tokenizer, label = load_model(args.smoke, args.model, args.data_dir, sizes.seed)
        data = load_data(args, sizes, tokenizer)
        written = local_tasks.write_tasks(
            args.data_dir, work / "tasks", tasks=list(TASKS), limit=sizes.task_limit, num_fewshot=sizes.num_fewshot,
            mmlu_limit=sizes.mmlu_per_subject, mmlu_subjects=sizes.mmlu_subjects, seed=1234,
        )
    num_layers = base.config.num_hidden_layers
    sets = layer_sets(num_layers)
    # Attention-Drop's candidate layers, in the scopes asked for.
    scopes = {scope: layers for scope, layers in (("all", list(range(num_layers))), ("restricted", sets["paper"]))
              if scope in args.drop_scopes}
    run.meta.update(model=label, num_layers=num_layers, layer_sets=sets, data=data.stats,
                    items=written.sizes, items_available=written.totals, num_fewshot=written.num_fewshot,
                    metric=METRIC, sizes=asdict(sizes))
    if args.resume:
        run.resume(finished=args.output / "pareto.json")
    for source in args.merge:
        merge_results(run, source, args.output)
    pad = pad_token_id(tokenizer)
    ablation = args.stage == "ablation"
    with_tasks = not ablation and sizes.tasks
    # The ablation ranks recipes on the first blocks of WikiText-2; the Pareto stage reports the whole split.
    ppl = data.ppl[: sizes.ablation_ppl_blocks] if ablation else data.ppl
    ppl_tokens = sum(len(e) - 1 for e in ppl)
    further = sorted(k for k, e in run.models.items() if _progress(e)[0] > ppl_tokens)
    if ablation and further:  # its first blocks would be written over their whole-split perplexities
        raise SystemExit(f"--stage ablation: {', '.join(further)} in these results were evaluated on the whole "
                         f"WikiText-2 split by the Pareto stage, and the ablation would evaluate them again on its "
                         f"first {len(ppl)} blocks in their place; give the ablation its own --output")

    def ensure(name: str, entry: dict, load, tasks: bool) -> dict:
        """Evaluate model ``name`` where its recorded results lack this stage's: the perplexity on ``ppl`` with the
        held-out loss, and the six tasks when ``tasks``. ``load()`` gives (the model to evaluate, a cleanup)."""
        have = run.models.get(name, {})
        want_ppl = have.get("wikitext2", {}).get("target_tokens") != ppl_tokens
        want_tasks = tasks and "tasks" not in have
        if not (want_ppl or want_tasks):
            return have
        model, cleanup = load()
        settings = {"batch_size": sizes.eval_batch_size, "seed": sizes.seed}
        if want_ppl:
            settings.update(ppl_examples=ppl, heldout=data.heldout)
        if want_tasks:
            settings["tasks_dir"] = written.path
        result = evaluate(run, name, model, tokenizer, {**have, **entry}, **settings)
        cleanup()
        if ablation:  # what the recipes are ranked on, kept when the Pareto stage evaluates the model again
            result["ablation"] = {"wikitext2_ppl": result["wikitext2"]["perplexity"],
                                  "heldout_loss": result["heldout"]["loss"], "blocks": len(ppl)}
            run.save_partial()
        return result

    def static(dropped: list[int]):
        model = dropped_model(base, dropped, "attn")
        # Input-independent routing: the plain (padded-batch) evaluation path is exact and faster.
        return model.base_model, model.unload

    def drop_count(scope: str, count: int) -> None:
        """Attention-Drop in ``scope`` with ``count`` layers dropped, under an existing name where there is one."""
        dropped = select_dropped(scores, count, scopes[scope])
        have = [k for k, e in run.models.items()
                if e["kind"] == "attention-drop" and e["scope"] == scope and e["dropped_layers"] == dropped]
        if have:
            name, entry = have[0], {}
        else:
            name = f"attention-drop-{scope}@{count}/{num_layers}"
            entry = {"kind": "attention-drop", "scope": scope, "ratio": count / num_layers, "dropped_layers": dropped,
                     "skip_ratio": count / num_layers, "matched": True}
        ensure(name, entry, lambda: static(dropped), tasks=False)

    def matched_drops(result: dict) -> None:
        """Attention-Drop in its scopes at the layer counts around a MindSkip model's measured skips on each
        evaluation set."""
        for where in ("wikitext2", "heldout"):
            skipped = skipped_per_sequence(result, where)
            for count in sorted(set(counts_around(skipped))):
                for scope, candidates in scopes.items():
                    if 1 <= count <= len(candidates):
                        drop_count(scope, count)

    with run.stage("attention-drop scores"):
        scores = redundancy_scores(base, data.train["alpaca"][: sizes.drop_records], pad, "attn",
                                   sizes.eval_batch_size)
    run.meta["attention_drop_similarity"] = {str(k): round(v, 6) for k, v in scores.items()}
    costs = heldout_costs(run, base, data, pad, sorted(set().union(*sets.values())), work)
    ensure("dense", {"kind": "dense", "label": label}, lambda: (base, lambda: None), tasks=with_tasks)
    ratios = run.meta["ratios"]
    # The Pareto stage compares the recipe ranked by the ablation's results, before it evaluates anything again.
    best = None if ablation else args.best or best_recipe(run.models)
    recipes = args.recipes if ablation else [r for r, m in (("paper", "paper"), (best, "best")) if m in args.methods]
    # Ratio by ratio, the ablation's first, so that an interrupted run has whole comparisons to report.
    for ratio in sorted(ratios, key=lambda r: (r != ABLATION_RATIO, r)):
        n = round(ratio * num_layers)
        drops = {}
        for scope, candidates in (scopes if "attention-drop" in args.methods else {}).items():
            name, dropped = f"attention-drop-{scope}@{ratio}", select_dropped(scores, n, candidates)
            entry = {"kind": "attention-drop", "scope": scope, "ratio": ratio, "dropped_layers": dropped,
                     "skip_ratio": n / num_layers}
            drops[name] = ensure(name, entry, lambda d=dropped: static(d), tasks=False)
        if drops and with_tasks:  # the better scope by perplexity gets the tasks
            better = min(drops, key=lambda k: drops[k]["wikitext2"]["perplexity"])
            ensure(better, {"best_of_scopes": True}, lambda d=drops[better]["dropped_layers"]: static(d), tasks=True)
        for recipe_name in dict.fromkeys(recipes):
            name = f"{recipe_name}@{ratio}"
            model, entry = train_recipe(run, name, base, tokenizer, RECIPES[recipe_name], ratio, data, args.output)
            decisions = routing_decisions(model, data.heldout, pad, sizes.eval_batch_size)
            entry["routing_heldout"] = routing_report(decisions, num_layers)
            result = ensure(name, entry, lambda m=model: (m, lambda: None), tasks=with_tasks)
            result["headroom_heldout"] = headroom(costs, decisions)  # also for a model resumed without it
            run.save_partial()
            model.unload()
            if "matched" in args.methods:
                matched_drops(result)
            if recipe_name != "paper" and "static" in args.methods:
                count = round(entry["routing_train"]["skipped_layers_per_sequence"])
                ranked = sorted(entry["routing_train"]["layers"].items(), key=lambda kv: (kv[1]["kept"], -int(kv[0])))
                dropped = sorted(int(i) for i, _ in ranked[:count])
                entry = {"kind": "static-projection", "of": name, "ratio": ratio, "dropped_layers": dropped,
                         "skip_ratio": len(dropped) / num_layers}
                ensure(f"{recipe_name}-static@{ratio}", entry, lambda d=dropped: static(d), tasks=with_tasks)

    run.meta["best_recipe"] = best or args.best or best_recipe(run.models)
    run.timings["total"] = round(time.perf_counter() - started, 1)
    return run


# ---------------------------------------------------------------------------------------------------- CLI


def _some_of(p, flag: str, text: str, choices: tuple[str, ...]) -> list[str]:
    """The comma-separated names of ``text``, at least one and each one of ``choices``; else a usage error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        p.error(f"{flag} takes some of {', '.join(choices)}, got {', '.join(unknown) or 'none'}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.pareto", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("ablation", "pareto"), default="pareto")
    p.add_argument("--smoke", action="store_true", help="Tiny config model, a handful of items (minutes).")
    p.add_argument("--preset", choices=("default", "small"), default="default",
                   help="Evaluation sizes: default (the whole WikiText-2 split, the six tasks), or small (8 blocks of "
                   "512 tokens, 30 held-out examples, no tasks, the recipe capped at 30 steps of 4 sequences of 128 "
                   "tokens: for a model whose forward costs several times SmolLM2's, e.g. Gemma 3 270M on a CPU).")
    p.add_argument("--best", choices=sorted(RECIPES), default=None,
                   help="The recipe to compare (default: the ablation's furthest below Attention-Drop at its own "
                   "skip ratio, WikiText-2 and held-out averaged).")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help=f"Recipes the ablation trains, comma-separated (default: all of {', '.join(RECIPES)}).")
    p.add_argument("--ratios", default=None,
                   help=f"Skip ratios to run, comma-separated (the ablation's default: {ABLATION_RATIO}; the Pareto "
                   f"stage's: all of {', '.join(map(str, RATIOS))}, and it takes only those).")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="What each ratio evaluates, comma-separated (default: all of " + ", ".join(METHODS) + "): "
                   "Attention-Drop at the ratio in both scopes, the paper recipe, the best recipe, the best recipe's "
                   "static projection, and Attention-Drop at the layer counts each MindSkip model actually skips. "
                   "A subset puts the deciding comparisons first when time is short; a later run adds the rest.")
    p.add_argument("--drop-scopes", default=",".join(DROP_SCOPES),
                   help="Attention-Drop's candidate layers, comma-separated (default: both, "
                   + ", ".join(DROP_SCOPES) + "): every layer, and the paper recipe's MindSkip layers. Where one "
                   "scope is far behind on the ablation's blocks, the other alone saves the whole split's "
                   "evaluations of it.")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"Shared data folder (default: {DEFAULT_DATA_DIR}).")
    p.add_argument("--model", default=None, help="Model folder (default: SmolLM2-135M-Instruct, fetched once).")
    p.add_argument("--output", type=Path, default=None, help="Results folder (default: bench/results).")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help=f"Task files and cached skip costs (default: {DEFAULT_WORK_DIR}).")
    p.add_argument("--resume", action="store_true",
                   help="Reuse the models in <output>/pareto.partial.json (else <output>/pareto.json) and the routers "
                   "in <output>/pareto_routers.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--merge", type=Path, action="append", default=[], metavar="DIR",
                   help="Also take the models of another run's results folder (its pareto.partial.json, else "
                   "pareto.json) that this run lacks or that were evaluated further there, with their routers. "
                   "Repeatable; lets runs of different --ratios go side by side (one core each).")
    p.add_argument("--merge-only", action="store_true",
                   help="With --merge: write the merged results as <output>/pareto.partial.json (starting from "
                   "the results already there) and stop; no model is loaded.")
    args = p.parse_args(argv)
    if args.smoke and args.preset != "default":
        p.error("--smoke is its own preset; drop --preset")
    args.preset = "smoke" if args.smoke else args.preset
    args.recipes = _some_of(p, "--recipes", args.recipes, tuple(RECIPES))
    args.drop_scopes = _some_of(p, "--drop-scopes", args.drop_scopes, DROP_SCOPES)
    args.methods = _some_of(p, "--methods", args.methods, METHODS)
    text = args.ratios if args.ratios is not None else str(ABLATION_RATIO) if args.stage == "ablation" else ""
    args.ratios = skip_ratios(p, text) or list(RATIOS)
    if args.stage == "pareto" and not set(args.ratios) <= set(RATIOS):
        p.error("the Pareto stage runs some of " + ", ".join(map(str, RATIOS)) + f", got {args.ratios}")
    if args.merge_only and not args.merge:
        p.error("--merge-only needs at least one --merge DIR")
    check_data_and_model(p, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.output = args.output or RESULTS_DIR
    if args.merge_only:
        merge_only(args)
        return 0
    run = run_stage(args)
    paths = write_outputs(run, args.output)
    run.announce(paths, best_recipe=run.meta["best_recipe"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
