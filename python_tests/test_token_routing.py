"""Token-level MindSkip (``routing="token"``): the contract of the sequence level at the token level on tiny llama and
qwen3 models (identity at init, forced skip, batch invariance, generate batched == unbatched with the dynamic and the
static cache, beam search, one compiled decode graph), the official attn_token variant as the reference (every
token's attention, masked per token), decode steps equal to recomputing without a cache, the complete KV cache, the
in-place dynamic slot, the static projection, save/load and training. Tiny models built from configs; no downloads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache, StaticCache

import mindskip_ext as msk
from mindskip_ext import data as D
from mindskip_ext import token_routing as tr
from mindskip_ext.cache import decode_compile_config, kv_bytes
from mindskip_ext.hf_compat import cache_kwargs
from mindskip_ext.model import CONFIG_NAME
from mindskip_ext.testing import synthetic_instructions, tiny_model

from tiny import ATTN_IMPLS, VOCAB, logits_of, padded_batch, positions, randomize_routers, tiny_lm

pytestmark = pytest.mark.hf

MODEL_TYPES = ["llama", "qwen3"]
TOKEN = msk.MindSkipConfig(routing="token")


def routed(model_type="llama", attn="sdpa", seed=1, **config):
    model = msk.get_mindskip_model(tiny_lm(model_type, attn), msk.MindSkipConfig(routing="token", **config))
    randomize_routers(model, seed=seed)
    return model


def official_variant(model: msk.MindSkipModel):
    """The unconverted model with each router layer's attention output multiplied by the token's keep decision: the
    official attn_token code, which computes every token's attention and masks it."""
    reference = copy.deepcopy(model.base_model)
    for idx, layer in model.mindskip_layers.items():
        reference.model.layers[idx] = layer.base_layer = copy.deepcopy(layer.base_layer)

        def hook(module, args, kwargs, out, layer=layer):
            keep = torch.sigmoid(tr.token_logits(layer, kwargs["hidden_states"])) >= layer.threshold
            return out[0] * keep.unsqueeze(-1), out[1]

        reference.model.layers[idx].self_attn.register_forward_hook(hook, with_kwargs=True)
    return reference


# ----------------------------------------------------------------------------------- config and save / load


def test_config_records_the_level_and_reads_old_files_as_sequence():
    assert msk.MindSkipConfig().routing == "sequence"
    assert "routing" not in msk.MindSkipConfig().to_dict()  # a sequence file reads with an older mindskip_ext
    loaded, _ = msk.MindSkipConfig.from_json(TOKEN.to_json())
    assert loaded.routing == "token"
    old = json.dumps({"mindskip_config": {"granularity": "attn", "layers": None, "threshold": 0.5}})
    assert msk.MindSkipConfig.from_json(old)[0].routing == "sequence"
    with pytest.raises(ValueError, match="routing must be one of"):
        msk.MindSkipConfig(routing="head")
    with pytest.raises(ValueError, match="token routing gates the attention sublayer only"):
        msk.MindSkipConfig(routing="token", granularity="mlp")
    with pytest.raises(ValueError, match="token routing pools nothing"):
        msk.MindSkipConfig(routing="token", pool_padding=True)


def test_save_and_load_keep_the_level(tmp_path):
    model = routed()
    _, ids, mask = padded_batch([5, 9, 7])
    want = logits_of(model, ids, mask)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["mindskip_config"]["routing"] == "token"
    loaded = msk.MindSkipModel.from_pretrained(tiny_lm("llama"), tmp_path)
    assert loaded.mindskip_config.routing == "token"
    assert torch.equal(logits_of(loaded, ids, mask), want)


