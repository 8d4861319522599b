"""A load test of the OpenAI-compatible server with MindSkip routers (``python -m mindskip_ext.vllm.serve``): many
concurrent clients, streaming and not, some cancelled mid-stream, for a while; every completed response must
equal the offline result for its prompt, no request may fail, and the server's memory must stay level.

    python -m bench.vllm_load [--clients 64] [--duration 180]                 # from the root, in .venv

This runs SmolLM2-135M with the default recipe's routers at 25% (dynamic routing: requests with different
decisions share every batch) on the benchmark's real prompts (bench/vllm_serving.py: held-out instructions and
code) and writes bench/results/vllm_load.md and .json. The work itself runs in the vLLM environment
(.venv-vllm), as ``python bench/vllm_load.py --worker SPEC.json`` (which python_tests/vllm runs as a short
version on a tiny model):

1. **Offline references.** ``mindskip_ext.vllm.llm`` with the server's settings, in-process: greedy
   ``max_tokens`` new tokens of every prompt, all submitted at once. The engine is shut down before the server
   starts.
2. **The server**, started with the documented command on 127.0.0.1 (its own process group, stopped at the end).
3. **Clients.** ``clients`` asyncio tasks send, until ``duration`` has passed, one request after another: a random
   prompt, a random ``max_tokens`` (a quarter of the maximum up to it), and a random kind: a plain completion, a
   streamed one, or a streamed one the client drops after a few chunks (vLLM aborts it). A completed response must
   be the offline tokens' first ``max_tokens``; an error (an HTTP status, a broken stream, a timeout) fails.
4. **Afterwards.** The server must report no running or waiting request and an empty KV cache (so the cancelled
   requests released their blocks), and still answer a request. The resident memory of the server's processes is
   sampled every second; "level" compares the last quarter of the run with the second (after warm-up).

The worker prints one JSON report on its last stdout line and exits with 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("plain", "stream", "cancel")


# ----------------------------------------------------------------------------------- worker (in .venv-vllm)


def offline_tokens(spec: dict) -> list[list[int]]:
    """Greedy ``max_tokens`` new tokens of every prompt, from the offline engine with the server's settings."""
    from vllm import SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from mindskip_ext.vllm import llm

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    engine = llm(spec["base"], spec["routers"], distributed_executor_backend="uni", **spec["engine"])
    try:
        params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
        outputs = engine.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]
    finally:
        engine.llm_engine.engine_core.shutdown()
        del engine
        cleanup_dist_env_and_memory()
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_command(spec: dict, port: int) -> list[str]:
    engine = spec["engine"]
    return [
        sys.executable, "-m", "mindskip_ext.vllm.serve", spec["base"], "--routers", spec["routers"],
        "--host", "127.0.0.1", "--port", str(port), "--dtype", engine["dtype"],
        "--max-model-len", str(engine["max_model_len"]), "--max-num-seqs", str(engine["max_num_seqs"]),
        "--seed", str(engine["seed"]),
    ]


