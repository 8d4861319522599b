"""Data loading, formatting, response-only labels, truncation, batching and the errors before training."""

from __future__ import annotations

import json
import random

import pytest

from mindskip_ext import data as D
from mindskip_ext.testing import synthetic_instructions

from tiny import DATA_DIR, tiny_tokenizer

ALPACA = DATA_DIR / "alpaca_small.json"
CHAT = DATA_DIR / "chat_small.jsonl"
TEXT = DATA_DIR / "text_small.txt"


@pytest.fixture(scope="module")
def plain_tok():
    return tiny_tokenizer(chat_template=False)


def supervised_text(tokenizer, example):
    ids = [t for t, label in zip(example.input_ids, example.labels) if label != D.IGNORE_INDEX]
    return tokenizer.decode(ids)


# ----------------------------------------------------------------------------------- loading


def test_loads_json_jsonl_text_parquet_and_folders(tmp_path):
    assert len(D.load_records(ALPACA)) == 30
    assert len(D.load_records(CHAT)) == 8
    lines = TEXT.read_text().splitlines()
    assert len(D.load_records(TEXT)) == len(lines)
    import datasets

    parquet = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(json.loads(ALPACA.read_text())).to_parquet(str(parquet))
    assert D.load_records(parquet)[3] == json.loads(ALPACA.read_text())[3]
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, part in enumerate((json.loads(ALPACA.read_text())[:10], json.loads(ALPACA.read_text())[10:])):
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    assert len(D.load_records(folder)) == 30


def test_missing_and_empty_sources_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(D.DataError, match="not found"):
        D.load_records(tmp_path / "nope.json")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(D.DataError, match="is empty"):
        D.load_records(empty)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(D.DataError, match="no records|could not read"):
        D.load_records(listed)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(D.DataError, match="holds no data file"):
        D.load_records(folder)
    import datasets
    import huggingface_hub

    # Offline mode (read at import, so set on the loaded modules): no network retries in tests.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(D.DataError, match="from the hub"):
        D.load_records("someone/no-such-dataset-mindskip")


