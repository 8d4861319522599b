"""Router-Tuning: settings checks, target-capacity control, the L1 penalty, frozen base, checkpoints and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext import data as D
from mindskip_ext.eval.perplexity import evaluate_examples
from mindskip_ext.eval.routing import routing_decisions
from mindskip_ext.model import CONFIG_NAME, WEIGHTS_NAME
from mindskip_ext.testing import synthetic_instructions, tiny_model
from mindskip_ext.training import (
    LOG_NAME,
    SUMMARY_NAME,
    CapacityController,
    RouterTuner,
    RouterTuningConfig,
    calibrate_capacity,
)
from mindskip_ext.training.checkpoint import CHECKPOINT_DIR, LATEST_NAME
from mindskip_ext.training.fit import lr_lambda


@pytest.fixture(scope="module")
def split(tok):
    examples = D.prepare_examples(tok, synthetic_instructions(1000, seed=11), 128).examples
    return D.split_heldout(examples, 0.3, seed=0)


def converted(tok, seed=0, **config):
    return msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=8, seed=seed), msk.MindSkipConfig(**config))


def tuner(tok, split, out, model=None, **settings):
    settings = {"batch_size": 16, "max_steps": 60, "save_every": 0, **settings}
    model = model if model is not None else converted(tok)
    return RouterTuner(
        model, split[0], split[1], RouterTuningConfig(**settings), out, D.pad_token_id(tok), progress=False
    )


# ----------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "settings, message",
    [
        ({}, "exactly one"),
        ({"target_capacity": 0.5, "l1_lambda": 0.1}, "exactly one"),
        ({"target_capacity": 0.5, "skip_ratio": 0.25}, "exactly one"),
        ({"skip_ratio": 0.0}, r"skip_ratio must be in \(0, 1\)"),
        ({"skip_ratio": float("nan")}, r"skip_ratio must be in \(0, 1\)"),
        ({"target_capacity": 0.0}, r"\(0, 1\]"),
        ({"target_capacity": 1.5}, r"\(0, 1\]"),
        ({"target_capacity": float("nan")}, r"\(0, 1\]"),
        ({"l1_lambda": -1.0}, ">= 0"),
        ({"target_capacity": 0.5, "schedule": "step"}, "schedule"),
        ({"target_capacity": 0.5, "batch_size": 0}, "batch_size"),
        ({"target_capacity": 0.5, "max_steps": 0}, "max_steps"),
        ({"target_capacity": 0.5, "heldout_fraction": 1.0}, "heldout_fraction"),
    ],
)
def test_bad_settings_fail_before_training(settings, message):
    with pytest.raises(ValueError, match=message):
        RouterTuningConfig(**settings)


def test_full_capacity_target_is_allowed():
    assert RouterTuningConfig(target_capacity=1).target_capacity == 1.0


def test_a_skip_ratio_resolves_to_the_capacity_of_the_router_layers():
    config = RouterTuningConfig(skip_ratio=0.125, loss="kd")
    assert config.mode == "target"
    resolved = config.resolved(num_layers=30, router_layers=25)
    assert resolved.target_capacity == pytest.approx(0.85) and resolved.skip_ratio is None
    assert resolved.loss == "kd" and config.skip_ratio == 0.125  # the original is unchanged
    assert RouterTuningConfig(target_capacity=0.5).resolved(30, 25).target_capacity == 0.5
    with pytest.raises(ValueError, match="cannot be reached with routers on 15 of 30 layers"):
        RouterTuningConfig(skip_ratio=0.6).resolved(30, 15)


def test_lr_schedule_warms_up_and_decays():
    f = lr_lambda("cosine", 4, 20)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 2, 10)(9) == 1.0


def test_controller_integrates_and_scales():
    ctl = CapacityController(target=0.5, integral_gain=0.1, proportional_gain=2.0)
    assert ctl.coefficient(1.0) == 0.0  # no measured gate pressure yet
    ctl.observe_scale(4.0)
    assert ctl.coefficient(0.75) == pytest.approx(4.0 * 2.0 * 0.25)
    ctl.step(1.0)
    assert ctl.integral == pytest.approx(0.05)
    ctl.step(0.0)
    ctl.step(0.0)
    assert ctl.integral == pytest.approx(-0.05)  # below target: the multiplier turns negative and raises capacity
    ctl.observe_scale(float("nan"))
    ctl.observe_scale(14.0)
    assert ctl.scale == pytest.approx(0.9 * 4.0 + 0.1 * 14.0)
    for _ in range(10_000):
        ctl.step(1.0)
    assert ctl.integral == 20.0
    restored = CapacityController(0.5, 0.1, 2.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.coefficient(0.3) == ctl.coefficient(0.3)


# ----------------------------------------------------------------------------------- training


@pytest.mark.parametrize("target, full_ste", [(0.5, True), (0.3, False)])
def test_target_capacity_lands_on_heldout(tok, split, tmp_path, target, full_ste):
    model = converted(tok, train_all_sequences=full_ste)
    base_before = {k: v.clone() for k, v in model.base_model.state_dict().items() if "router" not in k}
    summary = tuner(tok, split, tmp_path, model=model, target_capacity=target, max_steps=80).train()
    assert abs(summary["heldout"]["capacity"] - target) <= 0.05
    assert abs(summary["calibration"]["capacity"] - target) <= 0.01
    # Only the routers were trained.
    for k, v in model.base_model.state_dict().items():
        if "router" not in k:
            assert torch.equal(v, base_before[k]), k
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.router_parameters())
    # The router directory reloads onto a fresh base model with the same routing.
    reloaded = msk.MindSkipModel.from_pretrained(tiny_model(tokenizer=tok, layers=8), tmp_path)
    again = evaluate_examples(reloaded, split[1], D.pad_token_id(tok), 16)
    assert again["capacity"] == summary["heldout"]["capacity"]
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 1024 * len(model.routers)


def test_l1_penalty_lowers_capacity_with_lambda(tok, split, tmp_path):
    strong = tuner(tok, split, tmp_path / "strong", l1_lambda=5.0).train()
    none = tuner(tok, split, tmp_path / "none", l1_lambda=0.0).train()
    assert strong["calibration"] is None
    assert strong["heldout"]["capacity"] < 0.2
    assert none["heldout"]["capacity"] > strong["heldout"]["capacity"] + 0.3


def test_reference_settings_run(tok, split, tmp_path):
    """The reference code's procedure: unmasked mean pooling, kept-only compute, fixed lambda."""
    model = converted(tok, pool_padding=True, train_all_sequences=False)
    summary = tuner(tok, split, tmp_path, model=model, l1_lambda=0.5, max_steps=10, grad_accum=2).train()
    assert summary["steps"] == 10 and math.isfinite(summary["heldout"]["loss"])
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())["mindskip_config"]
    assert saved["pool_padding"] is True and saved["train_all_sequences"] is False


