"""The settings of one Router-Tuning run.

Every field carries its help text (``metadata["help"]``); ``mindskip train`` builds its options from these
fields (see :mod:`mindskip_ext.cli.options`), so a default or a choice is written down once, here. A field's
``metadata`` may also name its command-line ``flag`` (default: ``--field-name``) and mark a boolean that
defaults to True as ``negated`` (the flag turns it off, e.g. ``--no-bf16``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import capacity_for_skip_ratio, default_layers, wide_layers
from .cost_routers import TRANSFORMS
from .penalty import INTEGRAL_LIMIT

SCHEDULES = ("cosine", "linear", "constant")
LOSSES = ("ce", "kd", "ce+kd")
ROUTER_INITS = ("zero", "redundancy", "cost", "joint", "ranking")


@dataclass
class RouterTuningConfig:
    """Settings of one Router-Tuning run. Exactly one of ``target_capacity``, ``skip_ratio`` (a target capacity
    set by the model's layers: :meth:`resolved`) and ``l1_lambda``."""

    target_capacity: float | None = field(
        default=None,
        metadata={"help": "Kept fraction to land on, in (0, 1]: controlled in training, calibrated at the end."},
    )
    skip_ratio: float | None = field(
        default=None,
        metadata={"help": "Share of all attention sublayers to skip, in (0, 1): the target capacity over the router "
                  "layers that gives it (the same speed whatever layers carry routers)."},
    )
    l1_lambda: float | None = field(
        default=None, metadata={"help": "The paper's penalty lambda*mean(keep), with a fixed lambda."}
    )
    loss: str = field(
        default="ce",
        metadata={
            "help": "The task loss: 'ce' (cross-entropy on the labels, the paper's), 'kd' (self-distillation: "
            "KL(teacher || student) with the routers bypassed as the teacher, same weights, no second model) or "
            "'ce+kd' (their sum).",
            "choices": LOSSES,
        },
    )
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KD loss."})
    router_init: str = field(
        default="zero",
        metadata={
            "help": "Router start: 'zero' (the paper's: keeps everything), 'redundancy' (biases from the layers' "
            "Attention-Drop scores: the most redundant layers start skipped, so the initial capacity is near the "
            "target; weights stay zero), 'cost' (the same, ranked by the measured KL of skipping each layer alone "
            "on the calibration sequences: about half a forward per router layer and batch) or 'joint' (a greedy "
            "search: again and again the layer whose skip costs least together with those already chosen; about as "
            "many times the forwards of 'cost' as layers start skipped) or 'ranking' (the layers of "
            "--router-init-ranking, most skippable first: a ranking found before, e.g. a joint search's path in its "
            "train_log.jsonl).",
            "choices": ROUTER_INITS,
        },
    )
    router_init_ranking: list[int] | None = field(
        default=None,
        metadata={"help": "With --router-init ranking: router layers, most skippable first, at least as many as the "
                  "start skips (one more with --router-init-margin)."},
    )
    router_init_scale: float = field(
        default=0.5,
        metadata={"help": "With a static --router-init: how far from the threshold the initial biases are."},
    )
    router_init_margin: bool = field(
        default=False,
        metadata={"help": "With a static --router-init: only the layers the target skips in whole start skipped, and "
                  "the next-ranked layer starts exactly at the threshold, so that training splits it per input "
                  "(a target between whole layers then comes from routing, not from flipping a whole layer)."},
    )
    centre_router_inputs: bool = field(
        default=False,
        metadata={"help": "Train every router on its input less the input's mean over the calibration sequences at "
                  "the start (folded into the bias when saved). Without it the common part of the pooled input "
                  "makes weight steps act like bias steps, and routers stay static or flip whole layers."},
    )
    cost_routers: bool = field(
        default=False,
        metadata={"help": "After a static --router-init, fit every router to predict what skipping its layer "
                  "costs each sequence (the KL from the dense model it adds around the start's skipped layers, per "
                  "processed token; ridge regression on the standardised pooled input, folded into the router), so "
                  "that one common level skips the cheapest (sequence, layer) pairs. About one skip-cost pass over "
                  "--cost-sequences training sequences (half a forward per router layer). Training steps, if any, "
                  "start from the fit."},
    )
    cost_sequences: int = field(
        default=256, metadata={"help": "With --cost-routers: the training sequences the costs are measured on."}
    )
    cost_transform: str = field(
        default="log",
        metadata={"help": "With --cost-routers: the regression target, the per-token cost as it is ('linear') or its "
                  "log ('log', floored at --cost-floor).", "choices": TRANSFORMS},
    )
    cost_floor: float = field(
        default=1e-4, metadata={"help": "With --cost-routers and --cost-transform log: the smallest per-token cost."}
    )
    router_init_sequences: int | None = field(
        default=None,
        metadata={"help": "Training sequences a static --router-init ranks the layers on (default: "
                  "--calibration-sequences)."},
    )
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Peak AdamW learning rate of the routers.", "flag": "--lr"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Share of the steps with a linear learning-rate warmup."}
    )
    schedule: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule after the warmup.", "choices": SCHEDULES}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training data (unless --max-steps)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps; overrides --epochs (0 with --cost-routers: the fit alone)."}
    )
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "Share of the data held out for evaluation (without --heldout-data)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data order, the held-out split and torch."})
    bf16: bool = field(
        default=True,
        metadata={"help": "No bf16 autocast on CUDA (CPU always runs fp32).", "flag": "--no-bf16", "negated": True},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Activation checkpointing of the decoder layers (recomputed in the backward pass): far "
                  "less activation memory for about one more forward per step. Routing is unchanged."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the routers' gradient norm to this."})
    log_every: int = field(default=10, metadata={"help": "Write a training-log line every N steps."})
    eval_every: int = field(default=0, metadata={"help": "Held-out evaluation every N steps (0: at the end only)."})
    save_every: int = field(default=100, metadata={"help": "Router checkpoint every N steps (0: never)."})
    stop_after_steps: int | None = field(
        default=None,
        metadata={"help": "Stop after this many steps with a checkpoint, the run unfinished (for time-limited "
                  "jobs); --resume continues it."},
    )
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep the checkpoints after a finished run."})
    integral_gain: float = field(
        default=0.1, metadata={"help": "Target mode: dual-ascent step of the capacity multiplier."}
    )
    initial_multiplier: float = field(
        default=0.0,
        metadata={"help": "Target mode: the capacity multiplier's start, in units of the task loss's pressure on the "
                  "gates. 0 starts without penalty; about 1 balances the task loss from the first step, which holds a "
                  "start already at the target (--router-init redundancy) instead of letting the task loss pull every "
                  "router to keep first."},
    )
    proportional_gain: float = field(
        default=1.0, metadata={"help": "Target mode: weight of a batch's capacity deviation in the penalty."}
    )
    calibrate: bool = field(
        default=True,
        metadata={"help": "Target mode: no final router-bias calibration.", "flag": "--no-calibrate", "negated": True},
    )
    calibration_sequences: int = field(default=512, metadata={"help": "Training sequences used to calibrate."})
    eval_batch_size: int = field(default=16, metadata={"help": "Sequences per held-out evaluation batch."})

    def __post_init__(self):
        if sum(v is not None for v in (self.target_capacity, self.skip_ratio, self.l1_lambda)) != 1:
            raise ValueError("give exactly one of target_capacity or skip_ratio (target control) and l1_lambda "
                             "(paper's L1 penalty)")
        if self.skip_ratio is not None:
            r = self.skip_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r < 1.0:
                raise ValueError(f"skip_ratio must be in (0, 1), got {r!r}")
        if self.target_capacity is not None:
            t = self.target_capacity
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0 or math.isnan(t):
                raise ValueError(f"target_capacity must be in (0, 1], got {t!r}")
            self.target_capacity = float(t)
        if (self.router_init == "ranking") != (self.router_init_ranking is not None):
            raise ValueError("router_init 'ranking' and router_init_ranking go together: give both or neither")
        if self.router_init_ranking is not None and len(set(self.router_init_ranking)) != len(
                self.router_init_ranking):
            raise ValueError(f"router_init_ranking names a layer twice: {self.router_init_ranking}")
        for name in ("router_init_margin", "cost_routers"):
            if getattr(self, name) and self.router_init == "zero":
                raise ValueError(f"{name} needs a static router_init ('redundancy', 'cost', 'joint' or 'ranking')")
        if self.cost_routers and self.mode != "target":
            raise ValueError("cost_routers needs a target (target_capacity or skip_ratio): the level is calibrated")
        if self.l1_lambda is not None and not self.l1_lambda >= 0.0:
            raise ValueError(f"l1_lambda must be >= 0, got {self.l1_lambda!r}")
        for name, choices in (("schedule", SCHEDULES), ("loss", LOSSES), ("router_init", ROUTER_INITS),
                              ("cost_transform", TRANSFORMS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("kd_temperature", "router_init_scale", "cost_floor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum", "log_every", "eval_batch_size", "calibration_sequences",
                     "cost_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("stop_after_steps", "router_init_sequences"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and (self.max_steps < 0 or self.max_steps == 0 and not self.cost_routers):
            raise ValueError(f"max_steps must be at least 1 (0 only with cost_routers: the fit alone), got "
                             f"{self.max_steps}")
        if not (math.isfinite(self.initial_multiplier) and abs(self.initial_multiplier) <= INTEGRAL_LIMIT):
            raise ValueError(f"initial_multiplier must be in [-{INTEGRAL_LIMIT:g}, {INTEGRAL_LIMIT:g}], "
                             f"got {self.initial_multiplier!r}")
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
        return "l1" if self.l1_lambda is not None else "target"

    def resolved(self, num_layers: int, router_layers: int) -> RouterTuningConfig:
        """This config with a ``skip_ratio`` turned into the ``target_capacity`` that skips it, for routers on
        ``router_layers`` of a model's ``num_layers`` decoder layers (otherwise itself)."""
        if self.skip_ratio is None:
            return self
        capacity = capacity_for_skip_ratio(self.skip_ratio, num_layers, router_layers)
        return dataclasses.replace(self, target_capacity=capacity, skip_ratio=None)

    def resolved_for(self, model) -> RouterTuningConfig:
        """:meth:`resolved` for the layers and routers of ``model`` (a :class:`~mindskip_ext.MindSkipModel`)."""
        return self.resolved(model.config.num_hidden_layers, len(model.routers))


@dataclass(frozen=True)
class Recipe:
    """A named Router-Tuning setup: values for :class:`RouterTuningConfig` fields (the rest keep their defaults;
    settings given explicitly win) and the router layers for a model with a given number of decoder layers.
    ``hybrid``: token routers are trained, and the router directory written routes per token only the layers whose
    decisions vary per token on the held-out set, the others per sequence (``MindSkipConfig.token_layers``)."""

    description: str
    tuning: dict[str, object]
    layers: Callable[[int], list[int]]
    hybrid: bool = False


KD_JOINT = {"loss": "kd", "router_init": "joint", "router_init_margin": True, "router_init_sequences": 32,
            "centre_router_inputs": True, "initial_multiplier": 1.0, "learning_rate": 5e-4}
RECIPES = {
    "paper": Recipe("the paper's: cross-entropy, zero-initialised routers on the last half of the layers but the "
                    "last", {}, default_layers),
    # The best of bench/pareto's first ablation on SmolLM2-135M (bench/results/pareto.md): below static Attention-Drop
    # on WikiText-2 at 12.5%, 25% and 37.5% of all attention sublayers skipped, and far below the paper's recipe; the
    # default of `mindskip train` until kd-joint beat it at all three, and the cheap start (one similarity pass).
    "kd-wide": Recipe(
        "self-distillation, routers on every layer but the first eighth and the last, initialised from the "
        "Attention-Drop redundancy and held there by the capacity multiplier from the first step, lr 5e-4",
        {"loss": "kd", "router_init": "redundancy", "initial_multiplier": 1.0, "learning_rate": 5e-4},
        wide_layers,
    ),
    # The default of `mindskip train` before the hybrid: the best at 12.5%, 25% and 37.5% on SmolLM2-135M
    # (bench/results/pareto.md): WikiText-2 24.39, 29.32 and 44.67 (kd-wide: 25.06, 33.62, 60.42), 0.052, 0.110 and
    # 0.412 nats below Attention-Drop (kd-wide: 0.038, 0.052, 0.093). Its start costs about a layer-cost pass per
    # layer that starts skipped (minutes per search step on a CPU for a real model); `mindskip demo` searches on few
    # sequences.
    "kd-joint": Recipe(
        "kd-wide's, started from the greedy joint-cost search with the next-ranked layer at the threshold "
        "(--router-init joint --router-init-margin, on 32 sequences: about as many times the forwards of one "
        "layer-cost pass as layers start skipped) and centred router inputs",
        KD_JOINT,
        wide_layers,
    ),
    # The default of `mindskip train` (DEFAULT_RECIPE): kd-joint's training on token routers, written as the
    # hybrid. On the multi-domain suite (SmolLM2-135M, docs/routing-quality.md) 3.1% and 3.8% below its own static
    # projection at 25% and 37.5% of the attention skipped, where kd-joint's routers are within noise of theirs;
    # 3.3% / 3.0% below kd-joint's projection (the best static drop found), and equal to (25%) or 1.9% below
    # (37.5%) kd-joint's routers, with about their KV cache.
    "hybrid": Recipe(
        "kd-joint's, training token routers; the router directory routes per token only the layers whose "
        "decisions vary per token on the held-out set (--routing token, then token_layers), the others per "
        "sequence with no KV cache for a skipped sequence",
        KD_JOINT,
        wide_layers,
        hybrid=True,
    ),
}
# What `mindskip train` runs without --recipe.
DEFAULT_RECIPE = "hybrid"
