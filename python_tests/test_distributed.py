"""Router-Tuning at scale: data-parallel training under torchrun (gloo, 2 processes) agrees with one process on the
same global batch, FSDP2 shards the frozen weights with the same result, activation checkpointing leaves the
router gradients and decisions unchanged, resume refuses another world size, and the HF Trainer path lands on
the target capacity."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mindskip_ext as msk
from mindskip_ext import data as D
from mindskip_ext.hf_compat import enable_activation_checkpointing
from mindskip_ext.model import WEIGHTS_NAME
from mindskip_ext.testing import synthetic_instructions, tiny_model
from mindskip_ext.training import LOG_NAME, RouterTuner, RouterTuningConfig
from mindskip_ext.training.distributed import World

from tiny import padded_batch, randomize_routers, save_tiny_model, tiny_lm

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- in one process


def test_ranks_take_disjoint_shares_of_the_one_process_micro_batches(tok):
    examples = D.prepare_examples(tok, synthetic_instructions(300, seed=3), 64).examples
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=4))
    config = RouterTuningConfig(target_capacity=0.5, batch_size=4, grad_accum=3, save_every=0)

    def tuner(world, grad_accum=3):
        settings = RouterTuningConfig(**{**config.__dict__, "grad_accum": grad_accum})
        return RouterTuner(model, examples, examples[:4], settings, "/unused", 0, progress=False, world=world)

    one = tuner(World(0, 1), grad_accum=6)
    ranks = [tuner(World(r, 2)) for r in range(2)]
    assert one.total_steps == ranks[0].total_steps == ranks[1].total_steps
    for step in (0, 1, 7):
        shares = [r.micro_batches(step) for r in ranks]
        assert len(shares[0]) == len(shares[1]) == 3
        seen = [tuple(b) for share in shares for b in share]
        assert len(set(seen)) == 6 and set(seen) == {tuple(b) for b in one.micro_batches(step)}
        assert not {i for b in shares[0] for i in b} & {i for b in shares[1] for i in b}  # disjoint sequences


@pytest.mark.hf
def test_activation_checkpointing_keeps_router_gradients_and_decisions(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = []
    forward = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: calls.append(self) or forward(self, x))

    def run(checkpointing: bool, all_sequences: bool):
        model = msk.get_mindskip_model(tiny_lm("llama", layers=6),
                                       msk.MindSkipConfig(train_all_sequences=all_sequences))
        randomize_routers(model, std=2.0)
        if checkpointing:
            enable_activation_checkpointing(model.base_model)
        mlp = model.mindskip_layers[3].base_layer.mlp
        calls.clear()
        model.train()
        _, ids, mask = padded_batch([5, 9, 7, 8], "right")
        record = msk.RoutingRecord()
        out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False, mindskip_record=record)
        (out.loss + sum(g.sum() for g in record.gates().values())).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return grads, {i: r.keep.tolist() for i, r in record.layers.items()}, sum(m is mlp for m in calls)

    for all_sequences in (True, False):
        plain, decisions, once = run(False, all_sequences)
        checkpointed, same_decisions, recomputed = run(True, all_sequences)
        assert same_decisions == decisions
        assert once == 1 and recomputed == 2  # the MindSkip layer really was recomputed in the backward pass
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)
        assert any(g.abs().sum() > 0 for g in plain.values())


# ----------------------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_model(root / "model", layers=8)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_instructions(600, seed=21)))
    return root, str(model), str(data)


TRAIN = ["--target-capacity", "0.5", "--max-steps", "20", "--batch-size", "8", "--heldout-fraction", "0.2",
         "--save-every", "0", "--no-progress", "--threads", "1", "--no-bf16"]


def _train(setup, out: str, processes: int, *extra: str, check: bool = True):
    root, model, data = setup
    command = [sys.executable, "-m", "mindskip_ext.cli", "train", "--model", model, "--data", data,
               "--output", str(root / out), *TRAIN, *extra]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={_free_port()}", "-m", "mindskip_ext.cli", *command[3:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, env=env, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _routers(setup, out):
    return load_file(str(setup[0] / out / WEIGHTS_NAME))


def _log(setup, out):
    return [json.loads(line) for line in (setup[0] / out / LOG_NAME).read_text().splitlines() if '"ce"' in line]


@pytest.fixture(scope="module")
def one_process(setup):
    _train(setup, "one", 1, "--grad-accum", "2", "--log-every", "1")
    return _routers(setup, "one"), _log(setup, "one")


def _agrees(setup, out, one_process):
    routers, log = one_process
    for key, value in _routers(setup, out).items():
        torch.testing.assert_close(value, routers[key], rtol=0, atol=1e-5)
    other = _log(setup, out)
    assert [e["step"] for e in other] == [e["step"] for e in log] == list(range(1, 21))
    for a, b in zip(other, log):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["capacity"] == pytest.approx(b["capacity"])


@pytest.mark.slow
def test_two_processes_agree_with_one_process_on_the_same_global_batch(setup, one_process):
    proc = _train(setup, "two", 2, "--log-every", "1")
    _agrees(setup, "two", one_process)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and proc.stdout.count('"command": "train"') == 1  # only rank 0 reports


@pytest.mark.slow
def test_fsdp2_shards_the_frozen_weights_and_agrees(setup, one_process):
    proc = _train(setup, "fsdp", 2, "--log-every", "1", "--fsdp")
    assert "FSDP: the frozen weights are sharded over 2 processes" in proc.stdout
    _agrees(setup, "fsdp", one_process)


@pytest.mark.slow
def test_resume_under_torchrun_is_exact_and_refuses_another_world_size(setup, one_process):
    root = setup[0]
    first = _train(setup, "resume", 2, "--log-every", "1", "--stop-after-steps", "10")
    assert json.loads(first.stdout.strip().splitlines()[-1])["stopped_at_step"] == 10
    assert (root / "resume" / "checkpoints" / "latest").read_text() == "step-00000010"
    refused = _train(setup, "resume", 1, "--log-every", "1", "--grad-accum", "2", "--resume", check=False)
    assert refused.returncode == 1
    assert "written by a run of 2 process(es) and this run has 1; " in refused.stderr
    _train(setup, "resume", 2, "--log-every", "1", "--resume")
    _agrees(setup, "resume", one_process)


# ----------------------------------------------------------------------------------- transformers.Trainer


@pytest.mark.hf
def test_hf_trainer_path_lands_on_the_target_capacity(tok, tmp_path):
    from transformers import TrainingArguments

    from mindskip_ext.eval.perplexity import evaluate_examples
    from mindskip_ext.training.hf_trainer import RouterTuningTrainer, example_collator

    examples = D.prepare_examples(tok, synthetic_instructions(1000, seed=11), 128).examples
    train, held = D.split_heldout(examples, 0.3, seed=0)
    pad = D.pad_token_id(tok)
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=8))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=20, learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=1, remove_unused_columns=False, report_to=[], save_strategy="no",
        logging_steps=5, use_cpu=True, dataloader_num_workers=0, seed=0,
    )
    trainer = RouterTuningTrainer(model=model, args=args, train_dataset=train, data_collator=example_collator(pad),
                                  tuning=RouterTuningConfig(skip_ratio=0.25))
    assert trainer.tuning.target_capacity == 0.5  # a quarter of 8 layers is half of the 4 router layers
    trainer.train()
    assert len(trainer.routing.history) == 20 and trainer.routing.penalty.scale is not None
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".router." not in n)
    calibration = trainer.calibrate(train[:256], pad)
    assert abs(calibration["capacity"] - 0.5) <= 0.01
    assert abs(evaluate_examples(model, held, pad, 16)["capacity"] - 0.5) <= 0.05
    trainer.save_model(str(tmp_path / "routers"))
    reloaded = msk.MindSkipModel.from_pretrained(tiny_model(tokenizer=tok, layers=8), tmp_path / "routers")
    reloaded_capacity = evaluate_examples(reloaded, held, pad, 16)["capacity"]
    assert reloaded_capacity == evaluate_examples(model, held, pad, 16)["capacity"]