def test_log_and_summary(tok, split, tmp_path):
    summary = tuner(tok, split, tmp_path, target_capacity=0.5, max_steps=20, log_every=5, eval_every=10).train()
    lines = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    steps = [e for e in lines if "ce" in e]
    assert [e["step"] for e in steps] == [5, 10, 15, 20]
    for e in steps:
        assert set(e["capacity_per_layer"]) == {"3", "4", "5", "6"}
        assert e["tokens_per_s"] > 0 and math.isfinite(e["loss"]) and "multiplier" in e
    assert any("heldout" in e and e["step"] == 10 for e in lines)
    assert lines[-1]["final"] is True
    assert json.loads((tmp_path / SUMMARY_NAME).read_text())["steps"] == summary["steps"] == 20
    assert not (tmp_path / CHECKPOINT_DIR).exists()  # removed after a finished run


def test_a_model_with_trainable_base_weights_is_refused(tok, split, tmp_path):
    model = converted(tok)
    next(model.base_model.parameters()).requires_grad_(True)
    with pytest.raises(ValueError, match="only the router parameters"):
        tuner(tok, split, tmp_path, model=model, target_capacity=0.5)
    with pytest.raises(TypeError, match="MindSkipModel"):
        RouterTuner(
            tiny_model(tokenizer=tok), split[0], split[1], RouterTuningConfig(target_capacity=0.5), tmp_path, 0
        )


