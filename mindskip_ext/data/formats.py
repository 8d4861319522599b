"""Record formats, and their tokenization into training / evaluation examples.

Formats, detected per record:

* ``alpaca``: ``instruction``, optional ``input``, ``output``;
* ``qa``: ``question``, ``answer`` (e.g. GSM8K), read as an Alpaca record without input;
* ``chat``: ``messages``, a list of ``{"role", "content"}``; every assistant turn is a response;
* ``text``: ``text``, plain language-model data.

Instruction and chat records use the tokenizer's chat template when it has one, and a plain
Alpaca-style prompt otherwise; the loss is on response tokens only (``labels`` is -100 elsewhere).
Each is one example, truncated to ``max_length``. Text records are concatenated (EOS between
documents) and cut into blocks of ``max_length`` tokens, every token supervised.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PLAIN_CHAT_HEADER = "### {role}:\n"
PLAIN_CHAT_SEPARATOR = "\n\n"
PLAIN_CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


class DataError(ValueError):
    """A dataset that cannot be used as given; the message says why and what to change."""


@dataclass
class Example:
    """One tokenized training / evaluation sequence."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """Tokens the loss is taken on (labels are shifted by one inside the loss)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class PreparedData:
    examples: list[Example]
    stats: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------- formatting


def record_format(record: dict) -> str | None:
    """``'chat'``, ``'alpaca'``, ``'qa'``, ``'text'``, or None when the record has none of the known fields."""
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        return "chat"
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        return "alpaca"
    if isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        return "qa"
    if isinstance(record.get("text"), str):
        return "text"
    return None


def _as_alpaca(record: dict, kind: str) -> tuple[dict, str]:
    """A ``qa`` record as the Alpaca record it stands for; other records as they are."""
    if kind == "qa":
        return {"instruction": record["question"], "output": record["answer"]}, "alpaca"
    return record, kind