# ----------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_layer_that_skips_every_token_still_writes_every_key(model_type):
    """Identity at init and a forced skip are test_layer's (routing='token' among its cases). The KV cache of a layer
    that skips every token is complete: later tokens may attend to a skipped token's key (the sequence level keeps no
    row of a layer that every sequence skips)."""
    _, ids, mask = padded_batch([6, 8])
    wrapped = msk.get_mindskip_model(tiny_lm(model_type), msk.MindSkipConfig(routing="token", layers=[2]))
    with torch.no_grad():
        wrapped.routers[2].bias.fill_(-10.0)
    cache = DynamicCache()
    with torch.no_grad():
        wrapped(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(wrapped, cache))
    assert wrapped.last_capacity == {2: 0.0}
    assert cache.layers[2].keys.shape == cache.layers[0].keys.shape
    reference = DynamicCache()
    with torch.no_grad():
        wrapped(input_ids=ids, attention_mask=mask, use_cache=True, mindskip_bypass=True,
                **cache_kwargs(wrapped, reference))
    assert torch.equal(cache.layers[2].keys, reference.layers[2].keys)  # the keys the stock layer writes


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("attn", ATTN_IMPLS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_equals_the_official_variant_and_is_batch_invariant(model_type, attn, side):
    model = routed(model_type, attn)
    seqs, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], side)
    batched = logits_of(model, ids, mask)
    capacity = model.last_capacity
    assert all(0.2 < c < 0.8 for c in capacity.values()), capacity  # mixed decisions in every layer
    real = mask.bool()
    torch.testing.assert_close(batched[real], logits_of(official_variant(model), ids, mask)[real], rtol=1e-5,
                               atol=1e-5)
    width = ids.shape[1]
    for i, s in enumerate(seqs):
        alone = logits_of(model, s[None])
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        torch.testing.assert_close(batched[i, span], alone[0], rtol=1e-5, atol=1e-5)


def test_capacity_counts_the_real_tokens():
    model = routed()
    _, ids, mask = padded_batch([7, 12, 3], "left")
    record = msk.RoutingRecord()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False, mindskip_record=record)
    for routing in record.layers.values():
        assert routing.keep.shape == ids.shape and routing.batch_size == 22
        assert routing.num_kept == int(routing.keep[mask.bool()].sum())
        assert routing.logit().shape == (22,)


def test_a_long_sequence_attends_blockwise(monkeypatch):
    """Kept queries are attended in blocks of slots, each reading the keys up to its last query: the blocks together
    give the one-block result."""
    model = routed()
    _, ids, mask = padded_batch([60, 41, 55], "right")
    one = logits_of(model, ids, mask)
    monkeypatch.setattr(tr, "QUERY_BLOCK", 4)
    torch.testing.assert_close(logits_of(model, ids, mask), one, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- decode and generate


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("attn", ATTN_IMPLS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_decode_steps_equal_recomputing_without_a_cache(model_type, attn, kind):
    model = routed(model_type, attn)
    _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    cache = DynamicCache() if kind == "dynamic" else StaticCache(config=model.config, max_cache_len=24)
    kept = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                    **cache_kwargs(model, cache))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(5):
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            step = model(input_ids=token, attention_mask=mask, position_ids=positions(mask)[:, -1:], use_cache=True,
                         **cache_kwargs(model, cache)).logits[:, -1]
            full = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
            torch.testing.assert_close(step, full.logits[:, -1], rtol=1e-5, atol=1e-5)
            kept.append([float(r.keep[:, -1].float().mean()) for r in model.last_record.layers.values()])
            token = step.argmax(-1, keepdim=True)
    assert any(0.0 < k < 1.0 for step in kept for k in step), kept  # steps where some rows skip and some keep
    if kind == "dynamic":
        assert all(isinstance(cache.layers[i], tr.AppendDynamicLayer) for i in model.mindskip_layers)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("attn", ATTN_IMPLS)
def test_greedy_generate_is_batch_invariant_with_both_caches(model_type, attn):
    model = routed(model_type, attn)
    seqs, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    dynamic = model.generate(**kwargs)
    capacity = model.last_capacity  # the prefill's: decode steps route without a record
    assert all(0.2 < c < 0.8 for c in capacity.values()), capacity
    assert torch.equal(model.generate(**kwargs, cache_implementation="static"), dynamic)
    width = ids.shape[1]
    for i, s in enumerate(seqs):
        alone = model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long),
                               max_new_tokens=6, do_sample=False)
        assert torch.equal(alone[0, len(s):], dynamic[i, width:]), f"sequence {i}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_beam_search_and_sampling_match_unbatched_with_both_caches(model_type):
    model = routed(model_type)
    seqs, ids, mask = padded_batch([7, 12, 4, 9], "left")
    width = ids.shape[1]
    for gen_kwargs in (dict(num_beams=3, do_sample=False, max_new_tokens=5), dict(do_sample=True, top_k=1,
                                                                                  max_new_tokens=5)):
        torch.manual_seed(0)
        batched = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
        torch.manual_seed(0)
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static",
                                          **gen_kwargs), batched)
        for i, s in enumerate(seqs):
            torch.manual_seed(0)
            alone = model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long),
                                   **gen_kwargs)
            assert torch.equal(alone[0, len(s):], batched[i, width:]), (gen_kwargs, i)


