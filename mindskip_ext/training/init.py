"""Where the routers start: the paper's zero init (keep everything), or a static drop at the target.

Both static starts give the optimiser a static baseline as its starting point, so that training only has to add
input-dependence on top. The ``(1 - target)`` share of the router layers ranked most skippable start skipped (bias
``threshold_logit - scale``), the others kept (``threshold_logit + scale``); the weights stay zero, so the start is
input-independent and the initial capacity is about the target. With ``margin``, only the layers the target skips in
whole start skipped and the next-ranked one starts at the threshold itself (bias ``threshold_logit``, kept until
training moves it), so that a target between whole layers is met by routing that layer per input. The ranking,
on calibration sequences:

* ``redundancy``: Attention-Drop's similarity score (how little the sublayer changes the hidden states, on the
  unconverted model): cheap (one forward per batch), but a proxy;
* ``cost``: the measured cost of skipping each layer alone, KL(dense || only that layer skipped) per supervised
  token (:func:`~mindskip_ext.eval.headroom.skip_costs`: about half a forward per layer and batch). On
  SmolLM2-135M the two disagree: the cheapest layers by cost are 7, 6, 5 and 25, while the most similar are 25,
  26, 28 and 14;
* ``joint``: a greedy search on the measured cost of the whole skipped set: the cheapest layer alone, then again
  and again the layer whose skip costs least *together with* those already chosen. Skip costs interact: on
  SmolLM2-135M, 5, 6 and 7 are the cheapest alone, but 5, 6, 7 and 25 cost more perplexity than 6, 7, 25 and
  26. About ``n_skip`` times the forwards of ``cost``;
* ``ranking``: a ranking given by the caller (e.g. the path of a joint search run before), most skippable first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

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
    margin: bool = False,
    on_step: Callable[[dict], None] | None = None,
    ranking: Sequence[int] | None = None,
) -> dict:
    """Start every router of ``model`` (a :class:`~mindskip_ext.MindSkipModel`) from the static drop that ``kind``
    (``"redundancy"``, ``"cost"``, ``"joint"`` or ``"ranking"``: the given ``ranking``) ranks best at kept fraction
    ``target``.

    Returns the layers' scores (``redundancy``: similarity, higher is more skippable; ``cost`` and ``joint``: the
    cost of skipping each alone, nats per supervised token, lower is; ``ranking``: none), the layers that start
    skipped and the bias distance; ``joint`` also the search's ``path``: each layer in the order chosen, with the
    cost of the set so far; ``margin`` the layer at the threshold (None without ``margin``). ``on_step``, if given,
    is called with each step of the ``joint`` search as it is taken (``{"step", "of", "layer", "cost",
    "seconds"}``): on a large model a step takes about as long as the whole ``cost`` ranking.
    """
    layers = sorted(model.routers)
    share = (1.0 - target) * len(layers)
    n_skip = math.floor(share + 1e-9) if margin else round(share)
    n_ranked = n_skip + 1 if margin else n_skip  # the margin layer is ranked next (share < len(layers): it exists)
    started = time.perf_counter()  # of the ranking, then of each step of the joint search
    if kind == "ranking":
        unknown = [i for i in ranking or () if i not in layers]
        if ranking is None or unknown or len(ranking) < n_ranked:
            problem = f"layer {unknown[0]} is not a router layer ({layers})" if unknown else (
                f"it ranks {len(ranking or ())} layers and the start needs {n_ranked}")
            raise ValueError(f"a 'ranking' router init needs the router layers most skippable first: {problem}")
        scores = {}
    elif kind == "redundancy":
        similarity = redundancy_scores(model, examples, pad_id, model.mindskip_config.granularity, batch_size, bf16)
        scores = skippable = {i: similarity[i] for i in layers}
    elif kind in ("cost", "joint"):
        scores = _cost_per_token(model, examples, pad_id, layers, (), batch_size, bf16)
        skippable = {i: -cost for i, cost in scores.items()}  # the cheapest first
    else:
        raise ValueError(f"static router init must be 'redundancy', 'cost', 'joint' or 'ranking', got {kind!r}")
    path = None
    if kind == "joint" and n_ranked:
        path, costs, pool = [], scores, layers  # the first step ranks the single-layer costs
        while len(path) < n_ranked:
            if path:
                chosen = [step["layer"] for step in path]
                pool = [i for i in layers if i not in chosen]
                costs = _cost_per_token(model, examples, pad_id, pool, chosen, batch_size, bf16)
            (best,) = select_dropped({i: -cost for i, cost in costs.items()}, 1, candidates=pool)
            path.append({"layer": best, "cost": round(costs[best], 6)})
            if on_step is not None:
                on_step({"step": len(path), "of": n_ranked, **path[-1],
                         "seconds": round(time.perf_counter() - started, 1)})
            started = time.perf_counter()
        ranked = [step["layer"] for step in path]
    elif kind == "ranking":
        ranked = list(ranking[:n_ranked])
    else:
        ranked = select_dropped(skippable, n_ranked, candidates=layers, ordered=True) if n_ranked else []
    skipped, at_threshold = sorted(ranked[:n_skip]), (ranked[n_skip] if n_ranked > n_skip else None)
    center = model.mindskip_config.threshold_logit
    set_static_routing(model, skipped, skip_bias=center - scale, keep_bias=center + scale)
    if at_threshold is not None:
        model.routers[at_threshold].bias.fill_(center)
    init = {
        "kind": kind,
        "scores": {str(i): round(scores[i], 6) for i in layers if i in scores},
        "skipped_layers": skipped,
        "margin": at_threshold,
        "scale": scale,
        "sequences": len(examples),
    }
    if path is not None:
        init["path"] = path
    return init


def _cost_per_token(model, examples, pad_id, layers, also_skipped, batch_size, bf16) -> dict[int, float]:
    """KL(dense || each of ``layers`` skipped with ``also_skipped``) per supervised token of ``examples``."""
    from ..eval.headroom import skip_costs  # eval.headroom imports the training package

    costs = skip_costs(model, examples, pad_id, layers, batch_size, bf16, also_skipped=also_skipped)
    total = int(costs.tokens.sum())
    if total == 0:
        raise ValueError("a cost-ranked router init needs calibration sequences with supervised tokens; these have "
                         "none")
    return dict(zip(costs.layers, (costs.costs.sum(0) / total).tolist()))
