"""Tiny models, small built-in tasks, built-in text and a word-level tokenizer: what the tests, the demo and the
benchmarks build or read instead of downloading (no model hub is needed).

    tokenizer = train_word_tokenizer(tokenizer_corpus(records))
    model = tiny_model("llama", tokenizer=tokenizer, layers=8)           # random weights, eval mode
    model = random_model(llama_config(hidden_size=4096, ...), device="cuda", dtype=torch.bfloat16)

Models are built from configs with seeded random weights, directly on the requested device.
"""

from __future__ import annotations

import random
import sysconfig
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch

from .data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    PLAIN_CHAT_HEADER,
    PLAIN_CHAT_ROLES,
    collate,
    length_batches,
    pad_token_id,
    prepare_examples,
    record_format,
    record_messages,
)

# ----------------------------------------------------------------------------------- models


# The smallest sliding window the tiny configs use: shorter than the test prompts, so that a sliding layer's window
# really drops keys.
TINY_WINDOW = 6


def _family_fields(model_type: str, layers: int, hidden: int, heads: int, intermediate: int) -> dict:
    """The config fields that make a small model of ``model_type`` exercise what is particular to its family:
    experts, sliding and full layers, per-head norms, residual multipliers, layers without rotary embedding."""
    head_dim = hidden // heads
    # Sliding and full layers alternate, with the last layer full (Gemma 3 has five sliding ones per full one).
    layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)]
    layer_types[-1] = "full_attention"
    sliding = dict(sliding_window=TINY_WINDOW, layer_types=layer_types, head_dim=head_dim)
    experts = dict(num_experts_per_tok=2)
    fields = {
        "qwen3": dict(head_dim=head_dim),
        "mixtral": dict(num_local_experts=4, **experts),
        # Sparse experts in every layer but one dense MLP (Qwen3-MoE decides per layer).
        "qwen3_moe": dict(num_experts=4, moe_intermediate_size=intermediate, decoder_sparse_step=1,
                          mlp_only_layers=[layers // 2], head_dim=head_dim, **experts),
        "olmoe": dict(num_experts=4, **experts),
        "gemma": dict(head_dim=head_dim),
        "gemma2": dict(query_pre_attn_scalar=head_dim, **sliding),
        "gemma3_text": dict(query_pre_attn_scalar=head_dim, **sliding),
        "olmo3": dict(**sliding),
        "granite": dict(residual_multiplier=0.5, attention_multiplier=head_dim**-0.5, embedding_multiplier=2.0,
                        logits_scaling=2.0),
        "olmo": dict(clip_qkv=0.1),
        "phi3": dict(partial_rotary_factor=0.5),  # Phi-4-mini's rotary embedding covers part of each head
        # A layer without rotary embedding in the middle (SmolLM3 leaves it out of every fourth layer).
        "smollm3": dict(no_rope_layers=[0 if i == layers // 2 else 1 for i in range(layers)]),
    }
    return fields.get(model_type, {})


def tiny_config(
    model_type: str = "llama",
    *,
    vocab_size: int = 128,
    layers: int = 4,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_position_embeddings: int = 256,
    tokenizer=None,
    **overrides,
):
    """A small config of ``model_type`` (any family :mod:`mindskip_ext.architectures` supports, with the features of
    its family: experts, sliding layers of a :data:`TINY_WINDOW` window, ...); the vocabulary and special ids follow
    ``tokenizer`` when given (else pad 0, BOS 1, EOS 2). ``overrides`` are further config fields."""
    from transformers import AutoConfig

    intermediate = intermediate or 2 * hidden
    kwargs = dict(
        vocab_size=len(tokenizer) if tokenizer is not None else vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        bos_token_id=tokenizer.bos_token_id if tokenizer is not None else 1,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else 2,
        tie_word_embeddings=False,
        **_family_fields(model_type, layers, hidden, heads, intermediate),
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def random_model(config, *, attn: str = "sdpa", dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """A causal LM of ``config`` with seeded random weights, built directly on ``device`` (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def tiny_model(model_type: str = "llama", *, attn: str = "sdpa", dtype: torch.dtype = torch.float32, device="cpu",
               seed: int = 0, **config_kwargs):
    """:func:`random_model` of :func:`tiny_config`."""
    return random_model(tiny_config(model_type, **config_kwargs), attn=attn, dtype=dtype, device=device, seed=seed)


def word_llama(tokenizer, *, intermediate: int = 256, max_position_embeddings: int = 256, seed: int = 0):
    """The demo's untrained tiny Llama (8 layers, hidden 64, sdpa), sized to a word tokenizer."""
    return tiny_model("llama", tokenizer=tokenizer, layers=8, hidden=64, intermediate=intermediate,
                      max_position_embeddings=max_position_embeddings, seed=seed)


def train_tiny_model(records: list[dict], steps: int = 800, seed: int = 0, progress: bool = True):
    """A tiny Llama (8 layers, hidden 64) with a word tokenizer, trained for ``steps`` on ``records``."""
    from .eval.perplexity import token_nll

    tokenizer = train_word_tokenizer(tokenizer_corpus(records))
    model = word_llama(tokenizer, seed=seed)
    examples = prepare_examples(tokenizer, records, 128).examples
    pad = pad_token_id(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    order: list[list[int]] = []
    epoch = 0
    while len(order) < steps:
        order += length_batches([len(e) for e in examples], 32, shuffle=True, seed=seed + epoch)
        epoch += 1
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training the tiny model", unit="step", leave=False)
    for index in order[:steps]:
        batch = collate([examples[i] for i in index], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, count = token_nll(logits, batch["labels"])
        (nll / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------- built-in tasks

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


# The built-in tasks by kind: on words (copy, reverse, pick, count, ...) and on numbers (sort, max, add).
SYNTHETIC_KINDS = {
    "words": (_task_reverse, _task_copy, _task_first, _task_last, _task_count, _task_color, _task_fruits),
    "numbers": (_task_sort, _task_max, _task_add),
}
_SYNTHETIC_TASKS = (
    _task_reverse, _task_copy, _task_sort, _task_max, _task_add,
    _task_first, _task_last, _task_count, _task_color, _task_fruits,
)


def synthetic_instructions(n: int, seed: int = 0, kind: str | None = None) -> list[dict]:
    """``n`` Alpaca-style records from ten small word and number tasks (copy, reverse, sort, ...), or from those of
    one ``kind`` of :data:`SYNTHETIC_KINDS`.

    The package's built-in offline data: deterministic for a seed, learnable by a tiny model in
    seconds, and most tasks need attention (the answer is elsewhere in the sequence).
    """
    tasks = _SYNTHETIC_TASKS if kind is None else SYNTHETIC_KINDS[kind]
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        instruction, input_text, output = rng.choice(tasks)(rng)
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
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
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
    texts = [
        ALPACA_PROMPT,
        ALPACA_PROMPT_WITH_INPUT,
        *(PLAIN_CHAT_HEADER.format(role=r) for r in PLAIN_CHAT_ROLES.values()),
    ]
    for record in records:
        kind = record_format(record)
        if kind == "text":
            texts.append(record["text"])
        elif kind is not None:
            texts.extend(m["content"] for m in record_messages(record, kind))
    return texts


# ----------------------------------------------------------------------------------- built-in text

# Real text of two kinds that every Python installation carries, for held-out perplexity without any download.
BUILTIN_TEXT = {
    "docs": "English prose: Python's reference documentation (pydoc_data.topics of this Python)",
    "code": "Python code: the standard library's modules (the *.py files of this Python)",
}
# One document in this many is held out (chosen by a hash of its name, so the split never depends on the order).
HELDOUT_ONE_IN = 5


def builtin_documents(kind: str) -> dict[str, str]:
    """Name -> text of every document of the built-in text ``kind`` (see :data:`BUILTIN_TEXT`), read from the
    running Python installation."""
    if kind == "docs":
        try:
            from pydoc_data.topics import topics
        except ImportError as err:  # some distributions ship the standard library without it
            raise FileNotFoundError("this Python has no pydoc_data.topics (its reference documentation); "
                                    "give text of your own with --data") from err
        return dict(sorted(topics.items()))
    if kind == "code":
        folder = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(folder.glob("*.py"))
        if not files:
            raise FileNotFoundError(f"no standard-library sources (*.py) in {folder}; give text of your own with "
                                    "--data")
        return {f.name: f.read_text(encoding="utf-8", errors="replace") for f in files}
    raise ValueError(f"built-in text is one of {', '.join(BUILTIN_TEXT)}, got {kind!r}")


def is_heldout_document(name: str) -> bool:
    """Whether a built-in document is in the held-out part (about one in :data:`HELDOUT_ONE_IN`)."""
    return zlib.crc32(name.encode()) % HELDOUT_ONE_IN == 0
