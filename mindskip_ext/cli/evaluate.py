"""``mindskip eval``: perplexity and capacity on a dataset, and stock lm-eval tasks with the capacity per task."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .common import (
    add_common,
    add_data_args,
    add_model_args,
    add_router_args,
    add_token_layers_arg,
    emit_json,
    load_for_eval,
    say,
)

STATIC_REPORT_NAME = "static_projection.json"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="Perplexity and capacity on a dataset, and/or lm-eval tasks with capacity per task.",
        description="Evaluate a model with MindSkip routers (--routers; a router directory from `train` or `drop`) "
        "or without (dense baseline). --data: perplexity (text is cut into --max-length blocks, instructions "
        "are scored on their responses) with per-layer and overall capacity. --tasks: stock lm-eval tasks "
        "('paper' = the paper's tasks and shot counts; 'name' or 'name:shots', comma-separated).",
    )
    add_model_args(p)
    add_router_args(p)
    add_token_layers_arg(p)
    add_data_args(p, False, "Perplexity data: .json/.jsonl/.parquet/.txt file, folder, or hub dataset name.")
    p.add_argument("--tasks", default=None, help="lm-eval tasks: 'paper', or e.g. 'piqa,boolq' / 'mmlu:5,piqa:0'.")
    p.add_argument("--num-fewshot", type=int, default=None, help="Shots for tasks given without ':shots'.")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: at most N documents per task (or a fraction).")
    p.add_argument("--include-path", default=None, help="lm-eval: folder of extra task YAMLs (local tasks).")
    p.add_argument("--no-default-tasks", action="store_true", help="lm-eval: index only --include-path (faster).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--routing-report", action="store_true",
                   help="With --routers and --data: per layer, the kept fraction and the share of sequences (of "
                   "tokens, at a layer routed per token) whose decision differs from the layer's majority (is the "
                   "routing dynamic?).")
    p.add_argument("--static-projection", action="store_true",
                   help="With --routers and --data: evaluate the routers' static projection instead (every layer "
                   "frozen to its majority decision on --data), after the routing report.")
    p.add_argument("--save-static", default=None, metavar="DIR",
                   help="With --static-projection: also write the projection as a router directory, like `mindskip "
                   "drop`'s: routers on the always-skipped layers only, so the kept layers run unwrapped.")
    p.add_argument("--headroom", action="store_true",
                   help="With --routers and --data: how much per-sequence routing could gain over the best static "
                   "drop at the routers' budget, and how much of it the routers take (first-order KL from the "
                   "dense model; one extra forward per router layer). Implies --routing-report.")
    suite = p.add_argument_group(
        "multi-domain suite", "Per-domain perplexity and skipped attention sublayers per token, and their "
        "token-weighted mix, on a fixed set of sequences per domain (the same tokens for every model): text is cut "
        "into --max-length blocks (full blocks only), instruction and question-answer records are scored on their "
        "responses. The issue-34 suite is prose=wikitext:wikitext-2-raw-v1:test, instructions=<an Alpaca file> "
        "held out with --suite-heldout instructions=0.05 (the split `train` holds out with --heldout-fraction and "
        "--seed), math=openai/gsm8k:main:test and code=<Python files as {\"text\": ...} JSON lines>; --suite-dir "
        "gives it from a folder laid out as this repository's ../shared/data.")
    suite.add_argument("--suite", action="append", default=[], metavar="NAME=SOURCE",
                       help="A domain: a local file or folder, or a hub dataset NAME[:CONFIG][:SPLIT] (split "
                       "default: test). Repeat for each domain.")
    suite.add_argument("--suite-dir", default=None, metavar="DIR",
                       help="The default suite (prose, instructions, math, code) from a data folder laid out as "
                       "../shared/data (see its README).")
    suite.add_argument("--suite-heldout", action="append", default=[], metavar="NAME=FRACTION",
                       help="Score domain NAME's held-out part only: the split Router-Tuning makes with this "
                       "fraction and --suite-seed.")
    suite.add_argument("--suite-sequences", type=int, default=32,
                       help="Sequences per domain, spread evenly over each source (default: 32).")
    suite.add_argument("--suite-seed", type=int, default=0, help="Seed of the held-out splits (default: 0).")
    suite.add_argument("--save-scores", default=None, metavar="FILE",
                       help="With the suite: write every sequence's loss, tokens and skips (JSON), to compare "
                       "other models on the same tokens with --compare-to.")
    suite.add_argument("--compare-to", default=None, metavar="FILE",
                       help="With the suite: the per-domain loss and perplexity differences from a --save-scores "
                       "file of the same suite, with standard errors from the per-sequence differences.")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..devices import pick_device
    from ..eval.perplexity import evaluate_dataset

    domains = suite_domains(args)
    if not args.data and not args.tasks and not domains:
        raise ValueError("give --data (perplexity), --tasks (lm-eval), --suite / --suite-dir, or several")
    if (args.save_scores or args.compare_to) and not domains:
        raise ValueError("--save-scores and --compare-to need the suite (--suite or --suite-dir)")
    if (args.routing_report or args.static_projection or args.headroom) and not (args.routers and args.data):
        raise ValueError("--routing-report, --static-projection and --headroom need --routers and --data")
    if args.save_static and not args.static_projection:
        raise ValueError("--save-static needs --static-projection")
    if args.save_static and Path(args.save_static).resolve() == Path(args.routers).resolve():
        raise ValueError("--save-static must be another directory than --routers: it does not overwrite the "
                         "routers it projects")
    if args.limit is not None and args.limit > 1:
        args.limit = int(args.limit)
    model, tokenizer = load_for_eval(args)
    result: dict = {"command": "eval", "routers": args.routers}
    bf16 = pick_device(args.device).type == "cuda"
    if args.routing_report or args.static_projection or args.headroom:
        result["routing"] = report_routing(model, tokenizer, args, bf16)
    if args.data:
        ppl = evaluate_dataset(
            model, tokenizer, args.data, args.max_length, args.batch_size, args.data_split, args.data_config,
            args.max_records, bf16=bf16, progress=not args.no_progress,
        )
        say(f"perplexity {ppl['perplexity']:.4f} (loss {ppl['loss']:.4f}) over {ppl['target_tokens']} tokens, "
            f"{ppl['sequences']} sequences")
        if ppl["capacity"] is not None:
            say(f"capacity {ppl['capacity']:.4f}; per layer: "
                + ", ".join(f"{k}: {v:.3f}" for k, v in ppl["capacity_per_layer"].items()))
        result.update({k: ppl[k] for k in ("perplexity", "loss", "target_tokens", "sequences", "capacity",
                                           "capacity_per_layer", "skipped_layers_per_sequence")})
    if domains:
        result["suite"] = run_suite(model, tokenizer, domains, args, bf16)
    if args.tasks:
        from ..eval.harness import parse_tasks, run_lm_eval

        report = run_lm_eval(
            model, tokenizer, parse_tasks(args.tasks, args.num_fewshot), batch_size=args.batch_size, limit=args.limit,
            include_path=args.include_path, include_defaults=not args.no_default_tasks,
        )
        for name, entry in report["tasks"].items():
            score = f"{entry['metric']} {entry['score']:.4f}" if "score" in entry else "no score"
            capacity = "dense" if entry["capacity"] is None else f"capacity {entry['capacity']:.4f}"
            say(f"{name} ({entry['num_fewshot']}-shot): {score}, {capacity}")
        result["tasks"] = report["tasks"]
    if args.save_static:
        result["saved_static"] = save_static(model, result["routing"], args)
    emit_json(result)
    return 0


def suite_domains(args) -> list:
    """The suite's domains from ``--suite`` / ``--suite-dir`` / ``--suite-heldout`` (empty: no suite)."""
    from ..data import DataError
    from ..data.suite import DEFAULT_DOMAINS, parse_domain

    heldout = {}
    for spec in args.suite_heldout:
        name, _, fraction = spec.partition("=")
        try:
            heldout[name] = float(fraction)
        except ValueError:
            raise DataError(f"--suite-heldout takes NAME=FRACTION, got {spec!r}") from None
    if args.suite_dir and args.suite:
        raise ValueError("give the suite's domains with --suite or the default suite with --suite-dir, not both")
    if args.suite_dir:
        if not Path(args.suite_dir).is_dir():
            raise DataError(f"--suite-dir {args.suite_dir} is not a folder")
        domains = [dataclasses.replace(d, source=str(Path(args.suite_dir) / d.source),
                                       heldout_fraction=heldout.get(d.name, d.heldout_fraction))
                   for d in DEFAULT_DOMAINS]
    else:
        domains = []
        for spec in args.suite:
            name = spec.partition("=")[0]
            domains.append(parse_domain(spec, heldout.get(name)))
    unknown = sorted(set(heldout) - {d.name for d in domains})
    if unknown:
        raise ValueError(f"--suite-heldout names domain {unknown[0]}, which is not in the suite "
                         f"({', '.join(d.name for d in domains) or 'none given'})")
    return domains


