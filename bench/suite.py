"""Does per-input routing do work? Router-tuned models against their own static projection, their shuffled decisions,
the per-sequence oracle and Attention-Drop, per domain on the multi-domain suite (issue 34).

    python -m bench.suite --ratios 0.25 --threads 1 --resume        # the default recipe's routers at 25%
    python -m bench.suite --smoke                                   # a tiny model: checks every step in a minute

The suite (:mod:`mindskip_ext.data.suite`, ``mindskip eval --suite-dir``): WikiText-2 test (prose), the Alpaca
held-out split the Pareto recipes hold out (instructions), GSM8K test (math, question and worked answer, scored on
the answer) and held-out Python files (code), ``--sequences`` per domain of at most ``--length`` tokens. Every model
is scored on the same sequences, so two models compare by their per-sequence loss differences (a paired standard
error: :func:`mindskip_ext.eval.suite.paired`).

Per recipe (its routers from ``bench.pareto``'s results and router folder,
``<output>/pareto_routers/default/<recipe>@<ratio>``, or trained now into that folder with ``bench.pareto``'s data,
sizes and settings) and ratio:

* the routed model, with its skipped attention sublayers per token on each domain;
* its static projection (the layers it keeps least on its training data always skipped, as ``bench.pareto`` ranks
  them) at the whole layer counts around its skips on every domain, so that each domain compares at the routed
  model's own count (linear in each sequence's loss between counts) and the mix at the mix's count (the same
  compute);
* its decisions shuffled: each layer's decisions permuted over the suite's sequences (the same kept fractions,
  independent of the input);
* Attention-Drop over all layers and over the paper's layers 14..28, its similarity scores calibrated on the
  recipe's own training data, at the same whole counts (the better scope per domain and count);
* with ``--costs``: the toggle costs of every router layer around the projection at the mix's whole count
  (:func:`mindskip_ext.eval.headroom.skip_costs`, about 15 forwards of the suite, cached in ``--work-dir``), from
  which the first-order headroom per domain (best static drop, per-sequence oracle, routers, shuffled), and the
  choices of the oracle and of cross-fitted linear cost predictors (the best a ``Linear(hidden, 1)`` router fitted
  to these costs does on sequences it was not fitted on) scored like any model.

Token routers (issue 37: ``--token-routers DIR``, trained with the recipe of ``--recipes`` at ``--ratios``, e.g. by
:mod:`bench.token_quality`) are scored instead of the recipes' sequence routers, on the same sequences: the token
model (skips per token: each routed layer's skipped share of the real tokens), its static projection (each layer's
kept fraction on the recipe's training sequences as input-independent decisions,
:func:`mindskip_ext.token_routing.set_static_token_fractions`), its kept fractions on the suite as input-independent
decisions (the token level's shuffled decisions: permuting per-token decisions over the suite is, in expectation,
keeping each layer's fraction at random), Attention-Drop at the whole counts around its skips, and the sequence
variant's static projection at those counts when the sequence variant is among the results: reuse another run's with
``--resume-from bench/results/suite.json`` and write to another ``--output``, e.g.::

    python -m bench.suite --threads 1 --token-routers bench/results/token_routers/default/token@0.25 \
        --resume-from bench/results/suite.json --output bench/results/suite_token

Resumable (``--resume``: the models in ``<output>/suite.partial.json``, else ``suite.json``); writes ``suite.json``
(every model's per-domain summary and per-sequence scores) and ``suite.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import RESULTS_DIR
from .experiment import DEFAULT_DATA_DIR, Run, check_data_and_model, load_model, skip_ratios, start_run

DEFAULT_RECIPE = "kd+joint+wide+hold+slow+mix+margin+centre"
DEFAULT_WORK_DIR = Path.home() / ".cache" / "mindskip_ext" / "suite-work"
DROP_SCOPES = ("all", "restricted")
# With --costs, the routings of :func:`first_order_bounds` also scored on the suite (their actual perplexity), by
# the kind of their result: the per-sequence oracle (one common level, and the same count for every sequence), and
# the cost predictions of a Linear(hidden, 1) router fitted on other sequences (the log of the per-token cost, as the
# cost-supervised routers fit it).
SCORED_BOUNDS = {"oracle": "oracle", "fixed-count oracle": "oracle, fixed count", "linear predictor": "linear (log)"}


@dataclass(frozen=True)
class Sizes:
    sequences: int  # per domain
    length: int  # tokens per sequence at most (text: exactly)
    drop_records: int  # training sequences of Attention-Drop's similarity scores
    batch_size: int
    seed: int = 0


PRESETS = {
    "default": Sizes(sequences=32, length=256, drop_records=128, batch_size=8),
    "smoke": Sizes(sequences=4, length=160, drop_records=16, batch_size=8),
}


def cached(path: Path, key, compute) -> dict:
    """``compute()`` (a dict) with ``key``, saved at ``path``; read back from there while ``key`` is the same."""
    saved = torch.load(path, weights_only=False) if path.is_file() else None
    if saved is None or saved["key"] != key:
        saved = {**compute(), "key": key}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, path)
    return saved


def counts_for(summary: dict) -> list[int]:
    """The whole layer counts around the skips per token of every domain and the mix."""
    counts = set()
    for s in summary.values():
        counts.update((math.floor(s["skipped_per_token"]), math.ceil(s["skipped_per_token"])))
    return sorted(counts)


def projection_order(routing_train: dict) -> list[int]:
    """The router layers from least to most kept on the training data (ties: the later layer first), as
    ``bench.pareto`` ranks the static projection."""
    layers = routing_train["layers"]
    return [int(i) for i in sorted(layers, key=lambda i: (layers[i]["kept"], -int(i)))]


def encode_keep(decisions: dict[int, torch.Tensor]) -> dict[str, str]:
    return {str(i): "".join("1" if k else "0" for k in keep.tolist()) for i, keep in decisions.items()}


def decode_keep(encoded: dict[str, str]) -> dict[int, torch.Tensor]:
    return {int(i): torch.tensor([c == "1" for c in bits]) for i, bits in encoded.items()}


def shuffled(decisions: dict[int, torch.Tensor], seed: int) -> dict[int, torch.Tensor]:
    """Each layer's decisions permuted over the sequences (seeded per layer)."""
    out = {}
    for i, keep in decisions.items():
        order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed * 1000 + i))
        out[i] = keep[order]
    return out


