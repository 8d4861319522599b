"""Each setting MindSkip cannot serve under is refused when the engine is created, before any engine process
starts, with a message that names the setting and what to use instead."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext.vllm import ROUTERS_KEY, check_vllm_version, engine_kwargs, hf_overrides, llm, register


def creation_error(create) -> str:
    """The message of the error that ``create()`` (creating an engine) raises."""
    with pytest.raises(Exception) as info:  # vLLM's config is a pydantic dataclass, which may wrap a ValueError
        create()
    return str(info.value)


def refused(served, **vllm_kwargs) -> str:
    return creation_error(lambda: llm(served.base, served.routers, dtype="float32", max_model_len=256, **vllm_kwargs))


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({"enable_chunked_prefill": True}, r"chunked prefill is on.*enable_chunked_prefill=False \(--no-enable-chunk"),
        ({"enable_prefix_caching": True}, r"prefix caching is on.*enable_prefix_caching=False \(--no-enable-prefix"),
        (
            {"compilation_config": {"cudagraph_mode": "FULL"}},
            r"cudagraph_mode FULL captures whole steps.*default cudagraph_mode.*enforce_eager=True \(--enforce-eag",
        ),
    ],
)
def test_engine_settings_are_refused(tiny, setting, expected):
    assert re.search(expected, refused(tiny, **setting), flags=re.S)


def test_plain_llm_with_vllm_defaults_names_every_setting(tiny):
    """Without the helper, the vLLM defaults that dynamic routing cannot serve under are refused, all in one
    message; torch.compile is not one of them."""
    from vllm import LLM

    overrides = hf_overrides(tiny.base, tiny.routers)
    message = creation_error(lambda: LLM(model=str(tiny.base), hf_overrides=overrides, max_model_len=256))
    assert message.count("\n- ") == 2, message
    assert "MindSkip (dynamic mode) cannot serve" in message
    assert "--no-enable-prefix-caching" in message and "--no-enable-chunked-prefill" in message


def test_routers_of_another_model_are_refused(tiny, tmp_path):
    from mindskip_ext.testing import tiny_model

    other = msk.get_mindskip_model(tiny_model("llama", layers=4, hidden=128, heads=4, kv_heads=2))
    other.save_pretrained(tmp_path / "routers")
    message = refused(dataclasses.replace(tiny, routers=tmp_path / "routers"))
    assert re.search(r"were trained for .*'num_hidden_layers': 4.*but vLLM serves .*'num_hidden_layers': 6", message)
    assert "serve the base model they were trained on" in message


def test_routers_the_plugin_does_not_serve_are_refused(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny.base)
    msk.get_mindskip_model(base, msk.MindSkipConfig(granularity="mlp")).save_pretrained(tmp_path / "routers")
    message = refused(dataclasses.replace(tiny, routers=tmp_path / "routers"))
    assert "gate granularity 'mlp'; the vLLM plugin serves granularity 'attn'" in message


def test_missing_routers_are_refused(tiny):
    from vllm import LLM

    overrides = {"architectures": hf_overrides(tiny.base, tiny.routers)["architectures"]}
    kwargs = dict(enforce_eager=True, enable_chunked_prefill=False, enable_prefix_caching=False, max_model_len=256)
    message = creation_error(lambda: LLM(model=str(tiny.base), hf_overrides=overrides, **kwargs))
    assert f"no MindSkip routers: set hf_overrides={{'{ROUTERS_KEY}'" in message


def test_other_vllm_releases_are_refused(tiny, monkeypatch, caplog):
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1+cpu")
    for version in ("0.33.0", "0.3.2", "0.320.0"):
        expected = rf"supports vLLM 0\.32\.x, found vLLM {re.escape(version)}.*pip install"
        with pytest.raises(RuntimeError, match=expected):
            check_vllm_version(version)
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError, match="found vLLM 0.33.0"):
        llm(tiny.base, tiny.routers)
    # The plugin entry point warns instead: it runs in every vLLM process, whatever the model.
    with caplog.at_level(logging.WARNING, logger="mindskip_ext.vllm"):
        register()
    assert "found vLLM 0.33.0" in caplog.text and "not registered" in caplog.text


def test_unsupported_model_types_are_refused(tmp_path, tiny):
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2").save_pretrained(tmp_path)
    supported = "supported: gemma3_text, llama, mistral, qwen2, qwen3, qwen3_moe$"
    with pytest.raises(ValueError, match=f"model type 'gpt2' has no MindSkip vLLM architecture; {supported}"):
        hf_overrides(tmp_path, tiny.routers)


def test_engine_kwargs_keep_the_callers_settings(tiny):
    kwargs = engine_kwargs(tiny.base, tiny.routers, max_num_seqs=3, hf_overrides={"max_position_embeddings": 128})
    assert kwargs == {
        "max_num_seqs": 3,
        "enable_chunked_prefill": False,  # what dynamic routing needs; vLLM's compiled path stays on
        "enable_prefix_caching": False,
        "hf_overrides": {
            "max_position_embeddings": 128,
            "architectures": ["MindSkipLlamaForCausalLM"],
            ROUTERS_KEY: str(tiny.routers.resolve()),
        },
    }
    # Refused later, when the engine is created.
    assert engine_kwargs(tiny.base, tiny.routers, enable_prefix_caching=True)["enable_prefix_caching"] is True


def test_routers_on_sliding_layers_past_the_window_are_refused(tmp_path):
    """vLLM frees the KV blocks that leave a sliding window, and the plugin finds a request's decisions by its first
    block: routers on sliding layers serve only where no request outgrows the window."""
    from conftest import PROMPTS
    from transformers import AutoConfig

    from mindskip_ext.testing import tiny_model, train_word_tokenizer
    from mindskip_ext.vllm.checks import sliding_window_problem

    tokenizer = train_word_tokenizer(PROMPTS, chat_template=False)
    model = tiny_model("gemma3_text", tokenizer=tokenizer, layers=6, hidden=128, heads=4, kv_heads=2, intermediate=256,
                       sliding_window=64, max_position_embeddings=512)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    mindskip = msk.get_mindskip_model(model)  # layers 2, 3, 4: sliding, full, sliding
    with torch.no_grad():  # routers that read their input (dynamic mode: new routers ignore it, which is static)
        for layer in mindskip.mindskip_layers.values():
            layer.router.weight.normal_(generator=torch.Generator().manual_seed(layer.layer_idx))
    mindskip.save_pretrained(tmp_path / "routers")
    message = creation_error(lambda: llm(tmp_path / "base", tmp_path / "routers", dtype="float32", max_model_len=256))
    assert "routers on layers [2, 4] gate sliding-window attention (window 64)" in message
    assert "MindSkip (dynamic mode) cannot serve these routers" in message
    assert "use max_model_len=64 (--max-model-len 64) or routers on full-attention layers only" in message
    assert "static routers (mindskip eval --static-projection --save-static) serve sliding layers" in message
    config = AutoConfig.from_pretrained(tmp_path / "base")
    assert sliding_window_problem(config, [3, 5], 256) is None  # full-attention layers
    assert sliding_window_problem(config, [2, 3], 64) is None  # no request outgrows the window
    mistral = AutoConfig.for_model("mistral", sliding_window=64, num_hidden_layers=6)
    assert "layers [2, 3]" in sliding_window_problem(mistral, [2, 3], 256)  # Mistral's window: every layer
