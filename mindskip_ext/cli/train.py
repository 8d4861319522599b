"""``mindskip train``: Router-Tuning of a model's MindSkip routers on instruction, chat or text data."""

from __future__ import annotations

import dataclasses

from ..config import MindSkipConfig
from ..training.config import DEFAULT_RECIPE, RECIPES, RouterTuningConfig
from .common import add_common, add_data_args, add_model_args, emit_json, say
from .options import add_options, from_options

# Settings that are not the run's own: the device/dtype come from --device/--dtype, the packed path from the model.
# token_layers: Router-Tuning trains one level; the layers that route per token are chosen on the trained routers.
EXCLUDED = {MindSkipConfig: ("packed_attention", "token_layers")}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="Router-Tuning: train only the MindSkip routers of a frozen model.",
        description="Convert a model to MindSkip and train only its routers on instruction/chat/text data. "
        "With --target-capacity (the kept fraction over the router layers) or --skip-ratio (the share of all "
        "attention sublayers skipped) the capacity is controlled to the target and calibrated at the end; "
        "--l1-lambda uses the paper's fixed-lambda L1 penalty instead. Writes a router directory "
        "(mindskip_config.json + routers.safetensors), train_log.jsonl and training_summary.json to --output.",
    )
    add_model_args(p)
    add_data_args(p, True, "Training data: .json/.jsonl/.parquet/.txt file, folder, or hub dataset name.", True)
    p.add_argument("--output", required=True, help="Router directory to write.")
    p.add_argument("--heldout-data", default=None, help="Separate held-out data (default: a split of --data).")
    p.add_argument("--hybrid-output", default=None,
                   help="With --routing token: also write the routers to this directory with token_layers set to the "
                   "layers that vary per token on the held-out set (the others route per sequence and store no KV "
                   "cache for a skipped sequence; docs/token-routing.md). The recipe hybrid writes that to --output.")
    p.add_argument("--resume", action="store_true", help="Continue from --output/checkpoints/latest when present.")
    p.add_argument("--fsdp", action="store_true",
                   help="Under torchrun: shard the frozen weights over the processes with FSDP2 (routers replicated).")
    p.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                   help="Defaults of the settings below and of --layers; options given explicitly win. "
                   f"Default {DEFAULT_RECIPE}, the best measured (SmolLM2-135M, 12.5%%-37.5%% of the attention "
                   "skipped, docs/routing-quality.md); kd-joint trains sequence routers with the same settings; "
                   "kd-wide starts cheaper (no joint-cost search). "
                   + "; ".join(f"{name}: {r.description}" for name, r in RECIPES.items())
                   + ". --target-capacity is the kept fraction over the router layers either way; --skip-ratio "
                   "means the same speed whatever the layers.")
    add_options(p, RouterTuningConfig, exclusive_required=("target_capacity", "skip_ratio", "l1_lambda"))
    add_options(p, MindSkipConfig, exclude=EXCLUDED[MindSkipConfig])
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    """Router-tune in this process, or as one rank of ``torchrun`` / ``accelerate launch`` (see
    :mod:`mindskip_ext.training.distributed`): only the main rank prints and writes."""
    import torch.distributed as dist

    from ..devices import pick_device
    from ..training.distributed import local_device, setup

    device = local_device(pick_device(args.device))
    world = setup(device)
    try:
        return _train(args, device, world)
    finally:
        if world.active:
            dist.destroy_process_group()