def pareto_entry(output: Path, name: str) -> dict | None:
    """The ``bench.pareto`` result of router model ``name``, if it has one with its training-data routing (which
    ranks the projection)."""
    for file in ("pareto.partial.json", "pareto.json"):
        path = output / file
        if path.is_file():
            models = json.loads(path.read_text())["models"]
            if name in models and "routing_train" in models[name]:
                return models[name]
    return None


def routers_of(run: Run, args, base, tokenizer, recipe_name: str, ratio: float, data):
    """The routed model of ``recipe_name`` at ``ratio`` and its training entry (``routing_train`` among it): from
    ``bench.pareto``'s results or this run's own (resumed) and the router folder, else trained now into that folder
    by ``bench.pareto``'s code (the same data, sizes and settings as its ablation; a training cut off goes on from
    its checkpoint). ``data()`` gives ``bench.pareto``'s training data."""
    import mindskip_ext as msk

    from . import pareto

    name = f"{recipe_name}@{ratio}"
    folder = args.output / pareto.router_folder(args.router_preset, name)
    entry = pareto_entry(args.output, name)
    if entry is None and "routing_train" in run.models.get(name, {}):
        entry = run.models[name]
    if entry is not None and folder.is_dir():
        return msk.MindSkipModel.from_pretrained(base, folder), entry
    trainer = Run("pareto", args.router_preset, pareto.PRESETS[args.router_preset], timings=run.timings)
    return pareto.train_recipe(trainer, name, base, tokenizer, pareto.RECIPES[recipe_name], ratio, data(),
                               args.output)


