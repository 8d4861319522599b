"""Perplexity and capacity of a (MindSkip) causal LM on a text or instruction dataset.

Capacity is the kept fraction: per MindSkip layer, the share of sequences that ran the gated
sublayer; overall, the mean over (MindSkip layer, sequence) pairs. ``skipped_layers_per_sequence``
(the sum over layers of the skipped fraction) compares directly with a static drop of that
many layers.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Example, collate, length_batches, load_examples, pad_token_id
from .layer import RoutingRecord
from .model import MindSkipModel


class CapacityMeter:
    """Kept / total sequence counts per MindSkip layer, summed over many forwards."""

    def __init__(self):
        self.kept: Counter = Counter()
        self.total: Counter = Counter()

    def add(self, record: RoutingRecord) -> None:
        for idx, routing in record.layers.items():
            self.kept[idx] += routing.num_kept
            self.total[idx] += routing.batch_size

    def merge(self, other: CapacityMeter) -> None:
        self.kept.update(other.kept)
        self.total.update(other.total)

    def per_layer(self) -> dict[int, float]:
        return {idx: self.kept[idx] / self.total[idx] for idx in sorted(self.total) if self.total[idx]}

    def overall(self) -> float | None:
        """Kept fraction over all (layer, sequence) pairs; None when no MindSkip layer ran."""
        total = sum(self.total.values())
        return sum(self.kept.values()) / total if total else None

    def summary(self) -> dict:
        per_layer = self.per_layer()
        return {
            "capacity": self.overall(),
            "capacity_per_layer": {str(idx): round(c, 6) for idx, c in per_layer.items()},
            "skipped_layers_per_sequence": round(sum(1.0 - c for c in per_layer.values()), 6),
        }


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


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; a no-op context otherwise."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def forward_routed(model, batch: dict, record: RoutingRecord | None):
    """One no-cache forward; a MindSkip model also fills ``record`` with its routing."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if isinstance(model, MindSkipModel):
        kwargs["mindskip_record"] = record
    return model(**kwargs)


@torch.no_grad()
def evaluate_examples(
    model,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    progress: bool = False,
) -> dict:
    """Loss, perplexity and capacity of ``model`` (MindSkip or plain HF) on tokenized examples."""
    if not examples:
        raise ValueError("nothing to evaluate: no examples")
    was_training = model.training
    model.eval()
    device = model_device(model)
    meter = CapacityMeter()
    total_nll, total_count = 0.0, 0
    batches = length_batches([len(e) for e in examples], batch_size, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", leave=False)
    try:
        for index in batches:
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in index], pad_id).items()}
            record = RoutingRecord()
            with autocast_for(device, bf16):
                logits = forward_routed(model, batch, record).logits
            nll, count = token_nll(logits, batch["labels"])
            total_nll += float(nll)
            total_count += count
            meter.add(record)
    finally:
        model.train(was_training)
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
