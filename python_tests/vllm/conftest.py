"""Fixtures of the vLLM plugin tests (mindskip_ext.vllm).

These tests run only where vLLM is installed: the .venv-vllm environment of scripts/install_vllm_env.sh, from
this folder, which is their pytest root (pytest.ini), so that neither the repository root (whose mindskip_ext
source folder would shadow the installed package) nor python_tests lands on sys.path:

    cd python_tests/vllm && OMP_NUM_THREADS=1 ../../.venv-vllm/bin/python -m pytest -q

Where vLLM is not installed (the main suite's .venv), nothing here is collected and vLLM is never imported.

The models are a tiny random Llama (hidden 128: head size 32, the smallest vLLM's CPU attention takes) with a
word tokenizer, and SmolLM2-135M when it has been fetched. Their routers have random weights and biases set per
layer so that every layer keeps a different subset of the test prompts, each decision far from the threshold.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


def _vllm_installed() -> bool:
    # Not just find_spec("vllm"): with python_tests on sys.path (the main suite), this folder is a namespace package
    # of that name.
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None and spec.origin.endswith("__init__.py")


if not _vllm_installed():
    collect_ignore_glob = ["test_*.py"]
else:
    # One thread: the tiny models run fastest so, and 2-core machines oversubscribe badly otherwise. The KV cache
    # of the CPU backend is 4 GiB by default; 1 GiB is plenty here.
    for _name, _value in {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}.items():
        os.environ.setdefault(_name, _value)

PROMPTS = [
    "reverse the words : cat dog bird fish",
    "what is the largest number in 3 9 4 ?",
    "copy : red blue green",
    "sort these fruits : plum apple pear grape lemon melon peach cherry",
    "count the animals",
    "first word of : horse mouse cow fox bear duck cat dog bird fish",
]
# Per MindSkip layer of the tiny model (2, 3, 4): how many of the six prompts it keeps.
TINY_KEEP_COUNTS = [3, 2, 4]
NEW_TOKENS = 12


@dataclass
class Served:
    """A base checkpoint, its routers, the test prompts as token ids, and what transformers MindSkip makes of them."""

    base: Path
    routers: Path
    prompts: list[list[int]]
    expected: list[list[int]]  # greedy new tokens of each prompt, generated alone
    dense: list[list[int]]  # the same without the routers (the base model)
    keep: dict[int, list[bool]]  # MindSkip layer -> which prompts it keeps (per token: keeps the prompt's last token)
    token_layers: tuple[int, ...] = ()  # the MindSkip layers routed per token


def _layer_inputs(model, layer, prompts: list[list[int]]) -> list[torch.Tensor]:
    """The normalised input (``(T, D)``) that MindSkip ``layer`` routes on, for each prompt run alone."""
    captured = []
    norm = layer.base_layer.input_layernorm
    handle = norm.register_forward_hook(lambda module, args, out: captured.append(out[0].detach()))
    try:
        with torch.no_grad():
            for ids in prompts:
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return captured


def set_routers(model, prompts: list[list[int]], keep_counts: list[int], seed: int = 0) -> None:
    """Random router weights, and per layer the bias that keeps exactly ``keep_counts[i]`` of ``prompts`` (layer by
    layer, since a layer's input depends on what the layers before it skipped); a layer routed per token keeps about
    half of the prompts' tokens instead. The bias sits halfway between two logits that are at least 0.05 apart, so
    rounding differences between engines never flip a decision."""
    gen = torch.Generator().manual_seed(seed)
    layers = model.mindskip_layers
    for layer, count in zip(layers.values(), keep_counts, strict=True):
        router = layer.router
        for _ in range(100):
            weight = torch.randn(router.weight.shape, generator=gen)
            with torch.no_grad():
                router.weight.copy_(weight)
                router.bias.fill_(20.0)  # keep everything while measuring this layer's input
            inputs = _layer_inputs(model, layer, prompts)
            if layer.routing == "token":
                logits = torch.cat([x.float() @ weight.reshape(-1) for x in inputs])
                count = len(logits) // 2
            else:
                logits = torch.stack([x.float().mean(0) @ weight.reshape(-1) for x in inputs])
            ordered = logits.sort(descending=True).values
            upper = ordered[count - 1].item() if count > 0 else ordered[0].item() + 1.0
            lower = ordered[count].item() if count < len(ordered) else ordered[-1].item() - 1.0
            if upper - lower >= 0.05:
                break
        else:
            raise AssertionError(f"no router weights separate the prompts at layer {layer.layer_idx}")
        with torch.no_grad():
            router.bias.fill_(-(upper + lower) / 2)


def _check_token_margins(model, sequences: list[list[int]], margin: float = 0.002) -> None:
    """Every token that a per-token layer of ``model`` decides on in ``sequences`` (prompts and their generated
    tokens) has a router logit at least ``margin`` from the threshold (far above fp32 rounding differences between
    engines, which could otherwise flip a decision and fail a test for no fault). The generated tokens are not
    known when the biases are set, so this is checked after generating."""
    for idx, layer in model.mindskip_layers.items():
        if layer.routing != "token":
            continue
        weight, bias = layer.router.weight.reshape(-1), layer.router.bias.item()
        closest = min((x.float() @ weight + bias).abs().min().item() for x in _layer_inputs(model, layer, sequences))
        assert closest >= margin, f"layer {idx}: a token's router logit is {closest:.4f} from the threshold"


def serve_fixture(directory: Path, model, tokenizer, keep_counts: list[int], layers=None, **config) -> Served:
    """Save ``model`` (a stock HF causal LM) with ``tokenizer`` and routers (``MindSkipConfig(layers=layers,
    **config)``) that keep ``keep_counts`` of the prompts (about half of the tokens at a layer routed per token), and
    run transformers MindSkip on each prompt (greedy) for the expected tokens."""
    import mindskip_ext as msk

    base, routers = directory / "base", directory / "routers"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    dense = [_greedy(model, ids, tokenizer) for ids in prompts]
    mindskip = msk.get_mindskip_model(model, msk.MindSkipConfig(layers=layers, **config))
    set_routers(mindskip, prompts, keep_counts)
    mindskip.save_pretrained(routers)
    expected, keep = [], {idx: [] for idx in mindskip.mindskip_layers}
    for ids in prompts:
        expected.append(_greedy(mindskip, ids, tokenizer))
        for idx, routing in mindskip.last_record.layers.items():
            # A layer routed per token: whether the prompt's last token is kept (its decisions mix within prompts).
            keep[idx].append(bool(routing.keep[0, -1] if routing.keep.dim() == 2 else routing.keep[0]))
    _check_token_margins(mindskip, [ids + out[:-1] for ids, out in zip(prompts, expected)])
    token_layers = tuple(idx for idx, layer in mindskip.mindskip_layers.items() if layer.routing == "token")
    return Served(base=base, routers=routers, prompts=prompts, expected=expected, dense=dense, keep=keep,
                  token_layers=token_layers)


def static_fixture(directory: Path, served: Served, layers: list[int], dropped: list[int]) -> Served:
    """Static routers on ``served``'s base model, as ``mindskip drop`` and ``mindskip eval --save-static`` write
    them: routers on ``layers`` that ignore their input, each skipping every sequence (the ``dropped`` layers) or
    keeping every sequence (the others); and what transformers MindSkip generates with them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mindskip_ext as msk
    from mindskip_ext.eval.attention_drop import set_static_routing

    model = AutoModelForCausalLM.from_pretrained(served.base, dtype=torch.float32, attn_implementation="sdpa").eval()
    mindskip = msk.get_mindskip_model(model, msk.MindSkipConfig(layers=layers))
    set_static_routing(mindskip, dropped)
    mindskip.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(served.base)
    expected = [_greedy(mindskip, ids, tokenizer) for ids in served.prompts]
    keep = {idx: [idx not in dropped] * len(served.prompts) for idx in layers}
    return Served(base=served.base, routers=directory, prompts=served.prompts, expected=expected, dense=served.dense,
                  keep=keep)


def _greedy(model, ids: list[int], tokenizer) -> list[int]:
    """NEW_TOKENS greedy tokens after prompt ``ids``, run alone; EOS does not stop it (vLLM runs with ignore_eos)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():  # an explicit mask: generate would mask prompt tokens equal to the pad id, vLLM does not
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS,
            do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


def tiny_fixture(directory: Path, model_type: str, seed: int, routers: dict | None = None, **config) -> Served:
    """A tiny random model of ``model_type`` (6 layers, hidden 128) with the test prompts' word tokenizer, served
    with routers (``MindSkipConfig(**routers)``) on layers 2, 3 and 4 that keep TINY_KEEP_COUNTS of the prompts
    (:func:`serve_fixture`)."""
    from mindskip_ext.testing import tiny_model, train_word_tokenizer

    tokenizer = train_word_tokenizer(PROMPTS, chat_template=False)
    model = tiny_model(
        model_type, tokenizer=tokenizer, layers=6, hidden=128, heads=4, kv_heads=2, intermediate=256, seed=seed,
        max_position_embeddings=512, **config,
    )
    return serve_fixture(directory, model, tokenizer, TINY_KEEP_COUNTS, **(routers or {}))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Served:
    return tiny_fixture(tmp_path_factory.mktemp("tiny"), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_hybrid(tmp_path_factory) -> Served:
    """The tiny Llama with token routers on layers 2-4: layer 3 routes per token, 2 and 4 per sequence."""
    routers = {"routing": "token", "token_layers": [3]}
    return tiny_fixture(tmp_path_factory.mktemp("tiny_hybrid"), "llama", seed=0, routers=routers)


@pytest.fixture(scope="session")
def tiny_token(tmp_path_factory) -> Served:
    """The tiny Llama with token routers on layers 2-4, every one routed per token."""
    return tiny_fixture(tmp_path_factory.mktemp("tiny_token"), "llama", seed=0, routers={"routing": "token"})


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Served:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mindskip_ext.offline_models import checkpoint_path, is_fetched

    if not is_fetched("smollm2"):
        pytest.skip("SmolLM2-135M is not fetched (mindskip fetch-model smollm2)")
    path = checkpoint_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # A third of its 30 layers, for a short test; every one keeps a different share of the prompts.
    layers = [14, 16, 18, 20, 22, 24, 26, 28]
    return serve_fixture(
        tmp_path_factory.mktemp("smollm2"), model, tokenizer, [3, 1, 5, 2, 4, 0, 6, 3], layers=layers
    )


@contextlib.contextmanager
def offline_engine(served: Served, max_num_seqs: int, *, compiled: bool = False, **vllm_kwargs):
    """``mindskip_ext.vllm.llm`` on ``served``, in this process (engine core and worker: a start of seconds, and the
    model reachable with ``apply_model``), shut down on exit. The server test covers vLLM's own processes.

    Eager unless ``compiled`` (vLLM's default path): compiling costs 20-90 s per engine on this CPU, so the tests
    that are about compilation ask for it."""
    with in_process_engine(
        base=served.base, routers=served.routers, max_num_seqs=max_num_seqs, enforce_eager=not compiled, **vllm_kwargs
    ) as engine:
        yield engine


@contextlib.contextmanager
def in_process_engine(base: Path, routers: Path | None, **vllm_kwargs):
    """A ``vllm.LLM`` in this process: of ``base`` with ``routers`` (``mindskip_ext.vllm.llm``), or plain vLLM when
    ``routers`` is None; fp32, greedy-ready, shut down on exit."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from mindskip_ext.vllm import llm

    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    settings = dict(dtype="float32", max_model_len=256, seed=0, distributed_executor_backend="uni", **vllm_kwargs)
    try:
        engine = LLM(model=str(base), **settings) if routers is None else llm(base, routers, **settings)
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
    try:
        yield engine
    finally:
        engine.llm_engine.engine_core.shutdown()
        del engine
        cleanup_dist_env_and_memory()


def generate(engine, served: Served) -> list[list[int]]:
    """Greedy NEW_TOKENS for every test prompt, all submitted at once (the engine batches up to max_num_seqs)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = engine.generate([{"prompt_token_ids": ids} for ids in served.prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]
