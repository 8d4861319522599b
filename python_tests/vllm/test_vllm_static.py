"""Static mode: routers that ignore their input (``mindskip drop``, ``mindskip eval --save-static``) are served as a
model whose always-skipped layers have no attention and no KV cache, on vLLM's compiled path and under vLLM's
default settings, with the tokens of transformers MindSkip."""

from __future__ import annotations

import os

import pytest
from conftest import generate, in_process_engine, static_fixture, tiny_fixture

from mindskip_ext.vllm import hf_overrides, serving_mode

TINY_LAYERS, TINY_DROPPED = [2, 3, 4], [2, 4]  # layer 3 has a router that keeps every request


@pytest.fixture(scope="module")
def tiny_static(tiny, tmp_path_factory):
    return static_fixture(tmp_path_factory.mktemp("static") / "routers", tiny, TINY_LAYERS, TINY_DROPPED)


def kv_layout(engine) -> tuple[int, list[str], int]:
    """vLLM's own KV-cache config: the number of blocks, the layers that hold KV, and a layer's page in bytes."""
    config = engine.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    (group,) = config.kv_cache_groups  # one full-attention group, with or without the dropped layers
    return config.num_blocks, list(group.layer_names), group.kv_cache_spec.page_size_bytes


def model_summary(model) -> dict[int, tuple[str, int]]:
    """Per decoder layer: the class of its attention module and its number of submodules (projections, rotary,
    attention)."""
    return {idx: (type(layer.self_attn).__name__, len(list(layer.self_attn.children())))
            for idx, layer in enumerate(model.model.layers)}


def test_static_mode_compiled_matches_transformers_with_fewer_kv_layers(tiny, tiny_static):
    from vllm.config import CompilationMode

    assert serving_mode(tiny_static.routers) == "static" and serving_mode(tiny.routers) == "dynamic"
    assert tiny_static.expected != tiny_static.dense, "dropping changes no output: the test could not see it"
    with in_process_engine(tiny.base, None, max_num_seqs=8, enforce_eager=True) as plain:
        plain_blocks, plain_layers, page = kv_layout(plain)
    # vLLM's defaults otherwise: compiled, chunked prefill and prefix caching on.
    with in_process_engine(tiny_static.base, tiny_static.routers, max_num_seqs=8) as engine:
        config = engine.llm_engine.vllm_config
        assert not config.model_config.enforce_eager and config.compilation_config.mode != CompilationMode.NONE
        assert config.cache_config.enable_prefix_caching and config.scheduler_config.enable_chunked_prefill
        assert generate(engine, tiny_static) == tiny_static.expected
        (compiled,) = engine.apply_model(lambda model: model.model.compiled)
        (layers,) = engine.apply_model(model_summary)
        blocks, kv_layers, static_page = kv_layout(engine)
    assert compiled
    assert plain_layers == [f"model.layers.{i}.self_attn.attn" for i in range(6)]
    assert kv_layers == [f"model.layers.{i}.self_attn.attn" for i in range(6) if i not in TINY_DROPPED]
    assert static_page == page
    # The same KV memory holds 6 / 4 times as many blocks: each holds 4 layers instead of 6.
    budget = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30
    for num_blocks, num_layers in ((plain_blocks, 6), (blocks, 4)):
        assert num_blocks * num_layers * page <= budget < (num_blocks + 1) * num_layers * page
    assert blocks / plain_blocks == pytest.approx(6 / 4, abs=1 / plain_blocks)
    for idx, (kind, submodules) in layers.items():
        assert (kind == "SkippedAttention") == (idx in TINY_DROPPED), idx
        assert (submodules == 0) == (idx in TINY_DROPPED), idx


# Gemma 3: a sliding-window and a full-attention layer dropped, with a window (64) that requests may outgrow
# (max_model_len 256), which dynamic mode refuses (test_vllm_refusals); Qwen3-MoE: its expert blocks stay.
@pytest.mark.parametrize("model_type, config, dropped", [
    ("gemma3_text", {"sliding_window": 64}, [2, 3]),
    ("qwen3_moe", {}, [2, 4]),
])
def test_static_mode_of_other_families(tmp_path, model_type, config, dropped):
    from transformers import AutoConfig

    served = tiny_fixture(tmp_path / "dynamic", model_type, seed=1, **config)
    static = static_fixture(tmp_path / "static", served, TINY_LAYERS, dropped)
    assert static.expected != static.dense, "dropping changes no output: the test could not see it"
    layer_types = getattr(AutoConfig.from_pretrained(served.base), "layer_types", None)
    if model_type == "gemma3_text":
        assert [layer_types[i] for i in dropped] == ["sliding_attention", "full_attention"]
    # vLLM's defaults: compiled, chunked prefill and prefix caching on.
    with in_process_engine(static.base, static.routers, max_num_seqs=8) as engine:
        assert not engine.llm_engine.vllm_config.model_config.enforce_eager
        assert generate(engine, static) == static.expected
        (layers,) = engine.apply_model(model_summary)
        groups = engine.llm_engine.engine_core.engine_core.scheduler.kv_cache_config.kv_cache_groups
    kv_layers = sorted(name for group in groups for name in group.layer_names)
    assert kv_layers == [f"model.layers.{i}.self_attn.attn" for i in range(6) if i not in dropped]
    for idx, (kind, submodules) in layers.items():
        assert (kind == "SkippedAttention") == (idx in dropped), idx
        assert (submodules == 0) == (idx in dropped), idx


def test_compile_cache_key_follows_the_routers(tiny, tiny_static, tmp_path):
    """vLLM keys its compile cache on the config, which leaves hf_overrides (the router directory) out: the plugin
    puts what of the routers shapes the graph into it, so another drop never reuses this one's compiled model."""
    from vllm.engine.arg_utils import EngineArgs

    def config_hash(routers) -> str:
        args = EngineArgs(model=str(tiny.base), hf_overrides=hf_overrides(tiny.base, routers), max_model_len=256,
                          enable_chunked_prefill=False, enable_prefix_caching=False)
        return args.create_engine_config().compute_hash()

    other = static_fixture(tmp_path / "routers", tiny, TINY_LAYERS, [3])
    hashes = [config_hash(tiny_static.routers), config_hash(tiny_static.routers), config_hash(other.routers),
              config_hash(tiny.routers)]
    assert hashes[0] == hashes[1]
    assert len(set(hashes)) == 3
