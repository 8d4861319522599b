"""Perplexity and capacity of a (MindSkip) causal LM on a text or instruction dataset (capacity: see
:class:`~mindskip_ext.layer.CapacityMeter`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, Example, collate, length_batches, load_examples, pad_token_id
from ..devices import autocast_for, model_device
from ..layer import CapacityMeter, RoutingRecord
from ..model import MindSkipModel


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over supervised positions, and their count."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    count = int((shift_labels != IGNORE_INDEX).sum())
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, count


def forward_routed(model, batch: dict, record: RoutingRecord | None):
    """One no-cache forward; a MindSkip model also fills ``record`` with its routing."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if isinstance(model, MindSkipModel):
        kwargs["mindskip_record"] = record
    return model(**kwargs)


def routed_forwards(model, examples: Sequence[Example], pad_id: int, batch_size: int = 8, bf16: bool = False,
                    progress: bool = False):
    """Generator of ``(index, batch, output, record)``: one no-cache forward per length-sorted batch of
    ``examples`` (``index``: their positions in ``examples``), in eval mode without gradient. The model's
    training mode is restored when the generator ends."""
    if not examples:
        raise ValueError("nothing to evaluate: no examples")
    device = model_device(model)
    batches = length_batches([len(e) for e in examples], batch_size, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", leave=False)
    was_training = model.training
    model.eval()
    try:
        for index in batches:
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in index], pad_id).items()}
            record = RoutingRecord()
            with torch.no_grad(), autocast_for(device, bf16):
                output = forward_routed(model, batch, record)
            yield index, batch, output, record
    finally:
        model.train(was_training)


def evaluate_examples(
    model,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    progress: bool = False,
) -> dict:
    """Loss, perplexity and capacity of ``model`` (MindSkip or plain HF) on tokenized examples."""
    meter = CapacityMeter()
    total_nll, total_count = 0.0, 0
    for _, batch, output, record in routed_forwards(model, examples, pad_id, batch_size, bf16, progress):
        nll, count = token_nll(output.logits, batch["labels"])
        total_nll += float(nll)
        total_count += count
        meter.add(record)
    loss = total_nll / total_count if total_count else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if total_count else float("nan"),
        "target_tokens": total_count,
        "sequences": len(examples),
        **meter.summary(),
    }


def evaluate_dataset(
    model,
    tokenizer,
    source,
    max_length: int = 1024,
    batch_size: int = 8,
    split: str = "train",
    config: str | None = None,
    max_records: int | None = None,
    bf16: bool = False,
    progress: bool = False,
) -> dict:
    """Perplexity and capacity on a dataset: text is cut into ``max_length`` blocks, instruction
    and chat records are scored on their response tokens."""
    prepared = load_examples(source, tokenizer, max_length, split=split, config=config, max_records=max_records)
    result = evaluate_examples(model, prepared.examples, pad_token_id(tokenizer), batch_size, bf16, progress)
    result["data"] = prepared.stats
    return result