def test_the_dynamic_slot_appends_in_place_and_survives_crop_reorder_and_select():
    model = routed()
    _, ids, mask = padded_batch([7, 12, 3], "left")
    cache = DynamicCache(config=model.config)  # as generate() makes it: a slot per layer from the start
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
              **cache_kwargs(model, cache))
    slot = cache.layers[1]
    buffer = slot.keys.untyped_storage().data_ptr()
    assert slot.keys.shape[2] == 12 and slot._buffers[0].shape[2] == 12 + tr.MIN_SPARE
    # The unrouted layers' slots append in place too (layer 0 before the routed layers, layer 3 after them).
    assert [type(layer) for layer in cache.layers] == [tr.AppendDynamicLayer] * 4
    unrouted = cache.layers[0]
    nxt = torch.randint(1, VOCAB, (3, 1))
    step_mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        step = model(input_ids=nxt, attention_mask=step_mask, position_ids=positions(step_mask)[:, -1:],
                     use_cache=True, **cache_kwargs(model, cache)).logits
    assert slot.keys.untyped_storage().data_ptr() == buffer and slot.get_seq_length() == 13  # written in place
    unrouted_buffer = unrouted.keys.untyped_storage().data_ptr()
    with torch.no_grad():
        model(input_ids=nxt, attention_mask=torch.cat([step_mask, torch.ones_like(nxt)], 1),
              position_ids=positions(step_mask)[:, -1:] + 1, use_cache=True, **cache_kwargs(model, cache))
    assert unrouted.keys.untyped_storage().data_ptr() == unrouted_buffer and unrouted.get_seq_length() == 14
    for layer in cache.layers:
        layer.crop(-1)
    for layer in cache.layers:
        layer.crop(-1)
    with torch.no_grad():
        again = model(input_ids=nxt, attention_mask=step_mask, position_ids=positions(step_mask)[:, -1:],
                      use_cache=True, **cache_kwargs(model, cache)).logits
    assert torch.equal(again, step) and slot.keys.untyped_storage().data_ptr() == buffer
    before = slot.keys.clone()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert torch.equal(slot.keys, before[[2, 1]])
    grown = torch.cat([step_mask[[2, 1]], torch.ones(2, 1, dtype=step_mask.dtype)], 1)
    with torch.no_grad():  # after new tensors, the next update takes new buffers holding the selected rows
        model(input_ids=nxt[[2, 1]], attention_mask=grown, position_ids=positions(grown)[:, -1:], use_cache=True,
              **cache_kwargs(model, cache))
    assert slot.keys.shape[2] == 14 and slot.keys.untyped_storage().data_ptr() != buffer
    assert torch.equal(slot.keys[:, :, :13], before[[2, 1]])
    cache.reset()
    # The buffers go; the tensors do what the stock slot's do (dropped, or zeroed before transformers 5.18).
    assert slot._buffers is None and slot.get_seq_length() == cache.layers[0].get_seq_length()


def test_a_sequence_routing_cache_is_refused():
    _, ids, mask = padded_batch([5, 7], "left")
    cache = DynamicCache()
    sequence = msk.get_mindskip_model(tiny_lm("llama"))
    with torch.no_grad():
        sequence(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(sequence, cache))
    token = msk.get_mindskip_model(sequence.unload(), TOKEN)
    with pytest.raises(ValueError, match="a token-routed layer needs a fresh cache"), torch.no_grad():
        token(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), use_cache=True,
              **cache_kwargs(token, cache))