class MemorySampler(threading.Thread):
    """The resident memory of a process and its children, every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self._halt.is_set():
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += proc.memory_info().rss
            except psutil.Error:
                break
            self.samples.append((time.monotonic(), total))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def memory_report(samples: list[tuple[float, int]], start: float, end: float, limit: float) -> dict:
    """RSS over the load phase ``[start, end]``: the medians of its second and last quarters, their ratio (level
    when the growth is at most ``limit``), the peak, and the median of each tenth of the phase (the course: a
    leak climbs to the end, a warm-up levels off)."""
    loaded = [rss for t, rss in samples if start <= t <= end]
    if len(loaded) < 8:
        return {"samples": len(loaded), "level": None}
    quarter = len(loaded) // 4

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    second, last = median(loaded[quarter:2 * quarter]), median(loaded[-quarter:])
    tenths = [median(loaded[len(loaded) * i // 10:len(loaded) * (i + 1) // 10]) / 2**20 for i in range(10)]
    return {"samples": len(loaded), "second_quarter_mb": second / 2**20, "last_quarter_mb": last / 2**20,
            "growth": last / second - 1.0, "peak_mb": max(loaded) / 2**20, "tenths_mb": tenths,
            "level": last / second - 1.0 <= limit}


async def _completion(session, url: str, model: str, ids: list[int], max_tokens: int, kind: str, rng: random.Random,
                      timeout: float) -> dict:
    import aiohttp

    payload = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
               "return_token_ids": True, "stream": kind != "plain"}
    started = time.monotonic()
    first = None
    async with session.post(f"{url}/v1/completions", json=payload,
                            timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        if response.status != 200:
            return {"error": f"HTTP {response.status}: {(await response.text())[:300]}"}
        if kind == "plain":
            body = await response.json()
            return {"tokens": body["choices"][0]["token_ids"], "seconds": time.monotonic() - started}
        tokens, chunks, finished = [], 0, False
        drop_after = rng.randint(1, max(1, max_tokens // 2)) if kind == "cancel" else None
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                finished = True
                break
            choice = json.loads(data)["choices"][0]
            if choice.get("token_ids"):
                if first is None:
                    first = time.monotonic() - started
                tokens += choice["token_ids"]
                chunks += 1
            if drop_after is not None and chunks >= drop_after:
                response.close()  # the client goes away mid-stream: the server aborts the request
                return {"cancelled": True, "tokens": tokens}
        if not finished:
            return {"error": f"the stream ended without [DONE] after {len(tokens)} tokens"}
        return {"tokens": tokens, "seconds": time.monotonic() - started, "ttft": first}


async def run_clients(spec: dict, url: str, model: str, expected: list[list[int]]) -> dict:
    import aiohttp

    deadline = time.monotonic() + spec["duration"]
    stats = dict.fromkeys(KINDS, 0) | {"completed": 0, "equal": 0, "cancelled": 0, "tokens": 0}
    errors, mismatches, latencies = [], [], []

    async def client(index: int) -> None:
        rng = random.Random(spec["seed"] * 1000 + index)
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                prompt = rng.randrange(len(spec["prompts"]))
                max_tokens = rng.randint(max(1, spec["max_tokens"] // 4), spec["max_tokens"])
                kind = rng.choices(KINDS, weights=spec["kind_weights"])[0]
                stats[kind] += 1
                try:
                    result = await _completion(session, url, model, spec["prompts"][prompt], max_tokens, kind, rng,
                                               spec["request_timeout"])
                except Exception as err:  # noqa: BLE001 (every failure of a request is reported, none stops the test)
                    errors.append(f"{kind} request of prompt {prompt}: {type(err).__name__}: {err}")
                    continue
                if "error" in result:
                    errors.append(f"{kind} request of prompt {prompt}: {result['error']}")
                elif result.get("cancelled"):
                    stats["cancelled"] += 1
                    if result["tokens"] != expected[prompt][: len(result["tokens"])]:
                        mismatches.append({"prompt": prompt, "kind": kind, "got": result["tokens"],
                                           "expected": expected[prompt][: len(result["tokens"])]})
                else:
                    stats["completed"] += 1
                    stats["tokens"] += len(result["tokens"])
                    latencies.append(result["seconds"])
                    if result["tokens"] == expected[prompt][:max_tokens]:
                        stats["equal"] += 1
                    else:
                        mismatches.append({"prompt": prompt, "kind": kind, "got": result["tokens"],
                                           "expected": expected[prompt][:max_tokens]})

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(spec["clients"])))
    stats["seconds"] = time.monotonic() - started
    latencies.sort()
    stats["latency_p50_s"] = latencies[len(latencies) // 2] if latencies else None
    stats["latency_p95_s"] = latencies[int(0.95 * (len(latencies) - 1))] if latencies else None
    return {"stats": stats, "errors": errors, "mismatches": mismatches}


def _get(url: str, timeout: float = 10) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def server_state(url: str) -> dict:
    """Running and waiting requests and the KV cache usage, from the server's Prometheus metrics."""
    text = _get(f"{url}/metrics")
    state = {}
    for key, metric in (("running", "vllm:num_requests_running"), ("waiting", "vllm:num_requests_waiting"),
                        ("kv_usage", "vllm:kv_cache_usage_perc")):
        values = [float(m) for m in re.findall(rf"^{re.escape(metric)}{{[^}}]*}} ([0-9.eE+-]+)$", text, re.M)]
        state[key] = sum(values) if values else None
    return state


