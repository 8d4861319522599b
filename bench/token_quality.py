"""Token-level MindSkip against the sequence variant, Attention-Drop and its own static projections on SmolLM2-135M, at
a quarter of the attention sublayer-tokens skipped (a quality study; speed: :mod:`bench.token_decode`).

    python -m bench.token_quality --threads 1          # train (or reload) and evaluate; resumable (--resume)
    python -m bench.token_quality --smoke              # a tiny model: checks every step in a minute

The token variant is trained with the recipe the Pareto study found best for the sequence variant
(``kd+joint+wide+hold+slow+mix+margin+centre``: self-distillation, routers on every layer but the first eighth and
the last, the same data, steps and learning rate, centred router inputs) at the same target capacity: the two levels
compare on equal terms. Its start is that run's joint-cost search result (the layers that start skipped and the one at
the threshold, from ``pareto_routers/<preset>/<recipe>@<ratio>/training_summary.json``): with zero router weights the
start is the same static drop at either level, and the search costs about an hour on a CPU. Where that summary is
absent (``--smoke``) the search runs.

Evaluated, each on the whole WikiText-2 test split and the Alpaca held-out split of :mod:`bench.pareto` (the same
tokens, so the sequence variant's and Attention-Drop's numbers come from its committed ``pareto.json``):

* ``token``: the trained token routers;
* ``token-static``: their static projection: each layer keeps its kept fraction (on 256 training sequences) of the
  tokens with input-independent decisions (:func:`mindskip_ext.token_routing.static_token_keep`, by position);
* ``token-layers``: the whole-layer projection (as the sequence variant's static projection: the least-kept layers
  always skipped, as many as it skips per token on the training sequences, the others always kept);
* against them: the sequence variant and its static projection, and Attention-Drop at the token model's own measured
  skips on each set (the better scope at the whole layer counts around it, linear between: as :mod:`bench.pareto`).

What a token router could capture (``headroom_heldout`` of each token model, :mod:`mindskip_ext.eval.headroom` per
token): the first-order KL from the dense model on the held-out set of the best static drop, the per-sequence and the
per-token oracles, the routers' own decisions and their input-independent shuffle, at the routers' budget (the skip
costs are cached in ``--work-dir``, shared with :mod:`bench.pareto`'s).

Writes ``token_quality.json`` and ``token_quality.md`` to ``--output`` (default ``bench/results``), the routers to
``<output>/token_routers/<preset>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .common import RESULTS_DIR, machine_info, markdown_table, utc_timestamp
from .experiment import DEFAULT_DATA_DIR, MACHINE_PACKAGES, Run, evaluate, load_model
from .pareto import (
    DEFAULT_WORK_DIR,
    PRESETS,
    RECIPES,
    heldout_costs,
    layer_sets,
    load_data,
    router_folder,
    tuning_config,
)
from .pareto_report import drop_at

RECIPE = "kd+joint+wide+hold+slow+mix+margin+centre"
RATIO = 0.25  # the default of --ratio


def kept_per_layer(model, examples, pad: int, batch_size: int) -> dict[int, float]:
    """Each router layer's kept fraction of the real tokens of ``examples``."""
    from mindskip_ext.eval.perplexity import evaluate_examples

    result = evaluate_examples(model, examples, pad, batch_size)
    return {int(i): c for i, c in result["capacity_per_layer"].items()}


def _skipped(entry: dict, where: str) -> float:
    """Attention sublayers skipped per token on ``where`` (wikitext2 or heldout): the sum over the router layers of the
    skipped fraction (a whole-layer drop: its layer count)."""
    if "dropped_layers" in entry:
        return float(len(entry["dropped_layers"]))
    return sum(1.0 - c for c in entry[where]["capacity_per_layer"].values())


def _start_from_sequence_run(model, output: Path, preset: str, ratio: float) -> dict | None:
    """Give ``model``'s routers the sequence run's joint-search start (zero weights; biases as
    :func:`~mindskip_ext.training.init.static_init` sets them). None where that run's summary is absent."""
    from mindskip_ext.eval.attention_drop import set_static_routing

    summary = output / router_folder(preset, f"{RECIPE}@{ratio}") / "training_summary.json"
    if not summary.is_file():
        return None
    init = json.loads(summary.read_text())["router_init"]
    centre = model.mindskip_config.threshold_logit
    scale = init["scale"]
    set_static_routing(model, init["skipped_layers"], skip_bias=centre - scale, keep_bias=centre + scale)
    if init["margin"] is not None:
        with torch.no_grad():
            model.routers[init["margin"]].bias.fill_(centre)
    return {**init, "reused_from": str(summary.relative_to(output))}