def run_suite(args) -> Run:
    from mindskip_ext.data import pad_token_id
    from mindskip_ext.data.suite import DEFAULT_DOMAINS, load_suite
    from mindskip_ext.eval.attention_drop import dropped_model, redundancy_scores, select_dropped
    from mindskip_ext.eval.suite import domain_rows, kept_fractions, score_sequences, summarise

    from . import pareto

    sizes = PRESETS[args.preset]
    run = start_run("suite", args, sizes, "suite", ratios=list(args.ratios), recipes=list(args.recipes),
                    router_preset=args.router_preset)
    started = time.perf_counter()
    with run.stage("load model and data"):
        base, tokenizer, label = load_model(args.smoke, args.model, args.data_dir, sizes.seed)
        suite = load_suite(DEFAULT_DOMAINS, tokenizer, sizes.length, sizes.sequences, sizes.seed, args.data_dir)
        examples, owner = suite.examples()
    pad = pad_token_id(tokenizer)
    num_layers = base.config.num_hidden_layers
    run.meta.update(model=label, num_layers=num_layers, suite=suite.stats, owner=owner)
    if args.resume:
        run.resume(finished=args.output / "suite.json")

    if args.resume_from:
        reuse(run, args.resume_from, owner, [len(e) for e in examples])

    def score(name: str, entry: dict, model, decisions=None) -> dict:
        """Score ``model`` on the suite as ``name`` unless it was (``decisions``: forced per-sequence routing)."""
        if name in run.models:
            return run.models[name]
        with run.stage(f"evaluate {name}"):
            scores, taken = score_sequences(model, examples, pad, sizes.batch_size, decisions=decisions)
        summary = summarise(scores, owner)
        entry = {**entry, "summary": summary, "scores": scores.to_dict(), "eval_seconds": run.timings[
            f"evaluate {name}"]}
        if taken and decisions is None and entry["kind"] == "routed":
            entry["decisions"] = encode_keep(taken)
        if taken and entry["kind"].startswith("token"):
            entry["kept"] = {domain: {str(i): round(f, 6) for i, f in kept_fractions(
                {i: t[rows] for i, t in taken.items()}, scores.tokens[rows]).items()}
                for domain, rows in domain_rows(owner).items()}
        run.models[name] = entry
        run.save_partial()
        run.say(f"{name}: mix perplexity {summary['mix']['perplexity']:.3f} at "
                f"{summary['mix']['skipped_per_token']:.2f} skips per token")
        return entry

    score("dense", {"kind": "dense"}, base)
    loaded = {}

    def data():
        if "data" not in loaded:
            with run.stage("load training data"):
                loaded["data"] = pareto.load_data(args, pareto.PRESETS[args.router_preset], tokenizer)
        return loaded["data"]

    drop_scores: dict[str, dict[int, float]] = {}

    def projection(recipe_name: str, ratio: float, name: str, order: list[int], counts: list[int]) -> None:
        """The static projection of routed model ``name`` (``order``: its layers from least kept) at ``counts``."""
        for count in counts:
            dropped = sorted(order[:count])
            model = dropped_model(base, dropped, "attn") if dropped else base
            score(f"{recipe_name}-static@{ratio}/{count}", {"kind": "static-projection", "of": name,
                                                           "ratio": ratio, "count": count,
                                                           "dropped_layers": dropped}, model)
            if dropped:
                model.unload()

    def attention_drops(recipe_data: str, counts: list[int]) -> None:
        """Attention-Drop in both scopes at ``counts``, its similarity scores calibrated on ``recipe_data``."""
        if recipe_data not in drop_scores:
            records = data().train[recipe_data][: sizes.drop_records]

            def similarity(records=records, stage=f"attention-drop scores on {recipe_data}"):
                with run.stage(stage):
                    return {"scores": redundancy_scores(base, records, pad, "attn", sizes.batch_size)}

            drop_scores[recipe_data] = cached(args.work_dir / args.preset / f"attention_drop_{recipe_data}.pt",
                                              [e.input_ids for e in records], similarity)["scores"]
            run.meta.setdefault("attention_drop_similarity", {})[recipe_data] = {
                str(k): round(v, 6) for k, v in drop_scores[recipe_data].items()}
        scopes = {"all": list(range(num_layers)), "restricted": pareto.layer_sets(num_layers)["paper"]}
        for scope, candidates in scopes.items():
            for count in counts:
                if not 1 <= count <= len(candidates):
                    continue
                dropped = select_dropped(drop_scores[recipe_data], count, candidates)
                model = dropped_model(base, dropped, "attn")
                score(f"attention-drop-{scope}[{recipe_data}]@{count}",
                      {"kind": "attention-drop", "scope": scope, "data": recipe_data, "count": count,
                       "dropped_layers": dropped}, model)
                model.unload()

    if args.token_routers is not None:
        token_model(run, args, base, pad, data, score, projection, attention_drops)
        run.timings["total"] = round(time.perf_counter() - started, 1)
        return run
    for recipe_name in args.recipes:
        recipe = pareto.RECIPES[recipe_name]
        for ratio in args.ratios:
            name = f"{recipe_name}@{ratio}"
            model, trained = routers_of(run, args, base, tokenizer, recipe_name, ratio, data)
            routed = score(name, {"kind": "routed", "recipe": recipe_name, "ratio": ratio,
                                  "router_dir": trained["router_dir"], "routing_train": trained["routing_train"],
                                  **({"cost_fit": trained["cost_fit"]} if "cost_fit" in trained else {})}, model)
            decisions = decode_keep(routed["decisions"])
            score(f"{name} shuffled", {"kind": "shuffled", "of": name, "ratio": ratio}, model,
                  shuffled(decisions, sizes.seed))
            model.unload()
            counts = counts_for(routed["summary"])
            routed.setdefault("routing_train", trained["routing_train"])  # results scored before it was kept
            order = projection_order(routed["routing_train"])
            projection(recipe_name, ratio, name, order, counts)
            attention_drops(recipe.data, counts)
            if args.costs:
                headroom_of(run, args, base, examples, owner, pad, name, routed, order, score)
    run.timings["total"] = round(time.perf_counter() - started, 1)
    return run


