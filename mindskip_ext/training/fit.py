"""Running Router-Tuning: data order, the optimizer loop, logging, checkpoints, calibration and the summary.

The step's math lives elsewhere: the loss in :mod:`.loss`, the capacity penalty in :mod:`.penalty`, the
final bias calibration in :mod:`.calibration`, the sums over training processes in :mod:`.distributed`.
:class:`RouterTuner` only runs them: it orders the micro-batches (a pure function of seed and step, so
``--resume`` is exact; under ``torchrun`` each rank takes its own share of every step's micro-batches, and the
global batch is ``batch_size x grad_accum x world_size``), steps AdamW with a warmup and schedule, writes the
JSON-lines log, keeps atomic checkpoints, and at the end calibrates (target mode), evaluates on the held-out
split and saves the router directory with a summary. Only the main rank writes files; calibration and the
held-out evaluation run the same examples on every rank, so every rank ends with the same routers.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .._io import atomic_write_json
from ..data import Example, collate, length_batches, padding_fraction
from ..devices import model_device
from ..eval.perplexity import evaluate_examples
from ..hf_compat import enable_activation_checkpointing
from ..layer import CapacityMeter
from ..model import WEIGHTS_NAME, MindSkipModel
from .calibration import calibrate_capacity
from .centring import router_input_means, router_inputs
from .checkpoint import load_checkpoint, remove_checkpoints, save_checkpoint, set_rng_state
from .config import RouterTuningConfig
from .cost_routers import fit_cost_routers, set_cost_routers, transform_costs
from .distributed import World, current
from .init import static_init
from .loss import router_tuning_loss, routing_units
from .penalty import CapacityController, FixedPenalty

LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "training_summary.json"
COST_LABELS_NAME = "cost_labels.pt"  # the per-sequence skip costs a cost-supervised fit was made from


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


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA's allocated peak on a GPU, the resident set size on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def make_penalty(config: RouterTuningConfig):
    if config.mode == "target":
        return CapacityController(config.target_capacity, config.integral_gain, config.proportional_gain,
                                  config.initial_multiplier)
    return FixedPenalty(config.l1_lambda)


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
        world: World | None = None,
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
        self.skip_ratio = config.skip_ratio
        self.config = config = config.resolved_for(model)
        self.output_dir = Path(output_dir)
        self.pad_id = pad_id
        self.progress = progress
        self.device = model_device(model)
        self.world = world if world is not None else current()
        self.lengths = [len(e) for e in self.train_examples]
        self.batches_per_epoch = len(length_batches(self.lengths, config.batch_size, shuffle=False))
        self.micro_per_step = config.grad_accum * self.world.size  # micro-batches of one global step
        if self.batches_per_epoch < self.micro_per_step:
            raise ValueError(
                f"{len(self.train_examples)} training examples make {self.batches_per_epoch} batches of "
                f"{config.batch_size}, fewer than one global step takes (grad_accum {config.grad_accum} x "
                f"{self.world.size} processes); use more data or a smaller batch"
            )
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model.base_model)
        steps_per_epoch = max(1, self.batches_per_epoch // self.micro_per_step)
        self.total_steps = (config.max_steps if config.max_steps is not None
                            else max(1, math.ceil(config.epochs * steps_per_epoch)))
        self.optimizer = torch.optim.AdamW(routers, lr=config.learning_rate, weight_decay=config.weight_decay)
        warmup = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, warmup, self.total_steps)
        )
        self.penalty = make_penalty(config)
        self.step = 0
        self._epoch_cache: dict[int, list[list[int]]] = {}

    # ------------------------------------------------------------------ data order

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_cache:
            self._epoch_cache = {
                epoch: length_batches(self.lengths, self.config.batch_size, True, self.config.seed + epoch)
            }
        return self._epoch_cache[epoch]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of optimizer step ``step``: a pure function of (seed, step, rank), so resume is
        exact and the ranks' shares are disjoint (together, the micro-batches one process would take)."""
        out = []
        start = step * self.micro_per_step
        for i in range(start + self.world.rank, start + self.micro_per_step, self.world.size):
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
            "world_size": self.world.size,
            "loss": c.loss,
            "router_init": c.router_init,
            **({"router_init_margin": True} if c.router_init_margin else {}),
            **({"router_init_ranking": c.router_init_ranking} if c.router_init_ranking else {}),
            **({"centre_router_inputs": True} if c.centre_router_inputs else {}),
            **({"cost_routers": [c.cost_sequences, c.cost_transform, c.cost_floor]} if c.cost_routers else {}),
            "layers": sorted(self.model.routers),
            "mindskip_config": self.model.mindskip_config.to_dict(),
        }

    # ------------------------------------------------------------------ one step

    def _train_step(self, step: int) -> dict:
        model, c = self.model, self.config
        model.train()
        batches = [collate([self.train_examples[i] for i in idx], self.pad_id) for idx in self.micro_batches(step)]
        # The whole global step's counts normalise every micro-batch's loss, on every rank.
        sequences, targets, tokens = (int(v) for v in self.world.sum([
            sum(routing_units(model, b) for b in batches),  # sequences, or real tokens under token routing
            sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
            sum(int(b["attention_mask"].sum()) for b in batches),
        ], self.device))
        all_sequences = model.mindskip_config.train_all_sequences
        meter, total_nll, total_kd, coefficients = CapacityMeter(), 0.0, 0.0, []
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss, stats = router_tuning_loss(
                model, batch, self.penalty, targets=targets, sequences=sequences, bf16=c.bf16, loss=c.loss,
                kd_temperature=c.kd_temperature,
            )
            loss.backward()
            self.penalty.observe(stats, all_sequences)
            total_nll += stats.nll
            total_kd += stats.kd or 0.0
            coefficients.append(stats.coefficient)
            meter.add(stats.record)
        self.world.sum_gradients(model.router_parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.router_parameters(), c.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world.active:
            meter, total_nll, total_kd, coefficients = self._global(meter, total_nll, total_kd, coefficients)
        step_capacity = meter.overall()
        self.penalty.end_step(step_capacity, reduce=lambda total, count: self.world.sum([total, count], self.device))
        ce = total_nll / max(1, targets)
        kd = total_kd / max(1, targets) if c.loss != "ce" else None
        task = {"ce": ce, "kd": kd, "ce+kd": ce + (kd or 0.0)}[c.loss]
        return {
            "ce": ce,
            **({"kd": kd} if kd is not None else {}),
            "loss": task + self.penalty.value(step_capacity),
            "capacity": step_capacity,
            "capacity_per_layer": meter.summary()["capacity_per_layer"],
            "penalty_coefficient": sum(coefficients) / len(coefficients),
            "grad_norm": float(grad_norm),
            "tokens": tokens,
            "sequences": sequences,
        }

    def _global(self, meter: CapacityMeter, nll: float, kd: float, coefficients: list[float]):
        """The step's statistics summed over the ranks (one all-reduce)."""
        layers = sorted(meter.total)
        sums = self.world.sum(
            [nll, kd, sum(coefficients), len(coefficients), *(meter.kept[i] for i in layers),
             *(meter.total[i] for i in layers)], self.device)
        out = CapacityMeter()
        for j, idx in enumerate(layers):
            out.kept[idx], out.total[idx] = int(sums[4 + j]), int(sums[4 + len(layers) + j])
        return out, sums[0], sums[1], [sums[2] / sums[3]]

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Routers + optimizer/scheduler/penalty state, atomically (see :mod:`.checkpoint`)."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": self.penalty.state_dict(),
            "fingerprint": self._fingerprint(),
        }
        centres = self.model.router_centres
        if centres is not None:
            state["router_centres"] = {str(i): centre.cpu() for i, centre in centres.items()}
        return save_checkpoint(self.output_dir, self.step, self.model, state)

    def load_checkpoint(self) -> bool:
        """Resume from ``output_dir/checkpoints/latest``; False when there is none."""
        found = load_checkpoint(self.output_dir)
        if found is None:
            return False
        folder, routers, state = found
        if state["fingerprint"] != self._fingerprint():
            changed = sorted(k for k in state["fingerprint"] if state["fingerprint"][k] != self._fingerprint().get(k))
            if "world_size" in changed:
                saved = state["fingerprint"]["world_size"]
                raise ValueError(
                    f"cannot resume from {folder}: it was written by a run of {saved} process(es) and this run has "
                    f"{self.world.size}; the data each rank reads depends on the number, so resume with {saved}"
                )
            raise ValueError(
                f"cannot resume from {folder}: the run differs from the checkpoint in {', '.join(changed)}; "
                "use the same data and settings, or a new output directory"
            )
        if "router_centres" in state:  # before the routers: their saved biases are uncentred
            self.model.set_router_centres({int(i): centre for i, centre in state["router_centres"].items()})
        self.model.load_router_state_dict(routers)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.penalty.load_state_dict(state["controller"] or {})
        set_rng_state(state)
        self.step = int(state["step"])
        return True

    # ------------------------------------------------------------------ run

    def _log(self, entry: dict) -> None:
        if not self.world.is_main:
            return
        with open(self.output_dir / LOG_NAME, "a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def _joint_init_step(self, step: dict) -> None:
        """Log each step of a ``joint`` router init as it is taken (and say it, with progress on)."""
        self._log({"step": 0, "router_init_step": step})
        if self.progress and self.world.is_main:
            print(f"router init (joint search): step {step['step']}/{step['of']}: layer {step['layer']}, "
                  f"{step['cost']:.4f} nats/token with those before it ({step['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)

    def centre_routers(self) -> None:
        """Centre every router's input on its mean over the calibration sequences, at the current routing (see
        :mod:`.centring`); the decisions stay the same."""
        examples = self.train_examples[: self.config.calibration_sequences]
        centres = router_input_means(self.model, examples, self.pad_id, self.config.eval_batch_size, self.config.bf16)
        self.model.set_router_centres(centres)
        self._log({"step": 0, "router_centres": {
            "sequences": len(examples), "norm": {str(i): round(float(v.norm()), 4) for i, v in centres.items()}}})

    def fit_cost_routers(self, skipped: list[int]) -> dict:
        """Fit every router to predict its layer's skip cost around the start's ``skipped`` layers (see
        :mod:`.cost_routers`) on the first ``cost_sequences`` training sequences, under the start's routing, and
        calibrate the common level to the target; logged as ``cost_fit``."""
        from ..eval.headroom import skip_costs  # eval.headroom imports the training package

        c = self.config
        started = time.perf_counter()
        examples = self.train_examples[: c.cost_sequences]
        inputs = router_inputs(self.model, examples, self.pad_id, c.eval_batch_size, c.bf16)
        # The costs take most of the time: kept beside the routers, so that a second run fits again without them.
        key = {"tokens": [e.input_ids for e in examples], "layers": sorted(self.model.routers), "around": skipped}
        labels = self.output_dir / COST_LABELS_NAME
        saved = torch.load(labels, weights_only=False) if labels.is_file() else None
        if saved is not None and saved["key"] == key:
            costs = saved["costs"]
        else:
            costs = skip_costs(self.model, examples, self.pad_id, batch_size=c.eval_batch_size, bf16=c.bf16,
                               layers=sorted(self.model.routers), also_skipped=skipped)
            if self.world.is_main:
                torch.save({"key": key, "costs": costs}, labels)
        lengths = torch.tensor([len(e) for e in examples], dtype=torch.float64)
        target = transform_costs(costs.marginal() / lengths[:, None], c.cost_transform, c.cost_floor)
        fit = fit_cost_routers(inputs, target, costs.layers, folds=min(5, len(examples)), seed=c.seed)
        scale = set_cost_routers(self.model, fit)
        calibration = calibrate_capacity(self.model, self.train_examples[: c.calibration_sequences],
                                         c.target_capacity, self.pad_id, c.eval_batch_size, c.bf16)
        report = {**fit.report, "around": skipped, "transform": c.cost_transform, "scale": scale,
                  "calibration": calibration, "seconds": round(time.perf_counter() - started, 1)}
        self._log({"step": 0, "cost_fit": report})
        if self.progress and self.world.is_main:
            r2 = [v["cv_r2"] for v in fit.report["layers"].values() if v["cv_r2"] is not None]
            print(f"cost routers: fitted on {len(examples)} sequences around {skipped}, cross-validated R^2 "
                  f"{min(r2):.2f}..{max(r2):.2f}, capacity {calibration['capacity']:.3f} "
                  f"({report['seconds']:.0f} s)", file=sys.stderr, flush=True)
        return report

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
        init = None
        if resumed_from is None:
            if self.world.is_main:
                (self.output_dir / LOG_NAME).unlink(missing_ok=True)
            if c.router_init != "zero":
                sequences = c.router_init_sequences or c.calibration_sequences
                init = static_init(
                    self.model, c.router_init, self.train_examples[:sequences], self.pad_id,
                    c.target_capacity if c.target_capacity is not None else 0.5, c.router_init_scale,
                    c.eval_batch_size, c.bf16, margin=c.router_init_margin, on_step=self._joint_init_step,
                    ranking=c.router_init_ranking,
                )
                self._log({"step": 0, "router_init": init})
            if c.cost_routers:
                self.fit_cost_routers(init["skipped_layers"])
            if c.centre_router_inputs:
                self.centre_routers()
        bar = None
        if self.progress and self.world.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total_steps, initial=self.step, desc="router-tuning", unit="step", dynamic_ncols=True
            )
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
                        "epoch": self.step * self.micro_per_step / self.batches_per_epoch,
                        "lr": self.scheduler.get_last_lr()[0],
                        **{k: v for k, v in stats.items() if k not in ("tokens", "sequences")},
                        "tokens_per_s": window_tokens / max(window_time, 1e-9),
                    }
                    if isinstance(self.penalty, CapacityController):
                        entry["multiplier"] = self.penalty.integral
                        entry["gate_pressure"] = self.penalty.scale
                    self._log(entry)
                    window_tokens, window_time = 0, 0.0
                if c.eval_every and self.step % c.eval_every == 0 and self.step < self.total_steps:
                    held = self.evaluate_heldout()
                    self._log({"step": self.step, "heldout": held})
                stopping = c.stop_after_steps is not None and self.step >= c.stop_after_steps < self.total_steps
                saving = c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps
                if (saving or stopping) and self.world.is_main:
                    self.save_checkpoint()
                if stopping:
                    self.world.barrier()  # the checkpoint is complete before any rank leaves
                    return {"stopped_at_step": self.step, "last_step": last}
        finally:
            if bar is not None:
                bar.close()
            self.model.set_router_centres(None)  # folded into the biases: the routers are ordinary again
        train_seconds = time.perf_counter() - started
        calibration = None
        if c.mode == "target" and c.calibrate:
            calibration_examples = self.train_examples[: c.calibration_sequences]
            calibration = calibrate_capacity(
                self.model, calibration_examples, c.target_capacity, self.pad_id, c.eval_batch_size, c.bf16
            )
        heldout = self.evaluate_heldout()
        if not self.world.is_main:
            self.world.barrier()  # until the main rank has written the router directory
            return {"steps": self.step, "calibration": calibration, "heldout": heldout, "last_step": last,
                    "router_dir": str(self.output_dir), "rank": self.world.rank}
        self.model.save_pretrained(self.output_dir)
        trainable, total = self.model.get_nb_trainable_parameters()
        summary = {
            "mode": c.mode,
            "target_capacity": c.target_capacity,
            "skip_ratio": self.skip_ratio,
            "l1_lambda": c.l1_lambda,
            "steps": self.step,
            "resumed_from_step": resumed_from,
            "world_size": self.world.size,
            "train_examples": len(self.train_examples),
            "heldout_examples": len(self.heldout_examples),
            "padding_fraction": padding_fraction(
                length_batches(self.lengths, c.batch_size, True, c.seed), self.lengths
            ),
            "last_step": last,
            "router_init": init,
            "calibration": calibration,
            "heldout": heldout,
            "train_seconds": train_seconds,
            "train_tokens_per_s": total_tokens / step_seconds if step_seconds > 0 else None,  # steps only, no evals
            "peak_memory_mib": peak_memory_mib(self.device),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "router_dir": str(self.output_dir),
            "router_file_bytes": (self.output_dir / WEIGHTS_NAME).stat().st_size,
            "mindskip_config": self.model.mindskip_config.to_dict(),
            "config": asdict(c),
        }
        self._log({"step": self.step, "final": True, "calibration": calibration, "heldout": heldout})
        atomic_write_json(self.output_dir / SUMMARY_NAME, summary)
        if not c.keep_checkpoints:
            remove_checkpoints(self.output_dir)
        self.world.barrier()
        return summary
