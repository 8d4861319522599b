"""Tiny Hugging Face causal LMs and real tokenizers for tests, built offline from configs.

    path = save_tiny_model(tmp_path / "m")            # model + tokenizer, loadable with from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)

The tokenizer is a word-level ``tokenizers`` tokenizer trained on the given texts (by default the
package's built-in synthetic instructions plus the files under ``python_tests/data``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mindskip_ext.data import synthetic_instructions, tokenizer_corpus, train_word_tokenizer

DATA_DIR = Path(__file__).parent / "data"


def bundled_records() -> list[dict]:
    """Every record of the JSON / JSONL files under ``python_tests/data`` (for tokenizer vocabularies)."""
    records = []
    for path in sorted(DATA_DIR.glob("*.json*")):
        if path.suffix == ".json":
            records.extend(json.loads(path.read_text()))
        else:
            records.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return records


def tiny_tokenizer(texts=None, chat_template: bool = True):
    if texts is None:
        texts = tokenizer_corpus(synthetic_instructions(400, seed=0) + bundled_records())
        texts += [p.read_text() for p in sorted(DATA_DIR.glob("*.txt"))]
    return train_word_tokenizer(texts, chat_template=chat_template)


def tiny_config(model_type: str = "llama", vocab_size: int = 128, layers: int = 4, hidden: int = 32, **overrides):
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if model_type == "qwen3":
        kwargs["head_dim"] = hidden // 4
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", tokenizer=None, seed: int = 0, attn: str = "sdpa", **config_kwargs):
    """A randomly initialised tiny causal LM (eval mode); vocabulary sized to ``tokenizer`` when given."""
    if tokenizer is not None:
        config_kwargs.setdefault("vocab_size", len(tokenizer))
        config_kwargs.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **config_kwargs), attn_implementation=attn)
    return model.eval()


def save_tiny_model(path, model_type: str = "llama", chat_template: bool = True, seed: int = 0, **config_kwargs) -> Path:
    """Build a tiny model and its tokenizer and save both to ``path``; returns ``path``."""
    path = Path(path)
    tokenizer = tiny_tokenizer(chat_template=chat_template)
    model = tiny_model(model_type, tokenizer=tokenizer, seed=seed, **config_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores); import this
    fixture into a test module to apply it there, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