def reuse(run: Run, path: Path, owner: list[str], lengths: list[int]) -> None:
    """Take the models of another suite run's results at ``path`` (``--resume-from``) that this run has not scored:
    they must be of the same suite (the same domains and token counts, sequence by sequence)."""
    from .experiment import read_results

    models, timings = read_results(path, "--resume-from", "suite", run.preset)
    saved = json.loads(path.read_text()).get("meta", {})
    if saved.get("owner") != owner:
        raise SystemExit(f"--resume-from: {path} scored another suite (its sequences' domains differ from this one's)")
    other = [name for name, e in models.items() if e["scores"]["tokens"] != lengths]
    if other:
        raise SystemExit(f"--resume-from: {path} scored {other[0]!r} on other sequences (their token counts differ)")
    new = {k: v for k, v in models.items() if k not in run.models}
    run.models.update(new)
    run.timings.update({k: v for k, v in timings.items() if k.startswith("evaluate ") and k not in run.timings})
    run.meta["reused"] = {"from": str(path), "models": sorted(new)}
    run.say(f"reused {len(new)} models from {path}")


def token_model(run: Run, args, base, pad: int, data, score, projection, attention_drops) -> None:
    """Token routers (``--token-routers``, trained with the recipe of ``--recipes`` at ``--ratios``, e.g. by
    :mod:`bench.token_quality`) on the suite: the routed model; its static projection (each layer's kept fraction of
    the recipe's training sequences, as input-independent decisions); its suite fractions as input-independent
    decisions (the token level's shuffled decisions); the same routers with only the layers that vary on the training
    sequences per token and the others per sequence (``MindSkipConfig.token_layers``, ``varying_layers``: where a
    skipped sequence stores no KV cache); Attention-Drop at the whole counts around its skips; and, when the sequence
    variant of the same recipe and ratio is among the results (``--resume-from``), its static projection at those
    counts."""
    import mindskip_ext as msk
    from mindskip_ext.token_routing import set_static_token_fractions, varying_layers

    from . import pareto
    from .token_quality import kept_per_layer

    recipe_name, ratio = args.recipes[0], args.ratios[0]
    recipe = pareto.RECIPES[recipe_name]
    sequence = f"{recipe_name}@{ratio}"
    name = f"{sequence} token"
    model = msk.MindSkipModel.from_pretrained(base, args.token_routers)
    if model.mindskip_config.routing != "token":
        model.unload()
        raise SystemExit(f"--token-routers: {args.token_routers} holds {model.mindskip_config.routing} routers; "
                         "it takes token routers (MindSkipConfig(routing='token'), e.g. bench.token_quality's)")
    routed = score(name, {"kind": "token-routed", "of": sequence, "recipe": recipe_name, "ratio": ratio,
                          "router_dir": str(args.token_routers)}, model)
    if "kept_train" not in routed:
        records = data().train[recipe.data][: pareto.PRESETS[args.router_preset].projection_records]
        with run.stage(f"kept fractions of {name} on {len(records)} training sequences"):
            routed["kept_train"] = {str(i): round(f, 6) for i, f in kept_per_layer(
                model, records, pad, run.sizes.batch_size).items()}
        run.save_partial()
    set_static_token_fractions(model, {int(i): f for i, f in routed["kept_train"].items()})
    score(f"{name} static", {"kind": "token-static", "of": name, "ratio": ratio}, model)
    suite_kept = {int(i): f for i, f in routed["kept"]["mix"].items()}
    set_static_token_fractions(model, suite_kept)
    score(f"{name} shuffled", {"kind": "token-shuffled", "of": name, "ratio": ratio}, model)
    set_static_token_fractions(model, None)
    model.unload()
    kept_train = {int(i): f for i, f in routed["kept_train"].items()}
    layers = varying_layers(kept_train)
    if layers and len(layers) < len(kept_train):
        mixed = msk.MindSkipModel.from_pretrained(base, args.token_routers, token_layers=layers)
        score(f"{name} hybrid", {"kind": "token-routed", "of": sequence, "recipe": recipe_name, "ratio": ratio,
                                 "router_dir": str(args.token_routers), "token_layers": layers, "hybrid_of": name},
              mixed)
        mixed.unload()
    counts = counts_for(routed["summary"])
    attention_drops(recipe.data, counts)
    entry = run.models.get(sequence)
    if entry is None or "routing_train" not in entry:
        run.say(f"no sequence-level {sequence} with its training-data routing among the results: its static "
                "projection is not scored at the token model's counts (pass --resume-from)")
        return
    projection(recipe_name, ratio, sequence, projection_order(entry["routing_train"]), counts)


