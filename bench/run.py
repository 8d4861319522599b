"""The one benchmark entry point (run from the repository root).

    python bench/run.py --quick                 # every section, small and fast (< 1 min on CPU)
    python -m bench.run --only micro --device cuda    # the same module, run as part of the bench package

Results are appended to bench/results/<device-slug>.jsonl and summarised in
bench/results/<device-slug>.md (see bench/common.py for the row schema); --quick runs go to
bench/results/quick/ so a smoke run never mixes with the recorded numbers.

Sections are modules of the bench package with ``run(args, writer)`` (and optionally
``add_arguments(parser)``); register a new one in SECTIONS below.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python bench/run.py`: this file runs outside its package, with bench/ first on the path. Put the repository
    # root there instead, as `python -m bench.run` does, and run the package's module.
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    from bench.run import main

    sys.exit(main())

from . import common  # noqa: E402

# section name -> module of the bench package defining run(args, writer)
SECTIONS: dict[str, str] = {
    "micro": "micro",
    "layer": "layer",
    "e2e": "e2e",
    "token_decode": "token_decode",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    parser.add_argument(
        "--results-dir", type=Path, default=None,
        help="where the .jsonl/.md files go (default: bench/results, or bench/results/quick with --quick)",
    )
    for module in _modules(SECTIONS):
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.results_dir is None:
        args.results_dir = common.RESULTS_DIR / "quick" if args.quick else common.RESULTS_DIR
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def _modules(names):
    return [importlib.import_module(f".{SECTIONS[name]}", __package__) for name in names]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    writer = common.Writer(device, args.results_dir)
    print(f"# {common.device_name(device)}; {common.env_summary()}; sections: {', '.join(args.sections)}")
    for name, module in zip(args.sections, _modules(args.sections), strict=True):
        print(f"## {name}")
        module.run(args, writer)
    jsonl, markdown = writer.finish()
    print(f"wrote {len(writer.rows)} rows to {jsonl} and the table {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
