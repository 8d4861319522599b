"""The report of :mod:`bench.pareto`: ``pareto.json``, the markdown (the ablation stage's ``pareto_ablation.md``,
the Pareto stage's ``pareto.md``) and the two Pareto figures.

Model names are ``<method>@<ratio>``: ``attention-drop-all``, ``attention-drop-restricted``, a recipe of
:data:`bench.pareto.RECIPES`, or ``<recipe>-static`` (its static projection); ``dense`` has no ratio.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .common import markdown_table
from .plot import figure

ABLATION_RATIO = 0.25


def fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def method_of(name: str) -> str:
    return name.rsplit("@", 1)[0]


def _points(value: float | None) -> float | None:
    return None if value is None else 100 * value


def on_this_split(models: dict) -> set[str]:
    """The models evaluated on the same WikiText-2 tokens as dense: the stage's own evaluation (the ablation's first
    blocks, or the Pareto stage's whole split). The others are an earlier stage's numbers, not comparable."""
    tokens = models["dense"]["wikitext2"]["target_tokens"]
    return {name for name, e in models.items() if e.get("wikitext2", {}).get("target_tokens") == tokens}


def skipped_per_sequence(entry: dict, where: str = "wikitext2") -> float:
    """Attention sublayers skipped per sequence on ``wikitext2`` or the ``heldout`` set (a static drop: its count)."""
    if entry["kind"] == "dense":
        return 0.0
    if entry["kind"] in ("attention-drop", "static-projection"):
        return float(len(entry["dropped_layers"]))
    routing = entry["wikitext2"] if where == "wikitext2" else entry["routing_heldout"]
    return routing["skipped_layers_per_sequence"]


def measured_skip_ratio(entry: dict, num_layers: int, where: str = "wikitext2") -> float:
    """Share of all attention sublayers skipped on an evaluation set (a static drop: its layer count)."""
    return skipped_per_sequence(entry, where) / num_layers


def counts_around(skipped: float) -> tuple[int, int]:
    """The whole layer counts around ``skipped`` layers per sequence (equal when it is whole)."""
    return math.floor(skipped), math.ceil(skipped)


def drop_at(models: dict, skipped: float, where: str, tokens: int | None = None) -> float | None:
    """The better Attention-Drop (over all layers or restricted to the paper's) at ``skipped`` layers per
    sequence: at each whole layer count around it the lower loss on ``where`` of the two scopes (0: dense), and
    linear between the counts. None where neither scope was evaluated at a count (on WikiText-2: on the same
    ``tokens``)."""
    curve: dict[int, float] = {0: models["dense"][where]["loss"]}
    for e in models.values():
        result = e.get(where) if e["kind"] == "attention-drop" else None
        if result is not None and (tokens is None or result.get("target_tokens") == tokens):
            count = len(e["dropped_layers"])
            curve[count] = min(curve.get(count, math.inf), result["loss"])
    lo, hi = counts_around(skipped)
    if lo not in curve or hi not in curve:
        return None
    return curve[lo] + (skipped - lo) * (curve[hi] - curve[lo])


def drop_matching(models: dict, entry: dict, where: str) -> float | None:
    """The better Attention-Drop's loss on ``where`` at ``entry``'s own measured skips there."""
    return drop_at(models, skipped_per_sequence(entry, where), where, entry[where].get("target_tokens"))


def minus_drop(models: dict, entry: dict, where: str) -> float | None:
    """``entry``'s loss on ``where`` minus :func:`drop_matching` (negative: MindSkip better)."""
    drop = drop_matching(models, entry, where)
    return None if drop is None else entry[where]["loss"] - drop


def best_recipe(models: dict) -> str:
    """The recipe furthest below Attention-Drop at its own measured skip ratio at the ablation's ratio (25%): the
    mean of its WikiText-2 and held-out loss differences (a recipe without both ranks last; ties: by name). Raw
    perplexity would favour the recipes that skip less than the target."""
    scores = {}
    for name, e in models.items():
        if e["kind"] == "mindskip" and e["ratio"] == ABLATION_RATIO and "ablation" in e:
            deltas = [minus_drop(models, e, where) for where in ("wikitext2", "heldout")]
            scores[method_of(name)] = math.inf if None in deltas else sum(deltas) / 2
    if not scores:
        raise SystemExit("no recipe ranked by the ablation yet: run --stage ablation first, or pass --best")
    return min(scores, key=lambda name: (scores[name], name))


def _ablation(run, ratio: float) -> list[str]:
    m, n = run.models, run.meta["num_layers"]
    rows = []
    for name, e in m.items():
        if e.get("ratio") != ratio or e.get("matched"):
            continue
        dynamic, speed = "0.0%", ""
        if e["kind"] == "mindskip":
            r = e["recipe"]
            layers = f"{e['layers'][0]}..{e['layers'][-1]}"
            how = f"{r['loss']}, {r['init']} init{' with a margin layer' if r.get('margin') else ''}"
            how += f", {r['layers']} layers ({layers}), {r['data']}"
            if r.get("centre"):
                how += ", centred router inputs"
            if r.get("cost"):
                how += ", cost-supervised routers"
            if r.get("multiplier"):
                how += f", multiplier from {r['multiplier']:g}"
            if r.get("learning_rate"):
                how += f", lr {r['learning_rate']:g}"
            if r.get("steps") is not None:  # a recipe's own step count (a preset may cap it)
                how += f", {e['steps']} steps"
            dynamic = f"{100 * e['routing_heldout']['mean_disagreement']:.1f}%"
            speed = fmt(e["train_tokens_per_s"], ".0f")
        elif e["kind"] == "static-projection":
            how = f"static projection of {e['of']}, layers {e['dropped_layers']}"
        else:
            how = f"static, layers {e['dropped_layers']}"
        rows.append([method_of(name), how, f"{100 * measured_skip_ratio(e, n):.1f}%",
                     f"{e['wikitext2']['perplexity']:.2f}", f"{e['heldout']['loss']:.4f}", dynamic, speed])
    dense = m["dense"]
    rows.append(["dense", "", "0.0%", f"{dense['wikitext2']['perplexity']:.2f}", f"{dense['heldout']['loss']:.4f}",
                 "", ""])
    return [
        f"## Recipes at a {100 * ratio:g}% skip ratio",
        "",
        f"WikiText-2: the first {m['dense']['ablation']['blocks']} blocks. Skip ratio: share of all attention "
        "sublayers skipped on WikiText-2 (MindSkip: measured; static: its layer count). Disagreement: the mean share "
        "of held-out sequences whose decision differs from their layer's majority (0 = static routing).",
        "",
        *markdown_table(["model", "recipe", "skip ratio", "WikiText-2 ppl", "held-out loss", "disagreement",
                         "train tok/s"], rows),
        "",
    ]


def matched(run) -> list[dict]:
    """Every MindSkip model of this stage's evaluation against the better Attention-Drop at its own measured skip
    ratio, set by set."""
    m, n = run.models, run.meta["num_layers"]
    ours = on_this_split(m)
    out = []
    for name, e in sorted(m.items(), key=lambda kv: (kv[1].get("ratio", 0.0), kv[0])):
        if e["kind"] != "mindskip" or name not in ours:
            continue
        row = {"model": name}
        for where in ("wikitext2", "heldout"):
            drop = drop_matching(m, e, where)
            row[where] = {"skip_ratio": skipped_per_sequence(e, where) / n, "loss": e[where]["loss"],
                          "drop_loss": drop, "minus_drop": None if drop is None else e[where]["loss"] - drop}
        out.append(row)
    return out


def _matched_table(rows: list[dict]) -> list[str]:
    def cells(r: dict, exp: bool) -> list[str]:
        value = (lambda x: fmt(None if x is None else math.exp(x), ".2f")) if exp else (lambda x: fmt(x, ".4f"))
        return [f"{100 * r['skip_ratio']:.1f}%", value(r["loss"]), value(r["drop_loss"]), fmt(r["minus_drop"], "+.4f")]

    return [
        "## At the same skip ratio as Attention-Drop",
        "",
        "A MindSkip model skips a different share on each set (its routers see the input). Attention-Drop over all "
        "layers and restricted to the paper's layers is evaluated at the whole layer counts around its measured "
        "skips per sequence; at each count the better scope on that set counts, linear in loss between counts. Δ is "
        "MindSkip's loss minus Attention-Drop's (negative: MindSkip better).",
        "",
        *markdown_table(["model", "WikiText-2 skip", "ppl", "Attention-Drop ppl", "Δ loss", "held-out skip",
                         "loss", "Attention-Drop loss", "Δ loss"],
                        [[r["model"], *cells(r["wikitext2"], True), *cells(r["heldout"], False)] for r in rows]),
        "",
    ]


def _headroom_table(run) -> list[str]:
    ours = on_this_split(run.models)
    rows = [[name, f"{h['skips_per_token']:.2f}", f"{h['static']:.4f}", f"{h['oracle']:.4f}",
             f"{100 * h['headroom']:.1f}%", f"{h['routers']:.4f}", f"{h['shuffled']:.4f}"]
            for name, e in sorted(run.models.items(), key=lambda kv: (kv[1].get("ratio", 0.0), kv[0]))
            if name in ours and (h := e.get("headroom_heldout")) and h["headroom"] is not None]
    if not rows:
        return []
    return [
        "## How much could per-sequence routing gain?",
        "",
        "First-order KL from the dense model on the held-out set, in nats per supervised token: the cost of skipping "
        "each layer alone for each sequence, summed over the skipped (layer, sequence) pairs "
        "(`mindskip_ext.eval.headroom`), at each model's own token-weighted skips and over its router layers. "
        "Static: the cheapest layers for every sequence. Oracle: the cheapest pairs per token, the best any "
        "per-sequence router could do; headroom = 1 − oracle / static. Routers: the model's decisions. Shuffled: "
        "its per-layer kept fractions with input-independent decisions (routers below shuffled: informative "
        "per-sequence choices; routers above static: the layers chosen cost more than those choices gain).",
        "",
        *markdown_table(["model", "skips per token", "static", "oracle", "headroom", "routers", "shuffled"], rows),
        "",
    ]


def _pareto_rows(run) -> list[list[str]]:
    """Every model of this stage's evaluation; "–" for the tasks of a model not scored on them yet."""
    m, n = run.models, run.meta["num_layers"]
    tasks = list(run.meta["metric"])
    ours = on_this_split(m)
    rows = []
    for name, e in sorted(m.items(), key=lambda kv: (kv[1].get("ratio", 0.0), kv[0])):
        if name not in ours:
            continue
        cells = [fmt(_points(e["tasks"][t]["score"]) if "tasks" in e else None, ".1f") for t in tasks]
        avg = f"{100 * e['avg']:.1f} ± {fmt(_points(e.get('avg_stderr')), '.1f')}" if "avg" in e else "–"
        rows.append(
            [
                name,
                f"{100 * measured_skip_ratio(e, n):.1f}%",
                f"{e['wikitext2']['perplexity']:.2f}",
                f"{e['heldout']['loss']:.4f}",
                avg,
                *cells,
                fmt(e.get("task_capacity"), ".3f"),
            ]
        )
    return rows


def goal_checks(run) -> list[dict]:
    """Per ratio: the best recipe against the better Attention-Drop and the paper recipe (numbers, not verdicts)."""
    m = run.models
    best = run.meta["best_recipe"]
    out = []
    for ratio in run.meta["ratios"]:
        ours, paper = m.get(f"{best}@{ratio}"), m.get(f"paper@{ratio}")
        drops = [e for name, e in m.items() if name.startswith("attention-drop") and e.get("ratio") == ratio
                 and "tasks" in e]
        if ours is None or "tasks" not in ours or not drops:
            continue
        drop = drops[0]
        out.append({
            "ratio": ratio,
            "ppl": ours["wikitext2"]["perplexity"],
            "drop_ppl": drop["wikitext2"]["perplexity"],
            "ppl_at_or_below_drop": ours["wikitext2"]["perplexity"] <= drop["wikitext2"]["perplexity"],
            "avg_minus_drop_points": 100 * (ours["avg"] - drop["avg"]),
            "avg_stderr_points": 100 * ours["avg_stderr"] if ours.get("avg_stderr") else None,
            "heldout_loss": ours["heldout"]["loss"],
            "paper_heldout_loss": paper["heldout"]["loss"] if paper else None,
            "ppl_over_dense": ours["wikitext2"]["perplexity"] / m["dense"]["wikitext2"]["perplexity"],
        })
    return out


def render_markdown(run) -> str:
    meta = run.meta
    machine = meta["machine"]
    lines = [
        f"# MindSkip against Attention-Drop on {meta['model']} ({run.preset} run, stage {meta['stage']})",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads); "
        f"torch {machine['versions']['torch']}, transformers {machine['versions']['transformers']}; commit "
        f"{machine['git_commit']}; started {meta['started']}; this stage took {run.timings['total'] / 60:.0f} min "
        "(resumed stages not counted).",
        "",
    ]
    if meta["stage"] == "ablation":
        for ratio in meta["ratios"]:
            if any(e.get("ratio") == ratio and e["kind"] == "mindskip" for e in run.models.values()):
                lines += _ablation(run, ratio)
    else:
        lines += ["The recipes were ranked on the first WikiText-2 blocks by the ablation stage: its report is "
                  "[pareto_ablation.md](pareto_ablation.md). Here every model is on the whole split; the tables and "
                  "figures leave out the models only the ablation evaluated.", ""]
    if meta.get("matched"):
        lines += _matched_table(meta["matched"])
    lines += _headroom_table(run)
    rows = _pareto_rows(run)
    if rows:
        tasks = list(meta["metric"])
        lines += [
            "## Pareto: every method at each skip ratio",
            "",
            f"Best recipe: **{meta['best_recipe']}**. Accuracy in %, average of the six tasks ± its standard error "
            "(–: not scored on the tasks yet). Task capacity: kept fraction on the MindSkip layers, averaged over "
            "the tasks.",
            "",
            *markdown_table(["model", "skip ratio", "WikiText-2 ppl", "held-out loss", "avg acc",
                             *(t.replace("local_", "") for t in tasks), "task capacity"], rows),
            "",
            "![perplexity](pareto_ppl.png) ![accuracy](pareto_acc.png)",
            "",
        ]
        checks = goal_checks(run)
        if checks:
            lines += ["## Against the goals", ""]
            lines += markdown_table(
                ["skip ratio", "ppl (best / Attention-Drop)", "avg acc − Attention-Drop (pts)", "SE (pts)",
                 "held-out loss (best / paper)", "ppl / dense"],
                [[f"{100 * c['ratio']:.1f}%", f"{c['ppl']:.2f} / {c['drop_ppl']:.2f}",
                  f"{c['avg_minus_drop_points']:+.2f}", fmt(c["avg_stderr_points"], ".2f"),
                  f"{c['heldout_loss']:.4f} / {fmt(c['paper_heldout_loss'], '.4f')}", f"{c['ppl_over_dense']:.3f}"]
                 for c in checks],
            )
            lines.append("")
    sizes = meta["sizes"]
    lines += [
        "## Sizes",
        "",
        f"Router-Tuning: one epoch of {meta['data']['alpaca']['train_examples']} Alpaca examples (or as many from the "
        f"mixture {meta['data']['mix']['weights']} of Alpaca, GSM8K train and WikiText-2 valid), batch "
        f"{sizes['batch_size']}, lr {sizes['learning_rate']}, max length {sizes['max_length']}; held-out: "
        f"{meta['data']['alpaca']['heldout_examples']} Alpaca examples. WikiText-2 test: "
        f"{meta['data']['wikitext2_test']['blocks']} blocks of "
        f"{meta['data']['wikitext2_test']['block_tokens']} tokens.",
        "Scored items: " + ", ".join(f"{t.replace('local_', '')} {meta['items'][t]}" for t in meta["metric"]) + ".",
        "",
        "## Wall-clock per stage (s)",
        "",
        *markdown_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in run.timings.items()]),
        "",
    ]
    return "\n".join(lines)