def headroom_of(run: Run, args, base, examples, owner, pad, name: str, routed: dict, order: list[int], score):
    """The first-order headroom of routed model ``name`` per domain, around its static projection at the mix's whole
    count; what other routings would reach at its budget (:func:`first_order_bounds`); and the choices of the
    oracle and of the linear cost predictors (:data:`SCORED_BOUNDS`) scored at its budget."""
    import mindskip_ext as msk
    from mindskip_ext.eval.attention_drop import set_static_routing
    from mindskip_ext.eval.headroom import headroom, skip_costs
    from mindskip_ext.eval.suite import domain_rows
    from mindskip_ext.training.centring import router_inputs

    sizes = run.sizes
    decisions = decode_keep(routed["decisions"])
    layers = sorted(decisions)
    count = math.floor(routed["summary"]["mix"]["skipped_per_token"])
    around = sorted(order[:count])

    def measure() -> dict:
        model = msk.get_mindskip_model(base, msk.MindSkipConfig(layers=layers))
        with run.stage(f"skip costs around {around}"):
            costs = skip_costs(model, examples, pad, layers, sizes.batch_size, also_skipped=around)
            set_static_routing(model, around)
            inputs = router_inputs(model, examples, pad, sizes.batch_size)
        model.unload()
        return {"costs": costs, "inputs": inputs}

    saved = cached(args.work_dir / args.preset / f"costs_{'-'.join(map(str, around)) or 'dense'}.pt",
                   {"tokens": [e.input_ids for e in examples], "layers": layers, "around": around}, measure)
    costs, inputs = saved["costs"], saved["inputs"]
    lengths = torch.tensor([len(e) for e in examples])
    shuffled_keep = shuffled(decisions, sizes.seed)
    report = {}
    for domain, rows in domain_rows(owner).items():
        sub = costs.subset(rows)
        h = headroom(sub, {i: k[rows] for i, k in decisions.items()}, lengths[rows])
        h["shuffled_decisions"] = headroom(sub, {i: k[rows] for i, k in shuffled_keep.items()}, lengths[rows])[
            "routers"]
        gap = h["static"] - h["oracle"]
        h["captured"] = round((h["static"] - h["routers"]) / gap, 4) if gap > 0 else None
        report[domain] = h
    budget = routed["summary"]["mix"]["skipped_per_token"]
    bounds, routings = first_order_bounds(costs, inputs, lengths, owner, budget, order, decisions)
    run.models[name]["headroom"] = {"around": around, "domains": report, "bounds": bounds}
    run.save_partial()
    model = msk.get_mindskip_model(base, msk.MindSkipConfig(layers=layers))
    for kind, routing in SCORED_BOUNDS.items():
        score(f"{name} {kind}", {"kind": kind, "of": name, "around": around, "skips_per_token": budget,
                                 "routing": routing}, model, routings[routing])
    model.unload()


