"""The report of a replication run (:mod:`bench.replicate`): the paper's comparisons as numbers
(:func:`findings`), ``replication.md`` with the tables in the layout of the paper's Table 1, and Figure 2.

Everything here reads a finished :class:`bench.experiment.Run`; the tasks, their metrics and their order are
the run's own (``run.meta["metric"]``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .common import markdown_table
from .plot import figure

TASK_LABELS = {
    "local_piqa": "PIQA", "local_boolq": "BoolQ", "local_rte": "RTE", "local_hellaswag": "HellaSwag",
    "local_openbookqa": "OBQA", "local_mmlu": "MMLU",
}
GRANULARITY_LABELS = {"block": "Block", "mlp": "MLP", "attn": "Attn"}


# ---------------------------------------------------------------------------------------- findings


def skip_ratio(entry: dict, num_layers: int) -> float:
    """Share of all attention sublayers a MindSkip-Attn model skips, averaged over the evaluated tasks."""
    return (1.0 - entry["task_capacity"]) * len(entry["layers"]) / num_layers


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def findings(models: dict[str, dict], num_layers: int) -> dict:
    """The comparisons the paper makes, as numbers (average accuracy in points, perplexity ratios)."""
    m = models

    def pts(a, b):
        return round(100 * (m[a]["avg"] - m[b]["avg"]), 2)

    attn_ratio = skip_ratio(m["mindskip-attn"], num_layers)
    drops = [(e["skip_ratio"], e["avg"]) for e in m.values() if e["kind"] == "attention-drop"]
    drop_ppl = [(e["skip_ratio"], e["wikitext2"]["perplexity"]) for e in m.values() if e["kind"] == "attention-drop"]
    drop_avg = _interpolate(drops, attn_ratio)
    ours, ref = m["mindskip-attn"], m["reference-attn"]
    return {
        "attn_minus_mlp_points": pts("mindskip-attn", "mindskip-mlp"),
        "attn_minus_block_points": pts("mindskip-attn", "mindskip-block"),
        "mlp_minus_block_points": pts("mindskip-mlp", "mindskip-block"),
        "attn_minus_dense_points": pts("mindskip-attn", "dense"),
        "attn_skip_ratio": attn_ratio,
        "attention_drop_avg_at_attn_skip_ratio": drop_avg,
        "attn_minus_attention_drop_points": None if drop_avg is None else round(100 * (ours["avg"] - drop_avg), 2),
        "attention_drop_ppl_at_attn_skip_ratio": _interpolate(drop_ppl, attn_ratio),
        "ours_minus_reference_points": pts("mindskip-attn", "reference-attn"),
        "ours_minus_reference_heldout_loss": ours["heldout"]["loss"] - ref["heldout"]["loss"],
        "ours_over_reference_wikitext2_ppl": ours["wikitext2"]["perplexity"] / ref["wikitext2"]["perplexity"],
        "reference_lambda": ref["tuning"].get("l1_lambda"),
    }


# ------------------------------------------------------------------------------------------ output


def write_outputs(run, output: Path) -> dict[str, Path]:
    """``replication.json`` (every number), ``replication.md`` and ``replication_figure2.png`` in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "replication.json", "markdown": output / "replication.md",
             "plot": output / "replication_figure2.png"}
    payload = {"preset": run.preset, "sizes": asdict(run.sizes), "meta": run.meta, "timings": run.timings,
               "models": run.models}
    paths["json"].write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    paths["markdown"].write_text(render_markdown(run))
    plot(run, paths["plot"])
    return paths


def fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def render_markdown(run) -> str:
    tasks = list(run.meta["metric"])
    score_head = [TASK_LABELS[t] for t in tasks] + ["Avg", "WikiText-2 ppl"]
    sections = (
        _summary(run),
        _table1(run, tasks, score_head),
        _figure2(run, tasks, score_head),
        _procedures(run, tasks, score_head),
        _findings(run),
        _capacities(run, tasks),
        _sizes(run, tasks),
        _timings(run),
    )
    return "\n".join(line for section in sections for line in section)


def _score_cells(entry: dict, tasks: list[str]) -> list[str]:
    """Task scores (%), their average and the WikiText-2 perplexity of one model."""
    return ([f"{100 * entry['tasks'][t]['score']:.1f}" for t in tasks]
            + [f"**{100 * entry['avg']:.1f}**", f"{entry['wikitext2']['perplexity']:.2f}"])


