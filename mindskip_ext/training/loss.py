"""The Router-Tuning loss of one micro-batch, as a pure function of the model, the batch and the penalty.

    loss = NLL / targets + coefficient(c) / (layers * sequences) * sum of the straight-through keep gates

``c`` is the batch's capacity (the mean gate: its value is the 0/1 decision, its gradient goes to the
router score). ``targets`` and ``sequences`` count the whole optimizer step, so that micro-batches of one
step add up to the loss of the step. ``coefficient`` comes from the penalty (:mod:`.penalty`): the paper's
fixed lambda, or the capacity controller's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import autocast_for, model_device
from ..eval.perplexity import token_nll
from ..layer import RoutingRecord


@dataclass
class LossStats:
    """What one micro-batch's loss saw: the penalty reads the gates' gradients from it after backward."""

    nll: float  # summed token NLL of the batch
    capacity: float  # mean keep gate over (MindSkip layer, sequence) pairs of the batch
    coefficient: float  # the penalty coefficient used for the batch
    per_gate: float  # d(penalty)/d(gate): coefficient / (layers * sequences of the step)
    sequences: int  # sequences of the whole optimizer step
    record: RoutingRecord
    gates: dict[int, torch.Tensor]  # layer -> (B,) straight-through gate


def router_tuning_loss(model, batch: dict, penalty, *, targets: int, sequences: int, bf16: bool = False):
    """``(loss, stats)`` of one micro-batch (``input_ids``, ``attention_mask``, ``labels`` on the model's device).

    The model must be a :class:`~mindskip_ext.MindSkipModel` in training mode with gradients enabled, so that
    every MindSkip layer records a straight-through gate.
    """
    record = RoutingRecord()
    with autocast_for(model_device(model), bf16):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
            mindskip_record=record,
        ).logits
    nll, _ = token_nll(logits, batch["labels"])
    gates = record.gates()
    num_layers = len(model.routers)
    if len(gates) != num_layers:
        raise RuntimeError(
            f"{len(gates)} of {num_layers} MindSkip layers recorded a straight-through gate; the model must be in "
            "training mode with gradients enabled"
        )
    stacked = torch.stack([gates[i] for i in sorted(gates)])  # (layers, batch)
    capacity = float(stacked.detach().mean())
    coefficient = penalty.coefficient(capacity)
    if penalty.reads_gate_gradients:
        for gate in gates.values():
            gate.retain_grad()
    per_gate = coefficient / (num_layers * sequences)
    loss = nll / max(1, targets) + per_gate * stacked.sum()
    stats = LossStats(float(nll.detach()), capacity, coefficient, per_gate, sequences, record, gates)
    return loss, stats