def first_order_bounds(costs, inputs: dict[int, torch.Tensor], lengths: torch.Tensor, owner: list[str],
                       budget: float, order: list[int], routers: dict[int, torch.Tensor]) -> tuple[dict, dict]:
    """First-order KL (nats per scored token, around the costs' base set) and skips per token, per domain and on
    the mix, of routings that all spend ``budget`` skips per token over the whole suite:

    * ``projection``: the static projection (``order``'s first layers; the fraction of the next, linearly);
    * ``best static``: the layers cheapest on the whole suite;
    * ``domain static``: each domain's own cheapest layers (a router that knows only the domain, exactly);
    * ``linear (log)`` / ``linear``: the cheapest pairs by per-token costs *predicted* by a ridge fit on the pooled
      router inputs (standardised; :func:`~mindskip_ext.training.cost_routers.cross_fitted`: each sequence
      predicted by a fit on the other folds), of the log or of the cost itself: the best a ``Linear(hidden, 1)``
      router fitted to these costs does on unseen sequences;
    * ``oracle, fixed count``: each sequence skips its own cheapest layers, the same number for every sequence;
    * ``oracle``: the cheapest pairs per token (a common level: a sequence may skip more than another);
    * ``routers``: the routers' own decisions (at their own budget).

    Returns these by routing and domain, and the per-sequence decisions of the routings that are not static (layer
    -> ``(sequences,)`` bool keep, by routing): what :data:`SCORED_BOUNDS` scores.
    """
    from mindskip_ext.eval.headroom import headroom, level_decisions
    from mindskip_ext.eval.suite import domain_rows
    from mindskip_ext.training.cost_routers import cross_fitted, transform_costs

    layers = list(costs.layers)
    weights = lengths.to(torch.float64)
    per_token = costs.marginal() / weights[:, None]
    rows_of = domain_rows(owner)

    def measured(keep: dict[int, torch.Tensor], rows) -> dict:
        h = headroom(costs.subset(rows), {i: k[rows] for i, k in keep.items()}, lengths[rows])
        return {"cost": h["routers"], "skips": h["skips_per_token"]}

    def static(ranked: list[int], rows) -> dict:
        """The first ``budget`` layers of ``ranked`` skipped by every sequence of ``rows``, linear between counts."""
        lo = math.floor(budget)
        at = [measured({i: torch.full((len(owner),), i not in ranked[:k]) for i in layers}, rows)["cost"]
              for k in (lo, lo + 1)]
        return {"cost": at[0] + (budget - lo) * (at[1] - at[0]), "skips": budget}

    def cheapest(rows) -> list[int]:
        mean = per_token[rows].mul(weights[rows, None]).sum(0) / weights[rows].sum()
        return [layers[j] for j in torch.argsort(mean).tolist()]

    out = {"projection": {}, "best static": {}, "domain static": {}}
    for name, rows in rows_of.items():
        out["projection"][name] = static([i for i in order if i in layers], rows)
        out["best static"][name] = static(cheapest(rows_of["mix"]), rows)
        out["domain static"][name] = static(cheapest(rows), rows) if name != "mix" else None
    # The domain-static routing on the mix: every domain its own layers, at the same count.
    mix_weights = {name: float(costs.tokens[rows].sum()) for name, rows in rows_of.items() if name != "mix"}
    out["domain static"]["mix"] = {
        "cost": sum(out["domain static"][n]["cost"] * w for n, w in mix_weights.items()) / sum(mix_weights.values()),
        "skips": budget}
    routings = {}
    for label, kind in (("linear (log)", "log"), ("linear", "linear")):
        predicted = cross_fitted(inputs, transform_costs(per_token, kind, 1e-4), layers)
        routings[label] = level_decisions(predicted, weights, budget, layers)
    routings["oracle, fixed count"] = fixed_count(per_token, weights, budget, layers)
    routings["oracle"] = level_decisions(per_token, weights, budget, layers)
    routings["routers"] = routers
    for label, keep in routings.items():
        out[label] = {name: measured(keep, rows) for name, rows in rows_of.items()}
    return out, routings


def fixed_count(per_token: torch.Tensor, weights: torch.Tensor, budget: float, layers: list[int]):
    """Each sequence skips its own cheapest ``floor(budget)`` layers, and the next one where that is cheapest per
    token, until ``budget`` skips per token (weighted by ``weights``)."""
    from mindskip_ext.eval.headroom import level_decisions

    whole = math.floor(budget)
    rank = torch.argsort(torch.argsort(per_token, dim=1), dim=1)
    inf = torch.finfo(per_token.dtype).max / 4
    # Pairs ranked below `whole` in their sequence come first, the next-ranked pairs by cost, the rest never.
    scores = torch.where(rank < whole, -inf, torch.where(rank == whole, per_token, inf))
    return level_decisions(scores, weights, budget, layers)


