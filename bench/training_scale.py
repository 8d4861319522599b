"""Router-Tuning at scale, measured on this machine: tokens/s of one process against two data-parallel processes
(``torchrun``, one thread each, the same global batch), and the peak memory of a step with and without
activation checkpointing.

    python -m bench.training_scale [--model smollm2] [--steps 12] [--batch-size 8] [--max-length 256]

Every measurement is a fresh ``mindskip train`` process, so its peak memory (the resident set on the CPU) is that
run's own; rows go to
``bench/results/training_scale.{json,md}``. On a GPU the same commands run with ``--device cuda``; this script
measures the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS_DIR, ROOT, machine_info, markdown_table
from .experiment import ALPACA, DEFAULT_DATA_DIR


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args, out: Path, processes: int, *extra: str) -> dict:
    """One ``mindskip train`` run: its tokens/s, wall seconds and peak memory (of the main process)."""
    flags = ["train", "--model", args.model, "--data", str(args.data_dir / ALPACA), "--output", str(out),
             "--target-capacity", "0.5", "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--max-length", str(args.max_length), "--save-every", "0", "--no-progress", "--threads", "1",
             "--no-calibrate", "--recipe", "paper", *extra]  # the recipe of the committed results
    command = [sys.executable, "-m", "mindskip_ext.cli", *flags]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={_port()}", "-m", "mindskip_ext.cli", *flags]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"processes": processes, "flags": list(extra), "seconds": round(seconds, 1),
            "train_tokens_per_s": result["train_tokens_per_s"], "peak_memory_mib": result["peak_memory_mib"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.training_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--output", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(train(args, Path(tmp) / "ckpt", 1, "--gradient-checkpointing", "--grad-accum", "2"))
        rows.append(train(args, Path(tmp) / "plain", 1, "--grad-accum", "2"))
        rows.append(train(args, Path(tmp) / "two", 2))
    payload = {"machine": machine_info(("torch", "transformers", "mindskip_ext")), "model": args.model,
               "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "rows": rows,
               # other work on the machine skews the 2-process row most: say how busy it was
               "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "training_scale.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown_table(
        ["run", "processes x threads", "global batch", "train tokens/s", "wall s", "peak RSS (MiB, rank 0)"],
        [[" ".join(r["flags"]) or "plain", f"{r['processes']} x 1", str(2 * args.batch_size),
          f"{r['train_tokens_per_s']:.0f}", f"{r['seconds']:.0f}",
          f"{r['peak_memory_mib']:.0f}"] for r in rows],
    )
    text = "\n".join([
        f"# Router-Tuning throughput and memory ({args.model}, {args.steps} steps, batch {args.batch_size} x 2, "
        f"max length {args.max_length})", "",
        f"{payload['machine']['cpu']}; commit {payload['machine']['git_commit']}; 1-minute load average "
        f"{payload['load_average_1min']['before']} before, {payload['load_average_1min']['after']} after.", "",
        *table, ""])
    (args.output / "training_scale.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
