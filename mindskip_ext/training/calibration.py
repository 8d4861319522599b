"""Final capacity calibration of trained routers: one common shift of every router bias.

A controller leaves the final capacity a few points off (batch noise, the last updates). So after
training every router bias is shifted by one common amount, in logit space, keeping the per-layer
allocation the training found, until the capacity on training sequences is the target. It takes a few
rounds, since skipping in one layer changes the inputs of the next.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import Example
from ..eval.perplexity import routed_forwards
from ..layer import CapacityMeter


def router_logits(model, examples: Sequence[Example], pad_id: int, batch_size: int, bf16: bool):
    """Router logits of every (MindSkip layer, sequence) pair under the current routing, and the capacity."""
    meter, logits = CapacityMeter(), []
    for _, _, _, record in routed_forwards(model, examples, pad_id, batch_size, bf16):
        meter.add(record)
        logits.extend(r.logit() for r in record.layers.values())
    return torch.cat(logits), meter.overall()


@torch.no_grad()
def calibrate_capacity(
    model,
    examples: Sequence[Example],
    target: float,
    pad_id: int,
    batch_size: int = 16,
    bf16: bool = False,
    rounds: int = 6,
    tolerance: float = 0.005,
) -> dict:
    """Shift every router bias by one common amount so that the capacity on ``examples`` is ``target``.

    Each round places the keep threshold between the k-th and (k+1)-th largest router logit
    (k = target * pairs), then re-measures, because a changed decision in one layer changes the
    inputs of the later layers. Stops within ``tolerance`` or after ``rounds`` shifts.
    """
    threshold = model.mindskip_config.threshold_logit
    total_shift, history = 0.0, []
    for _ in range(rounds + 1):
        logits, capacity = router_logits(model, examples, pad_id, batch_size, bf16)
        history.append(capacity)
        if abs(capacity - target) <= tolerance or len(history) > rounds:
            break
        ordered = torch.sort(logits, descending=True).values
        k = min(len(ordered), max(1, round(target * len(ordered))))
        boundary = float(ordered[k - 1]) if k == len(ordered) else float(ordered[k - 1] + ordered[k]) / 2.0
        if k == len(ordered):
            boundary -= 1e-3  # keep every pair: put the threshold just under the smallest logit
        shift = threshold - boundary
        for router in model.routers.values():
            router.bias.add_(shift)
        total_shift += shift
    return {
        "bias_shift": total_shift,
        "capacity": history[-1],
        "capacity_history": history,
        "sequences": len(examples),
    }
