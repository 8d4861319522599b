"""The Router-Tuning loss of one micro-batch, as a pure function of the model, the batch and the penalty.

    loss = task / targets + coefficient(c) / (layers * sequences) * sum of the straight-through keep gates

The task term is the labels' cross-entropy (``ce``, the paper's), the self-distillation ``kd`` term
KL(teacher || student) summed over the same supervised positions, or their sum (``ce+kd``). The teacher is the
same model with every router bypassed (all sequences kept), run without gradient in the same step: the routers'
job is to keep the dense model's behaviour, and the whole next-token distribution says more about it than one
label per token. With temperature ``T`` both distributions are softened and the KL is scaled by ``T**2``.

``c`` is the batch's capacity (the mean gate: its value is the 0/1 decision, its gradient goes to the
router score). ``targets`` and ``sequences`` count the whole optimizer step, so that micro-batches of one
step add up to the loss of the step. Under token routing a decision covers one real token, so the gates are per
real token and ``sequences`` counts the step's real tokens (:func:`routing_units`): the capacity is the kept fraction
of the real tokens, and both levels train on the same losses. ``coefficient`` comes from the penalty
(:mod:`.penalty`): the paper's fixed lambda, or the capacity controller's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX
from ..devices import autocast_for, model_device
from ..eval.perplexity import token_nll
from ..layer import RoutingRecord


@dataclass
class LossStats:
    """What one micro-batch's loss saw: the penalty reads the gates' gradients from it after backward."""

    nll: float  # summed token NLL of the batch (reported whatever the task loss)
    kd: float | None  # summed KL(teacher || student) of the batch, when the loss has a KD term
    capacity: float  # mean keep gate over (MindSkip layer, sequence) pairs of the batch
    coefficient: float  # the penalty coefficient used for the batch
    per_gate: float  # d(penalty)/d(gate): coefficient / (layers * sequences of the step)
    sequences: int  # routing units (sequences; real tokens under token routing) of the whole optimizer step
    record: RoutingRecord
    gates: dict[int, torch.Tensor]  # layer -> (B,) straight-through gate; (B, T) under token routing


def routing_units(model, batch: dict) -> int:
    """What the capacity penalty of ``model`` counts in ``batch``: its sequences, or under token routing its real
    tokens. A model that routes some layers per token and the others per sequence (``token_layers``) is refused."""
    config = model.mindskip_config
    if config.token_layers is not None:
        raise ValueError(
            f"Router-Tuning trains one routing level, but this model routes layers {config.token_layers} per token "
            "and its other routed layers per sequence: train token routers (routing='token' without token_layers), "
            "then choose the token layers (MindSkipModel.from_pretrained(model, routers, token_layers=...))"
        )
    if config.routing == "token":
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].shape[0])


def covered_log_probs(logits: torch.Tensor, covered: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``(positions, vocab)`` float log-probabilities of the next token at the ``covered`` positions only
    (``covered``: ``(batch, length - 1)`` bool, position ``t`` predicting token ``t + 1``)."""
    return F.log_softmax(logits[:, :-1][covered].float() / temperature, dim=-1)


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """``(sum, count)``: KL(teacher || student) of the next-token distributions, summed over the supervised
    positions (those ``labels`` covers, shifted by one as in :func:`token_nll`), times ``temperature**2``."""
    covered = labels[:, 1:] != IGNORE_INDEX
    kl = F.kl_div(covered_log_probs(student, covered, temperature), covered_log_probs(teacher, covered, temperature),
                  log_target=True, reduction="sum")
    return kl * temperature**2, int(covered.sum())


def router_tuning_loss(
    model, batch: dict, penalty, *, targets: int, sequences: int, bf16: bool = False, loss: str = "ce",
    kd_temperature: float = 1.0,
):
    """``(loss, stats)`` of one micro-batch (``input_ids``, ``attention_mask``, ``labels`` on the model's device).

    The model must be a :class:`~mindskip_ext.MindSkipModel` in training mode with gradients enabled, so that
    every MindSkip layer records a straight-through gate. ``loss``: ``ce``, ``kd`` or ``ce+kd``.
    """
    record = RoutingRecord()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with autocast_for(model_device(model), bf16):
        teacher = None
        if loss != "ce":
            with torch.no_grad():
                teacher = model(**inputs, mindskip_bypass=True).logits
        logits = model(**inputs, mindskip_record=record).logits
    nll, _ = token_nll(logits, batch["labels"])
    kd = distillation_kl(logits, teacher, batch["labels"], kd_temperature)[0] if teacher is not None else None
    task = {"ce": nll, "kd": kd, "ce+kd": nll + kd if kd is not None else None}[loss]
    gates = record.gates()
    num_layers = len(model.routers)
    if len(gates) != num_layers:
        raise RuntimeError(
            f"{len(gates)} of {num_layers} MindSkip layers recorded a straight-through gate; the model must be in "
            "training mode with gradients enabled"
        )
    stacked = torch.stack([record.layers[i].units(gates[i]) for i in sorted(gates)])  # (layers, units)
    capacity = float(stacked.detach().mean())
    coefficient = penalty.coefficient(capacity)
    if penalty.reads_gate_gradients:
        for gate in gates.values():
            gate.retain_grad()
    per_gate = coefficient / (num_layers * sequences)
    total = task / max(1, targets) + per_gate * stacked.sum()
    kd_value = float(kd.detach()) if kd is not None else None
    stats = LossStats(float(nll.detach()), kd_value, capacity, coefficient, per_gate, sequences, record, gates)
    return total, stats
