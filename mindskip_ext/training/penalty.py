"""The capacity penalty of Router-Tuning: the paper's fixed lambda, or a controller that holds a target.

``l1`` (the paper's): ``lambda * c`` with a fixed ``lambda``. Where training lands depends on ``lambda``,
the learning rate and the number of steps.

``target`` (``target_capacity=t``): the capacity is held at ``t`` by a PI controller acting on the penalty
coefficient, i.e. an augmented Lagrangian for the constraint ``c = t`` whose multiplier is updated by dual
ascent (as in CoFi / Sheared-LLaMA's target-sparsity training)::

    penalty gradient per gate = s * (mu + kp * (c_batch - t)) / (layers * sequences)
    mu <- clip(mu + ki * (c_step - t))            after every optimizer step

``mu`` is dimensionless because ``s`` is a running measure of the task loss's own pressure on the gates
(the mean |dCE/dgate|, read off the gates' gradients in the same backward pass). One pair of gains therefore
works for any model, dataset and learning rate: ``mu + kp*(c-t) = 1`` means the capacity penalty pushes a
gate as hard as the task loss typically does. ``mu`` starts at 0 (no penalty while the paper's zero init keeps
everything) or where it is given: about 1 holds a start that is already at the target (the redundancy init)
instead of letting the task loss pull every gate to "keep" while the multiplier builds up. ``mu`` may go
negative, which raises the capacity when it is below target (needed with the kept-only variant, where a
skipped sequence gets no task-loss gradient to bring it back).

Both penalties have the same interface: ``coefficient(c)`` for the loss, ``observe(stats, all_sequences)``
after each backward, ``end_step(c)`` after each optimizer step, ``value(c)`` for the log, and a state dict.
"""

from __future__ import annotations

import math

import torch

INTEGRAL_LIMIT = 20.0
SCALE_EMA = 0.9


class FixedPenalty:
    """The paper's ``lambda * c``."""

    reads_gate_gradients = False

    def __init__(self, l1_lambda: float):
        self.l1_lambda = l1_lambda

    def coefficient(self, capacity: float) -> float:
        return self.l1_lambda

    def value(self, capacity: float) -> float:
        return self.l1_lambda * capacity

    def observe(self, stats, all_sequences: bool) -> None:
        pass

    def end_step(self, capacity: float, reduce=None) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _clip(multiplier: float) -> float:
    return min(INTEGRAL_LIMIT, max(-INTEGRAL_LIMIT, multiplier))


class CapacityController:
    """PI control of the capacity-penalty coefficient, in units of the task loss's gate pressure."""

    reads_gate_gradients = True

    def __init__(self, target: float, integral_gain: float, proportional_gain: float, initial: float = 0.0):
        self.target = target
        self.ki = integral_gain
        self.kp = proportional_gain
        self.integral = _clip(initial)
        self.scale: float | None = None
        self._samples: list[float] = []

    def coefficient(self, capacity: float) -> float:
        """The penalty coefficient for a batch at ``capacity`` (0 until the scale is measured)."""
        if self.scale is None:
            return 0.0
        return self.scale * (self.integral + self.kp * (capacity - self.target))

    def value(self, capacity: float) -> float:
        """The augmented Lagrangian's value ``s*(mu*(c-t) + kp/2*(c-t)^2)``."""
        if self.scale is None:
            return 0.0
        gap = capacity - self.target
        return self.scale * (self.integral * gap + 0.5 * self.kp * gap * gap)

    def observe(self, stats, all_sequences: bool) -> None:
        """Sample the task loss's pressure on the gates: their gradient minus the (known) penalty part.

        With kept-only training a skipped sequence has no task gradient, so only kept ones count.
        """
        grads, counted = [], []
        for idx in sorted(stats.gates):
            routing = stats.record.layers[idx]
            grads.append(routing.units(stats.gates[idx].grad) - stats.per_gate)
            everyone = torch.ones_like(grads[-1], dtype=torch.bool)
            counted.append(everyone if all_sequences else routing.units(routing.keep))
        grads, counted = torch.stack(grads), torch.stack(counted)
        if counted.any():
            # Per gate the loss divides by (layers * sequences of the step); undo that to get dCE/dgate.
            self._samples.append(float(grads.abs()[counted].mean()) * grads.shape[0] * stats.sequences)

    def observe_scale(self, value: float) -> None:
        if not math.isfinite(value) or value <= 0.0:
            return
        self.scale = value if self.scale is None else SCALE_EMA * self.scale + (1.0 - SCALE_EMA) * value

    def step(self, capacity: float) -> None:
        """Dual ascent of the multiplier on a step's capacity."""
        self.integral = _clip(self.integral + self.ki * (capacity - self.target))

    def end_step(self, capacity: float, reduce=None) -> None:
        """After an optimizer step: fold the step's gate-pressure samples into the scale, then :meth:`step`.

        ``reduce(total, count) -> (total, count)`` sums the samples over the training processes, so that every
        rank applies the same scale (:meth:`~mindskip_ext.training.distributed.World.sum`).
        """
        total, count = sum(self._samples), len(self._samples)
        if reduce is not None:
            total, count = reduce(total, count)
        if count:
            self.observe_scale(total / count)
        self._samples = []
        self.step(capacity)

    def state_dict(self) -> dict:
        return {"integral": self.integral, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.integral, self.scale = float(state["integral"]), state["scale"]