# ----------------------------------------------------------------------------------- compile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_compiled_decode_step_is_one_graph_with_the_eager_tokens(model_type, fresh_dynamo):
    """The kept count changes every step; the decode step has fixed shapes, so a static cache's step traces into one
    graph without breaks or recompilation, and gives the eager tokens."""
    model = routed(model_type)
    _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    eager = model.generate(**kwargs)
    traced = model.generate(**kwargs, compile_config=decode_compile_config(backend="eager", fullgraph=True))
    assert torch.equal(traced, eager)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------------- static projection


def test_static_token_fractions_are_input_independent_at_each_layers_fraction():
    model = routed()
    fractions = {1: 0.25, 2: 0.75}
    tr.set_static_token_fractions(model, fractions)
    _, ids, mask = padded_batch([60, 60], "right")
    other = torch.randint(1, VOCAB, ids.shape, generator=torch.Generator().manual_seed(9))
    records = []
    for batch in (ids, other):
        record = msk.RoutingRecord()
        with torch.no_grad():
            model(input_ids=batch, attention_mask=mask, use_cache=False, mindskip_record=record)
        records.append(record)
    for idx, fraction in fractions.items():
        keep = records[0].layers[idx].keep
        assert torch.equal(keep, records[1].layers[idx].keep)  # the same decisions whatever the input
        assert abs(float(keep.float().mean()) - fraction) < 0.03
    # Generation decodes with the same pattern, and routing comes back when it is cleared.
    assert model.generate(input_ids=ids[:1, :8], max_new_tokens=3, do_sample=False).shape == (1, 11)
    tr.set_static_token_fractions(model, None)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert model.last_capacity != {1: 0.25, 2: 0.75}
    with pytest.raises(ValueError, match="are for layers"):
        tr.set_static_token_fractions(model, {1: 0.5})
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        tr.set_static_token_fractions(model, {1: 0.5, 2: 1.5})
    with pytest.raises(ValueError, match="need a token-routed model"):
        tr.set_static_token_fractions(msk.get_mindskip_model(tiny_lm("llama")), {1: 0.5, 2: 0.5})


# ----------------------------------------------------------------------------------- some layers per token


def test_token_layers_config_is_checked_and_saved(tmp_path):
    config = msk.MindSkipConfig(routing="token", layers=[1, 2, 3], token_layers=[3, 2])
    assert config.token_layers == [2, 3] and [config.routing_of(i) for i in (1, 2, 3)] == ["sequence", "token",
                                                                                          "token"]
    assert "token_layers" not in TOKEN.to_dict()  # a file routing every layer alike reads with an older mindskip_ext
    assert msk.MindSkipConfig.from_json(config.to_json())[0] == config
    for kwargs, message in ((dict(token_layers=[2]), "needs routing 'token'"),
                            (dict(routing="token", token_layers=[]), "use routing 'sequence'"),
                            (dict(routing="token", token_layers=[2, 2]), "duplicates"),
                            (dict(routing="token", token_layers=["2"]), "must be integers")):
        with pytest.raises(ValueError, match=message):
            msk.MindSkipConfig(**kwargs)
    base = tiny_lm()
    with pytest.raises(ValueError, match=r"token_layers \[3\] are not routed layers"):
        msk.get_mindskip_model(base, msk.MindSkipConfig(routing="token", layers=[1, 2], token_layers=[2, 3]))
    assert not any(isinstance(m, msk.MindSkipDecoderLayer) for m in base.modules())  # refused before any change
    model = routed(layers=[1, 2, 3])
    model.save_pretrained(tmp_path)
    model.unload()
    mixed = msk.MindSkipModel.from_pretrained(tiny_lm(), tmp_path, token_layers=[2])
    assert {i: layer.routing for i, layer in mixed.mindskip_layers.items()} == {1: "sequence", 2: "token",
                                                                               3: "sequence"}
    mixed.save_pretrained(tmp_path / "mixed")
    assert json.loads((tmp_path / "mixed" / CONFIG_NAME).read_text())["mindskip_config"]["token_layers"] == [2]
    from mindskip_ext.training.loss import routing_units

    batch = D.collate([D.Example([1, 2, 3], [1, 2, 3])], pad_token_id=0)
    with pytest.raises(ValueError, match="trains one routing level"):
        routing_units(mixed, batch)


