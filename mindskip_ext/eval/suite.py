"""Scoring models on the multi-domain suite (:mod:`mindskip_ext.data.suite`): per-sequence losses and skips, so that
models scored on the same tokens compare per domain with paired standard errors.

* :func:`score_sequences`: every sequence's summed NLL, supervised and processed tokens, and skipped attention
  sublayers (under token routing, per processed token: each layer's skipped share of the sequence's real tokens),
  under the model's own routing or under given per-sequence decisions (``decisions``: the static projection,
  shuffled decisions, an oracle's choices); :func:`kept_fractions`: each layer's kept share of the tokens;
* :func:`summarise`: per domain and over the token-weighted mix: loss, perplexity, skipped sublayers per
  processed token (the compute) and per sequence;
* :func:`paired`: the loss difference of two scorings of the same sequences, per domain and on the mix, with its
  standard error from the per-sequence differences (a ratio estimator), and the perplexity ratio;
* :func:`static_at`: a static drop's scoring at a fractional number of skips per token on each domain, linear in
  each sequence's loss between the whole counts around it (a static drop cannot skip a fraction of a layer);
  :func:`best_per_domain`: the better of several scorings on each domain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, Example
from ..model import MindSkipModel
from .perplexity import routed_forwards

MIX = "mix"  # the token-weighted mix of every domain


@dataclass
class SequenceScores:
    """Per-sequence results of one model on a list of sequences (all ``(sequences,)``)."""

    nll: torch.Tensor  # float64, summed over the supervised positions
    targets: torch.Tensor  # long, supervised positions
    tokens: torch.Tensor  # long, processed tokens
    skipped: torch.Tensor  # float64, attention sublayers skipped for the sequence

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("nll", "targets", "tokens", "skipped")}

    @classmethod
    def from_dict(cls, d: dict) -> SequenceScores:
        return cls(torch.tensor(d["nll"], dtype=torch.float64), torch.tensor(d["targets"], dtype=torch.long),
                   torch.tensor(d["tokens"], dtype=torch.long), torch.tensor(d["skipped"], dtype=torch.float64))


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B,)`` float64 summed next-token NLL over each row's supervised positions, and ``(B,)`` their counts."""
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX,
                          reduction="none")
    return nll.double().sum(1), (shift_labels != IGNORE_INDEX).sum(1)


