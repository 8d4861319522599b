"""Where records come from: local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.txt`` files, a folder of such
files, or a dataset name on the hub (all read through :mod:`datasets`, imported when first used)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .batching import mix_examples, split_heldout
from .formats import DataError, Example, PreparedData, prepare_examples

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def _looks_like_path(source: str) -> bool:
    """A missing source that is clearly meant as a file (a hub name is ``name`` or ``owner/name``)."""
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in FILE_BUILDERS


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_BUILDERS)
        if not files:
            raise DataError(f"{path} holds no data file ({', '.join(sorted(FILE_BUILDERS))})")
    else:
        files = [path]
    builders = {FILE_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(sorted(FILE_BUILDERS))}")
    if len(builders) > 1:
        raise DataError(f"{path} mixes file types ({', '.join(sorted(builders))}); keep one type per folder")
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"{p} is empty")
    return builders.pop(), [str(p) for p in files]


def json_problem(path: str | os.PathLike) -> str | None:
    """Where a JSON or JSON Lines file stops parsing (``line L column C: message``), or None if it parses.

    A file whose first character is ``[`` or ``{`` and that parses whole is one JSON document; anything
    else is read as JSON Lines, one document per non-blank line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 text ({err.reason} at byte {err.start})"
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            return f"line {err.lineno} column {err.colno}: {err.msg}"
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} column {err.colno}: {err.msg}"
    return None


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def load_records(source: str | os.PathLike, split: str = "train", config: str | None = None):
    """The records of ``source`` as a :class:`datasets.Dataset` (local files, or a hub dataset name)."""
    import datasets

    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as err:  # datasets raises many types for malformed files; say what is wrong, and where
            if builder == "json":
                for file in files:
                    problem = json_problem(file)
                    if problem is not None:
                        raise DataError(f"{file} is not valid JSON: {problem}") from err
            cause = _root_cause(err)
            raise DataError(f"could not read {source}: {type(cause).__name__}: {cause}") from err
    elif _looks_like_path(source):
        raise DataError(f"data file {source} not found")
    else:
        try:
            ds = datasets.load_dataset(source, config, split=split)
        except Exception as err:
            raise DataError(
                f"could not load dataset {source!r} (split {split!r}) from the hub: {err}. "
                "Pass a local .json/.jsonl/.parquet/.txt file when offline"
            ) from err
    if len(ds) == 0:
        raise DataError(f"dataset {source} has no records")
    return ds


def load_examples(
    source,
    tokenizer,
    max_length: int,
    split: str = "train",
    config: str | None = None,
    max_records: int | None = None,
) -> PreparedData:
    """:func:`load_records` then :func:`prepare_examples`."""
    records = load_records(source, split=split, config=config)
    prepared = prepare_examples(tokenizer, records, max_length, max_records=max_records)
    prepared.stats["source"] = str(source)
    return prepared


def load_training_data(
    sources: list[str],
    tokenizer,
    max_length: int,
    *,
    weights: list[float] | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    split: str = "train",
    config: str | None = None,
    max_records: int | None = None,
) -> tuple[list[Example], list[Example], list[dict]]:
    """``(train, held-out, per-source stats)`` from one or more sources (see :func:`load_examples`).

    Each source is split into training and held-out examples on its own (``heldout_fraction``; 0 keeps all
    for training). The training parts are mixed by ``weights`` (:func:`~.batching.mix_examples`), or simply
    put together without weights; the held-out parts are put together.
    """
    if not sources:
        raise DataError("no training data source")
    if weights is not None and len(weights) != len(sources):
        raise DataError(f"{len(sources)} data sources but {len(weights)} weights")
    trains, helds, stats = [], [], []
    for source in sources:
        prepared = load_examples(source, tokenizer, max_length, split, config, max_records)
        if heldout_fraction > 0:
            train, held = split_heldout(prepared.examples, heldout_fraction, seed)
        else:
            train, held = prepared.examples, []
        trains.append(train)
        helds.append(held)
        stats.append({**prepared.stats, "train_examples": len(train), "heldout_examples": len(held)})
    if weights is None:
        train = [e for part in trains for e in part]
    else:
        train = mix_examples(trains, weights, seed)
        for entry, weight in zip(stats, weights):
            entry["weight"] = weight
    return train, [e for part in helds for e in part], stats

