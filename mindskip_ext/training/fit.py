"""Router-Tuning: train only the MindSkip routers of a frozen model.

Loss: ``CE + penalty``, where the capacity ``c`` of a step is the mean of the straight-through
keep gates over MindSkip layers and sequences (value: the 0/1 decision, gradient: to the router
score). Two penalties:

``l1`` (the paper's): ``lambda * c`` with a fixed ``lambda``. Where training lands depends on
``lambda``, the learning rate and the number of steps.

``target`` (``target_capacity=t``): the capacity is held at ``t`` by a PI controller acting on the
penalty coefficient, i.e. an augmented Lagrangian for the constraint ``c = t`` whose multiplier is
updated by dual ascent (as in CoFi / Sheared-LLaMA's target-sparsity training):

    penalty gradient per gate = s * (mu + kp * (c_batch - t)) / (layers * sequences)
    mu <- clip(mu + ki * (c_step - t))            after every optimizer step

``mu`` is dimensionless because ``s`` is a running measure of the task loss's own pressure on the
gates (the mean |dCE/dgate|, read off the gates' gradients in the same backward pass). One pair of
gains therefore works for any model, dataset and learning rate: ``mu + kp*(c-t) = 1`` means the
capacity penalty pushes a gate as hard as the task loss typically does. ``mu`` may go negative,
which raises the capacity when it is below target (needed with the kept-only variant, where a
skipped sequence gets no task-loss gradient to bring it back).

The controller keeps training at the target operating point, so the routers learn *which*
sequences to skip at that budget. A controller still leaves the final capacity a few points off
(batch noise, the last updates). So after training the routers are calibrated: every router bias
is shifted by one common amount (in logit space, keeping the per-layer allocation the training
found) so the capacity on training sequences is ``t``; a few rounds, since skipping in one layer
changes the inputs of the next. Then the capacity is measured on the held-out split and reported.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .data import Example, collate, length_batches, padding_fraction
from .evaluation import CapacityMeter, autocast_for, evaluate_examples, model_device, token_nll
from .layer import RoutingRecord
from .model import WEIGHTS_NAME, MindSkipModel, atomic_write_bytes, read_router_directory

SCHEDULES = ("cosine", "linear", "constant")
LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "training_summary.json"
CHECKPOINT_DIR = "checkpoints"
LATEST_NAME = "latest"
STATE_NAME = "trainer_state.pt"
INTEGRAL_LIMIT = 20.0
SCALE_EMA = 0.9


@dataclass
class RouterTuningConfig:
    """Settings of one Router-Tuning run. Exactly one of ``target_capacity`` and ``l1_lambda``."""

    target_capacity: float | None = field(default=None, metadata={"help": "Capacity to land on, in (0, 1]."})
    l1_lambda: float | None = field(default=None, metadata={"help": "Paper's fixed-lambda L1 penalty (lambda*mean(keep))."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate of the routers."})
    weight_decay: float = 0.0
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps with linear LR warmup."})
    schedule: str = field(default="cosine", metadata={"help": f"LR schedule after warmup: {', '.join(SCHEDULES)}."})
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides epochs."})
    heldout_fraction: float = 0.1
    seed: int = 0
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (CUDA only; CPU always runs fp32)."})
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_every: int = field(default=0, metadata={"help": "Held-out evaluation every N steps (0: at the end only)."})
    save_every: int = field(default=100, metadata={"help": "Router checkpoint every N steps (0: none)."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep checkpoints after a finished run."})
    integral_gain: float = field(default=0.1, metadata={"help": "Target mode: dual-ascent step of the multiplier."})
    proportional_gain: float = field(default=1.0, metadata={"help": "Target mode: weight of the batch's deviation."})
    calibrate: bool = field(default=True, metadata={"help": "Target mode: final common bias shift to the target."})
    calibration_sequences: int = field(default=512, metadata={"help": "Training sequences used to calibrate."})
    eval_batch_size: int = 16

    def __post_init__(self):
        if (self.target_capacity is None) == (self.l1_lambda is None):
            raise ValueError("give exactly one of target_capacity (target control) and l1_lambda (paper's L1 penalty)")
        if self.target_capacity is not None:
            t = self.target_capacity
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0 or math.isnan(t):
                raise ValueError(f"target_capacity must be in (0, 1], got {t!r}")
            self.target_capacity = float(t)
        if self.l1_lambda is not None and not self.l1_lambda >= 0.0:
            raise ValueError(f"l1_lambda must be >= 0, got {self.l1_lambda!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("batch_size", "grad_accum", "log_every", "eval_batch_size", "calibration_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    @property
    def mode(self) -> str:
        return "target" if self.target_capacity is not None else "l1"


class CapacityController:
    """PI control of the capacity-penalty coefficient, in units of the task loss's gate pressure."""

    def __init__(self, target: float, integral_gain: float, proportional_gain: float):
        self.target = target
        self.ki = integral_gain
        self.kp = proportional_gain
        self.integral = 0.0
        self.scale: float | None = None

    def coefficient(self, capacity: float) -> float:
        """The penalty coefficient for a batch at ``capacity`` (0 until the scale is measured)."""
        if self.scale is None:
            return 0.0
        return self.scale * (self.integral + self.kp * (capacity - self.target))

    def observe_scale(self, value: float) -> None:
        if not math.isfinite(value) or value <= 0.0:
            return
        self.scale = value if self.scale is None else SCALE_EMA * self.scale + (1.0 - SCALE_EMA) * value

    def step(self, capacity: float) -> None:
        self.integral = min(INTEGRAL_LIMIT, max(-INTEGRAL_LIMIT, self.integral + self.ki * (capacity - self.target)))

    def state_dict(self) -> dict:
        return {"integral": self.integral, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.integral, self.scale = float(state["integral"]), state["scale"]


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def router_logits(model: MindSkipModel, examples: Sequence[Example], pad_id: int, batch_size: int, bf16: bool):
    """Router logits of every (MindSkip layer, sequence) pair under the current routing, and the capacity."""
    model.eval()
    device = model_device(model)
    meter, logits = CapacityMeter(), []
    for index in length_batches([len(e) for e in examples], batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in index], pad_id).items()}
        record = RoutingRecord()
        with autocast_for(device, bf16):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, mindskip_record=record)
        meter.add(record)
        logits.extend(torch.logit(r.score.double(), eps=1e-7) for r in record.layers.values())
    return torch.cat(logits), meter.overall()


