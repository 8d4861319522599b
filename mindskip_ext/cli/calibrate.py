"""``mindskip calibrate``: move trained routers to another speed point, or to the deployment domain, without
training.

Router-Tuning calibrates the capacity on its training data. A model serves other data, and its routers see the
input: on SmolLM2-135M, routers calibrated to skip 12.5% of the attention sublayers on Alpaca skip 13.3% of them
on WikiText-2, and routers trained on a mixture 8.5%. ``calibrate`` shifts every router bias by one common amount
(:func:`~mindskip_ext.training.calibrate_capacity`) so that the kept fraction on ``--data`` is the target, and
writes a new router directory: the routers' ranking of (layer, sequence) pairs stays, only the cut moves.
"""

from __future__ import annotations

from pathlib import Path

from .common import add_common, add_data_args, add_model_args, add_router_args, emit_json, load_for_eval, say


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="Shift trained routers to a target capacity or skip ratio on given data (no training).",
        description="Load --routers, shift every router bias by one common amount so that the kept fraction on "
        "--data is the target (--target-capacity over the router layers, or --skip-ratio of all attention "
        "sublayers), and write the result to --output as a new router directory.",
    )
    add_model_args(p)
    add_router_args(p)
    add_data_args(p, True, "Calibration data from the domain the model will serve (same formats as train).")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-capacity", type=float, help="Kept fraction over the router layers, in (0, 1].")
    target.add_argument("--skip-ratio", type=float, help="Share of all attention sublayers to skip, in (0, 1).")
    p.add_argument("--output", required=True, help="Router directory to write (not --routers itself).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6, help="Most bias shifts (each re-measures the capacity).")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .._io import atomic_write_json
    from ..config import capacity_for_skip_ratio
    from ..data import load_examples, pad_token_id
    from ..devices import pick_device
    from ..training import calibrate_capacity

    if not args.routers:
        raise ValueError("calibrate needs --routers (a router directory from `train`)")
    output = Path(args.output)
    if output.exists() and output.resolve() == Path(args.routers).resolve():
        raise ValueError("--output must be a new directory: calibrate does not overwrite the routers it reads")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    if args.target_capacity is not None and not 0.0 < args.target_capacity <= 1.0:
        raise ValueError(f"--target-capacity must be in (0, 1], got {args.target_capacity}")
    model, tokenizer = load_for_eval(args)
    num_layers, routers = model.config.num_hidden_layers, len(model.routers)
    target = (args.target_capacity if args.skip_ratio is None
              else capacity_for_skip_ratio(args.skip_ratio, num_layers, routers))
    examples = load_examples(
        args.data, tokenizer, args.max_length, args.data_split, args.data_config, args.max_records
    ).examples
    if not examples:
        raise ValueError(f"no calibration sequences in {args.data}")
    result = calibrate_capacity(model, examples, target, pad_token_id(tokenizer), args.batch_size,
                                pick_device(args.device).type == "cuda", rounds=args.rounds)
    model.save_pretrained(output)
    report = {"routers": str(args.routers), "data": str(args.data), "target_capacity": target,
              "skip_ratio": (1.0 - result["capacity"]) * routers / num_layers, **result}
    atomic_write_json(output / "calibration.json", report)
    say(f"capacity {result['capacity_history'][0]:.4f} -> {result['capacity']:.4f} on {len(examples)} sequences "
        f"(target {target:.4f}; bias shift {result['bias_shift']:+.4f}); skip ratio "
        f"{100 * report['skip_ratio']:.1f}% of all attention sublayers; routers: {output}")
    emit_json({"command": "calibrate", "output": str(output), **report})
    return 0
