"""Attention-Drop baseline: similarity scores, choice of layers, the dropped model and its saved artifact."""

from __future__ import annotations

import json

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext import data as D
from mindskip_ext.eval.attention_drop import (
    REPORT_NAME,
    attention_drop,
    dropped_model,
    redundancy_scores,
    select_dropped,
)
from mindskip_ext.eval.perplexity import evaluate_examples
from mindskip_ext.testing import synthetic_instructions, tiny_model

from tiny import DATA_DIR


@pytest.fixture(scope="module")
def examples(tok):
    return D.prepare_examples(tok, synthetic_instructions(24, seed=5), 128).examples


def silence(model, layers, part):
    """Zero the output projection of a sublayer, so it adds nothing to the residual stream."""
    with torch.no_grad():
        for idx in layers:
            layer = model.model.layers[idx]
            if part in ("attn", "block"):
                layer.self_attn.o_proj.weight.zero_()
            if part in ("mlp", "block"):
                layer.mlp.down_proj.weight.zero_()
    return model


def real_logits(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize("granularity", ["attn", "mlp", "block"])
def test_a_silent_sublayer_scores_one_and_is_dropped_first(tok, examples, granularity):
    model = silence(tiny_model(tokenizer=tok, layers=6), [2], granularity)
    scores = redundancy_scores(model, examples, D.pad_token_id(tok), granularity, batch_size=4)
    assert sorted(scores) == list(range(6))
    assert scores[2] == pytest.approx(1.0, abs=1e-6)
    assert all(-1.0 <= s < 1.0 - 1e-4 for i, s in scores.items() if i != 2)
    assert select_dropped(scores, 1) == [2]


def test_scores_average_over_real_tokens_only(tok, examples):
    model = tiny_model(tokenizer=tok, layers=4)
    pad = D.pad_token_id(tok)
    one = redundancy_scores(model, examples[:6], pad, "block", batch_size=1)
    many = redundancy_scores(model, examples[:6], pad, "block", batch_size=6)
    for idx in one:
        assert many[idx] == pytest.approx(one[idx], abs=1e-5)


def test_select_dropped():
    scores = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.9, 4: 0.7}
    assert select_dropped(scores, 2) == [1, 3]
    assert select_dropped(scores, 3) == [1, 3, 4]
    assert select_dropped(scores, 1, candidates=[0, 2]) == [2]
    with pytest.raises(ValueError, match="between 1 and"):
        select_dropped(scores, 0)
    with pytest.raises(ValueError, match="between 1 and"):
        select_dropped(scores, 3, candidates=[0, 1])
    with pytest.raises(ValueError, match="not a decoder layer"):
        select_dropped(scores, 1, candidates=[7])


@pytest.mark.parametrize("granularity", ["attn", "block"])
def test_dropped_model_equals_removing_the_sublayers(tok, examples, granularity):
    batch = D.collate(examples[:5], D.pad_token_id(tok))
    reference = real_logits(silence(tiny_model(tokenizer=tok, layers=6), [1, 4], granularity), batch)
    dropped = dropped_model(tiny_model(tokenizer=tok, layers=6), [1, 4], granularity).eval()
    assert torch.allclose(real_logits(dropped, batch), reference, atol=1e-5)
    assert not torch.allclose(real_logits(tiny_model(tokenizer=tok, layers=6), batch), reference, atol=1e-3)


def test_attention_drop_saves_an_artifact_the_eval_path_loads(tok, examples, tmp_path):
    model = silence(tiny_model(tokenizer=tok, layers=6), [3], "attn")
    converted, report = attention_drop(model, tok, DATA_DIR / "alpaca_small.json", 2, tmp_path, max_records=20)
    assert 3 in report["dropped_layers"]  # the silent attention is the most redundant
    assert len(report["dropped_layers"]) == 2 and report["calibration"]["records"] == 20
    saved = json.loads((tmp_path / REPORT_NAME).read_text())
    assert saved["dropped_layers"] == report["dropped_layers"] and len(saved["similarity"]) == 6
    pad = D.pad_token_id(tok)
    fresh = silence(tiny_model(tokenizer=tok, layers=6), [3], "attn")
    loaded = msk.MindSkipModel.from_pretrained(fresh, tmp_path)
    result = evaluate_examples(loaded, examples, pad)
    assert result["capacity"] == 0.0 and result["skipped_layers_per_sequence"] == 2.0
    assert result["loss"] == pytest.approx(evaluate_examples(converted, examples, pad)["loss"], rel=1e-6)
