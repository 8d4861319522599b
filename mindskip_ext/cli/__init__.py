"""The ``mindskip`` command line: ``train``, ``calibrate``, ``eval``, ``drop``, ``generate``, ``fetch-model``,
``demo``.

One module per command, each with ``add_parser(subparsers)`` (which sets ``func``) and ``run(args)``.
``train`` and ``eval`` end with one JSON line of the final numbers on stdout. Errors are one readable
line on stderr (exit status 1) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import sys

from . import calibrate, demo, drop, evaluate, fetch_model, generate, train
from .common import library_progress_bars

COMMANDS = (train, calibrate, evaluate, drop, generate, fetch_model, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mindskip",
        description="MindSkip dynamic-depth attention and Router-Tuning for Hugging Face causal LMs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        with library_progress_bars(not getattr(args, "no_progress", False)):
            return args.func(args)
    except KeyboardInterrupt:
        print(f"mindskip {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False):
            raise
        print(f"mindskip {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
