"""Command-line options generated from the config dataclasses, so that each default, choice and help text
is written once, on the field (``metadata={"help": ...}``).

A field's ``metadata`` may also give ``flag`` (default ``--field-name``), ``choices``, and ``negated`` for a
boolean that defaults to True and is turned off by its flag (e.g. ``--no-bf16``, ``--kept-only``); any other boolean
has its flag and ``--no-`` its flag (a recipe that sets it can be overruled either way). A
``list[int]`` field takes one or more values, each a number, a range such as ``14-28``, or a comma list.
Unset options stay ``None`` in the parsed arguments, so the dataclass's own default applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def parse_layers(tokens: list[str] | None) -> list[int] | None:
    """``["14-16", "20,22"]`` -> ``[14, 15, 16, 20, 22]``."""
    if not tokens:
        return None
    layers: list[int] = []
    for token in tokens:
        for part in filter(None, token.split(",")):
            lo, dash, hi = part.partition("-")
            try:
                layers.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
            except ValueError:
                raise ValueError(f"bad layer list {part!r}: use numbers, ranges like 14-28, or commas") from None
    return layers


def _base_type(annotation) -> Any:
    """``float | None`` -> ``float``; ``list[int] | None`` -> ``list``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def _dest(cls, name: str) -> str:
    return f"{cls.__name__}.{name}"


def add_options(parser, cls, *, exclude=(), exclusive_required=()) -> None:
    """Add one option per field of dataclass ``cls`` (except ``exclude``). ``exclusive_required`` names fields
    of which exactly one must be given."""
    hints = typing.get_type_hints(cls)
    group = parser.add_mutually_exclusive_group(required=True) if exclusive_required else None
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = meta.get("help", "")
        kwargs: dict[str, Any] = {"dest": _dest(cls, f.name), "default": None}
        if kind is bool and meta.get("negated", False):
            kwargs.update(action="store_const", const=False)
        elif kind is bool:  # --flag and --no-flag: a recipe's True can be turned off
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif kind is list:
            kwargs.update(nargs="+", metavar="LAYERS")
        else:
            kwargs.update(type=kind, choices=meta.get("choices"))
            if not kwargs["choices"]:  # argparse would show the dotted dest, "ROUTERTUNINGCONFIG.GRAD_ACCUM"
                kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
            if default is not None:
                help_text += f" (default: {default})"
        target = group if f.name in exclusive_required else parser
        target.add_argument(flag, help=help_text, **kwargs)


def from_options(cls, args: argparse.Namespace, defaults: dict | None = None, **overrides):
    """An instance of ``cls`` from the options :func:`add_options` added: ``defaults``, then the given options,
    then ``overrides``."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, _dest(cls, f.name), None)
        if value is None:
            continue
        values[f.name] = parse_layers(value) if _base_type(hints[f.name]) is list else value
    return cls(**{**(defaults or {}), **values, **overrides})