def test_save_hybrid_writes_the_token_routers_with_the_chosen_token_layers(tmp_path):
    from mindskip_ext.model import WEIGHTS_NAME

    model = routed(layers=[1, 2, 3])
    model.save_pretrained(tmp_path / "token")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    model.unload()
    expected = logits_of(msk.MindSkipModel.from_pretrained(tiny_lm(), tmp_path / "token", token_layers=[2]), ids)
    out = tr.save_hybrid(tmp_path / "token", tmp_path / "hybrid", [2])
    assert (out / WEIGHTS_NAME).read_bytes() == (tmp_path / "token" / WEIGHTS_NAME).read_bytes()
    hybrid = msk.MindSkipModel.from_pretrained(tiny_lm(), out)
    assert hybrid.mindskip_config.token_layers == [2]
    assert torch.equal(logits_of(hybrid, ids), expected)
    # No layer per token, written over the source: sequence routers with the same weights and decisions.
    every_sequence = logits_of(msk.MindSkipModel.from_pretrained(tiny_lm(), out, routing="sequence",
                                                                 token_layers=None), ids)
    assert tr.save_hybrid(out, out, []) == out
    config = msk.MindSkipModel.from_pretrained(tiny_lm(), out).mindskip_config
    assert (config.routing, config.token_layers) == ("sequence", None)
    assert torch.equal(logits_of(msk.MindSkipModel.from_pretrained(tiny_lm(), out), ids), every_sequence)
    assert (out / WEIGHTS_NAME).read_bytes() == (tmp_path / "token" / WEIGHTS_NAME).read_bytes()
    with pytest.raises(ValueError, match=r"token_layers \[4\] are not routed layers"):
        tr.save_hybrid(tmp_path / "token", tmp_path / "bad", [2, 4])
    sequence = msk.get_mindskip_model(tiny_lm(), msk.MindSkipConfig(layers=[1, 2, 3]))
    sequence.save_pretrained(tmp_path / "sequence")
    with pytest.raises(ValueError, match="holds sequence routers: a hybrid needs token routers"):
        tr.save_hybrid(tmp_path / "sequence", tmp_path / "bad", [2])
    assert not (tmp_path / "bad").exists()  # refused before anything is written


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_sequence_layer_keeps_by_the_mean_of_its_token_logits(model_type):
    """A router is linear: routed per sequence, it keeps a sequence when the mean of its tokens' logits (over the
    real tokens) clears the threshold, the same router's per-token logits."""
    _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    token, mixed = routed(model_type, layers=[1, 2]), routed(model_type, layers=[1, 2], token_layers=[2])
    scores = {}
    for model in (token, mixed):
        randomize_routers(model, std=0.3)  # probabilities short of 0 and 1 in fp32, for their logits
        logits_of(model, ids, mask)
        scores[model.mindskip_layers[1].routing] = model.last_record.layers[1]
    per_token, per_sequence = scores["token"], scores["sequence"]
    assert per_token.keep.shape == mask.shape and per_sequence.keep.shape == (len(mask),)
    real = mask.bool()
    mean_logit = (torch.logit(per_token.score.double()) * real).sum(1) / real.sum(1)
    torch.testing.assert_close(torch.logit(per_sequence.score.double()), mean_logit, rtol=1e-4, atol=1e-4)
    assert torch.equal(per_sequence.keep, mean_logit >= 0.0) and 0 < int(per_sequence.keep.sum()) < len(mask)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_sequence_layers_that_decide_alike_for_every_token_store_no_kv_and_change_no_output(model_type, kind):
    """Where the other routers decide alike for every token (one skips all, one keeps all), routing them per
    sequence gives the token model's outputs and generations, batched or not, and the skipping layer stores no KV
    cache (the token model stores every token's there)."""
    token, mixed = routed(model_type, layers=[1, 2, 3]), routed(model_type, layers=[1, 2, 3], token_layers=[2])
    for model in (token, mixed):
        with torch.no_grad():
            for idx, bias in ((1, -20.0), (3, 20.0)):
                model.routers[idx].weight.zero_()
                model.routers[idx].bias.fill_(bias)
    seqs, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    torch.testing.assert_close(logits_of(mixed, ids, mask), logits_of(token, ids, mask), rtol=0, atol=0)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                  **({"cache_implementation": "static"} if kind == "static" else {}))
    want = token.generate(**kwargs)
    assert torch.equal(mixed.generate(**kwargs), want)
    assert mixed.last_capacity[1] == 0.0 and mixed.last_capacity[3] == 1.0 and 0 < mixed.last_capacity[2] < 1
    width = ids.shape[1]
    for i, s in enumerate(seqs):
        alone = mixed.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long),
                               max_new_tokens=6, do_sample=False)
        assert torch.equal(alone[0, len(s):], want[i, width:]), f"sequence {i}"
    stored = {}
    for model in (token, mixed):
        cache = DynamicCache() if kind == "dynamic" else StaticCache(config=model.config, max_cache_len=24)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                  **cache_kwargs(model, cache))
        stored[model.mindskip_layers[1].routing] = kv_bytes(cache)
    assert stored["sequence"][1] == 0 < stored["token"][1] == stored["token"][0]
    assert stored["sequence"][2] == stored["token"][2] == stored["token"][0] == stored["sequence"][3]


