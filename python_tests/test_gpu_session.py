"""The GPU session (bench/gpu_session.sh) without a GPU: its rehearsal (``all --dry-run``) end to end, its argument
handling, the summary it ends with (bench/gpu_summary.py) on synthetic logs and rows, and the e2e points it runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import e2e, gpu_sanitize, gpu_summary, routing, token_decode
from bench.common import RESULTS_DIR

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_session.sh"
# What comes back from a lent machine's $OUT: at most 8 files of at most 16 MiB, plainly named.
MAX_FILES, MAX_BYTES = 8, 16 << 20
H100_BYTES = 81559 << 20  # the memory torch reports on the lent H100s


def run_session(*args, out: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # the rehearsal runs every step on the CPU: about two minutes on 2 cores
def test_rehearsal_writes_the_session_files(tmp_path):
    results_before = {p: p.stat().st_mtime_ns for p in RESULTS_DIR.glob("*.*")}
    proc = run_session("all", "--dry-run", out=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    files = sorted(tmp_path.iterdir())
    assert len(files) <= MAX_FILES
    assert all(f.is_file() and f.stat().st_size <= MAX_BYTES and re.fullmatch(r"[\w.-]+", f.name) for f in files)
    (jsonl,) = tmp_path.glob("cpu-*.jsonl")  # the rows are named after the device, as in bench/results/
    assert {f.name for f in files} == {"session.log", "summary.txt", "decode_profile.md", "decode_profile_static.md",
                                       jsonl.name, f"{jsonl.stem}.md"}
    assert {json.loads(line)["section"] for line in jsonl.read_text().splitlines()} == {"micro", "e2e", "token_decode"}
    # A rehearsal leaves the repository's results as they were.
    assert {p: p.stat().st_mtime_ns for p in RESULTS_DIR.glob("*.*")} == results_before

    log = (tmp_path / "session.log").read_text()
    steps = gpu_summary.read_steps(log)
    # By value (issue 38): tests, compiled static-cache decode, eager decode, micro, token-level decode, the e2e
    # points last.
    assert list(steps) == ["build", "probe", "test", "sanitize", "profile-static", "profile", "micro", "token",
                           "e2e-2x16", "e2e-1x32"]
    assert all(step.rc == 0 for step in steps.values())
    assert "test_cache.py::test_cuda_identity_skipping_and_compact_kv" in steps["test"].text  # what -m cuda selects
    assert "pip install -q --no-build-isolation --no-deps -e ." in steps["build"].text  # what a GPU would run

    line1, line2 = (tmp_path / "summary.txt").read_text().splitlines()
    assert proc.stdout.endswith(f"{line1}\n{line2}\n")
    assert re.fullmatch(r"throw probe: 4 of 4 raised \| tests \(dry run\): \d+ selected by -m cuda \| "
                        r"sanitizer \(dry run, no compute-sanitizer\): "
                        r"\d+ cases, 0 failed \| every step exited 0", line1)
    assert int(re.search(r"(\d+) selected", line1)[1]) >= 8  # the tests marked cuda (test_ops, test_layer, test_cache)
    assert re.match(r"router_gate fp32 B=32 T=1024 D=2048: [\d.]+ GB/s, gather\+scatter fp32 B=32 T=1024 D=2048: "
                    r"[\d.]+ GB/s, pack\+unpack bf16 B=32 T=1024 D=2048: [\d.]+ GB/s \(no copy reference on cpu\) \| ",
                    line2)
    assert "e2e speedup measured/ideal: cpu-small B=2 T=16 kept 0.5: prefill " in line2
    assert "; cpu-small B=1 T=32 kept 0.5: " in line2
    assert " | decode step, eager: hf " in line2 and " | decode step, static cache compiled: hf " in line2
    assert re.search(r" \| token decode vs the faster dense cache, measured/ideal: cpu-small B=2 T=32: "
                     r"sequence [\d.]+/[\d.]+x (dynamic|static), token [\d.]+/[\d.]+x (dynamic|static), "
                     r"token@1\.0 [\d.]+x (dynamic|static), hybrid [\d.]+/[\d.]+x (dynamic|static); "
                     r"prefill layer T=32 kept 0\.5: [\d.]+/[\d.]+x$", line2)


@pytest.mark.parametrize("args", [(), ("bogus",), ("e2e", "8")])
def test_bad_arguments_print_the_usage(tmp_path, args):
    proc = run_session(*args, out=tmp_path)
    assert proc.returncode == 2 and "usage: gpu_session.sh all|" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_the_e2e_points_are_built_on_the_device_and_fit_an_h100(monkeypatch):
    """The Llama-3-8B model is created on the target device in bf16 (here the meta device: no parameter is ever
    on the CPU), and the sections' own memory rule (e2e._does_not_fit, on an H100's memory) keeps both e2e points and
    the token step's point on an H100 rather than skipping them."""
    points = re.search(r'^\s*points="([^"]+)"  # the Llama-3-8B points', SCRIPT.read_text(), re.MULTILINE)[1]
    batch_lengths = [tuple(int(v) for v in point.split("x")) for point in points.split()]
    assert batch_lengths == [(32, 2048), (8, 8192)]
    model = routing.build_model("llama3-8b", torch.device("meta"), torch.bfloat16, max_len=8192 + 64 + 8)
    params = list(model.parameters())
    assert {(p.device.type, p.dtype) for p in params} == {("meta", torch.bfloat16)}
    assert sum(p.numel() * p.element_size() for p in params) == pytest.approx(16.06e9, rel=0.01)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=H100_BYTES))
    cuda = torch.device("cuda")
    for batch, length in batch_lengths:
        assert e2e._does_not_fit(model, cuda, batch, length, 64, 0.85) is None  # e2e's --mem-fraction default
    # The token step's point, with the caches it holds at once, under the same rule (the section skips it otherwise).
    token_args = re.search(r'^\s*token_args=\((--token-shape llama3-8b [^)]+)\)', SCRIPT.read_text(), re.MULTILINE)[1]
    options = dict(zip(token_args.split()[::2], token_args.split()[1::2], strict=True))
    batch, length, new = (int(options[o]) for o in ("--token-batches", "--token-lengths", "--new-tokens"))
    caches = token_decode.POINT_CACHES
    assert e2e._does_not_fit(model, cuda, batch, length, new, 0.85, caches) is None  # it still runs
    assert re.fullmatch(r"needs ~\d+ GiB of 80 GiB", e2e._does_not_fit(model, cuda, batch, length, new, 0.6, caches))
    assert e2e._does_not_fit(model, torch.device("cpu"), batch, length, new, 0.0, caches) is None  # GPUs only