def _wait_for_server(proc, url: str, log: Path, timeout: float) -> None:
    import urllib.error

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            _get(f"{url}/health", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start in {timeout} s:\n{log.read_text()[-4000:]}") from None
            time.sleep(2)


def worker(spec: dict) -> dict:
    started = time.monotonic()
    expected = offline_tokens(spec)
    offline_s = time.monotonic() - started
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            # Its own process group and a folder without a mindskip_ext source tree.
            proc = subprocess.Popen(_server_command(spec, port), cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        sampler = None
        try:
            _wait_for_server(proc, url, log, spec["startup_timeout"])
            startup_s = time.monotonic() - started - offline_s
            sampler = MemorySampler(proc.pid)
            sampler.start()
            load_start = time.monotonic()
            clients = asyncio.run(run_clients(spec, url, spec["base"], expected))
            load_end = time.monotonic()
            # Aborted requests are released by the engine's next steps: give it a moment.
            for _ in range(30):
                state = server_state(url)
                if not state["running"] and not state["waiting"] and not state["kv_usage"]:
                    break
                time.sleep(1)
            final = _final_request(url, spec, expected)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if sampler is not None:
                sampler.stop()
    memory = memory_report(sampler.samples, load_start, load_end, spec["memory_growth_limit"])
    stats = clients["stats"]
    failures = []
    if clients["errors"]:
        failures.append(f"{len(clients['errors'])} requests failed")
    if clients["mismatches"]:
        failures.append(f"{len(clients['mismatches'])} responses differ from the offline result")
    if stats["completed"] == 0 or stats["cancelled"] == 0:
        failures.append("the load had no completed or no cancelled request")
    if state["running"] or state["waiting"] or state["kv_usage"]:
        failures.append(f"after the load the server still holds requests or KV blocks: {state}")
    if not final:
        failures.append("the server did not answer a request correctly after the load")
    if memory["level"] is False:
        failures.append(f"the server's memory grew by {100 * memory['growth']:.1f}% during the load")
    return {"ok": not failures, "failures": failures, "stats": stats, "errors": clients["errors"][:20],
            "mismatches": clients["mismatches"][:5], "state_after": state, "memory": memory,
            "offline_s": offline_s, "startup_s": startup_s, "load_s": load_end - load_start,
            "clients": spec["clients"], "duration": spec["duration"], "prompts": len(spec["prompts"]),
            "offline": expected[:16]}


def _final_request(url: str, spec: dict, expected: list[list[int]]) -> bool:
    import urllib.request

    payload = {"model": spec["base"], "prompt": spec["prompts"][0], "max_tokens": spec["max_tokens"],
               "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=spec["request_timeout"]) as response:
        body = json.loads(response.read())
    return body["choices"][0]["token_ids"] == expected[0]


# ----------------------------------------------------------------------------------- orchestrator (in .venv)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kind-weights", default="0.4,0.4,0.2", help="plain, stream, cancelled stream")
    parser.add_argument("--python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python",
                        help="the vLLM environment's interpreter")
    parser.add_argument("--routers", type=Path, help="another router directory (default: bench.vllm_serving's, "
                        "dynamic), e.g. their static projection as a control without the routed op")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def spec_for(base: str, routers: str, prompts: list[list[int]], *, clients: int, duration: float, max_tokens: int,
             kind_weights: list[float], max_model_len: int = 1024, memory_growth_limit: float = 0.05) -> dict:
    """A worker's spec: the model, the prompts, the load, the memory check (the last quarter's median RSS at most
    ``1 + memory_growth_limit`` times the second quarter's) and the engine settings (the server's and the offline
    engine's alike)."""
    return {
        "base": base, "routers": routers, "prompts": prompts, "clients": clients, "duration": duration,
        "max_tokens": max_tokens, "kind_weights": kind_weights, "seed": 0, "request_timeout": 900.0,
        "startup_timeout": 900.0, "memory_growth_limit": memory_growth_limit,
        "engine": {"dtype": "float32", "max_model_len": max_model_len, "max_num_seqs": clients, "seed": 0},
    }


def run_script(script: Path, python: Path, spec: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python script --worker SPEC`` with ``spec`` as SPEC, from a temporary folder and without PYTHONPATH, so that
    it imports the mindskip_ext installed in the vLLM environment and not the source tree; one thread."""
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        return subprocess.run([str(python), str(script), "--worker", str(spec_file)], cwd=tmp, env=env,
                              capture_output=True, text=True, check=False)


def run_worker(python: Path, spec: dict, env: dict | None = None) -> dict:
    """This script's worker on ``spec`` (:func:`run_script`): its JSON report."""
    env = dict(os.environ if env is None else env)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    out = run_script(Path(__file__).resolve(), python, spec, env)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"the load test did not report:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}") from None


def _markdown(report: dict, about: str, routers: str) -> str:
    s, m = report["stats"], report["memory"]
    lines = [
        f"# Load test of the OpenAI server, SmolLM2-135M with {routers}",
        "",
        f"{about}. Written by `python -m bench.vllm_load`; the whole report in vllm_load.json.",
        "",
        f"- **Result: {'pass' if report['ok'] else 'FAIL: ' + '; '.join(report['failures'])}.**",
        f"- Load: {report['clients']} concurrent clients for {report['load_s']:.0f} s over {report['prompts']} "
        f"prompts: {s['plain']} plain, {s['stream']} streamed and {s['cancel']} streamed-then-dropped requests "
        f"({s['cancelled']} dropped mid-stream).",
        f"- Completed: {s['completed']}, of which {s['equal']} equal the offline result token for token; "
        f"{len(report['errors'])} errors; {s['tokens']} tokens, {s['tokens'] / s['seconds']:.1f} tokens/s; "
        f"latency p50 {s['latency_p50_s']:.1f} s, p95 {s['latency_p95_s']:.1f} s.",
        f"- After the load: {report['state_after']} (running and waiting requests, KV cache usage).",
        f"- Server memory (RSS of its processes, sampled every second during the load): second quarter "
        f"{m['second_quarter_mb']:.0f} MB, last quarter {m['last_quarter_mb']:.0f} MB ({100 * m['growth']:+.1f}%), "
        f"peak {m['peak_mb']:.0f} MB; the median of each tenth of the load: "
        f"{', '.join(f'{v:.0f}' for v in m['tenths_mb'])} MB.",
        f"- Times: offline references {report['offline_s']:.0f} s, server start {report['startup_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        report = worker(json.loads(Path(args.worker).read_text()))
        print(json.dumps(report))
        return 0 if report["ok"] else 1
    from transformers import AutoTokenizer

    from bench import common
    from bench.vllm_serving import ROUTERS, workload
    from mindskip_ext.offline_models import fetch_model

    base = fetch_model("smollm2")
    _, requests, _ = workload(AutoTokenizer.from_pretrained(base))
    routers = args.routers or ROUTERS
    spec = spec_for(str(base), str(routers), [ids for ids, _ in requests], clients=args.clients,
                    duration=args.duration, max_tokens=args.max_tokens,
                    kind_weights=[float(w) for w in args.kind_weights.split(",")])
    load = os.getloadavg()[0]
    report = run_worker(args.python, spec)
    about = (f"{common.cpu_name()}, the server's engine on 1 thread; vLLM CPU build, compiled; commit "
             f"{common.git_commit()}, finished {common.utc_timestamp()}; load average {load:.1f} at the start and "
             f"{os.getloadavg()[0]:.1f} at the end (2 cores)")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "vllm_load.json").write_text(json.dumps({"about": about, **report}, indent=1))
    name = "the default recipe's routers at 25% (dynamic)" if args.routers is None else f"the routers in {routers}"
    text = _markdown(report, about, name)
    (args.results_dir / "vllm_load.md").write_text(text)
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
