"""Centred router inputs (``RouterTuningConfig.centre_router_inputs``): the same decisions, weight gradients from the
per-input part only, the centre folded into saved biases, and an exact resume."""

from __future__ import annotations

import json

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext import data as D
from mindskip_ext import ops
from mindskip_ext.testing import synthetic_instructions, tiny_model
from mindskip_ext.training import LOG_NAME, RouterTuner, RouterTuningConfig
from mindskip_ext.training.calibration import router_logits
from mindskip_ext.training.centring import router_input_means
from mindskip_ext.training.hf_trainer import RouterTuningTrainer

LAYERS = [2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def split(tok):
    examples = D.prepare_examples(tok, synthetic_instructions(400, seed=5), 96).examples
    return D.split_heldout(examples, 0.25, seed=0)


def converted(tok, seed=0, **config):
    base = tiny_model(tokenizer=tok, layers=8, seed=seed)
    return msk.get_mindskip_model(base, msk.MindSkipConfig(layers=LAYERS, **config))


def randomise(model, seed=0):
    """Weights of the size that splits the tiny model's sequences, and biases around the threshold."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
            router.bias.copy_(0.3 * torch.randn(router.bias.shape, generator=gen))


def direct_means(model, examples, pad):
    """Each layer's pooled normalised input, averaged over ``examples``, from the layers' own inputs (one batch)."""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, idx=idx: inputs.__setitem__(idx, kwargs.get("hidden_states", args[0] if args
                                                                               else None)), with_kwargs=True)
             for idx, layer in model.mindskip_layers.items()]
    batch = D.collate(examples, pad)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        for hook in hooks:
            hook.remove()
        mask = batch["attention_mask"].double()[..., None]
        out = {}
        for idx, layer in model.mindskip_layers.items():
            normed = layer.base_layer.input_layernorm(inputs[idx]).double()
            out[idx] = ((normed * mask).sum(1) / mask.sum(1)).mean(0)
    return out


def test_the_means_are_the_pooled_router_inputs_over_padded_batches(tok, split):
    model = converted(tok)
    randomise(model)  # some layers skip some sequences: the means are taken under the model's routing
    pad, examples = D.pad_token_id(tok), split[0][:10]
    assert len({len(e) for e in examples}) > 1  # padded batches
    means = router_input_means(model, examples, pad, batch_size=4)
    expected = direct_means(model, examples, pad)
    assert set(means) == set(LAYERS)
    for idx in LAYERS:
        assert means[idx].dtype == torch.float32 and means[idx].shape == (model.config.hidden_size,)
        torch.testing.assert_close(means[idx].double(), expected[idx], atol=1e-5, rtol=1e-5)


def test_centring_keeps_every_decision_and_saves_ordinary_routers(tok, split, tmp_path):
    model = converted(tok)
    randomise(model)
    pad, examples = D.pad_token_id(tok), split[1][:24]
    before, capacity = router_logits(model, examples, pad, 8, False)
    assert 0.0 < capacity < 1.0
    state = {k: v.clone() for k, v in model.router_state_dict().items()}  # (the tensors alias the parameters)
    centres = router_input_means(model, split[0][:32], pad)
    model.set_router_centres(centres)
    assert set(model.router_centres) == set(LAYERS)
    for idx, layer in model.mindskip_layers.items():  # the parameter holds b' = b + w . centre
        assert layer.router.bias.item() == pytest.approx(
            (state[f"layers.{idx}.router.bias"] + state[f"layers.{idx}.router.weight"] @ centres[idx]).item(),
            abs=1e-5)
    after, _ = router_logits(model, examples, pad, 8, False)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-5)

    saved = model.router_state_dict()  # uncentred: the biases the gates apply
    for key, value in state.items():
        torch.testing.assert_close(saved[key], value, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = msk.MindSkipModel.from_pretrained(tiny_model(tokenizer=tok, layers=8, seed=0), tmp_path)
    assert reloaded.router_centres is None
    torch.testing.assert_close(router_logits(reloaded, examples, pad, 8, False)[0], before, atol=1e-4, rtol=1e-5)

    model.load_router_state_dict(saved)  # loading into a centred model keeps its centres and the logits
    assert model.router_centres is not None
    torch.testing.assert_close(router_logits(model, examples, pad, 8, False)[0], before, atol=1e-4, rtol=1e-5)
    model.set_router_centres(None)
    assert model.router_centres is None
    for key, value in state.items():
        torch.testing.assert_close(model.router_state_dict()[key], value, atol=1e-5, rtol=1e-5)


def test_a_centred_weight_gets_only_the_per_input_part_of_the_gradient(tok, split):
    """At w = 0, b' = 0 the score is 1/2 for every sequence, so d(sum score)/dw = 1/4 sum_b (mean_b - centre): zero
    when the centre is these sequences' own mean, whatever the common part. Uncentred it is 1/4 sum_b mean_b."""
    model = converted(tok)
    pad, examples = D.pad_token_id(tok), split[0][:6]
    centres = router_input_means(model, examples, pad, batch_size=6)
    layer = model.mindskip_layers[4]
    hidden = {}
    hook = layer.base_layer.input_layernorm.register_forward_hook(lambda m, a, o: hidden.__setitem__("x", o))
    batch = D.collate(examples, pad)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hook.remove()
    grads = {}
    for centred in (False, True):
        layer.set_router_centre(centres[4] if centred else None)
        layer.router.zero_grad()
        score, *_ = ops.router_gate(hidden["x"], batch["attention_mask"], layer.router.weight, layer.router_bias(),
                                    0.5)
        score.sum().backward()
        grads[centred] = layer.router.weight.grad.clone().reshape(-1)
        assert layer.router.bias.grad.item() == pytest.approx(0.25 * len(examples))
    torch.testing.assert_close(grads[False], 0.25 * len(examples) * centres[4], atol=1e-5, rtol=1e-4)
    assert grads[True].abs().max() < 1e-5 < grads[False].abs().max()


def test_bad_centres_are_refused(tok):
    model = converted(tok)
    layer = model.mindskip_layers[2]
    size = model.config.hidden_size
    for bad in (torch.zeros(size + 1), torch.zeros(1, size), torch.full((size,), float("nan")),
                torch.zeros(size, dtype=torch.long)):
        with pytest.raises(ValueError, match="MindSkip layer 2: a router centre must be a finite float vector"):
            layer.set_router_centre(bad)
    assert layer.router_centre is None
    with pytest.raises(ValueError, match=r"router centres are for layers \[2\], the routers are on \[2, 3, 4, 5, 6\]"):
        model.set_router_centres({2: torch.zeros(size)})
    assert model.router_centres is None


def tuner(tok, split, out, **settings):
    settings = {"target_capacity": 0.6, "loss": "kd", "router_init": "cost", "router_init_sequences": 12,
                "batch_size": 16, "max_steps": 16, "save_every": 4, "calibration_sequences": 48,
                "centre_router_inputs": True, "learning_rate": 5e-3, **settings}
    return RouterTuner(converted(tok), split[0], split[1], RouterTuningConfig(**settings), out, D.pad_token_id(tok),
                       progress=False)


def test_router_tuning_centres_during_training_and_resumes_exactly(tok, split, tmp_path):
    straight = tuner(tok, split, tmp_path / "straight")
    summary = straight.train()
    assert straight.model.router_centres is None  # folded at the end
    lines = [json.loads(line) for line in (tmp_path / "straight" / LOG_NAME).read_text().splitlines()]
    centring = next(e["router_centres"] for e in lines if "router_centres" in e)
    assert centring["sequences"] == 48 and set(centring["norm"]) == {str(i) for i in LAYERS}
    reloaded = msk.MindSkipModel.from_pretrained(tiny_model(tokenizer=tok, layers=8, seed=0), tmp_path / "straight")
    for key, value in straight.model.router_state_dict().items():
        torch.testing.assert_close(reloaded.router_state_dict()[key], value)
    assert summary["config"]["centre_router_inputs"] is True

    plain = tuner(tok, split, tmp_path / "plain", centre_router_inputs=False)
    plain.train()
    moved = max(float((plain.model.routers[i].weight - straight.model.routers[i].weight).detach().abs().max())
                for i in LAYERS)
    assert moved > 1e-4  # centring changes what the weights learn

    stopped = tuner(tok, split, tmp_path / "resumed", stop_after_steps=8)
    assert stopped.train()["stopped_at_step"] == 8
    assert stopped.model.router_centres is None
    resumed = tuner(tok, split, tmp_path / "resumed")
    assert resumed.train(resume=True)["resumed_from_step"] == 8
    for key, value in straight.model.router_state_dict().items():
        torch.testing.assert_close(resumed.model.router_state_dict()[key], value, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("settings, message", [
    ({"centre_router_inputs": True}, "centre_router_inputs is run by RouterTuner"),
    ({"router_init": "joint"}, r"does not run router_init='joint': start the routers with .*static_init"),
])
def test_the_hf_trainer_refuses_what_only_router_tuner_runs(tok, settings, message):
    tuning = RouterTuningConfig(target_capacity=0.5, **settings)
    with pytest.raises(ValueError, match=message):  # before building anything
        RouterTuningTrainer(model=converted(tok), tuning=tuning, args=None)