@torch.no_grad()
def score_sequences(model, examples: Sequence[Example], pad_id: int, batch_size: int = 8, bf16: bool = False,
                    decisions: dict[int, torch.Tensor] | None = None) -> tuple[SequenceScores, dict]:
    """Score every example under ``model``'s routing, or under ``decisions`` (layer -> ``(len(examples),)`` bool
    keep; the MindSkip layers it does not name always keep): sequences that take the same decisions run together
    as a static drop, and the routers are restored afterwards. Returns the scores and the keep decisions taken,
    layer -> ``(len(examples),)`` bool (empty for a model without routers). A token-routed model (its routing, a
    static token pattern, or whole-layer ``decisions``) decides per token: its ``skipped`` counts each layer by the
    skipped share of the sequence's real tokens (so that skips per token compare with per-sequence routing's), and
    the decisions taken are each sequence's kept share of its real tokens, ``(len(examples),)`` float64."""
    from .attention_drop import set_static_routing

    n = len(examples)
    nll = torch.zeros(n, dtype=torch.float64)
    targets = torch.zeros(n, dtype=torch.long)
    taken: dict[int, torch.Tensor] = {}  # layer -> each sequence's kept share of its units
    per_token = False
    if decisions is None:
        groups = [(None, list(range(n)))]
    else:
        if not isinstance(model, MindSkipModel):
            raise TypeError(f"scoring given decisions needs a MindSkipModel, got {type(model).__name__}")
        unknown = sorted(set(decisions) - set(model.routers))
        if unknown:
            raise ValueError(f"decisions for layer {unknown[0]}, which is not a MindSkip layer of this model "
                             f"({sorted(model.routers)})")
        bad = [i for i, keep in decisions.items() if tuple(keep.shape) != (n,)]
        if bad:
            raise ValueError(f"decisions for layer {bad[0]} have shape {tuple(decisions[bad[0]].shape)}; there are "
                             f"{n} examples")
        layers = sorted(decisions)
        skipped_by_row = torch.stack([~decisions[i].bool().cpu() for i in layers], 1) if layers else None
        patterns: dict[tuple[int, ...], list[int]] = {}
        for row in range(n):
            key = tuple(layers[j] for j in range(len(layers)) if skipped_by_row[row, j]) if layers else ()
            patterns.setdefault(key, []).append(row)
        groups = list(patterns.items())
        saved = {k: v.clone() for k, v in model.router_state_dict().items()}
    try:
        for dropped, rows in groups:
            if dropped is not None:
                set_static_routing(model, list(dropped))
            subset = [examples[i] for i in rows]
            for index, batch, output, record in routed_forwards(model, subset, pad_id, batch_size, bf16):
                at = torch.tensor([rows[i] for i in index])
                seq_nll, seq_targets = sequence_nll(output.logits, batch["labels"])
                nll[at], targets[at] = seq_nll.cpu(), seq_targets.cpu()
                for idx, routing in record.layers.items():
                    per_token |= routing.keep.dim() == 2
                    taken.setdefault(idx, torch.ones(n, dtype=torch.float64))[at] = kept_share(routing).cpu()
    finally:
        if decisions is not None:
            model.load_router_state_dict(saved)
    tokens = torch.tensor([len(e) for e in examples], dtype=torch.long)
    skipped = sum((1.0 - share for share in taken.values()), torch.zeros(n, dtype=torch.float64))
    if not per_token:
        taken = {i: share.bool() for i, share in taken.items()}
    return SequenceScores(nll, targets, tokens, skipped), dict(sorted(taken.items()))


def kept_share(routing) -> torch.Tensor:
    """``(B,)`` float64: each row's kept share of one layer's decisions in a forward (a
    :class:`~mindskip_ext.layer.LayerRouting`): 0 or 1 for a sequence decision, the kept share of the row's real
    tokens for per-token decisions."""
    keep = routing.keep
    if keep.dim() == 1:
        return keep.double()
    real = torch.ones_like(keep) if routing.real is None else routing.real.to(torch.bool)
    return (keep & real).sum(1).double() / real.sum(1).clamp(min=1).double()


def kept_fractions(taken: dict[int, torch.Tensor], tokens: torch.Tensor) -> dict[int, float]:
    """Each layer's kept share of all the processed tokens, from :func:`score_sequences`' decisions taken (per
    sequence: bool, or a token-routed model's kept shares) and ``tokens`` (each sequence's processed tokens)."""
    weights = tokens.double()
    bad = [i for i, share in taken.items() if share.shape != weights.shape]
    if bad:
        raise ValueError(f"decisions of layer {bad[0]} are for {taken[bad[0]].shape[0]} sequences, the token "
                         f"counts for {weights.shape[0]}")
    return {i: float((share.double() * weights).sum() / weights.sum()) for i, share in taken.items()}


