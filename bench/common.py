"""Shared benchmark plumbing: the one result-row schema and the results files, the machine info every
result records (:func:`machine_info`), timing statistics, and markdown tables for every bench report.

Every section writes rows with the same fields (see :class:`Writer.add`):

    section, name, provider, params (JSON object), median_ms, p20_ms, p80_ms,
    metrics (e.g. {"gbps": ..., "speedup_vs_eager": ..., "frac_peak_bw": ...}),
    device, device_name, torch, transformers, mindskip, git_commit, timestamp

Rows are appended to ``bench/results/<device-slug>.jsonl``; ``bench/results/<device-slug>.md``
is regenerated from that file (the latest row of each section/name/provider/params).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from mindskip_ext.devices import pick_device
from mindskip_ext.timing import time_ms

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
ROW_FIELDS = (
    "section", "name", "provider", "params", "median_ms", "p20_ms", "p80_ms", "metrics",
    "device", "device_name", "torch", "transformers", "mindskip", "git_commit", "timestamp",
)


# ---------------------------------------------------------------------------------------------
# Device and environment


def resolve_device(name: str) -> torch.device:
    try:
        return pick_device(name)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux, the platform's processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    base = torch.cuda.get_device_name(device) if device.type == "cuda" else device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{device.type}-{base}".lower()).strip("-")
    return slug


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=30, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(packages=("torch", "transformers", "mindskip_ext")) -> dict:
    """The machine and software a result came from: the benchmark rows and the replication both record this."""
    return {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {package: _version(package) for package in packages},
        "git_commit": git_commit(),
    }


def utc_timestamp() -> str:
    """Now in UTC, to the second, in ISO 8601 (``2025-01-31T12:00:00+00:00``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


# ---------------------------------------------------------------------------------------------
# Timing


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    """Achievable memory bandwidth on a GPU: a large device-to-device copy (read + write)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), device, reps=20, warmup=3)
    return 2 * (1 << 30) / (statistics.median(times) * 1e6)


# ---------------------------------------------------------------------------------------------
# Results


class Writer:
    """Collects the rows of one run and writes them to the device's results files."""

    def __init__(self, device: torch.device, results_dir: Path = RESULTS_DIR):
        self.device = device
        self.results_dir = results_dir
        self.rows: list[dict] = []
        info = machine_info()
        self._env = {
            "device": device.type,
            "device_name": device_name(device),
            "torch": torch.__version__,  # the build (e.g. 2.10.0+cu130), not only the release
            "transformers": info["versions"]["transformers"],
            "mindskip": info["versions"]["mindskip_ext"],
            "git_commit": info["git_commit"],
        }
        self.slug = device_slug(device)

    def add(self, section: str, name: str, provider: str, params: dict, times_ms: list[float], **metrics) -> dict:
        row = {
            "section": section,
            "name": name,
            "provider": provider,
            "params": params,
            "median_ms": statistics.median(times_ms),
            "p20_ms": quantile(times_ms, 0.2),
            "p80_ms": quantile(times_ms, 0.8),
            "metrics": {k: v for k, v in metrics.items() if v is not None},
            **self._env,
            "timestamp": utc_timestamp(),
        }
        assert tuple(row) == ROW_FIELDS
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row

    def finish(self) -> tuple[Path, Path]:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.results_dir / f"{self.slug}.jsonl"
        with jsonl.open("a") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        markdown = self.results_dir / f"{self.slug}.md"
        markdown.write_text(render_markdown(read_rows(jsonl)))
        return jsonl, markdown


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def format_row(row: dict) -> str:
    metrics = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["metrics"].items())
    return (
        f"{row['section']:>6} {row['name']:<22} {row['provider']:<9} {_params_text(row['params']):<40} "
        f"median {row['median_ms']:9.3f} ms  {metrics}"
    )


def render_markdown(rows: list[dict]) -> str:
    """A table of the latest row per (section, name, provider, params), in first-seen order."""
    latest: dict[str, dict] = {}
    for row in rows:
        key = json.dumps([row["section"], row["name"], row["provider"], row["params"]], sort_keys=True)
        latest.pop(key, None)
        latest[key] = row
    ordered = sorted(
        latest.values(),
        key=lambda r: (r["section"], r["name"], json.dumps(r["params"], sort_keys=True), r["provider"]),
    )
    metric_names = sorted({k for r in ordered for k in r["metrics"]})
    head = ["section", "name", "provider", "params", "median ms", "p20-p80 ms", *metric_names]
    lines = []
    if ordered:
        last = max(ordered, key=lambda r: r["timestamp"])
        lines += [
            f"# Benchmarks on {last['device_name']}",
            "",
            f"torch {last['torch']}, transformers {last['transformers']}, mindskip_ext {last['mindskip']}, "
            f"commit {last['git_commit']}, latest run {last['timestamp']}. Machine-readable rows: the .jsonl "
            "file next to this one. `speedup_vs_eager` = eager median / this median.",
            "",
        ]
    lines += markdown_table(head, [
        [
            r["section"], r["name"], r["provider"], _params_text(r["params"]),
            f"{r['median_ms']:.3f}", f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            *(_metric_text(r["metrics"].get(m)) for m in metric_names),
        ]
        for r in ordered
    ])
    return "\n".join(lines) + "\n"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table; an empty cell is written ``| |``."""
    return [_markdown_row(header), "|" + "---|" * len(header), *(_markdown_row(row) for row in rows)]


def _markdown_row(cells: list[str]) -> str:
    return "|" + "".join(f" {cell} |" if cell else " |" for cell in cells)


def _metric_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def env_summary() -> str:
    return f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}"
