"""Where the routers start: the paper's zero init (keep everything), or a static drop at the target.

Both static starts give the optimiser a static baseline as its starting point, so that training only has to add
input-dependence on top. The ``(1 - target)`` share of the router layers ranked most skippable start skipped (bias
``threshold_logit - scale``), the others kept (``threshold_logit + scale``); the weights stay zero, so the start is
input-independent and the initial capacity is about the target. The ranking, on calibration sequences:

* ``redundancy``: Attention-Drop's similarity score (how little the sublayer changes the hidden states, on the
  unconverted model): cheap (one forward per batch), but a proxy;
* ``cost``: the measured cost of skipping each layer alone, KL(dense || only that layer skipped) per supervised
  token (:func:`~mindskip_ext.eval.headroom.skip_costs`: one forward per layer and batch). On SmolLM2-135M the
  two disagree: the cheapest layers by cost are 7, 6, 5 and 25, while the most similar are 25, 26, 28 and 14.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..data import Example
from ..eval.attention_drop import redundancy_scores, select_dropped, set_static_routing


@torch.no_grad()
def static_init(
    model,
    kind: str,
    examples: Sequence[Example],
    pad_id: int,
    target: float,
    scale: float = 0.5,
    batch_size: int = 16,
    bf16: bool = False,
) -> dict:
    """Start every router of ``model`` (a :class:`~mindskip_ext.MindSkipModel`) from the static drop that ``kind``
    (``"redundancy"`` or ``"cost"``) ranks best at kept fraction ``target``.

    Returns the layers' scores (``redundancy``: similarity, higher is more skippable; ``cost``: nats per supervised
    token, lower is), the layers that start skipped and the bias distance.
    """
    layers = sorted(model.routers)
    n_skip = round((1.0 - target) * len(layers))
    if kind == "redundancy":
        similarity = redundancy_scores(model, examples, pad_id, model.mindskip_config.granularity, batch_size, bf16)
        scores = skippable = {i: similarity[i] for i in layers}
    elif kind == "cost":
        from ..eval.headroom import skip_costs  # eval.headroom imports the training package

        costs = skip_costs(model, examples, pad_id, layers, batch_size, bf16)
        total = int(costs.tokens.sum())
        if total == 0:
            raise ValueError("--router-init cost needs calibration sequences with supervised tokens; these have none")
        scores = dict(zip(costs.layers, (costs.costs.sum(0) / total).tolist()))
        skippable = {i: -cost for i, cost in scores.items()}  # the cheapest first
    else:
        raise ValueError(f"static router init must be 'redundancy' or 'cost', got {kind!r}")
    skipped = select_dropped(skippable, n_skip, candidates=layers) if n_skip else []
    threshold = model.mindskip_config.threshold
    center = math.log(threshold / (1.0 - threshold))
    set_static_routing(model, skipped, skip_bias=center - scale, keep_bias=center + scale)
    return {
        "kind": kind,
        "scores": {str(i): round(scores[i], 6) for i in layers},
        "skipped_layers": skipped,
        "scale": scale,
        "sequences": len(examples),
    }
