"""The two-line summary of a GPU session (``bench/gpu_session.sh``), read from its files:

* the session log, where each step's output stands between ``### step NAME (limit S s)`` and
  ``### end NAME rc=R seconds=S limit=L`` (or a ``### skip NAME: why`` line instead);
* the bench rows of the session's device (``<device>.jsonl``, the schema of :mod:`bench.common`).

Line 1: whether bad inputs raise or crash (bench.gpu_throw_probe), the tests passed and failed, the sanitizer's error
count, the build time and every step that failed, timed out or was skipped. Line 2: the GB/s of router_gate,
gather+scatter and pack+unpack at the largest shape each ran, as a share of the device's copy bandwidth (measured in
the same micro run); per e2e point, MindSkip's speedup over the unconverted model against the ideal one, and its
decode speed as a share of Attention-Drop's at the same kept share; the decode step time of each variant the
profile steps timed (compiled first), MindSkip's again as a share of Attention-Drop's; and per token_decode point each
routed variant's decode speedup over the faster dense cache against its ideal, with one token-routed layer's prefill.

    python -m bench.gpu_summary --log OUT/session.log --rows OUT/<device>.jsonl [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

STEP_START = re.compile(r"^### step (\S+) \(limit \d+ s\)$")
STEP_END = re.compile(r"^### end (\S+) rc=(\d+) seconds=(\d+) limit=(\d+)$")
STEP_SKIP = re.compile(r"^### skip (\S+): (.+)$")
# timeout(1) exits 124 when it stopped the step, 137 when the step ignored that and was killed.
TIMED_OUT = (124, 137)
# The compiled ops of the micro section (bench/micro.py) the summary quotes, at the largest shape each ran.
MICRO_OPS = {"router": "router_gate", "gather_scatter": "gather+scatter", "pack_unpack": "pack+unpack"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Step:
    name: str
    text: str = ""
    rc: int | None = None  # None: started, but the log ends before its end line (the whole command was stopped)
    seconds: int | None = None
    limit: int | None = None
    skipped: str | None = None

    def problem(self) -> str | None:
        """What went wrong with this step, or None when it exited 0."""
        if self.skipped is not None:
            return f"skipped ({self.skipped})"
        if self.rc is None:
            return "cut off"
        if self.rc in TIMED_OUT:
            return f"timed out after {self.limit} s"
        return f"exit {self.rc}" if self.rc else None


def read_steps(log: str) -> dict[str, Step]:
    """The steps of a session log, by name, in the order they ran."""
    steps: dict[str, Step] = {}
    current = None
    for line in log.splitlines():
        if match := STEP_START.match(line):
            current = steps[match[1]] = Step(match[1])
        elif match := STEP_END.match(line):
            step = steps.setdefault(match[1], Step(match[1]))
            step.rc, step.seconds, step.limit = int(match[2]), int(match[3]), int(match[4])
            current = None
        elif match := STEP_SKIP.match(line):
            steps[match[1]] = Step(match[1], skipped=match[2])
        elif current is not None:
            current.text += line + "\n"
    return steps


def pytest_counts(text: str) -> dict[str, int] | None:
    """The counts of pytest's last summary line (``2 failed, 310 passed, 3 skipped in 41.0s`` -> {"failed": 2,
    ...}; ``8/912 tests collected (904 deselected) in 5.1s`` -> {"collected": 8, "deselected": 904}), or None."""
    for line in reversed(text.splitlines()):
        if collected := re.search(r"(\d+)(?:/\d+)? tests? collected", line):
            counts = {"collected": int(collected[1])}
            counts.update((word, int(n)) for n, word in re.findall(r"(\d+) (deselected|errors?)", line))
            return _plural_errors(counts)
        if re.search(r" in [\d.]+s\b", line) and re.search(r"\d+ (passed|failed|errors?|skipped)\b", line):
            return _plural_errors({word: int(n) for n, word in re.findall(r"(\d+) ([a-z]+)", line)})
    return None


def _plural_errors(counts: dict[str, int]) -> dict[str, int]:
    if "error" in counts:
        counts["errors"] = counts.pop("error")
    return counts


def sanitizer_errors(text: str) -> int | None:
    """compute-sanitizer's ``========= ERROR SUMMARY: N errors`` count, or None when it printed none."""
    found = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    return int(found[-1]) if found else None


def sanitize_cases(text: str) -> tuple[int, int] | None:
    """(cases, failed) of the ``sanitize: N cases, M failed`` line of :mod:`bench.gpu_sanitize`, or None."""
    found = re.findall(r"^sanitize: (\d+) cases, (\d+) failed$", text, re.MULTILINE)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def tests_text(step: Step | None, dry_run: bool) -> str:
    if step is None or step.skipped is not None:  # a skipped step's reason is among the problems
        return "tests: not run"
    counts = pytest_counts(step.text)
    if counts is None:
        return f"tests: no result ({step.problem() or 'no pytest summary line'})"
    if dry_run:
        return f"tests (dry run): {counts.get('collected', 0)} selected by -m cuda"
    parts = [f"{counts.get('passed', 0)} passed", f"{counts.get('failed', 0)} failed"]
    if counts.get("errors"):  # errors in fixtures, or test modules that could not be imported
        parts.append(_count(counts["errors"], "error"))
    if counts.get("skipped"):
        parts.append(f"{counts['skipped']} skipped")
    return "tests: " + ", ".join(parts)


