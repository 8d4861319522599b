"""Router-Tuning: train only the MindSkip routers of a frozen model.

* :func:`router_tuning_loss` (:mod:`.loss`): the loss of one micro-batch, ``CE + capacity penalty``;
* :class:`CapacityController` / :class:`FixedPenalty` (:mod:`.penalty`): the penalty's coefficient;
* :func:`calibrate_capacity` (:mod:`.calibration`): the final common router-bias shift onto the target;
* :func:`router_input_means` (:mod:`.centring`): each router's mean pooled input, to centre it on
  (``centre_router_inputs``);
* :class:`RouterTuner` / :func:`fit` (:mod:`.fit`): a whole run, with checkpoints, log and summary.
"""

from __future__ import annotations

from .calibration import calibrate_capacity
from .centring import router_input_means
from .config import RECIPES, Recipe, RouterTuningConfig
from .fit import LOG_NAME, SUMMARY_NAME, RouterTuner
from .loss import LossStats, router_tuning_loss
from .penalty import CapacityController, FixedPenalty

__all__ = [
    "LOG_NAME",
    "SUMMARY_NAME",
    "CapacityController",
    "FixedPenalty",
    "LossStats",
    "RECIPES",
    "Recipe",
    "RouterTuner",
    "RouterTuningConfig",
    "calibrate_capacity",
    "fit",
    "router_input_means",
    "router_tuning_loss",
]


def fit(model, train_examples, heldout_examples, config: RouterTuningConfig, output_dir, pad_id: int,
        progress: bool = True, resume: bool = False) -> dict:
    """Router-tune ``model`` and save its routers to ``output_dir``; returns the run's summary."""
    return RouterTuner(model, train_examples, heldout_examples, config, output_dir, pad_id, progress).train(resume)
