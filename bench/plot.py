"""Plots: the e2e section's speedup against kept fraction and decode tokens/s against batch size, and
:func:`figure`, the one figure helper every bench report draws with.

    python -m bench.plot bench/results/<device-slug>.jsonl      # writes <device-slug>-e2e.png beside it

Uses the latest row of each (name, provider, params) in the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def figure(path: Path, ncols: int, figsize: tuple[float, float], title: str, dpi: int = 110):
    """An off-screen (Agg) figure with ``ncols`` axes side by side, yielded as the array of axes; on a clean exit
    it gets ``title``, is laid out and saved to ``path``. Closed either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield axes
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def latest_e2e_rows(path: Path) -> list[dict]:
    latest = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row["section"] == "e2e":
            latest[json.dumps([row["name"], row["provider"], row["params"]], sort_keys=True)] = row
    return list(latest.values())


def plot(jsonl: Path, out: Path | None = None) -> Path:
    rows = latest_e2e_rows(jsonl)
    if not rows:
        raise SystemExit(f"{jsonl} has no e2e rows")
    out = out or jsonl.with_name(jsonl.stem + "-e2e.png")
    device = rows[-1]["device_name"]

    def pick(name, provider, **where):
        return [r for r in rows if r["name"] == name and r["provider"] == provider
                and all(r["params"].get(k) == v for k, v in where.items())]

    # The point with the most work (largest B*T) that has a fraction sweep.
    swept = {(r["params"]["B"], r["params"]["T"]) for r in pick("prefill", "mindskip")}
    batch, seqlen = max(swept, key=lambda bt: (bt[0] * bt[1], bt[1]))
    with figure(out, 3, (16, 4.5), f"MindSkip end to end on {device}") as axes:
        _speedups(axes[:2], pick, batch, seqlen)
        _throughput(axes[2], pick)
    return out


def _speedups(axes, pick, batch, seqlen):
    """Measured and ideal speedup against kept fraction, prefill and decode, at one (B, T) point."""
    for ax, name in zip(axes, ("prefill", "decode"), strict=True):
        for provider, style in (("mindskip", "o-"), ("attn-drop", "s--")):
            pts = sorted(pick(name, provider, B=batch, T=seqlen), key=lambda r: r["params"]["kept"])
            if pts:
                kept = [r["params"]["kept"] for r in pts]
                mid = [r["metrics"]["speedup_vs_hf"] for r in pts]
                # p20-p80 of the per-round speedups where the run recorded them (older rows have none).
                low = [m - r["metrics"].get("speedup_p20", m) for m, r in zip(mid, pts, strict=True)]
                high = [r["metrics"].get("speedup_p80", m) - m for m, r in zip(mid, pts, strict=True)]
                ax.errorbar(kept, mid, yerr=[low, high], fmt=style, capsize=3,
                            label=f"{provider} (measured, p20-p80)")
        ideal = pick(name, "mindskip", B=batch, T=seqlen)
        ax.plot(*_xy((r["params"]["kept"], r["metrics"]["ideal_speedup"]) for r in ideal), "k:",
                label="ideal (skipped attention free)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("kept fraction of (layer, sequence) pairs")
        ax.set_ylabel("speedup vs unconverted HF model")
        ax.set_title(f"{name}, B={batch}, T={seqlen}")
        ax.legend()


def _throughput(ax, pick):
    """Decode tokens/s against batch size at the longest prompt: dense, MindSkip at half kept, and its ideal."""
    lengths = sorted({r["params"]["T"] for r in pick("decode", "hf")})
    seqlen_d = lengths[-1]
    dense = _xy((r["params"]["B"], r["metrics"]["tokens_per_s"]) for r in pick("decode", "hf", T=seqlen_d))
    half = [r for r in pick("decode", "mindskip", T=seqlen_d) if abs(r["params"]["kept"] - 0.5) < 0.07]
    ax.plot(*dense, "k^-", label="unconverted HF")
    if half:
        ax.plot(*_xy((r["params"]["B"], r["metrics"]["tokens_per_s"]) for r in half), "o-", label="MindSkip, 50% kept")
        ax.plot(*_xy((r["params"]["B"], r["metrics"]["ideal_tokens_per_s"]) for r in half), "k:",
                label="ideal, 50% kept")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode throughput, T={seqlen_d}")
    ax.legend()


def _xy(points) -> tuple[list, list]:
    """The x and the y values of (x, y) points, in order of x."""
    ordered = sorted(points)
    return [x for x, _ in ordered], [y for _, y in ordered]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    print(plot(args.jsonl, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