def test_sanitize_script_reports_wrong_results_and_ops_it_does_not_call(monkeypatch, capsys):
    monkeypatch.setattr(gpu_sanitize, "SHAPES", [(2, 3, 5, torch.float32, "right")])
    assert gpu_sanitize.main(["--device", "cpu"]) == 0
    assert capsys.readouterr().out.endswith("sanitize: 3 cases, 0 failed\n")

    monkeypatch.setattr(gpu_sanitize, "COVERED", gpu_sanitize.COVERED - {"pack_kept"})
    monkeypatch.setattr(gpu_sanitize.ops, "gather_kept", lambda x, order, k: x[:k] * 0)  # wrong rows, in bounds
    assert gpu_sanitize.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "ok   B=2 T=3 D=5 float32 mask=right none kept: k=0" in out  # no row to get wrong
    assert "FAIL B=2 T=3 D=5 float32 mask=right all kept: gather_kept: " in out
    assert "FAIL no case calls pack_kept" in out
    assert out.endswith("sanitize: 3 cases, 3 failed\n")


# ------------------------------------------------------------------------------------------------ the summary

LOG = """\
### session: all at 2026-01-01T00:00:00Z, budget 540 s, output /out
### step build (limit 300 s)
built for sm_9.0 with 16 jobs in 84 s
### end build rc=0 seconds=84 limit=300
### step probe (limit 100 s)
throw probe: mindskip on cuda in a fresh process: raised
throw probe: mindskip on cuda after torch.compile (inductor): crashed (SIGSEGV)
  Fatal Python error: Segmentation fault
throw probe: torch on cuda after torch.compile (inductor): raised
throw probe: 1 of 3 cases did not raise
### end probe rc=1 seconds=21 limit=100
### step test (limit 150 s)
FAILED python_tests/test_ops.py::test_gather_kept_matches_reference[cuda-dtype0-shape0]
2 failed, 318 passed, 3 skipped, 12 warnings in 41.20s
### end test rc=1 seconds=50 limit=150
### step sanitize (limit 150 s)
========= COMPUTE-SANITIZER
ok   B=1 T=1 D=1 float32 mask=none none kept: k=0
sanitize: 15 cases, 0 failed
========= ERROR SUMMARY: 1 error
### end sanitize rc=3 seconds=70 limit=150
### step micro (limit 120 s)
### end micro rc=124 seconds=120 limit=120
### step e2e-32x2048 (limit 96 s)
### skip e2e-8x8192: out of time
"""


