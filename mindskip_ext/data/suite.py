"""A multi-domain held-out suite: a fixed set of sequences per domain, the same tokens for every model scored on it.

A domain is a source (:func:`~.sources.load_records`: a local file or a hub dataset name) read as usual
(:func:`~.formats.prepare_examples`): plain text is packed into ``length``-token blocks, every token scored;
instruction, question-answer and chat records are one sequence each, scored on the response. Of these, the suite
takes ``sequences`` spread evenly over the source (text: full blocks only, so that every prose or code sequence has
the same length), or, with ``heldout_fraction``, the held-out part of the seeded split that Router-Tuning makes with
the same fraction and seed (:func:`~.batching.split_heldout`), so that a model is never scored on what it trained on.

The default suite (``DEFAULT_DOMAINS``) names its sources relative to a data folder (``../shared/data`` in this
repository); users of the package give the hub equivalents instead, e.g.
``prose=wikitext:wikitext-2-raw-v1:test``, ``math=openai/gsm8k:main:test`` (see :func:`parse_domain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .batching import split_heldout
from .formats import DataError, Example
from .sources import load_examples


@dataclass(frozen=True)
class SuiteDomain:
    """One domain of the suite: where its records come from and which of them it scores."""

    name: str
    source: str  # a local file or folder, or a hub dataset name
    split: str = "train"  # of a hub dataset
    config: str | None = None  # of a hub dataset
    heldout_fraction: float | None = None  # score the held-out part of Router-Tuning's split instead

    def __post_init__(self):
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise DataError(f"a suite domain's name is letters, digits, '-' and '_', got {self.name!r}")
        if self.heldout_fraction is not None and not 0.0 < self.heldout_fraction < 1.0:
            raise DataError(f"suite domain {self.name}: held-out fraction must be in (0, 1), got "
                            f"{self.heldout_fraction}")


# The suite of issue 34, relative to the shared data folder; the hub equivalents are in the comments. The
# instructions are the held-out split the Pareto recipes train beside (5% of the file, seed 0).
DEFAULT_DOMAINS = (
    SuiteDomain("prose", "text/wikitext2-test.txt"),  # wikitext:wikitext-2-raw-v1:test
    SuiteDomain("instructions", "instruct/alpaca_en_demo.json", heldout_fraction=0.05),  # an Alpaca set, held out
    SuiteDomain("math", "eval/gsm8k/test.jsonl"),  # openai/gsm8k:main:test
    SuiteDomain("code", "text/code-python-test.jsonl"),  # Python files as {"text": ...} records
)


def parse_domain(spec: str, heldout_fraction: float | None = None) -> SuiteDomain:
    """``NAME=SOURCE`` as a :class:`SuiteDomain`. A SOURCE that is not an existing path is a hub dataset,
    ``NAME[:CONFIG][:SPLIT]`` (``wikitext:wikitext-2-raw-v1:test``; the split defaults to ``test``)."""
    name, sep, source = spec.partition("=")
    if not sep or not source:
        raise DataError(f"a suite domain is NAME=SOURCE (e.g. code=code-test.jsonl), got {spec!r}")
    if Path(source).expanduser().exists():
        return SuiteDomain(name, source, heldout_fraction=heldout_fraction)
    parts = source.split(":")
    if len(parts) > 3 or not all(parts):
        raise DataError(f"suite domain {name}: {source!r} is neither an existing path nor a hub dataset "
                        "NAME[:CONFIG][:SPLIT]")
    hub, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else "test"
    return SuiteDomain(name, hub, split=split, config=config, heldout_fraction=heldout_fraction)


@dataclass
class Suite:
    """The scored sequences of every domain, in a fixed order."""

    domains: dict[str, list[Example]]
    stats: dict

    def examples(self) -> tuple[list[Example], list[str]]:
        """Every sequence, domain after domain, and the domain of each."""
        flat, owner = [], []
        for name, examples in self.domains.items():
            flat.extend(examples)
            owner.extend([name] * len(examples))
        return flat, owner


def spread(items: list, count: int | None) -> list:
    """``count`` of ``items`` at evenly spaced positions (all of them without ``count`` or when fewer)."""
    if count is None or count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def load_suite(domains, tokenizer, length: int = 256, sequences: int | None = 64, seed: int = 0,
               data_dir: str | Path | None = None) -> Suite:
    """The suite's sequences (see the module doc). ``domains``: :class:`SuiteDomain` objects; a relative local
    source is looked up under ``data_dir`` when given. ``sequences`` per domain (None: all)."""
    if sequences is not None and sequences < 1:
        raise DataError(f"the suite needs at least one sequence per domain, got {sequences}")
    names = [d.name for d in domains]
    if not names or len(set(names)) != len(names):
        raise DataError(f"the suite needs at least one domain, each named once; got {names}")
    out, stats = {}, {}
    for domain in domains:
        source = domain.source
        if data_dir is not None and not Path(source).is_absolute() and (Path(data_dir) / source).exists():
            source = str(Path(data_dir) / source)
        prepared = load_examples(source, tokenizer, length, split=domain.split, config=domain.config)
        examples = prepared.examples
        if domain.heldout_fraction is not None:
            examples = split_heldout(examples, domain.heldout_fraction, seed)[1]
        full = [e for e in examples if len(e) == length]
        packed = prepared.stats["formats"].get("text", 0) > 0
        chosen = spread(full if packed and full else examples, sequences)
        out[domain.name] = chosen
        stats[domain.name] = {
            "source": str(domain.source),
            **({"split": domain.split, "config": domain.config} if source == domain.source and
               not Path(source).exists() else {}),
            **({"heldout_fraction": domain.heldout_fraction, "seed": seed}
               if domain.heldout_fraction is not None else {}),
            "sequences": len(chosen),
            "of": len(full if packed and full else examples),
            "tokens": sum(len(e) for e in chosen),
            "target_tokens": sum(e.num_targets for e in chosen),
        }
    return Suite(out, {"length": length, "sequences_per_domain": sequences, "domains": stats})
