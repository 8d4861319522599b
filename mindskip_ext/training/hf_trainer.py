"""Router-Tuning with ``transformers.Trainer``, for pipelines built on it (DeepSpeed, FSDP and DDP come with it).

    trainer = RouterTuningTrainer(
        model=get_mindskip_model(base), tuning=RouterTuningConfig(target_capacity=0.5, loss="kd"),
        args=TrainingArguments(output_dir="routers", remove_unused_columns=False, ...),
        train_dataset=train_examples, data_collator=example_collator(pad_id),
    )
    trainer.train()
    trainer.calibrate(train_examples[:512], pad_id)      # the final common router-bias shift (target mode)
    trainer.save_model("routers")                          # the router directory, a few KB

The loss is :func:`~mindskip_ext.training.router_tuning_loss`, the same code ``mindskip train`` runs. Trainer
hands it ``num_items_in_batch``, the supervised tokens of the whole optimizer step (over the devices too), so
each micro-batch is normalised like :class:`~mindskip_ext.training.RouterTuner` does and Trainer does not
divide again. Under data parallelism the loss is multiplied by the number of processes, as Trainer's own
``compute_loss`` does, because DDP averages the gradients. The capacity penalty lives in a
:class:`RouterTuningCallback`: it reads the gates' gradients after each backward and folds the step into the
controller after each optimizer step, summing over the processes so that every rank applies the same
coefficient. Keep ``train_all_sequences`` (the default) under DDP: with ``--kept-only`` a router may get no
gradient in a step, which DDP accepts only with ``ddp_find_unused_parameters=True``. The static router starts
and centred router inputs are :class:`~mindskip_ext.training.RouterTuner`'s: the trainer refuses them (call
:func:`~mindskip_ext.training.init.static_init` on the model before building it instead of ``router_init``).
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from ..data import collate
from ..layer import CapacityMeter
from .calibration import calibrate_capacity
from .config import RouterTuningConfig
from .distributed import current
from .fit import make_penalty
from .loss import router_tuning_loss, routing_units


def example_collator(pad_id: int):
    """A ``data_collator`` for a dataset of :class:`~mindskip_ext.data.Example`: padded, masked batches."""
    return lambda examples: collate(examples, pad_id)


class RouterTuningCallback(TrainerCallback):
    """The capacity controller's bookkeeping around Trainer's steps (see the module docstring)."""

    def __init__(self, penalty, all_sequences: bool):
        self.penalty = penalty
        self.all_sequences = all_sequences
        self.meter = CapacityMeter()
        self.history: list[float] = []  # the capacity of every optimizer step

    def observe(self, stats) -> None:
        self.penalty.observe(stats, self.all_sequences)
        self.meter.add(stats.record)

    def on_step_end(self, args, state, control, **kwargs):
        world, layers = current(), sorted(self.meter.total)
        device = next(iter(kwargs["model"].parameters())).device
        counts = world.sum([*(self.meter.kept[i] for i in layers), *(self.meter.total[i] for i in layers)], device)
        kept, total = sum(counts[: len(layers)]), sum(counts[len(layers) :])
        capacity = kept / total if total else 1.0
        self.penalty.end_step(capacity, reduce=lambda t, c: world.sum([t, c], device))
        self.history.append(capacity)
        self.meter = CapacityMeter()


class RouterTuningTrainer(Trainer):
    """``transformers.Trainer`` with the Router-Tuning loss; only the routers train."""

    def __init__(self, *args, tuning: RouterTuningConfig, **kwargs):
        if tuning.centre_router_inputs:
            raise ValueError("centre_router_inputs is run by RouterTuner (mindskip train), not by "
                             "RouterTuningTrainer: its checkpoints do not carry the centres")
        if tuning.router_init != "zero":
            raise ValueError(f"RouterTuningTrainer does not run router_init={tuning.router_init!r}: start the routers "
                             "with mindskip_ext.training.init.static_init(model, ...) before building the trainer, "
                             "and give router_init='zero'")
        super().__init__(*args, **kwargs)
        self.tuning = tuning = tuning.resolved_for(self.model)
        self.routing = RouterTuningCallback(make_penalty(tuning), self.model.mindskip_config.train_all_sequences)
        self.add_callback(self.routing)
        self.model_accepts_loss_kwargs = True  # the loss below is normalised by num_items_in_batch itself
        self._stats = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is None:
            raise ValueError("Router-Tuning needs Trainer's num_items_in_batch: give batches with 'labels'")
        processes = self.accelerator.num_processes
        # The step's routing units, from this micro-batch's (exact for sequences when the micro-batches are equal).
        sequences = routing_units(model, inputs) * self.current_gradient_accumulation_steps * processes
        loss, stats = router_tuning_loss(
            model, inputs, self.routing.penalty, targets=int(num_items_in_batch), sequences=sequences,
            bf16=False, loss=self.tuning.loss, kd_temperature=self.tuning.kd_temperature,
        )
        self._stats.append(stats)
        # DDP averages gradients: scale back to the sum over processes, as Trainer's own compute_loss does.
        loss = loss * processes
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The backward pass has run: the gates' gradients are there.
        processes = self.accelerator.num_processes
        for stats in self._stats:
            if processes > 1:  # the loss was scaled by the process count, and so were the gates' gradients
                for gate in stats.gates.values():
                    gate.grad = gate.grad / processes
            self.routing.observe(stats)
        self._stats = []
        return loss

    def calibrate(self, examples, pad_id: int, batch_size: int = 16) -> dict | None:
        """The final common router-bias shift onto the target capacity (target mode); None in L1 mode."""
        if self.tuning.target_capacity is None or not self.tuning.calibrate:
            return None
        return calibrate_capacity(self.model, examples, self.tuning.target_capacity, pad_id, batch_size)

    def _save(self, output_dir=None, state_dict=None):
        """Checkpoints and ``save_model`` write the router directory only (a few KB), not the frozen model."""
        self.model.save_pretrained(output_dir or self.args.output_dir)