def report_only(args) -> Run:
    """The results in ``args.output`` as a run, to write the report again (``--report-only``)."""
    path = next((p for p in (args.output / "suite.partial.json", args.output / "suite.json") if p.is_file()), None)
    if path is None:
        raise SystemExit(f"--report-only: no suite.partial.json or suite.json in {args.output}")
    saved = json.loads(path.read_text())
    run = Run("suite", saved["preset"], PRESETS[saved["preset"]], timings=saved["timings"], models=saved["models"],
              meta=saved["meta"])
    run.meta.pop("comparisons", None)
    run.meta.pop("token_comparisons", None)
    return run


def parse_args(argv=None):
    from . import pareto

    p = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="A tiny model and a handful of sequences.")
    p.add_argument("--recipes", default=DEFAULT_RECIPE,
                   help=f"bench.pareto recipes whose routers to score, comma-separated (default: {DEFAULT_RECIPE}).")
    p.add_argument("--ratios", default="0.25", help="Skip ratios, comma-separated (default: 0.25).")
    p.add_argument("--costs", action="store_true",
                   help="Also the first-order headroom per domain, and the oracle's and linear cost predictors' "
                   "choices scored (about 15 forwards of the suite per ratio, cached in --work-dir).")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"Shared data folder (default: {DEFAULT_DATA_DIR}).")
    p.add_argument("--model", default=None, help="Model folder (default: SmolLM2-135M-Instruct, fetched once).")
    p.add_argument("--output", type=Path, default=None,
                   help="Results folder, with bench.pareto's results and routers (default: bench/results).")
    p.add_argument("--router-preset", choices=("default", "small"), default=None,
                   help="The bench.pareto preset whose routers to score (<output>/pareto_routers/<preset>/), or to "
                   "train them with, and whose training data calibrates Attention-Drop (default: the suite's, "
                   "default or smoke; small: bench.pareto --preset small's, e.g. Gemma 3 270M's in "
                   "bench/results/pareto_gemma3).")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help=f"Cached skip costs (default: {DEFAULT_WORK_DIR}).")
    p.add_argument("--resume", action="store_true",
                   help="Reuse the models in <output>/suite.partial.json (else <output>/suite.json).")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--token-routers", type=Path, default=None,
                   help="Score these token routers (MindSkipConfig(routing='token'), trained with the recipe of "
                   "--recipes at --ratios, e.g. bench.token_quality's token_routers/default/token@0.25) instead of "
                   "the recipes' sequence routers: the token model, its static projection, its suite fractions as "
                   "input-independent decisions, Attention-Drop and the sequence variant's projection at its skips.")
    p.add_argument("--resume-from", type=Path, default=None,
                   help="Also reuse the models of another suite run's results (e.g. bench/results/suite.json) on the "
                   "same suite, e.g. the sequence variant to compare token routers with in another --output.")
    p.add_argument("--report-only", action="store_true",
                   help="Write suite.json and suite.md from the results there (suite.partial.json, else suite.json) "
                   "and stop; no model is loaded.")
    args = p.parse_args(argv)
    args.preset = "smoke" if args.smoke else "default"
    args.router_preset = args.router_preset or args.preset
    args.recipes = pareto._some_of(p, "--recipes", args.recipes, tuple(pareto.RECIPES))
    args.ratios = skip_ratios(p, args.ratios)
    if not args.ratios:
        p.error("--ratios needs at least one skip ratio")
    if args.token_routers is not None:
        if len(args.recipes) != 1 or len(args.ratios) != 1:
            p.error("--token-routers compares with one recipe at one ratio: give one --recipes and one --ratios")
        if args.costs:
            p.error("--costs measures per-sequence headroom; it does not go with --token-routers")
        if not (args.token_routers / "mindskip_config.json").is_file():
            p.error(f"--token-routers: {args.token_routers} is not a router folder (no mindskip_config.json)")
    if args.resume_from is not None and not args.resume_from.is_file():
        p.error(f"--resume-from: no results file at {args.resume_from}")
    check_data_and_model(p, args)
    return args


def main(argv=None) -> int:
    from .suite_report import write_outputs

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.output = args.output or RESULTS_DIR
    run = report_only(args) if args.report_only else run_suite(args)
    paths = write_outputs(run, args.output)
    run.announce(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