def plot(run, output: Path) -> dict[str, Path]:
    m, n = run.models, run.meta["num_layers"]
    dense, ours = m["dense"], on_this_split(m)
    methods: dict[str, list[tuple[float, dict]]] = {}
    for name, e in m.items():
        if e["kind"] != "dense" and "ratio" in e and name in ours:
            methods.setdefault(method_of(name), []).append((measured_skip_ratio(e, n), e))
    paths = {}
    for key, ylabel, value, err in (
        ("ppl", "WikiText-2 perplexity", lambda e: e["wikitext2"]["perplexity"], None),
        ("acc", "average accuracy of the six tasks (%)", lambda e: 100 * e["avg"],
         lambda e: 100 * (e.get("avg_stderr") or 0.0)),
    ):
        needs = "wikitext2" if key == "ppl" else "avg"
        if needs not in dense:
            continue
        path = output / f"pareto_{key}.png"
        with figure(path, 1, (7, 4.5), f"{run.meta['model']}: quality against skip ratio") as ax:
            ax.axhline(value(dense), color="grey", ls="--", label="dense")
            for method, points in sorted(methods.items()):
                points = sorted(((x, e) for x, e in points if needs in e), key=lambda p: p[0])
                if not points:
                    continue
                xs = [100 * x for x, _ in points]
                ys = [value(e) for _, e in points]
                if err is None:
                    ax.plot(xs, ys, "o-", label=method)
                else:
                    ax.errorbar(xs, ys, yerr=[err(e) for _, e in points], fmt="o-", capsize=3, label=method)
            ax.set_xlabel("skip ratio (% of all attention sublayers)")
            ax.set_ylabel(ylabel)
            if key == "ppl":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        paths[key] = path
    return paths


def write_outputs(run, output: Path) -> dict[str, Path]:
    from dataclasses import asdict

    output.mkdir(parents=True, exist_ok=True)
    run.meta["goal_checks"] = goal_checks(run) if "best_recipe" in run.meta else []
    run.meta["matched"] = matched(run)
    markdown = "pareto_ablation.md" if run.meta["stage"] == "ablation" else "pareto.md"
    paths = {"json": output / "pareto.json", "markdown": output / markdown}
    payload = {"preset": run.preset, "sizes": asdict(run.sizes), "meta": run.meta, "timings": run.timings,
               "models": run.models}
    paths["json"].write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    paths["markdown"].write_text(render_markdown(run))
    paths.update(plot(run, output))
    return paths