def test_malformed_json_names_the_file_line_and_column(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]\n')
    with pytest.raises(D.DataError, match=r"broken.json is not valid JSON: line 2 column 22: Expecting ',' delimiter"):
        D.load_records(broken)
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(
        D.DataError, match=r"broken.jsonl is not valid JSON: line 3 column 14: Expecting property name"
    ):
        D.load_records(lines)
    assert D.json_problem(tmp_path / "broken.json") is not None
    (tmp_path / "fine.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert D.json_problem(tmp_path / "fine.jsonl") is None


def test_question_answer_records_are_instructions(tok, plain_tok):
    qa = {"question": "How many legs has a cat?", "answer": "Four. #### 4"}
    alpaca = {"instruction": qa["question"], "output": qa["answer"]}
    assert D.record_format(qa) == "qa"
    for tokenizer in (tok, plain_tok):
        got = D.prepare_examples(tokenizer, [qa], 128)
        assert got.stats["formats"] == {"qa": 1}
        assert got.examples == D.prepare_examples(tokenizer, [alpaca], 128).examples


def test_mixture_follows_the_weights_and_repeats_a_small_source():
    big = [D.Example([1, i], [1, i]) for i in range(90)]
    small = [D.Example([2, i], [2, i]) for i in range(10)]
    mixed = D.mix_examples([big, small], [0.5, 0.5], seed=0)
    assert len(mixed) == 100
    assert sum(e.input_ids[0] == 2 for e in mixed) == 50  # the small source is repeated, every item 5 times
    assert {tuple(e.input_ids) for e in mixed if e.input_ids[0] == 2} == {tuple(e.input_ids) for e in small}
    assert mixed == D.mix_examples([big, small], [0.5, 0.5], seed=0) != D.mix_examples([big, small], [1, 1], seed=1)
    assert all(e.input_ids[0] == 1 for e in D.mix_examples([big, small], [1.0, 0.0]))
    sized = D.mix_examples([big, small], [3, 1], total=40)
    assert len(sized) == 40 and sum(e.input_ids[0] == 2 for e in sized) == 10
    for weights, message in (([1.0], "2 data sources but 1 weights"), ([0.0, 0.0], "positive sum"),
                             ([1.0, -1.0], ">= 0")):
        with pytest.raises(D.DataError, match=message):
            D.mix_examples([big, small], weights)
    with pytest.raises(D.DataError, match="data source 2 has no examples"):
        D.mix_examples([big, []], [1.0, 1.0])


def test_training_data_from_several_sources(tok):
    train, held, stats = D.load_training_data([str(ALPACA), str(CHAT)], tok, 128, heldout_fraction=0.25, seed=0)
    assert [s["records"] for s in stats] == [30, 8]
    assert len(held) == sum(s["heldout_examples"] for s in stats) and held
    assert len(train) == sum(s["train_examples"] for s in stats)
    weighted, held_w, stats_w = D.load_training_data([str(ALPACA), str(CHAT)], tok, 128, weights=[1.0, 3.0],
                                                     heldout_fraction=0.25, seed=0)
    assert len(weighted) == len(train) and held_w == held and [s["weight"] for s in stats_w] == [1.0, 3.0]
    chat_ids = {tuple(e.input_ids) for e in D.load_training_data([str(CHAT)], tok, 128, heldout_fraction=0.25)[0]}
    assert sum(tuple(e.input_ids) in chat_ids for e in weighted) == round(0.75 * len(weighted))
    all_train, none_held, _ = D.load_training_data([str(ALPACA)], tok, 128, heldout_fraction=0.0)
    assert none_held == [] and len(all_train) == stats[0]["examples"]


def test_record_formats():
    assert D.record_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    assert D.record_format({"messages": [{"role": "user", "content": "x"}]}) == "chat"
    assert D.record_format({"text": "hello"}) == "text"
    assert D.record_format({"question": "q", "answer": "a"}) == "qa"
    assert D.record_format({"prompt": "q", "completion": "a"}) is None
    assert D.record_format({"instruction": "a", "output": None, "text": None}) is None


# ----------------------------------------------------------------------------------- formatting


@pytest.mark.parametrize("templated", [True, False])
def test_alpaca_labels_cover_exactly_the_response(templated, tok, plain_tok):
    tokenizer = tok if templated else plain_tok
    record = {"instruction": "Reverse the order of the words.", "input": "cat dog fish", "output": "fish dog cat"}
    ids, labels = D.encode_record(tokenizer, record, "alpaca")
    example = D.Example(ids, labels)
    assert supervised_text(tokenizer, example) == "fish dog cat </s>"
    # The prompt is unsupervised and is what the model sees at generation time.
    prompt = D.prompt_text(tokenizer, record["instruction"], record["input"])
    n_prompt = labels.index(next(label for label in labels if label != D.IGNORE_INDEX))
    assert tokenizer.decode(ids[:n_prompt]) == tokenizer.decode(
        tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    )
    if templated:
        assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|user|>"
    else:
        assert "# # # response :" in tokenizer.decode(ids[:n_prompt])


def test_chat_supervises_every_assistant_turn_only(tok, plain_tok):
    record = {"messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ]}
    for tokenizer in (tok, plain_tok):
        ids, labels = D.encode_record(tokenizer, record, "chat")
        text = supervised_text(tokenizer, D.Example(ids, labels))
        assert "blue" in text and "green" in text
        assert "color" not in text and "another" not in text and "briefly" not in text


def test_chat_without_assistant_or_with_bad_roles_fails(tok):
    with pytest.raises(D.DataError, match="no assistant"):
        D.encode_record(tok, {"messages": [{"role": "user", "content": "hi"}]}, "chat")
    with pytest.raises(D.DataError, match="role"):
        D.encode_record(tok, {"messages": [{"role": "robot", "content": "hi"}]}, "chat")


def test_prefix_inconsistent_template_is_rejected(tok):
    import copy

    odd = copy.deepcopy(tok)
    odd.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{{ messages | length }}"
    with pytest.raises(D.DataError, match="prefix"):
        D.encode_record(odd, {"instruction": "a", "input": "", "output": "b"}, "alpaca")


def test_text_records_are_packed_into_blocks(tok):
    records = list(D.load_records(TEXT))
    prepared = D.prepare_examples(tok, records, max_length=16)
    blocks = prepared.examples
    assert all(len(b) <= 16 for b in blocks) and all(len(b) == 16 for b in blocks[:-1])
    assert all(b.labels == b.input_ids for b in blocks)
    stream = [t for b in blocks for t in b.input_ids]
    assert stream.count(tok.eos_token_id) == sum(1 for r in records if r["text"].strip())
    assert prepared.stats["formats"] == {"text": len(records)}


def test_every_block_starts_with_bos_where_the_tokenizer_starts_every_text_with_it(tok):
    import copy

    from tokenizers import processors

    texts = [r["text"] for r in D.load_records(TEXT)]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    content = [t for text in texts if text.strip() for t in tok(text, add_special_tokens=False)["input_ids"] + [eos]]
    assert D.adds_bos(tok)
    blocks = D.pack_texts(tok, texts, 16)
    assert all(b.input_ids[0] == bos for b in blocks) and all(len(b) == 16 for b in blocks[:-1])
    assert [t for b in blocks for t in b.input_ids[1:]] == content
    no_bos = copy.deepcopy(tok)
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert not D.adds_bos(no_bos)
    stream = [t for b in D.pack_texts(no_bos, texts, 16) for t in b.input_ids]
    assert stream == [bos] + content


# ----------------------------------------------------------------------------------- checks


def test_truncation_and_stats(tok):
    records = json.loads(ALPACA.read_text())
    full = D.prepare_examples(tok, records, max_length=512)
    assert full.stats["truncated"] == 0 and full.stats["examples"] == 30
    longest = max(len(e) for e in full.examples)
    cut = D.prepare_examples(tok, records, max_length=longest - 3)
    assert all(len(e) <= longest - 3 for e in cut.examples)
    assert cut.stats["truncated"] >= 1
    assert cut.stats["examples"] + cut.stats["dropped_without_targets"] == 30


def test_errors_before_training(tok):
    with pytest.raises(D.DataError, match="record 1 has none of the known fields.*'query'"):
        D.prepare_examples(tok, [{"text": "ok"}, {"query": "q", "response": "a"}], 64)
    records = json.loads(ALPACA.read_text())
    shortest = min(len(e) for e in D.prepare_examples(tok, records, 512).examples)
    with pytest.raises(D.DataError, match="every example is longer than max_length"):
        D.prepare_examples(tok, records, max_length=shortest - 1)
    with pytest.raises(D.DataError, match="no records"):
        D.prepare_examples(tok, [], 64)
    with pytest.raises(D.DataError, match="nothing to learn|no example"):
        D.prepare_examples(tok, [{"text": "   "}], 64)


# ----------------------------------------------------------------------------------- batching


def test_length_batches_cover_everything_and_keep_padding_small():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(1000)]
    for shuffle in (False, True):
        batches = D.length_batches(lengths, 16, shuffle=shuffle, seed=3)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(len(b) <= 16 for b in batches)
        assert D.padding_fraction(batches, lengths) < 0.05
    naive = [list(range(i, min(i + 16, 1000))) for i in range(0, 1000, 16)]
    assert D.padding_fraction(naive, lengths) > 0.3
    assert D.length_batches(lengths, 16, True, seed=1) != D.length_batches(lengths, 16, True, seed=2)
    assert D.length_batches(lengths, 16, True, seed=1) == D.length_batches(lengths, 16, True, seed=1)


def test_collate_pads_right_and_masks_labels():
    batch = D.collate([D.Example([5, 6, 7], [-100, 6, 7]), D.Example([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_split_is_seeded_disjoint_and_complete():
    examples = [D.Example([i, i], [i, i]) for i in range(50)]
    train, held = D.split_heldout(examples, 0.2, seed=0)
    assert len(held) == 10 and len(train) == 40
    assert sorted(e.input_ids[0] for e in train + held) == list(range(50))
    assert D.split_heldout(examples, 0.2, seed=0)[1] == held
    assert D.split_heldout(examples, 0.2, seed=1)[1] != held
    with pytest.raises(D.DataError):
        D.split_heldout(examples[:1], 0.2, 0)


def test_synthetic_instructions_are_deterministic_and_correct():
    a, b = synthetic_instructions(200, seed=5), synthetic_instructions(200, seed=5)
    assert a == b and a != synthetic_instructions(200, seed=6)
    for r in a:
        if r["instruction"].startswith("Reverse"):
            assert r["output"].split() == r["input"].split()[::-1]
        if r["instruction"].startswith("Sort"):
            assert [int(x) for x in r["output"].split()] == sorted(int(x) for x in r["input"].split())
        if r["instruction"].startswith("Add"):
            assert int(r["output"]) == sum(int(x) for x in r["input"].split())


def test_word_tokenizer_round_trips_and_saves(tmp_path, tok):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "reverse the order of the words. cat dog"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded(text)["input_ids"][0] == tok.bos_token_id
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == "reverse the order of the words . cat dog"
    assert loaded.chat_template == tok.chat_template