def domain_rows(owner: Sequence[str]) -> dict[str, torch.Tensor]:
    """Domain -> the rows it owns, in order of first appearance, then the mix (every row)."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(owner):
        rows.setdefault(name, []).append(i)
    out = {name: torch.tensor(r) for name, r in rows.items()}
    out[MIX] = torch.arange(len(owner))
    return out


def summarise(scores: SequenceScores, owner: Sequence[str]) -> dict[str, dict]:
    """Per domain and for the mix: loss and perplexity over the supervised tokens, skipped attention sublayers per
    processed token (token-weighted) and per sequence, and the counts."""
    if len(owner) != len(scores.nll):
        raise ValueError(f"{len(owner)} domain labels for {len(scores.nll)} scored sequences")
    out = {}
    for name, rows in domain_rows(owner).items():
        targets, tokens = int(scores.targets[rows].sum()), scores.tokens[rows].double()
        loss = float(scores.nll[rows].sum()) / targets if targets else float("nan")
        out[name] = {
            "loss": loss,
            "perplexity": math.exp(loss) if targets else float("nan"),
            "skipped_per_token": float((scores.skipped[rows] * tokens).sum() / tokens.sum()),
            "skipped_per_sequence": float(scores.skipped[rows].mean()),
            "sequences": len(rows),
            "tokens": int(tokens.sum()),
            "target_tokens": targets,
        }
    return out


def paired(a: SequenceScores, b: SequenceScores, owner: Sequence[str]) -> dict[str, dict]:
    """``a`` against ``b`` on the same sequences, per domain and on the mix: ``delta`` = loss(a) - loss(b) (nats per
    supervised token), its standard error from the per-sequence differences, and ``ratio`` = ppl(a) / ppl(b) - 1
    with ``ratio_se`` (negative: ``a`` better)."""
    if not torch.equal(a.targets, b.targets) or not torch.equal(a.tokens, b.tokens):
        raise ValueError("the two scorings are not of the same sequences (their token counts differ)")
    out = {}
    for name, rows in domain_rows(owner).items():
        counts = a.targets[rows].double()
        total = float(counts.sum())
        diff = a.nll[rows] - b.nll[rows]
        delta = float(diff.sum()) / total
        m = len(rows)
        residual = diff - delta * counts
        se = math.sqrt(float((residual**2).sum()) * m / max(1, m - 1)) / total
        out[name] = {"delta": delta, "se": se, "ratio": math.expm1(delta), "ratio_se": math.exp(delta) * se}
    return out


def static_at(curve: dict[int, SequenceScores], owner: Sequence[str], at: dict[str, float]) -> SequenceScores:
    """A static drop's scores at a fractional number of skipped layers: ``curve`` maps whole layer counts to the
    scores of a static drop of that many layers (0: the dense model), ``at`` each domain to its skips per token;
    on each domain every sequence's loss is linear in the count between the whole counts around it."""
    first = next(iter(curve.values()))
    if any(not (torch.equal(c.targets, first.targets) and torch.equal(c.tokens, first.tokens))
           for c in curve.values()):
        raise ValueError("the static scorings are not of the same sequences")
    nll, skipped = first.nll.clone(), first.skipped.clone()
    for name, rows in domain_rows(owner).items():
        if name == MIX:
            continue
        if name not in at:
            raise ValueError(f"no skip count to interpolate at for domain {name}")
        lo = math.floor(at[name] + 1e-9)
        hi = lo + 1 if at[name] - lo > 1e-9 else lo
        missing = [k for k in (lo, hi) if k not in curve]
        if missing:
            raise ValueError(f"domain {name} at {at[name]:.3f} skips needs the static drop of {missing[0]} layers "
                             f"(have {sorted(curve)})")
        weight = at[name] - lo
        nll[rows] = curve[lo].nll[rows] + weight * (curve[hi].nll[rows] - curve[lo].nll[rows])
        skipped[rows] = curve[lo].skipped[rows] + weight * (curve[hi].skipped[rows] - curve[lo].skipped[rows])
    return SequenceScores(nll, first.targets, first.tokens, skipped)


def best_per_domain(candidates: Sequence[SequenceScores], owner: Sequence[str]) -> SequenceScores:
    """On each domain, the rows of the candidate with the lowest loss there (e.g. the better Attention-Drop scope)."""
    nll, skipped = candidates[0].nll.clone(), candidates[0].skipped.clone()
    for name, rows in domain_rows(owner).items():
        if name == MIX:
            continue
        best = min(candidates, key=lambda c: float(c.nll[rows].sum()))
        nll[rows], skipped[rows] = best.nll[rows], best.skipped[rows]
    return SequenceScores(nll, candidates[0].targets, candidates[0].tokens, skipped)