def micro_row(gbps, name="router", batch=32, **metrics):
    params = {"B": batch, "T": 1024, "D": 2048, "dtype": "bf16", "padding": "none"}
    return {"section": "micro", "name": name, "provider": "mindskip", "params": params, "device": "cuda",
            "metrics": {"gbps": gbps, **metrics}}


def e2e_rows(batch, seqlen, kept, speedup, ideal, provider="mindskip"):
    params = {"shape": "llama3-8b", "B": batch, "T": seqlen, "new_tokens": 64, "kept": kept}
    return [{"section": "e2e", "name": name, "provider": provider, "params": params, "device": "cuda",
             "metrics": {"speedup_vs_hf": speedup * f, "ideal_speedup": ideal * f, "frac_of_ideal": speedup / ideal}}
            for name, f in (("prefill", 1.5), ("decode", 0.5), ("ttlt", 1.0))]


def test_summary_of_a_session_with_failures():
    rows = [micro_row(2400.0, frac_peak_bw=0.8), micro_row(900.0, batch=64, frac_peak_bw=0.3),
            micro_row(1500.0, name="router", batch=8, frac_peak_bw=0.5),
            micro_row(3000.0, name="pack_unpack", frac_peak_bw=1.0), *e2e_rows(32, 2048, 1.0, 0.99, 1.0),
            *e2e_rows(32, 2048, 0.5, 1.2, 1.4), *e2e_rows(32, 2048, 0.5, 1.0, 1.4, provider="attn-drop")]
    line1, line2 = gpu_summary.summarize(LOG, rows)
    assert line1 == (
        "throw probe: 2 of 3 raised (mindskip after compile crashed (SIGSEGV)) | "
        "tests: 318 passed, 2 failed, 3 skipped | sanitizer (memcheck): 1 error, 15 cases, 0 failed | build 84 s | "
        "problems: probe exit 1, test exit 1, sanitize exit 3, micro timed out after 120 s, e2e-32x2048 cut off, "
        "e2e-8x8192 skipped (out of time)"
    )
    assert line2 == (
        "router_gate bf16 B=64 T=1024 D=2048: 30%, pack+unpack bf16 B=32 T=1024 D=2048: 100% of the copy bandwidth "
        "3000 GB/s | "
        "e2e speedup measured/ideal: llama3-8b B=32 T=2048 kept 0.5: prefill 1.80/2.10x, decode 0.60/0.70x, "
        "ttlt 1.20/1.40x (0.86 of ideal)"
    )


def test_throw_probe_names_how_each_case_ended():
    from bench import gpu_throw_probe as probe

    assert [probe.outcome(rc) for rc in (0, 2, 3, -11, None)] == [
        "raised", "raised another error", "did not raise", "crashed (SIGSEGV)", "timed out"]
    # On a GPU the CPU kernel is a case too; every case runs after a compile, and the failing one also fresh.
    assert probe.plan("cuda") == [("mindskip", False), *((case, True) for case in probe.CASES)]
    assert ("mindskip-cpu", True) not in probe.plan("cpu")