def _train(args, device, world) -> int:
    import torch

    from .. import data as D
    from ..devices import pick_dtype
    from ..loading import load_tokenizer, load_weights
    from ..model import get_mindskip_model
    from ..training import RouterTuner
    from ..training.distributed import shard_frozen_layers

    show = say if world.is_main else (lambda *parts: None)
    recipe = RECIPES[args.recipe]
    config = from_options(RouterTuningConfig, args, defaults=recipe.tuning)
    ms_config = from_options(MindSkipConfig, args, defaults={"routing": "token"} if recipe.hybrid else None)
    if recipe.hybrid and ms_config.routing != "token":
        raise ValueError(f"recipe {args.recipe} trains token routers and writes the hybrid: drop --routing "
                         f"{ms_config.routing}, or use --recipe kd-joint for routers trained per sequence")
    if recipe.hybrid and args.hybrid_output:
        raise ValueError(f"recipe {args.recipe} writes the hybrid to --output itself: drop --hybrid-output")
    if args.hybrid_output and ms_config.routing != "token":
        raise ValueError("--hybrid-output chooses the layers that route per token: it needs --routing token")
    if args.fsdp and not world.active:
        raise ValueError("--fsdp shards the weights over several processes: run under torchrun --nproc_per_node N")
    # Everything that can be wrong with the input is checked before the weights load.
    path, tokenizer = load_tokenizer(args.model)
    weights = parse_weights(args.data_weights) if args.data_weights else None
    train, heldout, _ = D.load_training_data(
        args.data, tokenizer, args.max_length, weights=weights,
        heldout_fraction=0.0 if args.heldout_data else config.heldout_fraction, seed=config.seed,
        split=args.data_split, config=args.data_config, max_records=args.max_records,
    )
    if args.heldout_data:
        heldout = D.load_examples(args.heldout_data, tokenizer, args.max_length).examples
    # Under FSDP each rank reads the weights to the CPU and moves only its shards to the device.
    model = load_weights(path, torch.device("cpu") if args.fsdp else device, pick_dtype(args.dtype, device),
                         args.attn_implementation)
    if ms_config.layers is None:
        ms_config = dataclasses.replace(ms_config, layers=recipe.layers(model.config.num_hidden_layers))
    mindskip = get_mindskip_model(model, ms_config)
    if args.fsdp:
        units = shard_frozen_layers(mindskip, device)
        show(f"FSDP: the frozen weights are sharded over {world.size} processes ({units} units)")
    trainable, total = mindskip.get_nb_trainable_parameters()
    show(
        f"recipe {args.recipe}: MindSkip layers {sorted(mindskip.routers)} ({ms_config.granularity}); "
        f"trainable {trainable:,} of {total:,} "
        f"parameters ({100 * trainable / total:.4f}%); {len(train)} training / {len(heldout)} held-out sequences"
        + (f"; {world.size} processes, global batch {config.batch_size * config.grad_accum * world.size}"
           if world.active else "")
    )
    tuner = RouterTuner(
        mindskip, train, heldout, config, args.output, D.pad_token_id(tokenizer), progress=not args.no_progress,
        world=world,
    )
    summary = tuner.train(resume=args.resume)
    if not world.is_main:
        return 0
    if "stopped_at_step" in summary:
        say(f"stopped after step {summary['stopped_at_step']} of {tuner.total_steps}, checkpoint in {args.output}; "
            "continue with --resume")
        emit_json({"command": "train", "stopped_at_step": summary["stopped_at_step"], "router_dir": str(args.output)})
        return 0
    held = summary["heldout"]
    say(f"held-out: loss {held['loss']:.4f}, perplexity {held['perplexity']:.3f}, capacity {held['capacity']:.4f}")
    say("capacity per layer: " + ", ".join(f"{k}: {v:.3f}" for k, v in held["capacity_per_layer"].items()))
    say(f"routers: {args.output} ({summary['router_file_bytes']} bytes of weights)")
    token_layers = hybrid_dir = None
    if ms_config.routing == "token":
        from ..token_routing import save_hybrid, varying_layers

        token_layers = varying_layers({int(k): v for k, v in held["capacity_per_layer"].items()})
        alike = sorted(set(map(int, held["capacity_per_layer"])) - set(token_layers))
        target = args.output if recipe.hybrid else args.hybrid_output
        if token_layers and alike and not target:
            say(f"layers {alike} keep or skip at least 98% of the held-out tokens alike: routed per sequence they "
                f"store no KV cache for a skipped sequence (mindskip eval/generate --token-layers "
                f"{','.join(map(str, token_layers))}; docs/token-routing.md)")
        if target:
            hybrid_dir = str(save_hybrid(args.output, target, token_layers))
            say(f"hybrid routers (layers {token_layers} per token, the others per sequence): {hybrid_dir}"
                if token_layers else f"no layer varies per token on the held-out set: every layer routes per "
                f"sequence in {hybrid_dir}")
    emit_json(
        {
            "command": "train",
            "recipe": args.recipe,
            "capacity": held["capacity"],
            "capacity_per_layer": held["capacity_per_layer"],
            "target_capacity": tuner.config.target_capacity,
            "skip_ratio": config.skip_ratio,
            "calibrated_capacity": summary["calibration"]["capacity"] if summary["calibration"] else None,
            "loss": held["loss"],
            "perplexity": held["perplexity"],
            "train_loss": summary["last_step"]["ce"] if summary["last_step"] else None,
            "steps": summary["steps"],
            "world_size": world.size,
            "train_tokens_per_s": summary["train_tokens_per_s"],
            "peak_memory_mib": summary["peak_memory_mib"],
            "router_dir": str(args.output),
            "router_file_bytes": summary["router_file_bytes"],
            "varying_token_layers": token_layers,
            "hybrid_dir": hybrid_dir,
        }
    )
    return 0


def parse_weights(text: str) -> list[float]:
    """``"3,1"`` -> ``[3.0, 1.0]``."""
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--data-weights must be comma-separated numbers, got {text!r}") from None

