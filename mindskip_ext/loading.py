"""Loading a model and its tokenizer by name, for the command line and the benchmarks.

A name is a local folder, a hub id, or a model :mod:`mindskip_ext.offline_models` can fetch without a
hub (``smollm2``). The architecture is checked from the config before any weight is read.
"""

from __future__ import annotations

import re
from pathlib import Path

# A Hugging Face hub repo id: "name" or "namespace/name" (letters, digits, "-", "_", ".").
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def resolve_model(name: str) -> str:
    """A local folder or hub id as given; a fetchable name becomes its cached checkpoint folder."""
    from . import offline_models

    if name in offline_models.MODELS and not Path(name).exists():
        return str(offline_models.fetch_model(name))
    if not Path(name).expanduser().exists() and not HUB_ID.fullmatch(name):
        raise ValueError(
            f"no local folder {name!r} exists, and {name!r} is not a hub model id either (hub ids look like "
            f"'name' or 'namespace/name'; fetchable here: {', '.join(sorted(offline_models.MODELS))})"
        )
    return name


def load_tokenizer(name: str):
    """(model folder or hub id, tokenizer), after checking the architecture is supported (no weights loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    from .architectures import arch_for

    path = resolve_model(name)
    arch_for(AutoConfig.from_pretrained(path))
    return path, AutoTokenizer.from_pretrained(path)


def load_weights(path: str, device, dtype, attn_implementation: str = "sdpa"):
    """The model (eval mode, on ``device``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval()


def load_model(name: str, device, dtype, attn_implementation: str = "sdpa"):
    """Model (eval mode, on ``device``) and tokenizer; an unsupported architecture fails before weights load."""
    path, tokenizer = load_tokenizer(name)
    return load_weights(path, device, dtype, attn_implementation), tokenizer