@torch.no_grad()
def calibrate_capacity(
    model: MindSkipModel,
    examples: Sequence[Example],
    target: float,
    pad_id: int,
    batch_size: int = 16,
    bf16: bool = False,
    rounds: int = 6,
    tolerance: float = 0.005,
) -> dict:
    """Shift every router bias by one common amount so that the capacity on ``examples`` is ``target``.

    Each round places the keep threshold between the k-th and (k+1)-th largest router logit
    (k = target * pairs), then re-measures, because a changed decision in one layer changes the
    inputs of the later layers. Stops within ``tolerance`` or after ``rounds`` shifts.
    """
    threshold = math.log(model.mindskip_config.threshold / (1.0 - model.mindskip_config.threshold))
    total_shift, history = 0.0, []
    for _ in range(rounds + 1):
        logits, capacity = router_logits(model, examples, pad_id, batch_size, bf16)
        history.append(capacity)
        if abs(capacity - target) <= tolerance or len(history) > rounds:
            break
        ordered = torch.sort(logits, descending=True).values
        k = min(len(ordered), max(1, round(target * len(ordered))))
        boundary = float(ordered[k - 1]) if k == len(ordered) else float(ordered[k - 1] + ordered[k]) / 2.0
        if k == len(ordered):
            boundary -= 1e-3  # keep every pair: put the threshold just under the smallest logit
        shift = threshold - boundary
        for router in model.routers.values():
            router.bias.add_(shift)
        total_shift += shift
    return {"bias_shift": total_shift, "capacity": history[-1], "capacity_history": history, "sequences": len(examples)}


