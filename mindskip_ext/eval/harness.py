"""Stock lm-eval (``lm_eval``) tasks on a MindSkip model, with the capacity of each task next to its scores.

:class:`MindSkipLM` is lm-eval's own ``HFLM`` given the converted model instance. It adds two things:

* **capacity per task**: a forward pre-hook hands every forward a fresh routing record, a forward
  hook adds the records that made decisions (no-cache forwards and generation prefills) to the
  meter of the task being run; requests are run task by task for that;
* **exact routing under batching**: ``HFLM`` right-pads log-likelihood batches and passes no
  attention mask, so a router would average over padding and a sequence's routing would depend
  on its batch. Log-likelihood requests are therefore batched only with requests of the same
  length (no padding at all); every score and decision equals the unbatched one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from lm_eval.models.huggingface import HFLM

from ..layer import CapacityMeter, RoutingRecord
from ..model import RECORD_KWARG, MindSkipModel

# The paper's evaluation: task -> number of few-shot examples.
PAPER_TASKS: tuple[tuple[str, int], ...] = (
    ("boolq", 0),
    ("rte", 0),
    ("openbookqa", 0),
    ("piqa", 0),
    ("mmlu", 5),
    ("winogrande", 5),
    ("gsm8k", 5),
    ("hellaswag", 10),
    ("arc_challenge", 25),
)
HEADLINE_METRICS = ("acc_norm", "acc", "exact_match", "perplexity", "word_perplexity")


def parse_tasks(spec: str | Sequence[str], num_fewshot: int | None = None) -> list[tuple[str, int | None]]:
    """Task list from ``"paper"``, ``"piqa,boolq"`` or ``"mmlu:5,piqa:0"`` (``name:shots``).

    Tasks without ``:shots`` get ``num_fewshot`` (None: the task's own default).
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    tasks: list[tuple[str, int | None]] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item == "paper":
            tasks.extend(PAPER_TASKS)
            continue
        name, _, shots = item.partition(":")
        if shots and not shots.isdigit():
            raise ValueError(f"bad task {item!r}: write NAME or NAME:SHOTS with SHOTS a whole number")
        tasks.append((name, int(shots) if shots else num_fewshot))
    if not tasks:
        raise ValueError("no task given")
    return tasks


class MindSkipLM(HFLM):
    """lm-eval's ``HFLM`` on a (MindSkip) model instance; ``meters`` holds the capacity per task."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None, **kwargs):
        self.mindskip = model if isinstance(model, MindSkipModel) else None
        hf_model = model.base_model if self.mindskip is not None else model
        super().__init__(
            pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, **kwargs
        )
        self.meters: dict[str, CapacityMeter] = defaultdict(CapacityMeter)
        self._task: str | None = None
        self._hooks = []
        if self.mindskip is not None:
            self._hooks = [
                hf_model.register_forward_pre_hook(self._give_record, with_kwargs=True),
                hf_model.register_forward_hook(self._take_record, with_kwargs=True),
            ]

    def close(self) -> None:
        """Remove the hooks from the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _give_record(self, module, args, kwargs):
        kwargs[RECORD_KWARG] = RoutingRecord()
        return args, kwargs

    def _take_record(self, module, args, kwargs, output):
        record = kwargs.get(RECORD_KWARG)
        if record is not None and record.layers:
            self.meters[self._task or ""].add(record)

    def _by_task(self, method, requests, **kwargs):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[request.task_name or ""].append(i)
        results = [None] * len(requests)
        try:
            for task, index in groups.items():
                self._task = task
                for i, out in zip(index, method([requests[i] for i in index], **kwargs)):
                    results[i] = out
        finally:
            self._task = None
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._by_task(super().loglikelihood, requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._by_task(super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._by_task(super().generate_until, requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.mindskip is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # Same input length (HFLM feeds (context + continuation)[-(max_length + 1):][:-1]) -> no padding.
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            by_length[min(len(context) + len(continuation), self.max_length + 1) - 1].append(i)
        results = [None] * len(requests)
        for index in by_length.values():
            outs = super()._loglikelihood_tokens(
                [requests[i] for i in index], disable_tqdm=True, override_bs=override_bs
            )
            for i, out in zip(index, outs):
                results[i] = out
        return results


def _headline(metrics: dict) -> tuple[str, float] | None:
    for name in HEADLINE_METRICS:
        for key, value in metrics.items():
            if key.split(",")[0] == name and isinstance(value, (int, float)):
                return key, value
    return None


def run_lm_eval(
    model,
    tokenizer,
    tasks: Iterable[tuple[str, int | None]],
    batch_size: int = 8,
    limit: int | float | None = None,
    include_path: str | None = None,
    include_defaults: bool = True,
    max_length: int | None = None,
    seed: int = 0,
) -> dict:
    """Run lm-eval tasks; one ``simple_evaluate`` call per few-shot setting.

    Returns ``{"tasks": {name: {"metrics": {...}, "num_fewshot": n, "capacity": ..., "capacity_per_layer":
    {...}, "skipped_layers_per_sequence": ...}}}``; groups (e.g. ``mmlu``) get the capacity of all their
    subtasks together.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    by_shots: dict[int | None, list[str]] = defaultdict(list)
    for name, shots in tasks:
        by_shots[shots].append(name)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    lm = MindSkipLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
    report: dict[str, dict] = {}
    try:
        for shots, names in by_shots.items():
            out = simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=shots,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            subtasks = out.get("group_subtasks", {})
            for name, metrics in out["results"].items():
                meter = CapacityMeter()
                for member in [name, *_members(name, subtasks)]:
                    if member in lm.meters:
                        meter.merge(lm.meters[member])
                entry = {
                    "metrics": {k: v for k, v in metrics.items() if k not in ("alias", "name")},
                    "num_fewshot": out.get("n-shot", {}).get(name, shots),
                    **meter.summary(),
                }
                headline = _headline(metrics)
                if headline is not None:
                    entry["metric"], entry["score"] = headline
                report[name] = entry
    finally:
        lm.close()
    return {"tasks": report}


def _members(name: str, subtasks: dict[str, list[str]]) -> list[str]:
    out = []
    for child in subtasks.get(name, []):
        out.append(child)
        out.extend(_members(child, subtasks))
    return out