def test_calibration_hits_the_target_on_its_own_examples(tok, split):
    model = converted(tok)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
    result = calibrate_capacity(model, split[0][:300], 0.3, D.pad_token_id(tok))
    assert abs(result["capacity"] - 0.3) <= 0.005
    assert evaluate_examples(model, split[0][:300], D.pad_token_id(tok))["capacity"] == pytest.approx(
        result["capacity"]
    )


# ----------------------------------------------------------------------------------- checkpoints


def test_resume_after_a_crash_gives_the_same_routers(tok, split, tmp_path, monkeypatch):
    settings = {"target_capacity": 0.5, "max_steps": 20, "save_every": 5}
    straight = tuner(tok, split, tmp_path / "straight", **settings)
    straight.train()

    crashing = tuner(tok, split, tmp_path / "crash", **settings)
    original = RouterTuner._train_step

    def crash_at_12(self, step):
        if step == 12:
            raise RuntimeError("simulated crash")
        return original(self, step)

    monkeypatch.setattr(RouterTuner, "_train_step", crash_at_12)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    monkeypatch.setattr(RouterTuner, "_train_step", original)
    root = tmp_path / "crash" / CHECKPOINT_DIR
    assert (root / LATEST_NAME).read_text() == "step-00000010"
    (root / "step-00000099").mkdir()  # a half-written newer folder is ignored: `latest` moves last
    (root / "step-00000099" / WEIGHTS_NAME).write_bytes(b"partial")

    resumed = tuner(tok, split, tmp_path / "crash", **settings)
    summary = resumed.train(resume=True)
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 20
    for idx, router in straight.model.routers.items():
        other = resumed.model.routers[idx]
        assert torch.allclose(router.weight, other.weight, atol=1e-6)
        assert torch.allclose(router.bias, other.bias, atol=1e-6)
    logged = [json.loads(line)["step"] for line in (tmp_path / "crash" / LOG_NAME).read_text().splitlines()]
    assert logged[:2] == [10, 20]  # the first run's line for step 10, then the resumed run's


def test_resume_refuses_a_different_run(tok, split, tmp_path, monkeypatch):
    first = tuner(tok, split, tmp_path, target_capacity=0.5, max_steps=10, save_every=5, keep_checkpoints=True)
    first.train()
    other = tuner(tok, split, tmp_path, target_capacity=0.5, max_steps=10, save_every=5, batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        other.train(resume=True)


# ----------------------------------------------------------------------------------- quality levers


def test_kd_is_zero_for_equal_distributions_and_the_kl_otherwise():
    from mindskip_ext.training.loss import distillation_kl

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[1, 2, -100, 4, 5], [1, -100, -100, 3, 3]])
    same, count = distillation_kl(student, student, labels)
    assert count == 5 and same.item() == pytest.approx(0.0, abs=1e-6)
    covered = labels[:, 1:] != -100
    for temperature in (1.0, 2.0):
        p = torch.softmax(teacher[:, :-1][covered] / temperature, -1)
        q = torch.log_softmax(student[:, :-1][covered] / temperature, -1)
        manual = (p * (p.log() - q)).sum() * temperature**2
        assert distillation_kl(student, teacher, labels, temperature)[0].item() == pytest.approx(
            manual.item(), rel=1e-5
        )


def test_kd_loss_vanishes_at_a_fresh_conversion_and_teaches_the_routers_once_they_skip(tok, split):
    from mindskip_ext.training import FixedPenalty, router_tuning_loss

    model = converted(tok).train()
    batch = D.collate(split[0][:6], D.pad_token_id(tok))
    targets = int((batch["labels"][:, 1:] != -100).sum())
    loss, stats = router_tuning_loss(model, batch, FixedPenalty(0.0), targets=targets, sequences=6, loss="kd")
    assert stats.kd == pytest.approx(0.0, abs=1e-4) and stats.capacity == 1.0  # a fresh conversion is the teacher
    assert stats.nll > 0  # the CE is reported whatever the task loss
    with torch.no_grad():
        for router in model.routers.values():
            router.bias.fill_(-1.0)  # skip everything: the student now differs from the teacher
    loss, stats = router_tuning_loss(model, batch, FixedPenalty(0.0), targets=targets, sequences=6, loss="kd")
    assert stats.kd > 0 and loss.item() == pytest.approx(stats.kd / targets, rel=1e-5)
    loss.backward()
    assert all(router.bias.grad is not None and router.bias.grad.abs() > 0 for router in model.routers.values())
    both, stats_both = router_tuning_loss(model, batch, FixedPenalty(0.0), targets=targets, sequences=6,
                                          loss="ce+kd")
    assert both.item() == pytest.approx((stats_both.nll + stats_both.kd) / targets, rel=1e-5)


