"""How much could input-dependent routing gain at all, and how much of it do trained routers take?

The first-order cost of skipping MindSkip layer ``l`` for sequence ``x`` is KL(dense || the model with only
``l`` skipped), summed over ``x``'s supervised positions (:func:`skip_costs`: about half a forward per layer and
batch).
Summed over the (layer, sequence) pairs that a routing skips, it approximates that routing's KL from the dense
model (interactions between skipped layers ignored). That compares routings at the same budget without running
each one (:func:`headroom`), in nats per supervised token:

* ``static``: the layers that are cheapest on average, as many as the routing skips per token (interpolated
  between whole counts): the best static drop of these candidates by this measure;
* ``oracle``: the cheapest (layer, sequence) pairs per supervised token, until the same token-weighted number of
  skips: the best that any per-sequence router over these layers could do. A budget counted per *sequence*
  instead would let it skip every layer of the short sequences, which costs little loss but saves little
  compute;
* ``routers``: the routers' own decisions;
* ``shuffled``: the routers' per-layer kept fractions with decisions independent of the input (expected cost).

``headroom = 1 - oracle / static`` is what per-sequence routing could gain over the best static drop. Routers
below ``shuffled`` make informative per-sequence choices; routers above ``static`` lose more on which layers they
skip than those choices gain.

Per token (``skip_costs(..., per_token=True)``, for token-level routing): the units are the supervised positions,
and the cost of skipping layer ``l`` at position ``t`` is ``t``'s KL with ``l`` skipped for every token (the effect of
a skipped token on later tokens, through its changed keys and values in later layers, is counted at the position it
lands on: the costs of a layer still sum to its whole cost). The oracle then picks (layer, token) pairs, and
:func:`headroom` also reports the per-sequence oracle at the same budget (``sequence_oracle``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX, Example, collate, length_batches
from ..devices import autocast_for, model_device
from ..model import MindSkipModel
from ..training.loss import covered_log_probs
from .attention_drop import set_static_routing
from .perplexity import routed_forwards


@dataclass
class SkipCosts:
    """Per-sequence (or per-token) first-order costs of skipping each layer alone (or of toggling it around a base
    set)."""

    layers: list[int]
    costs: torch.Tensor  # (units, layers): KL(dense || only that layer skipped), summed over the unit
    tokens: torch.Tensor  # (units,): supervised positions of each unit (1 per token)
    # With a base set (``also_skipped``): its layers, and the KL of skipping that set alone, (units,).
    base_layers: list[int] = field(default_factory=list)
    base: torch.Tensor | None = None
    sequence: torch.Tensor | None = None  # per token: (units,) the example each position belongs to

    def subset(self, rows: torch.Tensor) -> SkipCosts:
        """The costs of the units ``rows`` only (e.g. one domain of a suite)."""
        base = None if self.base is None else self.base[rows]
        sequence = None if self.sequence is None else self.sequence[rows]
        return SkipCosts(self.layers, self.costs[rows], self.tokens[rows], self.base_layers, base, sequence)

    def marginal(self) -> torch.Tensor:
        """``(units, layers)``: what skipping each layer costs around the base set, the rest of the set skipped
        either way: ``KL(base + l) - KL(base)`` for a layer outside the base set, ``KL(base) - KL(base - l)`` for
        one inside (what keeping it would save; may be negative). Without a base set: :attr:`costs`."""
        if self.base is None:
            return self.costs
        inside = torch.tensor([i in self.base_layers for i in self.layers])
        return torch.where(inside, self.base[:, None] - self.costs, self.costs - self.base[:, None])


@torch.no_grad()
def skip_costs(
    model: MindSkipModel,
    examples: Sequence[Example],
    pad_id: int,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    bf16: bool = False,
    also_skipped: Sequence[int] = (),
    per_token: bool = False,
) -> SkipCosts:
    """The cost of skipping each of ``layers`` (default: every MindSkip layer but ``also_skipped``) alone, for every
    example: KL(dense || that layer skipped). With ``also_skipped``, each layer is skipped together with those, so
    a cost is that of the whole set (the joint cost a greedy search adds layers by); a layer of ``layers`` that is
    also in ``also_skipped`` is toggled instead (kept, the rest of the set skipped), and the result also holds
    the cost of the set alone (``base``), so that :meth:`SkipCosts.marginal` gives each layer's cost around it.
    With ``per_token``, one row per supervised position (in the order of ``examples``, each one's positions in
    order) instead of per example.

    Per batch: the dense forward, one forward with ``also_skipped`` that records every decoder layer's output, and
    per layer ``l`` a forward that starts at ``l`` from the recorded output of layer ``l - 1`` (the layers before
    ``l`` compute the same either way), so a late layer costs a fraction of a forward. The routers are restored
    afterwards."""
    if not isinstance(model, MindSkipModel):
        raise TypeError(f"skip_costs needs a MindSkipModel with routers on the layers to cost, got "
                        f"{type(model).__name__}")
    also_skipped = sorted(also_skipped)
    layers = sorted(set(model.routers) - set(also_skipped)) if layers is None else sorted(layers)
    missing = sorted(set(layers).union(also_skipped) - set(model.routers))
    if missing:
        raise ValueError(f"layer {missing[0]} is not a MindSkip layer of this model ({sorted(model.routers)})")
    if not layers or not examples:
        raise ValueError("skip_costs needs at least one layer and one example")
    device = model_device(model)
    start, sequence = supervised_positions(examples)
    units = len(sequence) if per_token else len(examples)
    costs = torch.zeros(units, len(layers), dtype=torch.float64)
    base = torch.zeros(units, dtype=torch.float64)
    tokens = torch.zeros(units, dtype=torch.long)
    saved = {k: v.clone() for k, v in model.router_state_dict().items()}
    was_training = model.training
    model.eval()
    try:
        for index in length_batches([len(e) for e in examples], batch_size, shuffle=False):
            batch = collate([examples[i] for i in index], pad_id)
            inputs = {"input_ids": batch["input_ids"].to(device),
                      "attention_mask": batch["attention_mask"].to(device), "use_cache": False}
            covered = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)
            rows = torch.tensor(index)
            with autocast_for(device, bf16):
                teacher = model(**inputs, mindskip_bypass=True).logits
            teacher_logp = covered_log_probs(teacher, covered)
            owner = covered.nonzero()[:, 0]  # the sequence of each covered position
            if per_token:
                target = _position_rows(covered, start[rows]).cpu()
                tokens[target] = 1
            else:
                target = rows
                tokens[rows] = covered.sum(1).cpu()
            set_static_routing(model, also_skipped)
            with _recorded(model.decoder_layers) as outputs, autocast_for(device, bf16):
                recorded = model(**inputs).logits
            if also_skipped:
                base[target] = _unit_kl(recorded, teacher_logp, covered, owner, len(index), per_token)
            for j, layer in enumerate(layers):
                set_static_routing(model, sorted(set(also_skipped) ^ {layer}))
                with _replayed(model.decoder_layers, outputs, layer), autocast_for(device, bf16):
                    student = model(**inputs).logits
                costs[target, j] = _unit_kl(student, teacher_logp, covered, owner, len(index), per_token)
    finally:
        model.load_router_state_dict(saved)
        model.train(was_training)
    return SkipCosts(layers, costs, tokens, also_skipped, base if also_skipped else None,
                     sequence if per_token else None)


def _unit_kl(student, teacher_logp, covered, owner, sequences: int, per_token: bool) -> torch.Tensor:
    """float64 on the CPU: KL(teacher || student) at each covered position (``per_token``), or summed over each
    sequence's covered positions, ``(sequences,)`` (``owner``: the sequence of each)."""
    kl = F.kl_div(covered_log_probs(student, covered), teacher_logp, log_target=True, reduction="none").sum(-1)
    if per_token:
        return kl.double().cpu()
    out = torch.zeros(sequences, dtype=torch.float64, device=student.device)
    return out.index_add_(0, owner, kl.double()).cpu()