class RouterTuner:
    """Runs Router-Tuning on a :class:`MindSkipModel`; writes the router directory, log and checkpoints."""

    def __init__(
        self,
        model: MindSkipModel,
        train_examples: Sequence[Example],
        heldout_examples: Sequence[Example],
        config: RouterTuningConfig,
        output_dir,
        pad_id: int,
        progress: bool = True,
    ):
        if not isinstance(model, MindSkipModel):
            raise TypeError("Router-Tuning needs a MindSkipModel (see mindskip_ext.get_mindskip_model)")
        if not train_examples or not heldout_examples:
            raise ValueError("Router-Tuning needs non-empty training and held-out examples")
        trainable = [p for p in model.parameters() if p.requires_grad]
        routers = model.router_parameters()
        if {id(p) for p in trainable} != {id(p) for p in routers}:
            raise ValueError("only the router parameters may require grad: the base model must stay frozen")
        self.model = model
        self.train_examples = list(train_examples)
        self.heldout_examples = list(heldout_examples)
        self.config = config
        self.output_dir = Path(output_dir)
        self.pad_id = pad_id
        self.progress = progress
        self.device = model_device(model)
        self.num_layers = len(model.routers)
        self.lengths = [len(e) for e in self.train_examples]
        self.batches_per_epoch = len(length_batches(self.lengths, config.batch_size, shuffle=False))
        steps_per_epoch = max(1, self.batches_per_epoch // config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        self.optimizer = torch.optim.AdamW(routers, lr=config.learning_rate, weight_decay=config.weight_decay)
        warmup = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, warmup, self.total_steps)
        )
        self.controller = (
            CapacityController(config.target_capacity, config.integral_gain, config.proportional_gain)
            if config.mode == "target"
            else None
        )
        self.step = 0
        self._epoch_cache: dict[int, list[list[int]]] = {}

    # ------------------------------------------------------------------ data order

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: length_batches(self.lengths, self.config.batch_size, True, self.config.seed + epoch)}
        return self._epoch_cache[epoch]

    def micro_batches(self, step: int) -> list[list[int]]:
        """The micro-batches of optimizer step ``step``: a pure function of (seed, step), so resume is exact."""
        out = []
        for i in range(step * self.config.grad_accum, (step + 1) * self.config.grad_accum):
            epoch, pos = divmod(i, self.batches_per_epoch)
            out.append(self._epoch_batches(epoch)[pos])
        return out

    def _fingerprint(self) -> dict:
        c = self.config
        return {
            "train_examples": len(self.train_examples),
            "train_tokens": sum(self.lengths),
            "batch_size": c.batch_size,
            "grad_accum": c.grad_accum,
            "seed": c.seed,
            "mode": c.mode,
            "target_capacity": c.target_capacity,
            "l1_lambda": c.l1_lambda,
            "layers": sorted(self.model.routers),
            "mindskip_config": self.model.mindskip_config.to_dict(),
        }

    # ------------------------------------------------------------------ one step

    def _train_step(self, step: int) -> dict:
        model, c = self.model, self.config
        model.train()
        batches = [collate([self.train_examples[i] for i in idx], self.pad_id) for idx in self.micro_batches(step)]
        num_seq = sum(b["input_ids"].shape[0] for b in batches)
        num_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        num_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        full_ste = model.mindskip_config.train_all_sequences
        meter, total_nll, scales, coefficients = CapacityMeter(), 0.0, [], []
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            record = RoutingRecord()
            with autocast_for(self.device, c.bf16):
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    mindskip_record=record,
                ).logits
            nll, _ = token_nll(logits, batch["labels"])
            gates = record.gates()
            if len(gates) != self.num_layers:
                raise RuntimeError(
                    f"{len(gates)} of {self.num_layers} MindSkip layers recorded a straight-through gate; the model "
                    "must be in training mode with gradients enabled"
                )
            stacked = torch.stack([gates[i] for i in sorted(gates)])  # (layers, batch)
            capacity = float(stacked.detach().mean())
            if self.controller is not None:
                coefficient = self.controller.coefficient(capacity)
                for gate in gates.values():
                    gate.retain_grad()
            else:
                coefficient = c.l1_lambda
            per_gate = coefficient / (self.num_layers * num_seq)
            loss = nll / max(1, num_targets) + per_gate * stacked.sum()
            loss.backward()
            if self.controller is not None:
                # The task loss's pressure on the gates: their gradient minus the (known) penalty part.
                # With kept-only training a skipped sequence has no task gradient, so only kept ones count.
                grads, counted = [], []
                for idx in sorted(gates):
                    grads.append(gates[idx].grad - per_gate)
                    counted.append(torch.ones_like(grads[-1], dtype=torch.bool) if full_ste else record.layers[idx].keep)
                grads, counted = torch.stack(grads), torch.stack(counted)
                if counted.any():
                    scales.append(float(grads.abs()[counted].mean()) * self.num_layers * num_seq)
            total_nll += float(nll.detach())
            coefficients.append(coefficient)
            meter.add(record)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.router_parameters(), c.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_capacity = meter.overall()
        if self.controller is not None:
            if scales:
                self.controller.observe_scale(sum(scales) / len(scales))
            self.controller.step(step_capacity)
        ce = total_nll / max(1, num_targets)
        return {
            "ce": ce,
            "loss": ce + self._penalty_value(step_capacity),
            "capacity": step_capacity,
            "capacity_per_layer": meter.summary()["capacity_per_layer"],
            "penalty_coefficient": sum(coefficients) / len(coefficients),
            "grad_norm": float(grad_norm),
            "tokens": num_tokens,
            "sequences": num_seq,
        }

    def _penalty_value(self, capacity: float) -> float:
        """The penalty term's value: lambda*c, or the augmented Lagrangian s*(mu*(c-t) + kp/2*(c-t)^2)."""
        if self.controller is None:
            return self.config.l1_lambda * capacity
        ctl = self.controller
        if ctl.scale is None:
            return 0.0
        gap = capacity - ctl.target
        return ctl.scale * (ctl.integral * gap + 0.5 * ctl.kp * gap * gap)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_root(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    def save_checkpoint(self) -> Path:
        """Write routers + optimizer/scheduler/controller state to a fresh folder, then point ``latest`` at it.

        Every file is written atomically and ``latest`` moves only after the folder is complete,
        so a crash at any moment leaves the previous checkpoint usable.
        """
        root = self._checkpoint_root()
        folder = root / f"step-{self.step:08d}"
        self.model.save_pretrained(folder)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "fingerprint": self._fingerprint(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(folder / STATE_NAME, buffer.getvalue())
        atomic_write_bytes(root / LATEST_NAME, folder.name.encode())
        for old in root.glob("step-*"):
            if old.is_dir() and old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def load_checkpoint(self) -> bool:
        """Resume from ``output_dir/checkpoints/latest``; False when there is none."""
        root = self._checkpoint_root()
        latest = root / LATEST_NAME
        if not latest.is_file():
            return False
        folder = root / latest.read_text().strip()
        _, routers = read_router_directory(folder)
        state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
        if state["fingerprint"] != self._fingerprint():
            changed = sorted(k for k in state["fingerprint"] if state["fingerprint"][k] != self._fingerprint().get(k))
            raise ValueError(
                f"cannot resume from {folder}: the run differs from the checkpoint in {', '.join(changed)}; "
                "use the same data and settings, or a new output directory"
            )
        self.model.load_router_state_dict(routers)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        self.step = int(state["step"])
        return True

    # ------------------------------------------------------------------ run

    def _log(self, entry: dict) -> None:
        with open(self.output_dir / LOG_NAME, "a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def evaluate_heldout(self) -> dict:
        return evaluate_examples(
            self.model, self.heldout_examples, self.pad_id, self.config.eval_batch_size, self.config.bf16
        )

    def train(self, resume: bool = False) -> dict:
        """Train, calibrate (target mode), evaluate on the held-out split and save the routers."""
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        resumed_from = self.step if resume and self.load_checkpoint() else None
        if resumed_from is None:
            (self.output_dir / LOG_NAME).unlink(missing_ok=True)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="router-tuning", unit="step", dynamic_ncols=True)
        started = time.perf_counter()
        window_tokens, window_time, total_tokens, step_seconds, last = 0, 0.0, 0, 0.0, None
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                stats = self._train_step(self.step)
                dt = time.perf_counter() - t0
                self.step += 1
                window_tokens += stats["tokens"]
                window_time += dt
                total_tokens += stats["tokens"]
                step_seconds += dt
                stats["tokens_per_s"] = stats["tokens"] / dt if dt > 0 else float("nan")
                last = stats
                if bar is not None:
                    layers = ",".join(f"{v:.2f}" for v in stats["capacity_per_layer"].values())
                    bar.set_postfix_str(
                        f"loss={stats['loss']:.3f} cap={stats['capacity']:.3f} [{layers}] "
                        f"{window_tokens / max(window_time, 1e-9):.0f} tok/s"
                    )
                    bar.update(1)
                if self.step % c.log_every == 0 or self.step == self.total_steps:
                    entry = {
                        "step": self.step,
                        "epoch": self.step * c.grad_accum / self.batches_per_epoch,
                        "lr": self.scheduler.get_last_lr()[0],
                        **{k: v for k, v in stats.items() if k not in ("tokens", "sequences")},
                        "tokens_per_s": window_tokens / max(window_time, 1e-9),
                    }
                    if self.controller is not None:
                        entry["multiplier"] = self.controller.integral
                        entry["gate_pressure"] = self.controller.scale
                    self._log(entry)
                    window_tokens, window_time = 0, 0.0
                if c.eval_every and self.step % c.eval_every == 0 and self.step < self.total_steps:
                    held = self.evaluate_heldout()
                    self._log({"step": self.step, "heldout": held})
                if c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - started
        calibration = None
        if self.controller is not None and c.calibrate:
            calibration_examples = self.train_examples[: c.calibration_sequences]
            calibration = calibrate_capacity(
                self.model, calibration_examples, c.target_capacity, self.pad_id, c.eval_batch_size, c.bf16
            )
        heldout = self.evaluate_heldout()
        self.model.save_pretrained(self.output_dir)
        trainable, total = self.model.get_nb_trainable_parameters()
        summary = {
            "mode": c.mode,
            "target_capacity": c.target_capacity,
            "l1_lambda": c.l1_lambda,
            "steps": self.step,
            "resumed_from_step": resumed_from,
            "train_examples": len(self.train_examples),
            "heldout_examples": len(self.heldout_examples),
            "padding_fraction": padding_fraction(
                length_batches(self.lengths, c.batch_size, True, c.seed), self.lengths
            ),
            "last_step": last,
            "calibration": calibration,
            "heldout": heldout,
            "train_seconds": train_seconds,
            "train_tokens_per_s": total_tokens / step_seconds if step_seconds > 0 else None,  # steps only, no evals
            "trainable_parameters": trainable,
            "total_parameters": total,
            "router_dir": str(self.output_dir),
            "router_file_bytes": (self.output_dir / WEIGHTS_NAME).stat().st_size,
            "mindskip_config": self.model.mindskip_config.to_dict(),
            "config": asdict(c),
        }
        self._log({"step": self.step, "final": True, "calibration": calibration, "heldout": heldout})
        atomic_write_bytes(self.output_dir / SUMMARY_NAME, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        if not c.keep_checkpoints:
            shutil.rmtree(self._checkpoint_root(), ignore_errors=True)
        return summary