def test_redundancy_init_starts_from_the_static_drop_at_the_target(tok, split):
    from mindskip_ext.eval.attention_drop import redundancy_scores, select_dropped
    from mindskip_ext.training.init import static_init

    model = converted(tok, layers=[1, 2, 3, 4, 5, 6])
    pad = D.pad_token_id(tok)
    init = static_init(model, "redundancy", split[0][:32], pad, target=0.5, scale=0.5)
    scores = redundancy_scores(model.unload(), split[0][:32], pad)  # the same scores as the unconverted model's
    assert init["kind"] == "redundancy"
    assert init["skipped_layers"] == select_dropped(scores, 3, candidates=[1, 2, 3, 4, 5, 6])
    assert init["scores"] == {str(i): pytest.approx(scores[i], abs=1e-6) for i in range(1, 7)}


def test_cost_init_starts_from_the_cheapest_layers_to_skip(tok, split):
    """``cost`` ranks the layers by the measured KL of skipping each alone: the cheapest (1 - target) start
    skipped, the rest kept, with zero weights (the start does not depend on the input)."""
    from mindskip_ext.eval.headroom import skip_costs
    from mindskip_ext.training.init import static_init

    model = converted(tok, layers=[1, 2, 3, 4, 5, 6])
    pad, examples = D.pad_token_id(tok), split[0][:24]
    costs = skip_costs(model, examples, pad, batch_size=8)
    per_token = costs.costs.sum(0) / costs.tokens.sum()
    cheapest = sorted(costs.layers[j] for j in torch.argsort(per_token)[:2].tolist())
    init = static_init(model, "cost", examples, pad, target=2 / 3, scale=0.25, batch_size=8)
    assert init["kind"] == "cost" and init["skipped_layers"] == cheapest and init["sequences"] == 24
    assert init["scores"] == {str(i): pytest.approx(float(c), abs=1e-6) for i, c in zip(costs.layers, per_token)}
    for idx, router in model.routers.items():
        assert torch.count_nonzero(router.weight) == 0
        assert router.bias.item() == pytest.approx(-0.25 if idx in cheapest else 0.25)  # threshold 0.5: logit 0
    # The start is the static drop: every held-out sequence skips exactly the cheapest layers.
    decisions = routing_decisions(model, split[1][:8], pad, batch_size=8)
    assert {i for i, keep in decisions.items() if not keep.any()} == set(cheapest)
    assert all(keep.all() for i, keep in decisions.items() if i not in cheapest)


