"""Where the routers start: the paper's zero init (keep everything), or the static Attention-Drop choice.

``redundancy`` gives the optimiser the static baseline as its starting point, so that training only has to add
input-dependence on top. The layers are ranked by Attention-Drop's similarity score (how little the sublayer
changes the hidden states, on calibration tokens of the unconverted model); the ``(1 - target)`` share most
redundant start skipped (bias ``threshold_logit - scale``), the others kept (``threshold_logit + scale``). The
weights stay zero, so the start is input-independent and the initial capacity is about the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..data import Example
from ..eval.attention_drop import redundancy_scores, select_dropped


@torch.no_grad()
def redundancy_init(
    model,
    examples: Sequence[Example],
    pad_id: int,
    target: float,
    scale: float = 0.5,
    batch_size: int = 16,
    bf16: bool = False,
) -> dict:
    """Set every router of ``model`` (a :class:`~mindskip_ext.MindSkipModel`) from the layers' redundancy scores.

    Returns the scores of the MindSkip layers, the layers that start skipped and the bias distance.
    """
    layers = sorted(model.routers)
    scores = redundancy_scores(model, examples, pad_id, model.mindskip_config.granularity, batch_size, bf16)
    n_skip = round((1.0 - target) * len(layers))
    skipped = select_dropped(scores, n_skip, candidates=layers) if n_skip else []
    threshold = model.mindskip_config.threshold
    center = math.log(threshold / (1.0 - threshold))
    for idx, router in model.routers.items():
        router.weight.zero_()
        router.bias.fill_(center - scale if idx in skipped else center + scale)
    return {
        "scores": {str(i): round(scores[i], 6) for i in layers},
        "skipped_layers": skipped,
        "scale": scale,
        "sequences": len(examples),
    }
