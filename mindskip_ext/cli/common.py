"""What every ``mindskip`` command shares: output helpers, the model/data/common options, and loading a
model with its routers."""

from __future__ import annotations

import argparse
import contextlib
import json


def say(*parts) -> None:
    print(*parts, flush=True)


def emit_json(result: dict) -> None:
    """The final machine-readable line."""
    print(json.dumps(result, sort_keys=True, default=float), flush=True)


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="Local model folder, hub id, or a fetchable name (smollm2).")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="Weights dtype; auto: bfloat16 on CUDA, float32 on CPU.")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])


def add_router_args(p: argparse.ArgumentParser) -> None:
    """The routers :func:`load_for_eval` applies."""
    p.add_argument("--routers", default=None, help="Router directory (omit for the unconverted model).")
    p.add_argument("--threshold", type=float, default=None, help="Override the routers' keep threshold.")


def add_token_layers_arg(p: argparse.ArgumentParser) -> None:
    """``--token-layers``: of token routers, the layers that route per token (the others per sequence)."""
    p.add_argument("--token-layers", nargs="+", default=None,
                   help="Of token routers (routing 'token'): route only these layers per token, e.g. 17 or 14-16, "
                   "and the other routed layers per sequence, where a skipped sequence stores no KV cache (see "
                   "docs/token-routing.md).")


def add_data_args(p: argparse.ArgumentParser, required: bool, help_text: str, mixture: bool = False) -> None:
    """The data options; with ``mixture``, ``--data`` may be repeated and ``--data-weights`` mixes the sources."""
    if mixture:
        p.add_argument("--data", required=required, action="append", help=help_text + " Repeat for a mixture.")
        p.add_argument("--data-weights", default=None,
                       help="Sampling weights of the --data sources, comma-separated (default: all of each).")
    else:
        p.add_argument("--data", required=required, help=help_text)
    p.add_argument("--data-split", default="train", help="Split of a hub dataset (default: train).")
    p.add_argument("--data-config", default=None, help="Config name of a hub dataset (e.g. wikitext-2-raw-v1).")
    p.add_argument("--max-records", type=int, default=None, help="Use only the first N records.")
    p.add_argument("--max-length", type=int, default=512, help="Tokens per sequence (longer ones are truncated).")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy machine).")


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """transformers' and datasets' own progress bars (loading weights, generating a split) on or off for one command
    (``--no-progress``), their state before it restored after."""
    if enabled:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            hf_logging.enable_progress_bar()
        if was[1]:
            datasets.enable_progress_bars()


def load_for_eval(args):
    """The model of ``args`` with its routers applied (when given), and its tokenizer."""
    from ..devices import pick_device, pick_dtype
    from ..loading import load_model
    from ..model import MindSkipModel
    from .options import parse_layers

    device = pick_device(args.device)
    model, tokenizer = load_model(args.model, device, pick_dtype(args.dtype, device), args.attn_implementation)
    token_layers = parse_layers(getattr(args, "token_layers", None))
    if token_layers and not args.routers:
        raise ValueError("--token-layers chooses among token routers: give --routers")
    if args.routers:
        overrides = {"threshold": args.threshold} if args.threshold is not None else {}
        if token_layers:
            overrides["token_layers"] = token_layers
        model = MindSkipModel.from_pretrained(model, args.routers, **overrides)
        model.eval()
    return model, tokenizer