def test_joint_init_adds_the_layer_cheapest_together_with_those_chosen(tok, split):
    """``joint`` is a greedy search on the cost of the whole skipped set: it starts from the cheapest layer alone,
    so with two layers to skip its pair costs at most what the two cheapest alone cost together."""
    from mindskip_ext.eval.headroom import skip_costs
    from mindskip_ext.training.init import static_init

    model = converted(tok, layers=[1, 2, 3, 4, 5, 6])
    pad, examples = D.pad_token_id(tok), split[0][:24]

    def joint_cost(layers):
        *rest, last = sorted(layers)
        costs = skip_costs(model, examples, pad, [last], batch_size=8, also_skipped=rest)
        return float(costs.costs.sum() / costs.tokens.sum())

    alone = static_init(model, "cost", examples, pad, target=2 / 3, scale=0.25, batch_size=8)
    steps = []
    init = static_init(model, "joint", examples, pad, target=2 / 3, scale=0.25, batch_size=8, on_step=steps.append)
    assert init["kind"] == "joint" and init["scores"] == alone["scores"]
    assert [{k: s[k] for k in ("step", "layer", "cost")} for s in steps] == [
        {"step": k + 1, **p} for k, p in enumerate(init["path"])]  # each step reported as it is taken
    assert all(s["of"] == 2 and s["seconds"] >= 0 for s in steps)
    first, second = init["path"]
    cheapest = min(alone["scores"], key=lambda i: (alone["scores"][i], -int(i)))  # ties: the later layer
    assert first["layer"] == int(cheapest)
    assert first["cost"] == pytest.approx(alone["scores"][str(first["layer"])], abs=1e-6)
    assert init["skipped_layers"] == sorted([first["layer"], second["layer"]])
    assert second["cost"] == pytest.approx(joint_cost(init["skipped_layers"]), abs=1e-6)  # rounded to 6 places
    pairs = {b: joint_cost([first["layer"], b]) for b in range(1, 7) if b != first["layer"]}
    assert second["layer"] == min(pairs, key=lambda b: (pairs[b], -b))  # the cheapest pair with the first layer,
    assert second["cost"] <= joint_cost(alone["skipped_layers"]) + 1e-6  # so no dearer than the two cheapest alone
    for idx, router in model.routers.items():
        assert torch.count_nonzero(router.weight) == 0
        assert router.bias.item() == pytest.approx(-0.25 if idx in init["skipped_layers"] else 0.25)


def test_a_margin_start_puts_the_next_ranked_layer_at_the_threshold(tok, split):
    """With ``margin`` only the whole layers of the target start skipped (6 routers at a kept 0.6 skip 2.4: two)
    and the next-ranked layer sits exactly at the threshold, kept until training moves it; ``joint`` searches one
    step further for it."""
    from mindskip_ext.training.init import static_init

    model = converted(tok, layers=[1, 2, 3, 4, 5, 6], threshold=0.7)
    pad, examples = D.pad_token_id(tok), split[0][:24]
    plain = static_init(model, "cost", examples, pad, target=0.6, scale=0.25, batch_size=8)
    init = static_init(model, "cost", examples, pad, target=0.6, scale=0.25, batch_size=8, margin=True)
    ranked = [int(i) for i in sorted(plain["scores"], key=lambda i: (plain["scores"][i], -int(i)))]
    assert plain["margin"] is None and plain["skipped_layers"] == sorted(ranked[:2])
    assert init["skipped_layers"] == sorted(ranked[:2]) and init["margin"] == ranked[2]
    at = model.mindskip_config.threshold_logit
    assert at == pytest.approx(math.log(0.7 / 0.3))
    for idx, router in model.routers.items():
        assert torch.count_nonzero(router.weight) == 0
        expected = at if idx == ranked[2] else (at - 0.25 if idx in ranked[:2] else at + 0.25)
        assert router.bias.item() == pytest.approx(expected)
    decisions = routing_decisions(model, split[1][:8], pad, batch_size=8)
    assert decisions[ranked[2]].all()  # at the threshold: kept
    joint = static_init(model, "joint", examples, pad, target=0.6, scale=0.25, batch_size=8, margin=True)
    assert [step["layer"] for step in joint["path"]][:1] == ranked[:1] and len(joint["path"]) == 3
    assert joint["skipped_layers"] == sorted(step["layer"] for step in joint["path"][:2])
    assert joint["margin"] == joint["path"][2]["layer"] not in joint["skipped_layers"]


def test_a_margin_start_with_centred_routers_lands_on_a_target_between_whole_layers(tok, split, tmp_path):
    model = converted(tok)  # routers on 3, 4, 5, 6: a kept 0.625 is 1.5 layers skipped
    summary = tuner(tok, split, tmp_path, model=model, target_capacity=0.625, max_steps=40, loss="kd",
                    router_init="cost", router_init_margin=True, router_init_sequences=12,
                    centre_router_inputs=True).train()
    init = summary["router_init"]
    assert len(init["skipped_layers"]) == 1 and init["margin"] not in (None, *init["skipped_layers"])
    assert abs(summary["heldout"]["capacity"] - 0.625) <= 0.05
    assert model.router_centres is None