def record_messages(record: dict, kind: str) -> list[dict]:
    record, kind = _as_alpaca(record, kind)
    if kind == "alpaca":
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    messages = []
    for turn in record["messages"]:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("content"), str)
            or turn.get("role") not in PLAIN_CHAT_ROLES
        ):
            raise DataError(
                f"a chat message must be {{'role': one of {sorted(PLAIN_CHAT_ROLES)}, 'content': str}}, got {turn!r}"
            )
        messages.append({"role": turn["role"], "content": turn["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("a chat record has no assistant message, so nothing to learn from")
    return messages


def _render_template(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def format_with_template(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of ``messages`` and the character spans of the assistant turns."""
    text = _render_template(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_template(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render_template(tokenizer, messages[: i + 1])
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise DataError(
                "the tokenizer's chat template renders a conversation differently from its prefix, so the response "
                "tokens cannot be located; pass a tokenizer whose template is prefix-consistent"
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def format_plain(record: dict, kind: str) -> tuple[str, list[tuple[int, int]]]:
    """Plain prompt format (no chat template): Alpaca's prompt, or ``### Role:`` turns for chats."""
    record, kind = _as_alpaca(record, kind)
    if kind == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if record.get("input") else ALPACA_PROMPT
        prompt = template.format(instruction=record["instruction"], input=record.get("input") or "")
        return prompt + record["output"], [(len(prompt), len(prompt) + len(record["output"]))]
    text, spans = "", []
    for message in record_messages(record, kind):
        header = PLAIN_CHAT_HEADER.format(role=PLAIN_CHAT_ROLES[message["role"]])
        if message["role"] == "assistant":
            spans.append((len(text) + len(header), len(text) + len(header) + len(message["content"])))
        text += header + message["content"] + PLAIN_CHAT_SEPARATOR
    return text, spans


def prompt_text(tokenizer, instruction: str, input_text: str = "") -> str:
    """The prompt a model sees before its response, in the same format training used."""
    record = {"instruction": instruction, "input": input_text, "output": ""}
    if getattr(tokenizer, "chat_template", None):
        return _render_template(tokenizer, record_messages(record, "alpaca")[:1], add_generation_prompt=True)
    template = ALPACA_PROMPT_WITH_INPUT if input_text else ALPACA_PROMPT
    return template.format(instruction=instruction, input=input_text)


def _encode_supervised(tokenizer, text: str, spans, templated: bool) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("a fast (Rust) tokenizer is needed to locate response tokens; load it with use_fast=True")
    enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
    ids, labels = list(enc["input_ids"]), []
    for token, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = end > start and any(lo <= start < hi for lo, hi in spans)
        labels.append(token if inside else IGNORE_INDEX)
    if not templated and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def encode_record(tokenizer, record: dict, kind: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one instruction or chat record (untruncated)."""
    if getattr(tokenizer, "chat_template", None):
        text, spans = format_with_template(tokenizer, record_messages(record, kind))
        return _encode_supervised(tokenizer, text, spans, templated=True)
    text, spans = format_plain(record, kind)
    return _encode_supervised(tokenizer, text, spans, templated=False)


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` starts every text it encodes with its BOS token (Llama 3, Mistral, Gemma do)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def pack_texts(tokenizer, texts: Iterable[str], max_length: int) -> list[Example]:
    """Concatenate documents (EOS between them) and cut the stream into ``max_length`` blocks.

    Where the tokenizer starts every text with BOS, every block starts with it too, as each window did in
    pretraining: a model like Gemma 3 is far off its quality on a window without it (Gemma 3 270M: WikiText-2
    perplexity 332 on 256-token windows without BOS, 73 with). Otherwise only the stream's start has BOS.
    """
    bos = tokenizer.bos_token_id
    every_block = adds_bos(tokenizer)
    stream: list[int] = [bos] if bos is not None and not every_block else []
    for text in texts:
        if not text.strip():
            continue
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    step = max_length - 1 if every_block else max_length
    blocks = [([bos] if every_block else []) + stream[i : i + step] for i in range(0, len(stream), step)]
    return [Example(list(b), list(b)) for b in blocks if len(b) >= 2]


def prepare_examples(tokenizer, records, max_length: int, max_records: int | None = None) -> PreparedData:
    """Tokenize ``records`` (any iterable of dicts) into examples; checks everything first.

    Raises :class:`DataError` for records with none of the known fields, and when every
    instruction example is longer than ``max_length`` (truncating all of them would train on
    a different task than the data describes).
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    kinds: Counter = Counter()
    texts: list[str] = []
    examples: list[Example] = []
    lengths: list[int] = []
    dropped = 0
    for i, record in enumerate(records):
        if max_records is not None and i >= max_records:
            break
        kind = record_format(record)
        if kind is None:
            present = sorted(k for k, v in record.items() if v is not None)
            raise DataError(
                f"record {i} has none of the known fields (instruction+output, question+answer, messages, text); "
                f"it has {present}"
            )
        kinds[kind] += 1
        if kind == "text":
            texts.append(record["text"])
            continue
        ids, labels = encode_record(tokenizer, record, kind)
        lengths.append(len(ids))
        ids, labels = ids[:max_length], labels[:max_length]
        example = Example(ids, labels)
        if example.num_targets == 0:
            dropped += 1
            continue
        examples.append(example)
    if not kinds:
        raise DataError("the dataset has no records")
    if lengths and min(lengths) > max_length:
        raise DataError(
            f"every example is longer than max_length={max_length} tokens (the shortest has {min(lengths)}); "
            "raise max_length"
        )
    if texts:
        examples.extend(pack_texts(tokenizer, texts, max_length))
    if not examples:
        raise DataError("no example has a token to learn from (empty responses, or no text)")
    stats = {
        "records": sum(kinds.values()),
        "formats": dict(sorted(kinds.items())),
        "examples": len(examples),
        "truncated": sum(1 for n in lengths if n > max_length),
        "dropped_without_targets": dropped,
        "tokens": sum(len(e) for e in examples),
        "target_tokens": sum(e.num_targets for e in examples),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }
    return PreparedData(examples, stats)
