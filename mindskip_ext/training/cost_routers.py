"""Cost-supervised routers: each router predicts what skipping its layer costs a sequence, and one common level
decides.

For every training sequence ``s`` and router layer ``l`` the cost of skipping ``l`` is measured
(:func:`~mindskip_ext.eval.headroom.skip_costs`, around the static start: the KL from the dense model that skipping
``l`` adds, or that keeping a layer of the start saves), per processed token of ``s`` (the compute a skip saves).
Each router is then fitted by ridge regression to predict that cost from its pooled input, in standardised
coordinates (each input feature less its mean over the training sequences, over its standard deviation), and the
fit is folded into an ordinary ``Linear(hidden, 1)``:

    logit_l(x) = scale * (predicted cost_l(x) - level)

so that ``router_gate`` stays one fused kernel and the saved router file is unchanged. A sequence keeps layer ``l``
when its predicted cost is above the level; one level for every layer is a Lagrange multiplier on the compute: the
cheapest (sequence, layer) pairs are skipped, wherever they are, and a sequence that is cheap to shorten skips more
layers than one that is not. The final bias calibration (:mod:`.calibration`: one common shift of every bias) sets
the level for the target capacity. ``scale`` makes the logits of the training pairs spread by about 1, so that a
later training step (KD) starts at a sensible slope.

The regularisation strength is chosen per layer by K-fold cross-validation over the training sequences; the report
gives each layer's cross-validated R^2 (how much of the spread of its costs the pooled input explains linearly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge strengths tried, relative to the number of sequences
TRANSFORMS = ("linear", "log")


@dataclass
class CostFit:
    """Per router layer: the folded weight ``(hidden,)`` and bias of the predicted cost, and the fit's report."""

    weight: dict[int, torch.Tensor]
    bias: dict[int, float]
    report: dict


def transform_costs(costs: torch.Tensor, kind: str, floor: float) -> torch.Tensor:
    """The regression target: per-token costs as they are (``linear``) or ``log(max(cost, floor))`` (``log``: the
    costs span orders of magnitude, and only their order near the level matters)."""
    if kind == "linear":
        return costs
    if kind == "log":
        return torch.log(costs.clamp_min(floor))
    raise ValueError(f"cost transform must be one of {TRANSFORMS}, got {kind!r}")


def _standardised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))
    return (x - mean) / std, mean, std


def _ridge_path(z: torch.Tensor, y: torch.Tensor, ridges: Sequence[float]) -> torch.Tensor:
    """``(len(ridges), features)``: ridge coefficients of centred ``y`` on centred ``z`` for each strength (relative
    to the number of rows), from one SVD."""
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    uy = u.T @ y
    n = z.shape[0]
    return torch.stack([vh.T @ (s / (s * s + r * n) * uy) for r in ridges])


def fit_cost_routers(inputs: dict[int, torch.Tensor], costs: torch.Tensor, layers: Sequence[int],
                     ridges: Sequence[float] = RIDGES, folds: int = 5, seed: int = 0) -> CostFit:
    """Fit every router of ``layers`` to predict its column of ``costs`` (``(sequences, len(layers))``, already
    transformed) from its pooled inputs ``inputs[l]`` (``(sequences, hidden)``), by ridge regression in
    standardised coordinates with the strength chosen by ``folds``-fold cross-validation; the fit is folded into a
    weight and bias on the raw pooled input."""
    layers = list(layers)
    n = costs.shape[0]
    if costs.shape != (n, len(layers)):
        raise ValueError(f"costs of shape {tuple(costs.shape)} for {len(layers)} layers")
    if not 2 <= folds <= n:
        raise ValueError(f"cross-validation needs 2 to {n} folds (one per sequence at most), got {folds}")
    missing = [i for i in layers if i not in inputs or inputs[i].shape[0] != n]
    if missing:
        raise ValueError(f"no pooled inputs of the {n} sequences for router layer {missing[0]}")
    if not torch.isfinite(costs).all():
        raise ValueError("the costs to fit must be finite (transform them first)")
    fold_of = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % folds
    weight, bias, per_layer = {}, {}, {}
    for j, idx in enumerate(layers):
        x, y = inputs[idx].double(), costs[:, j].double()
        squared = torch.zeros(len(ridges), dtype=torch.float64)
        for f in range(folds):
            train, test = fold_of != f, fold_of == f
            z, mean, std = _standardised(x[train])
            centre = y[train].mean()
            path = _ridge_path(z, y[train] - centre, ridges)
            predicted = ((x[test] - mean) / std) @ path.T + centre
            squared += ((predicted - y[test, None]) ** 2).sum(0)
        best = int(torch.argmin(squared))
        total = float(((y - y.mean()) ** 2).sum())
        z, mean, std = _standardised(x)
        beta = _ridge_path(z, y - y.mean(), [ridges[best]])[0]
        weight[idx] = (beta / std).float()
        bias[idx] = float(y.mean() - (beta / std) @ mean)
        per_layer[str(idx)] = {"ridge": ridges[best],
                               "cv_r2": round(1.0 - float(squared[best]) / total, 6) if total > 0 else None,
                               "target_mean": round(float(y.mean()), 6), "target_std": round(float(y.std()), 6)}
    return CostFit(weight, bias, {"sequences": n, "folds": folds, "layers": per_layer})


def cross_fitted(inputs: dict[int, torch.Tensor], costs: torch.Tensor, layers: Sequence[int],
                 ridges: Sequence[float] = RIDGES, folds: int = 5, seed: int = 0) -> torch.Tensor:
    """``(sequences, len(layers))``: every sequence's predicted costs from a fit (:func:`fit_cost_routers`) on the
    other folds only: what routers fitted on other sequences would predict for it."""
    n = costs.shape[0]
    fold_of = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)) % folds
    out = torch.zeros(n, len(layers), dtype=torch.float64)
    for f in range(folds):
        train, test = fold_of != f, fold_of == f
        fit = fit_cost_routers({i: inputs[i][train] for i in layers}, costs[train], layers, ridges,
                               min(folds, int(train.sum())), seed)
        for j, idx in enumerate(layers):
            out[test, j] = inputs[idx][test].double() @ fit.weight[idx].double() + fit.bias[idx]
    return out


@torch.no_grad()
def set_cost_routers(model, fit: CostFit, scale: float | None = None) -> float:
    """Give every router of ``model`` in ``fit`` the logit ``scale * predicted cost`` (the level is the bias
    calibration's common shift). ``scale`` defaults to 1 over the spread of the fitted biases and the typical
    weight response, so logits spread by about 1; returns the scale used. The routers must be uncentred."""
    if model.router_centres is not None:
        raise ValueError("set_cost_routers needs uncentred routers (the fit is on the raw pooled input)")
    unknown = sorted(set(fit.weight) - set(model.routers))
    if unknown:
        raise ValueError(f"a cost fit for layer {unknown[0]}, which is not a MindSkip layer of this model")
    if scale is None:
        spread = [fit.report["layers"][str(i)]["target_std"] for i in fit.weight]
        scale = 1.0 / max(max(spread), 1e-12)
    for idx, w in fit.weight.items():
        router = model.routers[idx]
        router.weight.copy_((scale * w).view_as(router.weight).to(router.weight))
        router.bias.fill_(scale * fit.bias[idx])
    return scale
