"""Cost-supervised routers: the ridge fit in standardised coordinates folded into ordinary routers, its
cross-validation, and routers whose logits are the scaled predictions."""

from __future__ import annotations

import math

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext import data as D
from mindskip_ext.eval.perplexity import routed_forwards
from mindskip_ext.eval.routing import routing_decisions
from mindskip_ext.testing import synthetic_instructions, tiny_model
from mindskip_ext.training.centring import router_inputs
from mindskip_ext.training.cost_routers import cross_fitted, fit_cost_routers, set_cost_routers, transform_costs


def synthetic(n=120, hidden=16, noise=0.0, seed=0):
    """Pooled inputs with a large common part (as a real model's) and costs linear in their per-input part."""
    gen = torch.Generator().manual_seed(seed)
    common = 5.0 * torch.randn(hidden, generator=gen)
    inputs = {3: common + torch.randn(n, hidden, generator=gen) * torch.linspace(0.1, 2.0, hidden),
              5: common + torch.randn(n, hidden, generator=gen)}
    beta = torch.randn(hidden, generator=gen)
    costs = torch.stack([inputs[3] @ beta + 1.0, inputs[5][:, 0] * 0.5 - 2.0], 1).double()
    costs += noise * torch.randn(costs.shape, generator=gen, dtype=torch.float64)
    return inputs, costs


def test_an_exactly_linear_cost_is_recovered_on_the_raw_input():
    inputs, costs = synthetic()
    fit = fit_cost_routers(inputs, costs, [3, 5])
    for j, idx in enumerate((3, 5)):
        predicted = inputs[idx].double() @ fit.weight[idx].double() + fit.bias[idx]
        torch.testing.assert_close(predicted, costs[:, j], rtol=0, atol=2e-2 * float(costs[:, j].std()))
        assert fit.report["layers"][str(idx)]["cv_r2"] > 0.99 and fit.weight[idx].dtype == torch.float32
    assert fit.report["sequences"] == 120 and fit.report["folds"] == 5


def test_noise_is_not_predicted_out_of_fold():
    inputs, _ = synthetic()
    noise = torch.randn(120, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fit = fit_cost_routers(inputs, noise, [3, 5])
    assert all(fit.report["layers"][k]["cv_r2"] < 0.1 for k in ("3", "5"))
    assert all(fit.report["layers"][k]["ridge"] >= 1.0 for k in ("3", "5"))  # shrunk hard
    out = cross_fitted(inputs, noise, [3, 5])
    assert out.shape == (120, 2)
    r2 = 1 - ((out - noise) ** 2).sum(0) / ((noise - noise.mean(0)) ** 2).sum(0)
    assert bool((r2 < 0.1).all())
    inputs, costs = synthetic(noise=0.01)
    good = cross_fitted(inputs, costs, [3, 5])
    assert float(1 - ((good - costs) ** 2).sum() / ((costs - costs.mean(0)) ** 2).sum()) > 0.95


def test_transforms_and_refusals():
    costs = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    assert torch.equal(transform_costs(costs, "linear", 1e-3), costs)
    torch.testing.assert_close(transform_costs(costs, "log", 1e-3), torch.tensor([[math.log(0.5), math.log(1e-3)]],
                                                                                  dtype=torch.float64))
    with pytest.raises(ValueError, match="transform must be one of"):
        transform_costs(costs, "sqrt", 1e-3)
    inputs, good = synthetic(n=10)
    with pytest.raises(ValueError, match="for 3 layers"):
        fit_cost_routers(inputs, good, [3, 5, 7])
    with pytest.raises(ValueError, match="2 to 10 folds"):
        fit_cost_routers(inputs, good, [3, 5], folds=11)
    with pytest.raises(ValueError, match="router layer 7"):
        fit_cost_routers(inputs, good, [3, 7])
    with pytest.raises(ValueError, match="finite"):
        fit_cost_routers(inputs, good.clone().fill_(float("-inf")), [3, 5])


def test_routers_take_the_scaled_prediction_as_their_logit(tok):
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=5), msk.MindSkipConfig(layers=[1, 2, 3]))
    pad = D.pad_token_id(tok)
    examples = D.prepare_examples(tok, synthetic_instructions(40, seed=2), 64).examples
    inputs = router_inputs(model, examples, pad, batch_size=7)  # zero routers: every layer keeps every sequence
    costs = torch.stack([inputs[i][:, :3].sum(1) for i in (1, 2, 3)], 1).double()
    costs = (costs - costs.mean(0)) / costs.std(0)  # around the threshold logit, so that both decisions occur
    fit = fit_cost_routers(inputs, costs, [1, 2, 3])
    assert all(fit.report["layers"][str(i)]["cv_r2"] > 0.9 for i in (1, 2, 3))
    assert set_cost_routers(model, fit, scale=2.0) == 2.0
    # The first router's input does not depend on the routing: its logits, from the fused gate, are the predictions.
    expected = 2.0 * (inputs[1].double() @ fit.weight[1].double() + fit.bias[1])
    for index, _, _, record in routed_forwards(model, examples, pad, batch_size=7):
        torch.testing.assert_close(record.layers[1].logit(), expected[index], rtol=1e-4, atol=1e-4)
    keep = routing_decisions(model, examples, pad)[1]
    assert torch.equal(keep, expected >= 0) and 0 < int(keep.sum()) < len(examples)
    # The default scale spreads the logits by about 1.
    scale = set_cost_routers(model, fit)
    assert scale == pytest.approx(1.0 / max(fit.report["layers"][k]["target_std"] for k in ("1", "2", "3")))
    model.set_router_centres({i: torch.zeros(model.config.hidden_size) for i in (1, 2, 3)})
    with pytest.raises(ValueError, match="uncentred"):
        set_cost_routers(model, fit)