PROBE_LINE = re.compile(r"^throw probe: (\S+) on \S+ (in a fresh process|after torch\.compile) ?.*?: (.+)$")


def probe_text(step: Step | None) -> str | None:
    """``throw probe: 5 of 5 raised`` or the cases that did not raise, from bench.gpu_throw_probe's lines."""
    if step is None or step.skipped is not None:
        return None
    found = [m for line in step.text.splitlines() if (m := PROBE_LINE.match(line))]
    if not found:
        return f"throw probe: no result ({step.problem() or 'no case reported'})"
    bad = [f"{m[1]} {'fresh' if m[2].startswith('in') else 'after compile'} {m[3]}" for m in found if m[3] != "raised"]
    return f"throw probe: {len(found) - len(bad)} of {len(found)} raised" + (f" ({', '.join(bad)})" if bad else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def sanitizer_text(step: Step | None, dry_run: bool) -> str:
    if step is None or step.skipped is not None:
        return "sanitizer: not run"
    cases = sanitize_cases(step.text)
    ran = f"{cases[0]} cases, {cases[1]} failed" if cases else "the op script did not finish"
    if dry_run:
        return f"sanitizer (dry run, no compute-sanitizer): {ran}"
    errors = sanitizer_errors(step.text)
    if errors is None:
        return f"sanitizer: no error summary ({step.problem() or 'none printed'})"
    return f"sanitizer (memcheck): {_count(errors, 'error')}, {ran}"


def latest(rows: list[dict]) -> list[dict]:
    """The last row of each (section, name, provider, params): a results file can hold earlier runs too."""
    last = {json.dumps([r["section"], r["name"], r["provider"], r["params"]], sort_keys=True): r for r in rows}
    return list(last.values())


def _bytes(params: dict) -> int:
    """The size of a micro case's (B, T, D) input."""
    return params["B"] * params["T"] * params["D"] * DTYPE_BYTES[params["dtype"]]


def bandwidth_text(rows: list[dict]) -> str:
    """Per compiled op of the micro section, at its largest shape: GB/s as a share of the copy bandwidth."""
    largest: dict[str, dict] = {}
    for row in rows:
        if row["section"] == "micro" and row["provider"] == "mindskip" and row["name"] in MICRO_OPS:
            best = largest.get(row["name"])
            if best is None or _bytes(row["params"]) >= _bytes(best["params"]):
                largest[row["name"]] = row
    if not largest:
        return "micro: no rows"
    parts, copy = [], None
    for name, label in MICRO_OPS.items():
        if (row := largest.get(name)) is None:
            continue
        params, metrics = row["params"], row["metrics"]
        shape = f"{params['dtype']} B={params['B']} T={params['T']} D={params['D']}"
        share = metrics.get("frac_peak_bw")
        if share is None:
            parts.append(f"{label} {shape}: {metrics['gbps']:.4g} GB/s")
            continue
        copy = metrics["gbps"] / share
        parts.append(f"{label} {shape}: {share:.0%}")
    if copy is None:
        return ", ".join(parts) + f" (no copy reference on {next(iter(largest.values()))['device']})"
    return ", ".join(parts) + f" of the copy bandwidth {copy:.4g} GB/s"


def e2e_text(rows: list[dict]) -> str:
    """Per e2e point, at its lowest kept fraction: MindSkip's measured/ideal speedup over the unconverted model."""
    points: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["section"] == "e2e" and row["provider"] == "mindskip":
            params = row["params"]
            key = (params["shape"], params["B"], params["T"], params["kept"])
            points.setdefault(key, {})[row["name"]] = row["metrics"]
    if not points:
        return "e2e: no rows"
    lowest: dict[tuple, float] = {}  # in the order the points ran
    for shape, batch, seqlen, kept in points:
        lowest[(shape, batch, seqlen)] = min(kept, lowest.get((shape, batch, seqlen), kept))
    parts = []
    for (shape, batch, seqlen), kept in lowest.items():
        phases = points[(shape, batch, seqlen, kept)]
        speedups = ", ".join(
            f"{name} {m['speedup_vs_hf']:.2f}/{m['ideal_speedup']:.2f}x"
            for name in ("prefill", "decode", "ttlt") if (m := phases.get(name))
        )
        ttlt, decode = phases.get("ttlt"), phases.get("decode") or {}
        shares = [f"{ttlt['frac_of_ideal']:.2f} of ideal"] if ttlt else []
        if "frac_of_static_drop" in decode:
            shares.append(f"decode {decode['frac_of_static_drop']:.2f} of the static drop's speed")
        share = f" ({'; '.join(shares)})" if shares else ""
        parts.append(f"{shape} B={batch} T={seqlen} kept {kept:g}: {speedups}{share}")
    return "e2e speedup measured/ideal: " + "; ".join(parts)


def token_text(rows: list[dict]) -> str | None:
    """Per point of the token_decode section: each routed variant's decode speedup over the faster dense cache against
    its ideal, on the variant's faster cache (kept 0.5; the token variant at kept 1.0 too: the cost of routing), and
    the prefill of one token-routed layer at kept 0.5 against the stock layer; None when the section wrote no rows."""
    best: dict[tuple, dict[str, dict]] = {}  # (shape, B, T) -> label -> the row on the faster cache
    prefill = {}
    for row in rows:
        if row["section"] != "token_decode" or row["provider"] == "hf":
            continue
        params, metrics = row["params"], row["metrics"]
        if row["name"] == "prefill-layer" and params["kept"] == 0.5:
            prefill[params["T"]] = metrics
        elif row["name"] == "decode":
            label = row["provider"] + ("@1.0" if params["kept"] == 1.0 else "")
            point = best.setdefault((params["shape"], params["B"], params["T"]), {})
            if label not in point or metrics["speedup_vs_fastest"] > point[label]["speedup_vs_fastest"]:
                point[label] = dict(metrics, cache=params["cache"])
    if not best and not prefill:
        return None
    parts = []
    for (shape, batch, seqlen), variants in best.items():
        shown = ", ".join(f"{label} {m['speedup_vs_fastest']:.2f}" + (f"/{m['ideal_vs_fastest']:.2f}x"
                                                                        if not label.endswith("@1.0") else "x")
                          + f" {m['cache']}" for label, m in variants.items())
        parts.append(f"{shape} B={batch} T={seqlen}: {shown}")
    parts += [f"prefill layer T={seqlen} kept 0.5: {m['speedup_vs_hf']:.2f}/{m['ideal_speedup']:.2f}x"
              for seqlen, m in prefill.items()]
    return "token decode vs the faster dense cache, measured/ideal: " + "; ".join(parts)


# The profile steps (bench/decode_profile.py's tables in the log) and what the summary calls them.
PROFILES = {"profile-static": "decode step, static cache compiled", "profile": "decode step, eager"}
# decode_profile's line comparing a MindSkip variant with Attention-Drop of its share.
AGAINST_DROP = re.compile(r"^\*\*(.+) against Attention-Drop of the same share\*\*: frac_of_static_drop ([\d.]+)")


def profile_text(steps: dict[str, Step]) -> str | None:
    """Per profile step that printed its table: each variant's step time, its speedup over the unconverted model and,
    for MindSkip, its speed as a share of Attention-Drop's at the same kept share; None when no profile step ran."""
    parts = []
    for name, label in PROFILES.items():
        step = steps.get(name)
        cells, of_drop = {}, {}
        for line in (step.text if step is not None else "").splitlines():
            row = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(row) >= 5 and row[0] and row[0] != "variant" and re.fullmatch(r"[\d.]+", row[1]):
                cells[row[0]] = (float(row[1]), row[4])
            elif match := AGAINST_DROP.match(line):
                of_drop[match[1]] = float(match[2])
        if "hf" not in cells:
            continue
        base = cells["hf"][0]
        shown = ", ".join(f"{v} {ms:.2f} ms" + (f" ({base / ms:.2f}x" if v != "hf" else "")
                          + (f"; {of_drop[v]:.2f} of attn-drop's speed" if v in of_drop else "")
                          + (")" if v != "hf" else "")
                          for v, (ms, _) in cells.items())
        breaks = sum(int(b) for _, b in cells.values() if b.isdigit())
        parts.append(f"{label}: {shown}" + (f", {breaks} graph breaks" if breaks else ""))
    return " | ".join(parts) or None


def summarize(log: str, rows: list[dict], dry_run: bool = False) -> tuple[str, str]:
    steps = read_steps(log)
    first = [tests_text(steps.get("test"), dry_run), sanitizer_text(steps.get("sanitize"), dry_run)]
    if probe := probe_text(steps.get("probe")):
        first.insert(0, probe)
    build = steps.get("build")
    if build is not None and build.problem() is None and not dry_run:
        first.append(f"build {build.seconds} s")
    problems = [f"{step.name} {problem}" for step in steps.values() if (problem := step.problem())]
    first.append("problems: " + ", ".join(problems) if problems else "every step exited 0")
    rows = latest(rows)
    second = [bandwidth_text(rows), e2e_text(rows), profile_text(steps), token_text(rows)]
    return " | ".join(first), " | ".join(part for part in second if part)


def read_rows(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, required=True, help="the session log")
    parser.add_argument("--rows", type=Path, default=None, help="the device's bench rows (.jsonl), if any")
    parser.add_argument("--dry-run", action="store_true", help="a rehearsal: tests were collected, not run")
    args = parser.parse_args(argv)
    print("\n".join(summarize(args.log.read_text(), read_rows(args.rows), args.dry_run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
