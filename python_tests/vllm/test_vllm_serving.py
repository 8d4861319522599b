"""vLLM with the MindSkip plugin generates exactly what transformers MindSkip generates (greedy), eager and compiled,
and a skipped (layer, request) never writes its KV slots."""

from __future__ import annotations

import pytest
import torch
from conftest import NEW_TOKENS, Served, generate, in_process_engine, offline_engine, tiny_fixture


def check_fixture(served: Served) -> None:
    """The test is only worth something if routing differs across prompts and layers and changes the output."""
    patterns = {tuple(keep) for keep in served.keep.values()}
    assert len(patterns) > 1, "every layer routes the prompts alike"
    assert any(0 < sum(keep) < len(keep) for keep in served.keep.values()), "no layer mixes kept and skipped prompts"
    assert served.expected != served.dense, "skipping changes no output: the test could not see routing errors"


# max_num_seqs 1: one request per step (every layer runs or skips the whole batch); 2: one request's prefill
# beside another's decode; 8: all six at once, each layer attending for a subset.
@pytest.mark.parametrize("max_num_seqs", [1, 2, 8])
def test_tiny_llama_matches_transformers(tiny, max_num_seqs):
    check_fixture(tiny)
    with offline_engine(tiny, max_num_seqs) as engine:
        assert generate(engine, tiny) == tiny.expected


# vLLM's default path, compiled (torch.compile with inductor on the CPU): the routed attention is one custom op in
# the compiled graph. At 2, one request's prefill beside another's decode; at 8, every layer attends for a subset.
@pytest.mark.parametrize("max_num_seqs", [2, 8])
def test_tiny_llama_compiled_matches_transformers(tiny, max_num_seqs):
    from vllm.config import CompilationMode

    check_fixture(tiny)
    with offline_engine(tiny, max_num_seqs, compiled=True) as engine:
        config = engine.llm_engine.vllm_config
        assert not config.model_config.enforce_eager and config.compilation_config.mode != CompilationMode.NONE
        assert generate(engine, tiny) == tiny.expected
        (compiled,) = engine.apply_model(lambda model: model.model.compiled)
    assert compiled


@pytest.mark.parametrize("max_num_seqs", [1, 2, 8])
def test_smollm2_matches_transformers(smollm2, max_num_seqs):
    check_fixture(smollm2)
    with offline_engine(smollm2, max_num_seqs) as engine:
        assert generate(engine, smollm2) == smollm2.expected


# Gemma 3 with sliding and full layers routed (a window of the engine's max_model_len: see test_vllm_refusals), and
# Qwen3-MoE with sparse and dense MLP layers. These two, whose decoder layers differ most from Llama's, run on vLLM's
# default compiled path (the routed op inside the graph); the others eagerly (compiling costs 20-90 s an engine).
OTHER = {"mistral": {}, "qwen2": {}, "qwen3": {}, "qwen3_moe": {}, "gemma3_text": {"sliding_window": 256}}
COMPILED = ("qwen3_moe", "gemma3_text")


@pytest.mark.parametrize("model_type", OTHER)
def test_other_architectures_match_transformers(tmp_path, model_type):
    served = tiny_fixture(tmp_path, model_type, seed=1, **OTHER[model_type])
    check_fixture(served)
    with offline_engine(served, 8, compiled=model_type in COMPILED) as engine:
        assert generate(engine, served) == served.expected


# Token routers: the hybrid (layer 3 per token, 2 and 4 per request) with one request per step and with all six at
# once, eagerly and compiled.
@pytest.mark.parametrize("max_num_seqs, compiled", [(1, False), (8, False), (8, True)])
def test_tiny_hybrid_matches_transformers(tiny_hybrid, max_num_seqs, compiled):
    from mindskip_ext.vllm import serving_mode

    check_fixture(tiny_hybrid)
    assert tiny_hybrid.token_layers == (3,) and serving_mode(tiny_hybrid.routers) == "dynamic"
    with offline_engine(tiny_hybrid, max_num_seqs, compiled=compiled) as engine:
        assert generate(engine, tiny_hybrid) == tiny_hybrid.expected


def test_token_routers_serve_under_vllm_defaults(tiny_token):
    """Every routed layer per token: each decision is the token's own, so the routers serve under vLLM's defaults
    (chunked prefill, prefix caching, compiled) and generate what transformers MindSkip generates."""
    from mindskip_ext.vllm import serving_mode

    check_fixture(tiny_token)
    assert serving_mode(tiny_token.routers) == "per-token"
    with in_process_engine(tiny_token.base, tiny_token.routers, max_num_seqs=8) as engine:
        config = engine.llm_engine.vllm_config
        assert config.scheduler_config.enable_chunked_prefill and config.cache_config.enable_prefix_caching
        assert not config.model_config.enforce_eager
        assert generate(engine, tiny_token) == tiny_token.expected


@pytest.mark.parametrize("fixture", ["tiny", "tiny_hybrid"])
def test_skipped_requests_write_no_kv(request, fixture):
    """Fill every KV cache with a sentinel, generate, and count the written token slots of each layer: exactly the
    tokens of the requests that layer keeps (every request at a layer without router, and at a layer routed per
    token, where every token computes its key and value). With all six requests in flight at once, no KV block changes
    hands. (The sentinel is finite: the CPU kernel reads the unused slots of a block and masks their scores, and a NaN
    value would survive the zero weight.)"""
    tiny = request.getfixturevalue(fixture)
    fed = [len(ids) + NEW_TOKENS - 1 for ids in tiny.prompts]  # the last new token is never fed back

    def layers_attention(model):
        return [layer.self_attn.attn for layer in model.model.layers]

    sentinel = -7777.0

    def fill(model):
        for attn in layers_attention(model):
            attn.kv_cache.fill_(sentinel)

    def written_slots(model):
        # A token's slot holds its key and value for every KV head, wherever the backend's layout puts them.
        per_token = [2 * attn.num_kv_heads * attn.head_size for attn in layers_attention(model)]
        return [int((attn.kv_cache != sentinel).sum()) / n for attn, n in zip(layers_attention(model), per_token)]

    with offline_engine(tiny, 8) as engine:
        engine.apply_model(fill)
        assert generate(engine, tiny) == tiny.expected
        (written,) = engine.apply_model(written_slots)
    for idx, count in enumerate(written):
        keep = [True] * len(fed) if idx in tiny.token_layers else tiny.keep.get(idx, [True] * len(fed))
        assert count == sum(n for n, kept in zip(fed, keep) if kept), f"layer {idx}"
    assert written[2] < sum(fed)


def test_router_state_lives_in_buffers_not_parameters(tiny):
    """vLLM checks that every parameter came from the base checkpoint; the routers come from their own files."""

    def router_summary(model):
        names = [name for name, _ in model.named_parameters() if "router" in name]
        routers = {idx: layer.self_attn.mindskip_router for idx, layer in enumerate(model.model.layers)
                   if hasattr(layer.self_attn, "mindskip_router")}
        return names, {idx: (r.weight.dtype, r.weight.clone(), float(r.bias)) for idx, r in routers.items()}

    with offline_engine(tiny, 2) as engine:
        ((names, routers),) = engine.apply_model(router_summary)
    assert names == []
    assert sorted(routers) == sorted(tiny.keep)
    from safetensors.torch import load_file

    saved = load_file(tiny.routers / "routers.safetensors")
    for idx, (dtype, weight, bias) in routers.items():
        assert dtype == torch.float32
        assert torch.equal(weight, saved[f"layers.{idx}.router.weight"].reshape(-1))
        assert bias == saved[f"layers.{idx}.router.bias"].item()