def test_a_given_ranking_starts_its_first_layers_skipped_and_the_next_at_the_threshold(tok, split):
    from mindskip_ext.training.init import static_init

    model = converted(tok, layers=[1, 2, 3, 4, 5, 6])
    pad = D.pad_token_id(tok)
    init = static_init(model, "ranking", split[0][:4], pad, target=0.6, scale=0.5, margin=True, ranking=[5, 2, 6, 1])
    assert init["skipped_layers"] == [2, 5] and init["margin"] == 6 and init["scores"] == {}
    assert [model.routers[i].bias.item() for i in (1, 2, 5, 6)] == [0.5, -0.5, -0.5, 0.0]
    with pytest.raises(ValueError, match="layer 7 is not a router layer"):
        static_init(model, "ranking", split[0][:4], pad, target=0.6, ranking=[7, 2])
    with pytest.raises(ValueError, match="it ranks 2 layers and the start needs 3"):
        static_init(model, "ranking", split[0][:4], pad, target=0.6, margin=True, ranking=[5, 2])


def test_static_init_refuses_what_it_cannot_rank(tok, split):
    from mindskip_ext.training.init import static_init

    model = converted(tok, layers=[1, 2])
    pad = D.pad_token_id(tok)
    with pytest.raises(ValueError, match="must be 'redundancy', 'cost', 'joint' or 'ranking'"):
        static_init(model, "random", split[0][:4], pad, target=0.5)
    unsupervised = [D.Example(e.input_ids, [D.IGNORE_INDEX] * len(e.labels)) for e in split[0][:4]]
    with pytest.raises(ValueError, match="calibration sequences with supervised tokens"):
        static_init(model, "cost", unsupervised, pad, target=0.5)


@pytest.mark.parametrize("init", ["redundancy", "cost", "joint"])
def test_kd_with_a_static_init_lands_on_the_target(tok, split, tmp_path, init):
    model = converted(tok)
    summary = tuner(tok, split, tmp_path, model=model, target_capacity=0.5, max_steps=40, loss="kd",
                    router_init=init, router_init_sequences=12).train()
    assert summary["router_init"]["kind"] == init and len(summary["router_init"]["skipped_layers"]) == 2
    assert summary["router_init"]["sequences"] == 12
    assert abs(summary["heldout"]["capacity"] - 0.5) <= 0.05
    steps = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    searched = [e["router_init_step"] for e in steps if "router_init_step" in e]
    assert [e["layer"] for e in searched] == [p["layer"] for p in summary["router_init"].get("path", [])]
    assert steps[len(searched)]["router_init"] == summary["router_init"]  # after the search's steps
    assert all("kd" in e for e in steps if "ce" in e)


def test_the_multiplier_can_start_at_balance(tok, split, tmp_path):
    """With ``initial_multiplier`` the capacity penalty holds a redundancy init from the first step."""
    model = converted(tok)
    tuner(tok, split, tmp_path, model=model, target_capacity=0.5, max_steps=2, log_every=1, loss="kd",
          router_init="redundancy", initial_multiplier=1.0, calibrate=False).train()
    first, second = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines() if '"ce"' in line]
    assert first["multiplier"] == pytest.approx(1.0 + 0.1 * (first["capacity"] - 0.5))
    assert second["multiplier"] == pytest.approx(first["multiplier"] + 0.1 * (second["capacity"] - 0.5))
    # The second step (the first with a measured gate pressure) pushes capacity down at about the task loss's
    # own strength, whichever side of the target the batch is.
    assert second["penalty_coefficient"] >= 0.4 * second["gate_pressure"]
    ctl = CapacityController(0.5, 0.1, 2.0, initial=-50.0)
    assert ctl.integral == -20.0