def test_varying_layers_are_those_not_deciding_alike_for_every_token():
    kept = {6: 0.0, 17: 0.47, 24: 0.9996, 27: 0.985, 28: 0.01}
    assert tr.varying_layers(kept) == [17]
    assert tr.varying_layers(kept, tolerance=0.0) == [17, 24, 27, 28]
    with pytest.raises(ValueError, match="must be in"):
        tr.varying_layers({1: 1.5})
    with pytest.raises(ValueError, match="tolerance"):
        tr.varying_layers(kept, tolerance=0.5)


# ----------------------------------------------------------------------------------- training


def test_straight_through_gradient_reaches_every_token_router():
    model = routed()
    model.train()
    _, ids, mask = padded_batch([7, 12, 3], "left")
    record = msk.RoutingRecord()
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, mindskip_record=record)
    gates = record.gates()
    assert set(gates) == {1, 2} and all(g.shape == ids.shape for g in gates.values())
    (out.logits.square().mean() + sum(g.sum() for g in gates.values())).backward()
    for router in model.routers.values():
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("full", [True, False])
def test_router_tuning_lands_on_the_target_share_of_real_tokens(tok, tmp_path, full):
    from mindskip_ext.eval.perplexity import evaluate_examples
    from mindskip_ext.training import RouterTuner, RouterTuningConfig

    examples = D.prepare_examples(tok, synthetic_instructions(400, seed=11), 128).examples
    train, heldout = D.split_heldout(examples, 0.3, seed=0)
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=8),
                                   msk.MindSkipConfig(routing="token", train_all_sequences=full))
    config = RouterTuningConfig(target_capacity=0.6, batch_size=16, max_steps=30, save_every=0, loss="kd",
                                centre_router_inputs=True)
    summary = RouterTuner(model, train, heldout, config, tmp_path, D.pad_token_id(tok), progress=False).train()
    assert abs(summary["calibration"]["capacity"] - 0.6) <= 0.01
    assert abs(summary["heldout"]["capacity"] - 0.6) <= 0.05
    per_layer = summary["heldout"]["capacity_per_layer"].values()
    assert any(0.05 < c < 0.95 for c in per_layer)  # routed per token, not whole layers
    reloaded = msk.MindSkipModel.from_pretrained(tiny_model(tokenizer=tok, layers=8), tmp_path)
    assert reloaded.mindskip_config.routing == "token"
    again = evaluate_examples(reloaded, heldout, D.pad_token_id(tok), 16)
    assert again["capacity"] == summary["heldout"]["capacity"]