def test_throw_probe_reports_an_op_that_does_not_raise(monkeypatch, capsys):
    from bench import gpu_throw_probe as probe

    monkeypatch.setattr(probe, "trigger", lambda case, device: None)
    assert probe.run_case("mindskip", torch.device("cpu"), after_compile=False, backend="eager") == 3
    monkeypatch.setattr(probe, "trigger", lambda case, device: torch.mm(torch.ones(2, 3), torch.ones(3, 2)).view(5))
    assert probe.run_case("mindskip", torch.device("cpu"), after_compile=False, backend="eager") == 2
    assert "raised a RuntimeError without 'hidden must have shape (B, T, D)'" in capsys.readouterr().out


def test_summary_when_nothing_ran():
    log = "### step build (limit 300 s)\nerror: nvcc failed\n### end build rc=1 seconds=40 limit=300\n"
    log += "".join(f"### skip {name}: the build failed\n" for name in ("test", "sanitize", "micro"))
    line1, line2 = gpu_summary.summarize(log, [])
    assert line1 == ("tests: not run | sanitizer: not run | problems: build exit 1, test skipped (the build failed), "
                     "sanitize skipped (the build failed), micro skipped (the build failed)")
    assert line2 == "micro: no rows | e2e: no rows"


def test_summary_keeps_the_latest_row_and_the_order_of_the_points():
    rows = [*e2e_rows(8, 8192, 0.5, 1.0, 1.5), *e2e_rows(32, 2048, 0.5, 1.1, 1.2), *e2e_rows(8, 8192, 0.5, 1.3, 1.5),
            micro_row(10.0, frac_peak_bw=0.5), micro_row(20.0)]
    rows[-4]["metrics"]["frac_of_static_drop"] = 0.9  # the latest decode row of B=8 T=8192
    text = gpu_summary.e2e_text(gpu_summary.latest(rows))
    assert text.index("B=8 T=8192") < text.index("B=32 T=2048")
    assert ("B=8 T=8192 kept 0.5: prefill 1.95/2.25x, decode 0.65/0.75x, ttlt 1.30/1.50x (0.87 of ideal; decode 0.90 "
            "of the static drop's speed)") in text
    assert gpu_summary.bandwidth_text(gpu_summary.latest(rows)) == (
        "router_gate bf16 B=32 T=1024 D=2048: 20 GB/s (no copy reference on cuda)"
    )


@pytest.mark.parametrize("line, counts", [
    ("318 passed in 40.10s", {"passed": 318}),
    ("2 failed, 316 passed, 3 skipped, 12 warnings in 41.00s (0:00:41)",
     {"failed": 2, "passed": 316, "skipped": 3, "warnings": 12}),
    ("1 error in 0.50s", {"errors": 1}),
    ("======= 3 passed, 1 xfailed in 1.02s =======", {"passed": 3, "xfailed": 1}),
    ("322/912 tests collected (590 deselected) in 6.98s", {"collected": 322, "deselected": 590}),
    ("no tests ran in 0.01s", None),
])
def test_pytest_counts(line, counts):
    assert gpu_summary.pytest_counts(f"collecting ...\n{line}\n") == counts


@pytest.mark.parametrize("text, errors", [
    ("========= ERROR SUMMARY: 0 errors\n", 0),
    ("========= Invalid __global__ read of size 2 bytes\n========= ERROR SUMMARY: 1 error\n", 1),
    ("========= ERROR SUMMARY: 12 errors\n========= ERROR SUMMARY: 3 errors\n", 3),
    ("compute-sanitizer not found\n", None),
])
def test_sanitizer_errors(text, errors):
    assert gpu_summary.sanitizer_errors(text) == errors


def test_sanitizer_without_a_summary_names_the_problem():
    steps = gpu_summary.read_steps("### step sanitize (limit 150 s)\ncompute-sanitizer not found\n"
                                   "### end sanitize rc=127 seconds=0 limit=150\n")
    assert gpu_summary.sanitizer_text(steps["sanitize"], dry_run=False) == "sanitizer: no error summary (exit 127)"


def test_main_prints_two_lines(tmp_path, capsys):
    log = tmp_path / "session.log"
    log.write_text(LOG)
    rows = tmp_path / "cuda-h100.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in e2e_rows(32, 2048, 0.5, 1.2, 1.4)))
    assert gpu_summary.main(["--log", str(log), "--rows", str(rows)]) == 0
    line1, line2 = capsys.readouterr().out.splitlines()
    assert line1.startswith("throw probe: 2 of 3 raised") and "| tests: 318 passed, 2 failed" in line1
    assert line2.startswith("micro: no rows | e2e ")