def run_suite(model, tokenizer, domains, args, bf16: bool) -> dict:
    """Score the model on every domain of the suite; print a line per domain and the mix."""
    from .._io import atomic_write_json
    from ..data import pad_token_id
    from ..data.suite import load_suite
    from ..eval.suite import SequenceScores, paired, score_sequences, summarise

    suite = load_suite(domains, tokenizer, args.max_length, args.suite_sequences, args.suite_seed)
    examples, owner = suite.examples()
    scores, _ = score_sequences(model, examples, pad_token_id(tokenizer), args.batch_size, bf16)
    summary = summarise(scores, owner)
    for name, s in summary.items():
        say(f"suite {name:>12}: perplexity {s['perplexity']:.4f} (loss {s['loss']:.4f}) over {s['target_tokens']} "
            f"tokens of {s['sequences']} sequences; {s['skipped_per_token']:.2f} attention sublayers skipped per "
            "token")
    out = {"domains": summary, "data": suite.stats}
    if args.compare_to:
        saved = json.loads(Path(args.compare_to).read_text())
        if saved.get("owner") != owner:
            raise ValueError(f"--compare-to {args.compare_to} is a scoring of another suite (its domains or sequence "
                             "counts differ)")
        other = SequenceScores.from_dict(saved["scores"])
        out["compared_to"] = {"file": str(args.compare_to), "routers": saved.get("routers"),
                              "difference": paired(scores, other, owner)}
        for name, d in out["compared_to"]["difference"].items():
            say(f"suite {name:>12}: {100 * d['ratio']:+.2f}% perplexity (+- {100 * d['ratio_se']:.2f}%) against "
                f"{args.compare_to}")
    if args.save_scores:
        atomic_write_json(Path(args.save_scores), {"routers": args.routers, "owner": owner,
                                                   "scores": scores.to_dict(), "data": suite.stats})
    return out