def run_study(args) -> Run:
    import mindskip_ext as msk
    from mindskip_ext.config import capacity_for_skip_ratio
    from mindskip_ext.data import pad_token_id
    from mindskip_ext.eval.attention_drop import set_static_routing
    from mindskip_ext.eval.headroom import headroom, token_decisions
    from mindskip_ext.model import read_router_directory
    from mindskip_ext.token_routing import set_static_token_fractions
    from mindskip_ext.training import SUMMARY_NAME, RouterTuner

    sizes = PRESETS[args.preset]
    run = Run("token-quality", args.preset, sizes, partial=args.output / "token_quality.partial.json")
    args.output.mkdir(parents=True, exist_ok=True)
    if args.resume and (run.partial.is_file() or (args.output / "token_quality.json").is_file()):
        run.resume(args.output / "token_quality.json")
        other = sorted(name for name, e in run.models.items() if e.get("ratio", args.ratio) != args.ratio)
        if other:
            raise SystemExit(f"--resume: the results there are at another skip ratio ({other[0]!r} at "
                             f"{run.models[other[0]]['ratio']}, not --ratio {args.ratio}); use another --output")
    started = time.perf_counter()
    ratio = args.ratio
    run.meta.update(started=utc_timestamp(), machine=machine_info(MACHINE_PACKAGES), recipe=RECIPE, ratio=ratio,
                    sizes=asdict(sizes))
    torch.manual_seed(sizes.seed)
    with run.stage("load model and data"):
        base, tokenizer, label = load_model(args.smoke, None, args.data_dir, sizes.seed)
        data = load_data(args, sizes, tokenizer)
    pad, num_layers = pad_token_id(tokenizer), base.config.num_hidden_layers
    recipe = RECIPES[RECIPE]
    layers = layer_sets(num_layers)[recipe.layers]
    capacity = capacity_for_skip_ratio(ratio, num_layers, len(layers))
    run.meta.update(model=label, num_layers=num_layers, layers=layers, target_capacity=capacity, data=data.stats)
    settings = {"batch_size": sizes.eval_batch_size, "seed": sizes.seed, "ppl_examples": data.ppl,
                "heldout": data.heldout}

    model = msk.get_mindskip_model(base, msk.MindSkipConfig(layers=layers, routing="token"))
    token = "token" + (f"+{args.tag}" if args.tag else "")  # the names of this run's models
    out = args.output / "token_routers" / args.preset / f"{token}@{ratio}"
    if (out / SUMMARY_NAME).is_file():
        model.load_router_state_dict(read_router_directory(out)[2])
        summary = json.loads((out / SUMMARY_NAME).read_text())
        run.say(f"token routers reloaded from {out}")
    else:
        init = _start_from_sequence_run(model, args.output, args.preset, ratio)
        tuning = tuning_config(recipe, sizes, capacity)
        if args.lr is not None:
            tuning = replace(tuning, learning_rate=args.lr)
        if init is not None:
            tuning = replace(tuning, router_init="zero", router_init_margin=False)
            run.say(f"start: the sequence run's joint search ({init['reused_from']}): skipped "
                    f"{init['skipped_layers']}, at the threshold {init['margin']}")
        with run.stage(f"train {token}"):
            summary = RouterTuner(model, data.train[recipe.data], data.heldout, tuning, out, pad,
                                  progress=False).train(resume=True)
        if init is not None:
            summary["router_init"] = init
            (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if args.train_only:
        return run
    train = data.train[recipe.data][: sizes.projection_records]
    with run.stage(f"kept fractions of {token} on the training sequences"):
        kept = kept_per_layer(model, train, pad, sizes.eval_batch_size)
    skipped_train = sum(1.0 - c for c in kept.values())
    common = {"ratio": ratio, "layers": layers, "target_capacity": capacity, "kept_train": kept,
              "skipped_per_token_train": skipped_train}
    if token not in run.models:
        evaluate(run, token, model, tokenizer, {
            "kind": "token", "tag": args.tag, **common, "router_dir": str(out.relative_to(args.output)),
            "train_seconds": summary.get("train_seconds"), "router_init": summary.get("router_init"),
            "calibration": summary.get("calibration"), "learning_rate": summary["config"]["learning_rate"]},
            **settings)
    if "headroom_heldout" not in run.models[token]:
        costs = heldout_costs(run, None, data, pad, layers, args.work_dir / args.preset, per_token=True, model=model)
        with run.stage(f"decisions of {token} on the held-out set"):
            decisions = token_decisions(model, data.heldout, pad, sizes.eval_batch_size)
        run.models[token]["headroom_heldout"] = headroom(costs, decisions)
        run.save_partial()
    if f"{token}-static" not in run.models:
        set_static_token_fractions(model, kept)
        evaluate(run, f"{token}-static", model, tokenizer, {"kind": "token-static", **common}, **settings)
        set_static_token_fractions(model, None)
    dropped = sorted(sorted(kept, key=lambda i: (kept[i], -i))[: round(skipped_train)])
    if f"{token}-layers" not in run.models:
        saved = {k: v.clone() for k, v in model.router_state_dict().items()}
        set_static_routing(model, dropped)
        evaluate(run, f"{token}-layers", model, tokenizer,
                 {"kind": "token-layers", **common, "dropped_layers": dropped}, **settings)
        model.load_router_state_dict(saved)
    run.timings["total"] = round(time.perf_counter() - started, 1)
    run.save_partial()
    return run


def compare(run: Run, pareto_path: Path) -> list[dict]:
    """One row per model: its skips per token and loss on each set, with the sequence variant's, its static
    projection's and Attention-Drop's at the same skips (from the Pareto study's results, where present)."""
    rows = []
    models = json.loads(pareto_path.read_text())["models"] if pareto_path.is_file() else {}
    ratio = run.meta["ratio"]
    sequence = models.get(f"{RECIPE}@{ratio}")
    for name, entry in run.models.items():
        row = {"model": name}
        for where in ("wikitext2", "heldout"):
            skipped = _skipped(entry, where)
            row[where] = {"skipped": skipped, "loss": entry[where]["loss"],
                          "drop_loss": drop_at(models, skipped, where, entry[where].get("target_tokens"))
                          if models else None}
        rows.append(row)
    if sequence is not None:
        static = models.get(f"{RECIPE}-static@{ratio}")
        for name, entry in (("sequence", sequence), ("sequence-static", static)):
            if entry is None:
                continue
            row = {"model": name}
            for where in ("wikitext2", "heldout"):
                skipped = (_skipped(entry, where) if "dropped_layers" in entry
                           else entry["wikitext2"]["skipped_layers_per_sequence"] if where == "wikitext2"
                           else entry["routing_heldout"]["skipped_layers_per_sequence"])
                row[where] = {"skipped": skipped, "loss": entry[where]["loss"],
                              "drop_loss": drop_at(models, skipped, where, entry[where].get("target_tokens"))}
            rows.append(row)
    return rows


def render(run: Run, rows: list[dict]) -> str:
    import math

    def cells(row, where):
        r = row[where]
        ppl = math.exp(r["loss"])
        drop = "–" if r["drop_loss"] is None else f"{math.exp(r['drop_loss']):.2f}"
        delta = "–" if r["drop_loss"] is None else f"{r['loss'] - r['drop_loss']:+.4f}"
        return [f"{100 * r['skipped'] / run.meta['num_layers']:.1f}%", f"{ppl:.2f}", f"{r['loss']:.4f}", drop, delta]

    kept = {name: e["kept_train"] for name, e in run.models.items() if e["kind"] == "token"}
    headroom = [[name, f"{h['skips_per_token']:.2f}", f"{h['static']:.4f}", f"{h['sequence_oracle']:.4f}",
                 f"{100 * h['sequence_headroom']:.1f}%", f"{h['oracle']:.4f}", f"{100 * h['headroom']:.1f}%",
                 f"{h['routers']:.4f}", f"{h['shuffled']:.4f}"]
                for name, e in run.models.items() if (h := e.get("headroom_heldout")) is not None]
    head = ["model", "WikiText-2 skip", "ppl", "loss", "Attention-Drop ppl", "Δ loss", "held-out skip", "ppl", "loss",
            "Attention-Drop ppl", "Δ loss"]
    lines = [
        f"# Token-level MindSkip on {run.meta['model']} at {100 * run.meta['ratio']:.1f}% of the attention "
        "sublayer-tokens "
        "skipped",
        "",
        f"Machine: {run.meta['machine']['cpu']} ({run.meta['machine']['torch_threads']} torch threads); commit "
        f"{run.meta['machine']['git_commit']}; started {run.meta['started']}. Recipe `{RECIPE}` at target capacity "
        f"{run.meta['target_capacity']:.3f} over {len(run.meta['layers'])} router layers, for both levels. "
        "Skip: the share of all attention sublayers skipped per token on that set. Δ loss: the model's loss minus "
        "Attention-Drop's at the same skips (negative: better than Attention-Drop).",
        "",
        *markdown_table(head, [[row["model"], *cells(row, "wikitext2"), *cells(row, "heldout")] for row in rows]),
        "",
        "token-static: each layer's kept fraction, input-independent token decisions; token-layers: the least-kept "
        "layers always skipped (whole layers). sequence / sequence-static: the Pareto study's (pareto.json).",
        "",
        *([] if not headroom else [
            "What a token router could capture: first-order KL from the dense model on the held-out set, nats per "
            "supervised token, at each model's own skips per supervised token over its router layers "
            "(`mindskip_ext.eval.headroom`, per token: a (layer, token) pair costs that token's KL with the layer "
            "skipped for every token). Static: the cheapest layers for every token; per-sequence / per-token oracle: "
            "the cheapest (layer, sequence) / (layer, token) pairs, the best any router of that level could do, and "
            "its headroom 1 − oracle / static; routers: the model's decisions; shuffled: its per-layer kept "
            "fractions with input-independent decisions.",
            "",
            *markdown_table(["model", "skips per token", "static", "sequence oracle", "headroom", "token oracle",
                             "headroom", "routers", "shuffled"], headroom),
            "",
        ]),
        *(f"Kept fraction per layer of {name} on the training sequences: "
          + ", ".join(f"{i}: {c:.3f}" for i, c in sorted(fractions.items(), key=lambda t: int(t[0]))) + "\n"
          for name, fractions in kept.items()),
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.0f} |" for k, v in run.timings.items()),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.token_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="A tiny random model and a handful of items.")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="The shared data folder.")
    p.add_argument("--output", type=Path, default=None, help="Results folder (default: bench/results).")
    p.add_argument("--resume", action="store_true", help="Keep the models already evaluated in the partial results.")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help=f"Cached skip costs (default: {DEFAULT_WORK_DIR}).")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--tag", default="", help="A variant of the recipe: its models are named token+TAG.")
    p.add_argument("--lr", type=float, default=None, help="The learning rate (default: the recipe's).")
    p.add_argument("--train-only", action="store_true", help="Train (or find trained) routers and stop.")
    p.add_argument("--ratio", type=float, default=RATIO,
                   help=f"The share of the attention sublayer-tokens to skip, in (0, 1) (default: {RATIO}); the "
                   "sequence run's start is taken at the same ratio.")
    args = p.parse_args(argv)
    if not 0.0 < args.ratio < 1.0:
        p.error(f"--ratio must be a skip ratio in (0, 1), got {args.ratio}")
    args.preset = "smoke" if args.smoke else "default"
    args.output = args.output or RESULTS_DIR
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run = run_study(args)
    if args.train_only:
        return 0
    rows = compare(run, args.output / "pareto.json")
    (args.output / "token_quality.json").write_text(json.dumps(
        {"meta": run.meta, "models": run.models, "timings": run.timings, "comparison": rows}, indent=2,
        sort_keys=True) + "\n")
    (args.output / "token_quality.md").write_text(render(run, rows))
    run.announce({"json": args.output / "token_quality.json", "report": args.output / "token_quality.md"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
