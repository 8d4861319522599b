"""Does a bad input raise a RuntimeError, or crash the process? Each case runs alone in a fresh process, so that a
crash names its case and the others still run.

On the first GPU session every bad-input test on CUDA crashed its process with a segfault instead of raising, and
only after torch.compile tests had run in that process (bench/results/cuda-nvidia-h200-session.log). The cases
below tell the possible causes apart in under a minute:

* ``mindskip``: a mindskip op's CUDA kernel rejects its input (the failing tests: ops.router_gate, through the
  autograd that torch.library registers in Python);
* ``mindskip-direct``: the same check through ``torch.ops.mindskip.router_gate`` (the dispatcher alone);
* ``torch``: one of torch's own CUDA ops rejects its input (is it any C++ exception?);
* ``mindskip-cpu``: the op's CPU kernel rejects its input (is it the CUDA kernels' code?),

each in a fresh process and after a torch.compile that runs Triton (inductor) kernels and a mindskip op.

    python -m bench.gpu_throw_probe --device cuda [--compile-backend inductor]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import torch

CASES = ("mindskip", "mindskip-direct", "torch", "mindskip-cpu")
EXPECTED = {  # what each case's error message must contain
    "mindskip": "hidden must have shape (B, T, D)",
    "mindskip-direct": "hidden must have shape (B, T, D)",
    "torch": "cannot be multiplied",
    "mindskip-cpu": "hidden must have shape (B, T, D)",
}


def plan(device: str) -> list[tuple[str, bool]]:
    """(case, after torch.compile) pairs to run on ``device``: every case fresh and compiled; the CPU kernel case
    only where the device is not the CPU already."""
    cases = [c for c in CASES if device != "cpu" or c != "mindskip-cpu"]
    return [("mindskip", False), *((case, True) for case in cases)]


def compile_first(device: torch.device, backend: str) -> None:
    """A torch.compile that, like the tests before the crash, compiles a graph with a mindskip op in it and runs it."""
    from mindskip_ext import ops

    weight, bias = torch.zeros(8, device=device), torch.zeros((), device=device)

    def step(x):
        score, keep, order, num_kept = ops.router_gate(x, None, weight, bias, 0.5)
        return torch.sigmoid(x * 2 + 1).sum() + score.sum()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    compiled(torch.randn(2, 4, 8, device=device))


def trigger(case: str, device: torch.device) -> None:
    """Call the case's op with an input it must reject."""
    from mindskip_ext import ops

    on = torch.device("cpu") if case == "mindskip-cpu" else device
    hidden = torch.randn(4, 8, device=on)  # rank 2: router_gate takes (B, T, D)
    weight, bias = torch.zeros(8, device=on), torch.zeros((), device=on)
    if case == "torch":
        torch.mm(torch.randn(2, 3, device=device), torch.randn(2, 3, device=device))
    elif case == "mindskip-direct":
        torch.ops.mindskip.router_gate(hidden, None, weight, bias, 0.5)
    else:
        ops.router_gate(hidden, None, weight, bias, 0.5)
    if on.type == "cuda":
        torch.cuda.synchronize()


def run_case(case: str, device: torch.device, after_compile: bool, backend: str) -> int:
    """The child process: 0 when the case raised the RuntimeError it should, 2 when it raised another, 3 when it
    did not raise."""
    if after_compile:
        compile_first(device, backend)
    try:
        trigger(case, device)
    except RuntimeError as error:
        if EXPECTED[case] in str(error):
            return 0
        print(f"{case}: raised a RuntimeError without {EXPECTED[case]!r}: {str(error)[:300]}")
        return 2
    return 3


def outcome(returncode: int | None) -> str:
    """What a child's exit status says about its case."""
    if returncode is None:
        return "timed out"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"crashed ({name})"
    return {0: "raised", 2: "raised another error", 3: "did not raise"}.get(returncode, f"exit {returncode}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_throw_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled cases (default: inductor, as the tests use)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--after-compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds the cases may take, all together (default 90)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.case is not None:
        return run_case(args.case, device, args.after_compile, args.compile_backend)
    cases = plan(device.type)
    # All at once (one small GPU job each), each in its own process group so that a timeout stops all of it.
    children = [subprocess.Popen(
        [sys.executable, "-m", "bench.gpu_throw_probe", "--device", args.device, "--case", case,
         "--compile-backend", args.compile_backend] + (["--after-compile"] if after_compile else []),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    ) for case, after_compile in cases]
    failed, deadline = 0, time.monotonic() + args.timeout
    for (case, after_compile), child in zip(cases, children):
        try:
            output = child.communicate(timeout=max(0.0, deadline - time.monotonic()))[0].strip()
            result = outcome(child.returncode)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, result = child.communicate()[0].strip(), outcome(None)
        when = f"after torch.compile ({args.compile_backend})" if after_compile else "in a fresh process"
        print(f"throw probe: {case} on {args.device} {when}: {result}")
        if result != "raised":
            failed += 1
            if output:
                print("  " + "\n  ".join(output.splitlines()[-15:]))
    print(f"throw probe: {failed} of {len(cases)} cases did not raise")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