def save_static(model, report: dict, args) -> str:
    """Write the static projection frozen by ``report_routing`` as a router directory of its skipped layers, with
    the routing report it came from (``static_projection.json``). The model is unloaded."""
    from .._io import atomic_write_json
    from ..eval.attention_drop import dropped_model

    dropped = report["static_projection"]["dropped_layers"]
    if not dropped:
        raise ValueError("the static projection skips no layer: there is nothing to save with --save-static")
    granularity = model.mindskip_config.granularity
    dropped_model(model.unload(), dropped, granularity).save_pretrained(args.save_static)
    atomic_write_json(Path(args.save_static) / STATIC_REPORT_NAME,
                      {"method": "static-projection", "granularity": granularity, "dropped_layers": dropped,
                       "routers": str(args.routers), "data": str(args.data), "routing": report})
    say(f"static projection saved to {args.save_static} (layers {dropped} skipped)")
    return str(args.save_static)


def report_routing(model, tokenizer, args, bf16: bool) -> dict:
    """Print how dynamic the routing is on ``--data`` (with ``--headroom``: how much it could gain); with
    ``--static-projection``, freeze it to the majorities."""
    from ..data import load_examples, pad_token_id
    from ..eval.headroom import headroom, skip_costs
    from ..eval.routing import apply_static_projection, routing_decisions, routing_report

    examples = load_examples(
        args.data, tokenizer, args.max_length, args.data_split, args.data_config, args.max_records
    ).examples
    pad = pad_token_id(tokenizer)
    decisions = routing_decisions(model, examples, pad, args.batch_size, bf16)
    report = routing_report(decisions, model.config.num_hidden_layers)
    for idx, layer in report["layers"].items():
        unit = "tokens" if model.mindskip_layers[int(idx)].routing == "token" else "sequences"
        say(f"  layer {idx:>3}: kept {layer['kept']:.3f}, majority {layer['majority']}, "
            f"{100 * layer['disagreement']:.1f}% of {unit} decide otherwise")
    say(f"routing: {report['skipped_layers_per_sequence']:.2f} skipped layers per sequence "
        f"(skip ratio {100 * report['skip_ratio']:.1f}%), mean disagreement with the majority "
        f"{100 * report['mean_disagreement']:.1f}%; dynamic layers {report['dynamic_layers']}")
    if args.headroom:
        h = report["headroom"] = headroom(skip_costs(model, examples, pad, batch_size=args.batch_size, bf16=bf16),
                                          decisions)
        say(f"headroom at {h['skips_per_token']:.2f} skips per token (KL from dense, nats/token, first order): "
            f"best static drop {h['static']:.4f}, per-sequence oracle {h['oracle']:.4f} "
            f"({100 * (h['headroom'] or 0.0):.1f}% below static), these routers {h['routers']:.4f}, their "
            f"input-independent shuffle {h['shuffled']:.4f}")
    if args.static_projection:
        dropped = apply_static_projection(model, report)
        say(f"static projection: layers {dropped} always skipped, the others always kept "
            f"(skip ratio {100 * report['static_projection']['skip_ratio']:.1f}%)")
    return report

