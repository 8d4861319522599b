"""Held-out splits, and batches built from length buckets so that padding stays small."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from .formats import IGNORE_INDEX, DataError, Example


def split_heldout(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split into (train, held-out); both non-empty."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"held-out fraction must be in (0, 1), got {fraction}")
    if len(examples) < 2:
        raise DataError(f"need at least 2 examples to hold some out, got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [examples[i] for i in train], [examples[i] for i in held]


def length_batches(
    lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0, mega: int = 32
) -> list[list[int]]:
    """Index batches with little padding.

    Without shuffling: indices sorted by length, cut into batches. With shuffling: a seeded
    permutation is cut into mega-batches of ``mega`` batches, each sorted by length and cut into
    batches, and the batches are shuffled; so batches vary from epoch to epoch yet stay tight.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    index = list(range(len(lengths)))
    if not shuffle:
        index.sort(key=lambda i: (lengths[i], i))
        return [index[i : i + batch_size] for i in range(0, len(index), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(index)
    batches = []
    span = batch_size * mega
    for start in range(0, len(index), span):
        chunk = sorted(index[start : start + span], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padding tokens when ``batches`` are right-padded to their longest member."""
    real = sum(lengths[i] for b in batches for i in b)
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - real / total if total else 0.0


def mix_examples(
    parts: Sequence[Sequence[Example]], weights: Sequence[float], seed: int = 0, total: int | None = None
) -> list[Example]:
    """A mixture of ``total`` examples (default: as many as the parts hold together) in proportion to ``weights``.

    Source ``i`` gives ``round(total * w_i / sum(w))`` examples, drawn in a seeded order and repeated (a new
    order each pass) when its weight asks for more than it has. The result is in a seeded random order.
    """
    if len(parts) != len(weights):
        raise DataError(f"{len(parts)} data sources but {len(weights)} weights")
    if any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise DataError(f"data weights must be >= 0 with a positive sum, got {list(weights)}")
    empty = [i for i, (part, w) in enumerate(zip(parts, weights)) if w > 0 and not part]
    if empty:
        raise DataError(f"data source {empty[0] + 1} has no examples but weight {weights[empty[0]]}")
    rng = random.Random(seed)
    total = sum(len(p) for p in parts) if total is None else total
    mixed: list[Example] = []
    for part, weight in zip(parts, weights):
        want = round(total * weight / sum(weights))
        while want > 0:
            order = list(range(len(part)))
            rng.shuffle(order)
            mixed.extend(part[i] for i in order[:want])
            want -= min(want, len(order))
    rng.shuffle(mixed)
    return mixed
