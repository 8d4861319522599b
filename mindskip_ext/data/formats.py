"""Data for Router-Tuning and evaluation: load, format, tokenize, split and batch.

Sources (all through :mod:`datasets`): a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.txt`` file,
a folder of such files, or a dataset name on the hub (for users who have one).

Record formats, detected per record:

* ``alpaca``: ``instruction``, optional ``input``, ``output``;
* ``chat``: ``messages``, a list of ``{"role", "content"}``; every assistant turn is a response;
* ``text``: ``text``, plain language-model data.

Instruction and chat records use the tokenizer's chat template when it has one, and a plain
Alpaca-style prompt otherwise; the loss is on response tokens only (``labels`` is -100 elsewhere).
Each is one example, truncated to ``max_length``. Text records are concatenated (EOS between
documents) and cut into blocks of ``max_length`` tokens, every token supervised.

Batches are built from length buckets so that padding stays small.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

IGNORE_INDEX = -100
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}

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


# ----------------------------------------------------------------------------------- loading


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


# ----------------------------------------------------------------------------------- formatting


def record_format(record: dict) -> str | None:
    """``'chat'``, ``'alpaca'``, ``'text'``, or None when the record has none of the known fields."""
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        return "chat"
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        return "alpaca"
    if isinstance(record.get("text"), str):
        return "text"
    return None


def _messages_of(record: dict, kind: str) -> list[dict]:
    if kind == "alpaca":
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    messages = []
    for turn in record["messages"]:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or turn.get("role") not in PLAIN_CHAT_ROLES:
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
    if kind == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if record.get("input") else ALPACA_PROMPT
        prompt = template.format(instruction=record["instruction"], input=record.get("input") or "")
        return prompt + record["output"], [(len(prompt), len(prompt) + len(record["output"]))]
    text, spans = "", []
    for message in _messages_of(record, kind):
        header = PLAIN_CHAT_HEADER.format(role=PLAIN_CHAT_ROLES[message["role"]])
        if message["role"] == "assistant":
            spans.append((len(text) + len(header), len(text) + len(header) + len(message["content"])))
        text += header + message["content"] + PLAIN_CHAT_SEPARATOR
    return text, spans


def prompt_text(tokenizer, instruction: str, input_text: str = "") -> str:
    """The prompt a model sees before its response, in the same format training used."""
    record = {"instruction": instruction, "input": input_text, "output": ""}
    if getattr(tokenizer, "chat_template", None):
        return _render_template(tokenizer, _messages_of(record, "alpaca")[:1], add_generation_prompt=True)
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
        text, spans = format_with_template(tokenizer, _messages_of(record, kind))
        return _encode_supervised(tokenizer, text, spans, templated=True)
    text, spans = format_plain(record, kind)
    return _encode_supervised(tokenizer, text, spans, templated=False)


def pack_texts(tokenizer, texts: Iterable[str], max_length: int) -> list[Example]:
    """Concatenate documents (EOS between them) and cut the stream into ``max_length`` blocks."""
    stream: list[int] = []
    if tokenizer.bos_token_id is not None:
        stream.append(tokenizer.bos_token_id)
    for text in texts:
        if not text.strip():
            continue
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
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
                f"record {i} has none of the known fields (instruction+output, messages, text); it has {present}"
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


def split_heldout(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split into (train, held-out); both non-empty."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"held-out fraction must be in (0, 1), got {fraction}")
    if len(examples) < 2:
        raise DataError(f"need at least 2 examples to hold some out, got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [examples[i] for i in train], [examples[i] for i in held]


# ----------------------------------------------------------------------------------- batching


def length_batches(lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0, mega: int = 32) -> list[list[int]]:
    """Index batches with little padding.

    Without shuffling: indices sorted by length, cut into batches. With shuffling: a seeded
    permutation is cut into mega-batches of ``mega`` batches, each sorted by length and cut into
    batches, and the batches are shuffled; so batches vary from epoch to epoch yet stay tight.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    index = list(range(len(lengths)))
    if not shuffle:
        index.sort(key=lambda i: (lengths[i], i))
        return [index[i : i + batch_size] for i in range(0, len(index), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(index)
    batches = []
    span = batch_size * mega
    for start in range(0, len(index), span):
        chunk = sorted(index[start : start + span], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padding tokens when ``batches`` are right-padded to their longest member."""
    real = sum(lengths[i] for b in batches for i in b)
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - real / total if total else 0.0


# ----------------------------------------------------------------------------------- built-in data

_COLORS = ["red", "blue", "green", "black", "white", "yellow", "pink", "brown"]
_ANIMALS = ["cat", "dog", "bird", "fish", "horse", "mouse", "cow", "fox", "bear", "duck"]
_FRUITS = ["apple", "pear", "plum", "grape", "lemon", "melon", "peach", "cherry"]
_WORDS = _ANIMALS + _FRUITS


def _task_reverse(rng):
    items = rng.sample(_WORDS, rng.randint(3, 6))
    return "Reverse the order of the words.", " ".join(items), " ".join(reversed(items))


def _task_copy(rng):
    items = [rng.choice(_WORDS) for _ in range(rng.randint(3, 6))]
    return "Repeat the words exactly.", " ".join(items), " ".join(items)


def _task_sort(rng):
    nums = [rng.randint(0, 20) for _ in range(rng.randint(3, 6))]
    return "Sort the numbers from smallest to largest.", " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))


def _task_max(rng):
    nums = rng.sample(range(21), rng.randint(3, 6))
    return "What is the largest number?", " ".join(map(str, nums)), str(max(nums))


def _task_add(rng):
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    return "Add the two numbers.", f"{a} {b}", str(a + b)


def _task_first(rng):
    items = rng.sample(_WORDS, rng.randint(3, 6))
    return "What is the first word?", " ".join(items), items[0]


def _task_last(rng):
    items = rng.sample(_WORDS, rng.randint(3, 6))
    return "What is the last word?", " ".join(items), items[-1]


def _task_count(rng):
    items = [rng.choice(_WORDS) for _ in range(rng.randint(1, 8))]
    return "How many words are there?", " ".join(items), str(len(items))


def _task_color(rng):
    color, animal = rng.choice(_COLORS), rng.choice(_ANIMALS)
    return "Which color is mentioned?", f"the {animal} is {color}", color


def _task_fruits(rng):
    items = rng.sample(_WORDS, rng.randint(3, 6))
    fruits = [w for w in items if w in _FRUITS]
    return "List the fruits.", " ".join(items), " ".join(fruits) if fruits else "none"


_SYNTHETIC_TASKS = (
    _task_reverse, _task_copy, _task_sort, _task_max, _task_add,
    _task_first, _task_last, _task_count, _task_color, _task_fruits,
)


def synthetic_instructions(n: int, seed: int = 0) -> list[dict]:
    """``n`` Alpaca-style records from ten small word and number tasks (copy, reverse, sort, ...).

    The package's built-in offline data: deterministic for a seed, learnable by a tiny model in
    seconds, and most tasks need attention (the answer is elsewhere in the sequence).
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        instruction, input_text, output = rng.choice(_SYNTHETIC_TASKS)(rng)
        records.append({"instruction": instruction, "input": input_text, "output": output})
    return records


WORD_TOKENIZER_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>")
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def train_word_tokenizer(texts: Iterable[str], chat_template: bool = True):
    """A small lower-cased word-level tokenizer trained on ``texts`` (for tiny offline models).

    BOS is added in front of plain text; with ``chat_template`` it gets a minimal template
    (``<|role|> content </s>`` turns), otherwise it has none and the plain prompt format is used.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(WORD_TOKENIZER_SPECIALS)))
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(WORD_TOKENIZER_SPECIALS[4:]),
    )
    if chat_template:
        tokenizer.chat_template = WORD_CHAT_TEMPLATE
    return tokenizer


def tokenizer_corpus(records: Iterable[dict]) -> list[str]:
    """Every string a word tokenizer needs for ``records`` in either prompt format."""
    texts = [ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, *(PLAIN_CHAT_HEADER.format(role=r) for r in PLAIN_CHAT_ROLES.values())]
    for record in records:
        kind = record_format(record)
        if kind == "text":
            texts.append(record["text"])
        elif kind is not None:
            texts.extend(m["content"] for m in _messages_of(record, kind))
    return texts