@pytest.mark.parametrize("settings, message", [
    ({"loss": "mse"}, "loss must be one of"),
    ({"initial_multiplier": float("inf")}, "initial_multiplier must be in"),
    ({"router_init": "random"}, "router_init must be one of"),
    ({"kd_temperature": 0.0}, "kd_temperature must be > 0"),
    ({"router_init_sequences": 0}, "router_init_sequences must be at least 1"),
    ({"router_init_margin": True}, "router_init_margin needs a static router_init"),
    ({"cost_routers": True}, "cost_routers needs a static router_init"),
    ({"router_init": "ranking"}, "give both or neither"),
    ({"router_init_ranking": [3, 4]}, "give both or neither"),
    ({"router_init": "ranking", "router_init_ranking": [3, 3]}, "names a layer twice"),
    ({"cost_routers": True, "router_init": "cost", "cost_transform": "sqrt"}, "cost_transform must be one of"),
    ({"cost_routers": True, "router_init": "cost", "cost_sequences": 0}, "cost_sequences must be at least 1"),
    ({"cost_routers": True, "router_init": "cost", "cost_floor": 0.0}, "cost_floor must be > 0"),
    ({"cost_routers": True, "router_init": "cost", "max_steps": -1}, "max_steps must be at least 1"),
])
def test_bad_quality_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        RouterTuningConfig(target_capacity=0.5, **settings)


def test_l1_mode_has_no_level_for_cost_routers():
    with pytest.raises(ValueError, match="cost_routers needs a target"):
        RouterTuningConfig(l1_lambda=0.1, router_init="cost", cost_routers=True)


@pytest.mark.parametrize("steps", [0, 6])
def test_cost_routers_are_fitted_to_the_skip_costs_and_route_per_input(tok, split, tmp_path, steps, monkeypatch):
    """The fit alone (no step) or followed by KD steps with centred routers: every router predicts its layer's
    per-token skip cost from its input, the calibration's common level lands on the target, and the routing is
    per input (layers that some sequences skip and others keep)."""
    from mindskip_ext.eval.routing import routing_report

    model = converted(tok, layers=[2, 3, 4, 5, 6])
    summary = tuner(tok, split, tmp_path, model=model, target_capacity=0.6, max_steps=steps, loss="kd",
                    router_init="cost", router_init_sequences=16, cost_routers=True, cost_sequences=48,
                    centre_router_inputs=steps > 0).train()
    fits = [json.loads(line)["cost_fit"] for line in (tmp_path / LOG_NAME).read_text().splitlines()
            if "cost_fit" in line]
    assert len(fits) == 1 and fits[0]["sequences"] == 48 and fits[0]["around"] == summary["router_init"][
        "skipped_layers"]
    assert set(fits[0]["layers"]) == {"2", "3", "4", "5", "6"} and fits[0]["transform"] == "log"
    assert abs(fits[0]["calibration"]["capacity"] - 0.6) <= 0.05  # the fit starts at the target
    assert summary["steps"] == steps and abs(summary["heldout"]["capacity"] - 0.6) <= 0.05
    pad = D.pad_token_id(tok)
    report = routing_report(routing_decisions(model, split[1][:64], pad), model.config.num_hidden_layers)
    assert report["dynamic_layers"], "cost-fitted routers route per input"
    assert any(torch.count_nonzero(r.weight) > 0 for r in model.routers.values())
    assert model.router_centres is None  # saved as ordinary routers
    # The costs are kept beside the routers: a second run fits again from them, to the same routers.
    from mindskip_ext.training.fit import COST_LABELS_NAME

    assert (tmp_path / COST_LABELS_NAME).is_file()
    if steps == 0:
        import mindskip_ext.eval.headroom as headroom

        again = converted(tok, layers=[2, 3, 4, 5, 6])
        costed = headroom.skip_costs
        monkeypatch.setattr(headroom, "skip_costs", lambda *a, also_skipped=(), **k: (
            costed(*a, also_skipped=also_skipped, **k) if not also_skipped else pytest.fail("costs measured again")))
        tuner(tok, split, tmp_path, model=again, target_capacity=0.6, max_steps=0, loss="kd", router_init="cost",
              router_init_sequences=16, cost_routers=True, cost_sequences=48).train()
        for key, value in model.router_state_dict().items():
            torch.testing.assert_close(again.router_state_dict()[key], value)
