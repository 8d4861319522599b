"""``mindskip drop``: the static Attention-Drop baseline, saved as a router directory."""

from __future__ import annotations

from .common import add_common, add_data_args, add_model_args, emit_json, say
from .options import parse_layers


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "drop",
        help="Attention-Drop baseline: statically drop the n most redundant attention sublayers.",
        description="Score every attention sublayer by the cosine similarity between its input and its output "
        "with the residual, over calibration tokens, and drop the n most redundant. Writes a router "
        "directory whose routers always skip those layers (evaluate it with `mindskip eval --routers`) "
        "and attention_drop.json with the scores.",
    )
    add_model_args(p)
    add_data_args(p, True, "Calibration data (same formats as train).")
    p.set_defaults(max_records=256)
    p.add_argument("--n", type=int, required=True, help="Number of sublayers to drop.")
    p.add_argument("--output", required=True, help="Router directory to write.")
    p.add_argument("--granularity", default="attn", choices=["attn", "mlp", "block"],
                   help="attn: Attention-Drop (default); mlp: MLP-Drop; block: Block-Drop.")
    p.add_argument("--layers", nargs="+", help="Candidate layers (default: all).")
    p.add_argument("--batch-size", type=int, default=8)
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..devices import pick_device, pick_dtype
    from ..eval.attention_drop import attention_drop
    from ..loading import load_model

    device = pick_device(args.device)
    model, tokenizer = load_model(args.model, device, pick_dtype(args.dtype, device), args.attn_implementation)
    _, report = attention_drop(
        model, tokenizer, args.data, args.n, args.output, args.granularity, parse_layers(args.layers),
        args.max_records, args.max_length, args.batch_size, bf16=device.type == "cuda",
    )
    say("similarity (input vs output, higher = more redundant):")
    for idx, sim in report["similarity"].items():
        say(f"  layer {idx:>3}: {sim:.4f}{'  dropped' if int(idx) in report['dropped_layers'] else ''}")
    say(f"dropped {report['granularity']} in layers {report['dropped_layers']}; routers: {args.output}")
    emit_json({"command": "drop", **{k: v for k, v in report.items() if k != "calibration"}})
    return 0