def _summary(run) -> list[str]:
    meta, machine = run.meta, run.meta["machine"]
    versions = machine["versions"]
    return [
        f"# Router-Tuning replication on {meta['model']} ({run.preset} run)",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_cores']} cores, {machine['torch_threads']} "
        f"torch threads){', GPU ' + machine['gpu'] if machine['gpu'] else ''}; "
        f"torch {versions['torch']}, transformers {versions['transformers']}, "
        f"lm_eval {versions['lm_eval']}; commit {machine['git_commit']}; "
        f"started {meta['started']}; total wall-clock {run.timings['total'] / 60:.1f} min; this process used "
        f"{100 * meta['cpu_share']:.0f}% of the {machine['torch_threads']} threads' CPU time over the run "
        f"(load average {meta['load_average_start'][1]:.1f} at the start, "
        f"{meta['load_average_end'][1]:.1f} at the end).",
        "",
    ]


def _table1(run, tasks: list[str], score_head: list[str]) -> list[str]:
    meta, m = run.meta, run.models
    layers = m["mindskip-attn"]["layers"]
    rows = [[f"{meta['model']} (dense)", "–", "1.00", *_score_cells(m["dense"], tasks)]]
    for granularity in ("block", "mlp", "attn"):
        e = m[f"mindskip-{granularity}"]
        rows.append(["MindSkip", GRANULARITY_LABELS[granularity], f"{e['task_capacity']:.2f}",
                     *_score_cells(e, tasks)])
    return [
        f"## Table 1: MindSkip at capacity 0.5 (layers {layers[0]}..{layers[-1]} of {meta['num_layers']})",
        "",
        *markdown_table(["Method", "Granularity", "Capacity", *score_head], rows),
        "",
        "Scores in %: " + ", ".join(f"{TASK_LABELS[t]} {meta['metric'][t]}" for t in tasks)
        + ". Capacity: the kept fraction over MindSkip layers and evaluated sequences, averaged over the tasks.",
        "",
    ]


def _figure2(run, tasks: list[str], score_head: list[str]) -> list[str]:
    m, num_layers = run.models, run.meta["num_layers"]
    ours = m["mindskip-attn"]
    rows = [["MindSkip-Attn (ours)", f"{100 * skip_ratio(ours, num_layers):.1f}%", "dynamic",
             *_score_cells(ours, tasks)]]
    rows += [["Attention-Drop", f"{100 * e['skip_ratio']:.1f}%", ", ".join(map(str, e["dropped_layers"])),
              *_score_cells(e, tasks)] for e in m.values() if e["kind"] == "attention-drop"]
    return [
        "## Figure 2: MindSkip vs static Attention-Drop",
        "",
        "Skip ratio: share of all attention sublayers skipped (MindSkip-Attn: its measured average over the tasks).",
        "",
        *markdown_table(["Model", "Skip ratio", "Dropped layers", *score_head], rows),
        "",
        "![Figure 2](replication_figure2.png)",
        "",
    ]


def _procedures(run, tasks: list[str], score_head: list[str]) -> list[str]:
    m, f = run.models, run.meta["findings"]
    rows = [[label, f"{e['heldout']['capacity']:.3f}", f"{e['heldout']['loss']:.4f}", *_score_cells(e, tasks)]
            for label, e in (("ours", m["mindskip-attn"]), ("reference", m["reference-attn"]))]
    before = m["reference-attn"].get("heldout_before_calibration", {})
    return [
        "## Our training procedure vs the reference code's (attn, matched capacity)",
        "",
        "Ours: masked mean router input, straight-through gradient for every sequence, target-capacity control. "
        "Reference: mean over padding too, gradient only through kept sequences, fixed lambda "
        f"(= {f['reference_lambda']:.4g}, our controller's mean coefficient over its last half of steps); "
        "both end with the same common router-bias calibration to capacity 0.5 on training sequences.",
        "",
        *markdown_table(["Procedure", "Held-out capacity", "Held-out loss", *score_head], rows),
        "",
        f"Reference before calibration: held-out capacity {fmt(before.get('capacity'), '.3f')}, "
        f"loss {fmt(before.get('loss'), '.4f')}.",
        "",
    ]


def _findings(run) -> list[str]:
    f = run.meta["findings"]
    return [
        "## Findings (average accuracy, points)",
        "",
        f"- Attn − MLP: {f['attn_minus_mlp_points']:+.2f}; Attn − Block: {f['attn_minus_block_points']:+.2f}; "
        f"MLP − Block: {f['mlp_minus_block_points']:+.2f}.",
        f"- MindSkip-Attn − dense: {f['attn_minus_dense_points']:+.2f}.",
        f"- MindSkip-Attn − Attention-Drop at the same skip ratio ({100 * f['attn_skip_ratio']:.1f}%, interpolated "
        f"between the neighbouring layer counts): {fmt(f['attn_minus_attention_drop_points'], '+.2f')}.",
        f"- Ours − reference procedure: {f['ours_minus_reference_points']:+.2f}; held-out loss difference "
        f"{f['ours_minus_reference_heldout_loss']:+.4f}; "
        f"WikiText-2 ppl ratio {f['ours_over_reference_wikitext2_ppl']:.3f}.",
        "",
    ]


