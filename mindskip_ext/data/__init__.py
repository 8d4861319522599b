"""Data for Router-Tuning and evaluation: load (:mod:`.sources`), format and tokenize (:mod:`.formats`),
split and batch (:mod:`.batching`). The names below are the public API; import them from here."""

from __future__ import annotations

from .batching import collate, length_batches, mix_examples, pad_token_id, padding_fraction, split_heldout
from .formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    IGNORE_INDEX,
    PLAIN_CHAT_HEADER,
    PLAIN_CHAT_ROLES,
    DataError,
    Example,
    PreparedData,
    adds_bos,
    encode_record,
    format_plain,
    format_with_template,
    pack_texts,
    prepare_examples,
    prompt_text,
    record_format,
    record_messages,
)
from .sources import FILE_BUILDERS, json_problem, load_examples, load_records, load_training_data

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "FILE_BUILDERS",
    "IGNORE_INDEX",
    "PLAIN_CHAT_HEADER",
    "PLAIN_CHAT_ROLES",
    "DataError",
    "Example",
    "PreparedData",
    "adds_bos",
    "collate",
    "encode_record",
    "format_plain",
    "format_with_template",
    "json_problem",
    "length_batches",
    "mix_examples",
    "load_examples",
    "load_records",
    "load_training_data",
    "pack_texts",
    "pad_token_id",
    "padding_fraction",
    "prepare_examples",
    "prompt_text",
    "record_format",
    "record_messages",
    "split_heldout",
]