def test_summary_gives_the_decode_step_of_each_profiled_variant():
    table = ("| variant | step ms | ops per step | device kernel ms | graph breaks | ops changed vs hf |\n"
             "|---|---|---|---|---|---|\n"
             "| hf | 20.00 | 2000 | 6.10 | {b} | - |\n"
             "| mindskip kept 0.5 | 25.00 | 2080 | 5.20 | {b} | `mindskip::gather_kept` +16 |\n"
             "| attn-drop | 16.00 | 1700 | 4.90 | {m} | `aten::linear` -32 |\n")
    against = ("\n**mindskip kept 0.5 against Attention-Drop of the same share**: frac_of_static_drop 0.640 (step "
               "time); ops per step 1.224x, Python calls per step 1.300x the drop's.\n")
    log = ("### step profile-static (limit 270 s)\n" + table.format(b="0", m="2") + against
           + "### end profile-static rc=0 seconds=200 limit=270\n### step profile (limit 90 s)\n"
           + "# Decode-step profile on NVIDIA H200\n" + table.format(b="-", m="-")
           + "### end profile rc=0 seconds=40 limit=90\n")
    _, line2 = gpu_summary.summarize(log, [])
    assert line2 == (
        "micro: no rows | e2e: no rows | decode step, static cache compiled: hf 20.00 ms, mindskip kept 0.5 25.00 ms "
        "(0.80x; 0.64 of attn-drop's speed), attn-drop 16.00 ms (1.25x), 2 graph breaks | decode step, eager: "
        "hf 20.00 ms, mindskip kept 0.5 25.00 ms (0.80x), attn-drop 16.00 ms (1.25x)"
    )
    # A profile step that printed no table (cut off, or failed) adds nothing.
    assert gpu_summary.profile_text(gpu_summary.read_steps("### step profile (limit 90 s)\nTraceback\n")) is None


def token_row(name, provider, cache, kept, **metrics):
    params = {"shape": "llama3-8b", "B": 8, "T": 4096} | ({"kept": kept} if kept is not None else {})
    if name == "decode":
        params |= {"new_tokens": 16, "cache": cache}
    return {"section": "token_decode", "name": name, "provider": provider, "params": params, "device": "cuda",
            "metrics": metrics}


def test_summary_gives_each_token_variant_on_its_faster_cache():
    rows = [token_row("decode", "hf", "static", None, speedup_vs_fastest=1.0, ideal_vs_fastest=1.0)]
    for cache, gain in (("dynamic", 0.9), ("static", 1.0)):
        rows += [token_row("decode", "sequence", cache, 0.5, speedup_vs_fastest=1.1 * gain, ideal_vs_fastest=1.2),
                 token_row("decode", "token", cache, 0.5, speedup_vs_fastest=1.15 - gain / 10, ideal_vs_fastest=1.2),
                 token_row("decode", "token", cache, 1.0, speedup_vs_fastest=0.97 * gain, ideal_vs_fastest=1.0),
                 token_row("decode", "hybrid", cache, 0.5, speedup_vs_fastest=1.08 * gain, ideal_vs_fastest=1.2)]
    rows += [token_row("prefill-layer", "hf", None, None),
             token_row("prefill-layer", "token", None, 0.5, speedup_vs_hf=1.1, ideal_speedup=1.25),
             token_row("prefill-layer", "token", None, 1.0, speedup_vs_hf=0.99, ideal_speedup=1.0)]
    assert gpu_summary.token_text(rows) == (
        "token decode vs the faster dense cache, measured/ideal: llama3-8b B=8 T=4096: sequence 1.10/1.20x static, "
        "token 1.06/1.20x dynamic, token@1.0 0.97x static, hybrid 1.08/1.20x static; prefill layer T=4096 kept 0.5: "
        "1.10/1.25x"
    )
    assert gpu_summary.token_text(rows[:1]) is None  # no routed variant: nothing to say