def supervised_positions(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, sequence)``: the first row of each example's supervised positions in a per-token layout (every
    example's positions in order, the examples in order), and the example of each row."""
    counts = torch.tensor([e.num_targets for e in examples], dtype=torch.long)
    start = torch.cumsum(counts, 0) - counts
    return start, torch.repeat_interleave(torch.arange(len(examples)), counts)


def _position_rows(covered: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The per-token row of each ``covered`` position of a batch (row-major, as ``covered.nonzero()``), its
    examples' first rows being ``start``."""
    rank = covered.long().cumsum(1) - 1
    return (start.to(covered.device)[:, None] + rank)[covered]


def token_decisions(model: MindSkipModel, examples: Sequence[Example], pad_id: int, batch_size: int = 8,
                    bf16: bool = False) -> dict[int, torch.Tensor]:
    """Layer index -> ``(positions,)`` bool keep decisions of a token-routed model at the supervised positions of
    ``examples``, in the per-token layout of :func:`skip_costs` (``per_token=True``)."""
    start, sequence = supervised_positions(examples)
    decisions: dict[int, torch.Tensor] = {}
    for index, batch, _, record in routed_forwards(model, examples, pad_id, batch_size, bf16):
        covered = batch["labels"][:, 1:] != IGNORE_INDEX
        rows = _position_rows(covered, start[torch.tensor(index)]).cpu()
        for idx, routing in record.layers.items():
            if routing.keep.dim() != 2:
                raise ValueError("token_decisions reads one decision per token; a sequence-routed model decides per "
                                 "sequence (mindskip_ext.eval.routing.routing_decisions)")
            out = decisions.setdefault(idx, torch.zeros(len(sequence), dtype=torch.bool))
            out[rows] = routing.keep[:, :-1][covered].cpu()
    return dict(sorted(decisions.items()))


@contextlib.contextmanager
def _recorded(layers: nn.ModuleList):
    """Collects each decoder layer's output of the forwards run inside, by index."""
    outputs = {}
    hooks = [layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
             for i, layer in enumerate(layers)]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def _replayed(layers: nn.ModuleList, outputs: dict, start: int):
    """The layers before ``start`` return their recorded ``outputs`` instead of computing (no layer changes its
    input in place, so the recorded tensors stay valid); any forward set on an instance (accelerate's hooks) is
    put back."""
    own = {i: layers[i].__dict__.get("forward") for i in range(start)}
    for i in range(start):
        layers[i].forward = lambda *args, _out=outputs[i], **kwargs: _out
    try:
        yield
    finally:
        for i, forward in own.items():
            if forward is None:
                del layers[i].forward
            else:
                layers[i].forward = forward


def _static(mean_cost: torch.Tensor, count: float) -> float:
    """Summed cost of the ``count`` cheapest columns, linear between whole counts."""
    ranked = torch.cat([torch.zeros(1, dtype=mean_cost.dtype), torch.sort(mean_cost).values.cumsum(0)])
    lo = min(math.floor(count), len(mean_cost))
    hi = min(lo + 1, len(mean_cost))
    return float(ranked[lo] + (count - lo) * (ranked[hi] - ranked[lo]))


def _oracle_order(costs: torch.Tensor, weights: torch.Tensor, budget: float):
    """The (sequence, layer) pairs in order of cost per sequence weight (flat indices), their costs per weight, and
    how many of them fit whole in ``budget``, with the weight they spend."""
    per_weight = (costs / weights[:, None]).flatten()
    order = torch.argsort(per_weight)
    taken = torch.cumsum(weights[:, None].expand_as(costs).flatten()[order], 0)
    whole = int((taken <= budget + 1e-9 * max(1.0, budget)).sum())
    return order, per_weight, whole, float(taken[whole - 1]) if whole else 0.0


def _oracle(costs: torch.Tensor, weights: torch.Tensor, budget: float) -> float:
    """Least summed cost of (sequence, layer) pairs whose summed sequence ``weights`` reach ``budget``: the pairs
    in order of cost per weight, the last one taken in part."""
    order, per_weight, whole, spent = _oracle_order(costs, weights, budget)
    total = float(costs.flatten()[order[:whole]].sum())
    if whole < len(order):
        total += float(per_weight[order[whole]]) * (budget - spent)
    return total


def _weights(costs: SkipCosts, lengths: torch.Tensor | None) -> torch.Tensor:
    """What a skip of each sequence spends of the budget: its ``lengths`` (processed tokens) when given, else its
    supervised tokens."""
    if lengths is None:
        return costs.tokens.to(torch.float64)
    if tuple(lengths.shape) != tuple(costs.tokens.shape):
        raise ValueError(f"lengths for {len(lengths)} sequences, skip costs for {len(costs.tokens)}")
    return lengths.to(torch.float64)


def _offset(costs: SkipCosts, layers: list[int]) -> torch.Tensor:
    """``(sequences,)``: the first-order cost of a routing that skips none of ``layers`` (the base set less those of
    it among ``layers``): 0 without a base set."""
    if costs.base is None:
        return torch.zeros(len(costs.tokens), dtype=torch.float64)
    marginal = costs.marginal()
    inside = [j for j, i in enumerate(costs.layers) if i in costs.base_layers and i in layers]
    return costs.base - marginal[:, inside].sum(1)


def oracle_decisions(costs: SkipCosts, skips_per_token: float, lengths: torch.Tensor | None = None,
                     layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """The per-sequence oracle's keep decisions (layer -> ``(sequences,)`` bool) over ``layers`` (default: every
    costed layer): the cheapest (sequence, layer) pairs per unit of budget (:func:`headroom`'s oracle) until
    ``skips_per_token`` (weighted by ``lengths``, else by supervised tokens); the pair at the edge is taken when
    more than half of it fits."""
    layers = list(costs.layers) if layers is None else sorted(layers)
    missing = sorted(set(layers) - set(costs.layers))
    if missing:
        raise ValueError(f"no skip costs for layer {missing[0]} (costed: {costs.layers})")
    weights = _weights(costs, lengths)
    cost = costs.marginal()[:, [costs.layers.index(i) for i in layers]]
    return level_decisions(cost / weights[:, None], weights, skips_per_token, layers)


def level_decisions(scores: torch.Tensor, weights: torch.Tensor, skips_per_token: float,
                    layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Keep decisions (layer -> ``(sequences,)`` bool) that skip the (sequence, layer) pairs of lowest ``scores``
    (``(sequences, len(layers))``: a cost per unit of budget, measured or predicted) until ``skips_per_token``
    weighted by ``weights``: one common level, as calibrated routers that predict their cost apply it. The pair at
    the edge is taken when more than half of it fits."""
    if scores.shape != (len(weights), len(layers)):
        raise ValueError(f"scores of shape {tuple(scores.shape)} for {len(weights)} sequences and {len(layers)} "
                         "layers")
    budget = skips_per_token * float(weights.sum())
    order, _, whole, spent = _oracle_order(scores * weights[:, None], weights, budget)
    if whole < len(order):
        whole += int(budget - spent > weights[int(order[whole]) // len(layers)] / 2)
    skipped = torch.zeros(scores.numel(), dtype=torch.bool)
    skipped[order[:whole]] = True
    skipped = skipped.view(scores.shape)
    return {i: ~skipped[:, j] for j, i in enumerate(layers)}


def headroom(costs: SkipCosts, decisions: dict[int, torch.Tensor], lengths: torch.Tensor | None = None) -> dict:
    """Static best, oracle, the routers' decisions and their input-independent shuffle, at the routers' budget.

    ``decisions`` maps each router layer to its ``(sequences,)`` bool keep decisions on the examples ``costs`` was
    measured on, in the same order (:func:`~mindskip_ext.eval.routing.routing_decisions`). Costs in nats per
    supervised token; the candidates are the routers' layers. The budget counts a skip of a sequence by its
    supervised tokens, or by ``lengths`` (its processed tokens: the compute) when given. With a base set, costs
    are first-order around it (:meth:`SkipCosts.marginal`), and every number includes the cost of the base set's
    layers that are not among the routers'."""
    missing = sorted(set(decisions) - set(costs.layers))
    if missing:
        raise ValueError(f"no skip costs for router layer {missing[0]} (costed: {costs.layers})")
    layers = sorted(decisions)
    columns = [costs.layers.index(i) for i in layers]
    cost = costs.marginal()[:, columns]
    wrong = [i for i in layers if decisions[i].shape != cost.shape[:1]]
    if wrong:
        raise ValueError(f"decisions of layer {wrong[0]} are {tuple(decisions[wrong[0]].shape)}, skip costs are for "
                         f"{cost.shape[0]} sequences: the per-sequence headroom needs one decision per sequence (a "
                         "layer routed per token has none)")
    keep = torch.stack([decisions[i].to(torch.bool).cpu() for i in layers], dim=1)
    scored = costs.tokens > 0
    offset = float(_offset(costs, layers)[scored].sum())
    weights = _weights(costs, lengths)[scored]
    cost, keep, total = cost[scored], keep[scored], float(costs.tokens[scored].sum())
    if total == 0:
        raise ValueError("no supervised tokens in the examples the skip costs were measured on")
    skipped = (~keep).to(torch.float64)
    budget = float((skipped.sum(1) * weights).sum())  # weighted skips
    per_token_skips = budget / float(weights.sum())
    static = (_static(cost.sum(0), per_token_skips) + offset) / total
    oracle = (_oracle(cost, weights, budget) + offset) / total
    per_sequence = {}
    if costs.sequence is not None:  # per token: the best per-sequence choice at the same budget
        owner = costs.sequence[scored]
        sequences = int(owner.max()) + 1 if len(owner) else 0
        summed = torch.zeros(sequences, cost.shape[1], dtype=cost.dtype).index_add_(0, owner, cost)
        counts = torch.zeros(sequences, dtype=weights.dtype).index_add_(0, owner, weights)
        present = counts > 0
        sequence_oracle = (_oracle(summed[present], counts[present], budget) + offset) / total
        per_sequence = {"sequence_oracle": round(sequence_oracle, 6),
                        "sequence_headroom": round(1.0 - sequence_oracle / static, 6) if static > 0 else None}
    return {
        "layers": layers,
        "sequences": len(weights),
        "tokens": int(total),
        "skips_per_sequence": round(float(skipped.sum(1).mean()), 6),
        "skips_per_token": round(per_token_skips, 6),
        "static": round(static, 6),
        "oracle": round(oracle, 6),
        "routers": round((float((cost * skipped).sum()) + offset) / total, 6),
        "shuffled": round((float((skipped.mean(0) * cost.sum(0)).sum()) + offset) / total, 6),
        "headroom": round(1.0 - oracle / static, 6) if static > 0 else None,
        **per_sequence,
    }