def _capacities(run, tasks: list[str]) -> list[str]:
    rows = []
    for name in ("mindskip-attn", "mindskip-mlp", "mindskip-block", "reference-attn"):
        e = run.models[name]
        rows.append([name, *(fmt(e["tasks"][t]["capacity"], ".3f") for t in tasks),
                     fmt(e["wikitext2"].get("capacity"), ".3f"), f"{e['heldout']['capacity']:.3f}"])
    header = ["Model", *(TASK_LABELS[t] for t in tasks), "WikiText-2", "held-out instructions"]
    return ["## Capacity reached per task", "", *markdown_table(header, rows), ""]


def _sizes(run, tasks: list[str]) -> list[str]:
    meta, s, m = run.meta, run.sizes, run.models
    items, shots, paper = meta["items"], meta["num_fewshot"], meta["paper_shots"]
    return [
        "## Sizes",
        "",
        "Scored items (of those available): "
        + ", ".join(f"{TASK_LABELS[t]} {items[t]}/{meta['items_available'][t]}" for t in tasks)
        + (f" (MMLU: {s.mmlu_per_subject} per subject)" if s.mmlu_per_subject else "") + ".",
        "Shots: " + ", ".join(
            f"{TASK_LABELS[t]} {shots[t]}" + (f" (paper: {paper[t]})" if shots[t] != paper[t] else "") for t in tasks
        ) + ".",
        f"WikiText-2 test: {meta['wikitext2']['blocks']} blocks of {meta['wikitext2']['block_tokens']} tokens.",
        f"Router-Tuning: {meta['train_examples']} training / {meta['heldout_examples']} held-out instruction examples "
        f"(max {s.max_length} tokens), batch {s.batch_size}, {m['mindskip-attn']['steps']} steps, "
        f"lr {s.learning_rate}; {m['mindskip-attn']['trainable_parameters']} trainable parameters.",
        f"Attention-Drop similarity scores from {meta['attention_drop']['calibration_sequences']} training sequences.",
        "",
    ]


def _timings(run) -> list[str]:
    resumed = run.meta.get("resumed")
    return [
        "## Wall-clock per stage (s)",
        "",
        *([f"Resumed from an interrupted run: {', '.join(resumed)} (their stages' seconds are from that "
           "run; `total` counts this run only).", ""] if resumed else []),
        *markdown_table(["Stage", "Seconds"], [[k, f"{v:.0f}"] for k, v in run.timings.items()]),
        "",
    ]


def plot(run, path: Path) -> None:
    """Figure 2: average accuracy and WikiText-2 perplexity against skip ratio, MindSkip-Attn vs Attention-Drop."""
    m, num_layers = run.models, run.meta["num_layers"]
    drops = sorted((e["skip_ratio"], e["avg"], e["wikitext2"]["perplexity"]) for e in m.values()
                   if e["kind"] == "attention-drop")
    title = f"{run.meta['model']}: MindSkip vs Attention-Drop ({run.preset} run)"
    with figure(path, 2, (11, 4.2), title, dpi=120) as axes:
        for ax, col, ylabel in ((axes[0], 1, "average accuracy (%)"), (axes[1], 2, "WikiText-2 perplexity")):
            scale = 100 if col == 1 else 1
            dense = m["dense"]["avg"] * 100 if col == 1 else m["dense"]["wikitext2"]["perplexity"]
            ax.axhline(dense, color="grey", linestyle="--", label="dense")
            ax.plot([100 * d[0] for d in drops], [scale * d[col] for d in drops], "o-", color="tab:orange",
                    label="Attention-Drop (static)")
            for name, marker, color, label in (
                ("mindskip-attn", "*", "tab:blue", "MindSkip-Attn (ours)"),
                ("reference-attn", "s", "tab:green", "MindSkip-Attn (reference training)"),
            ):
                e = m[name]
                y = 100 * e["avg"] if col == 1 else e["wikitext2"]["perplexity"]
                ax.plot([100 * skip_ratio(e, num_layers)], [y], marker, color=color,
                        markersize=14 if marker == "*" else 8, label=label, linestyle="none")
            ax.set_xlabel("skip ratio (% of attention sublayers)")
            ax.set_ylabel(ylabel)
            if col == 2:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8, loc="best")
