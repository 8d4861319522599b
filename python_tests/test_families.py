"""The contract of every decoder family MindSkip converts, on tiny random configs with each family's features (experts,
sliding and full layers, sandwich and post-norms, fused projections, residual multipliers): identity at init, forced
skip equal to the family's residual path, batch invariance under left and right padding, compact KV rows, batched
greedy generation equal to unbatched with dynamic and static caches, save / load / unload, router-only gradients, the
packed path; mixture-of-experts router logits and auxiliary loss; sliding-window slots through crop and beam search;
refusals. A family this transformers release lacks is skipped, with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, StaticCache

import mindskip_ext as msk
from mindskip_ext.architectures import ARCHITECTURES, REFUSED, TOKEN_ROUTING_FAMILIES
from mindskip_ext.cache import kv_bytes
from mindskip_ext.hf_compat import cache_kwargs, output_cache
from mindskip_ext.layer import MindSkipDecoderLayer
from mindskip_ext.testing import TINY_WINDOW, tiny_config, tiny_model

from tiny import VOCAB, logits_of, padded_batch, positions, randomize_routers

pytestmark = pytest.mark.hf

# model_type -> config overrides of its tiny model (on top of mindskip_ext.testing.tiny_config's family fields).
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=TINY_WINDOW),  # Mistral with a window: every layer slides
    "qwen2": {},
    "qwen3": {},
    "mixtral": {},
    "qwen3_moe": {},
    "olmoe": {},
    "gemma2": {},
    "gemma3_text": {},
    "phi3": {},
    "olmo2": {},
    "granite": {},
    # Llama-like ones beyond the list, and OLMo 3 (post-norm with sliding layers).
    "gemma": {},
    "smollm3": {},
    "olmo": {},
    "starcoder2": {},
    "olmo3": {},
}
MOE = [f for f in FAMILIES if ARCHITECTURES[f].moe]
DENSE = [f for f in FAMILIES if not ARCHITECTURES[f].moe]
# Gemma 2's soft-capped attention has no sdpa implementation in transformers.
ATTN = {"gemma2": "eager"}
# Families whose routed layers (1 and 2 of 4) have no full causal attention layer for the packed varlen path: every
# layer of Mistral with a window slides, and Gemma 2 soft-caps its attention logits.
NOT_PACKED = {"mistral", "gemma2"}
LENGTHS = [7, 12, 3, 9, 12, 5]  # longer and shorter than the sliding window
NEW_TOKENS = 6


def _available(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def family_lm(family: str, seed: int = 0, attn: str | None = None, **overrides):
    """A tiny LM of ``family`` with ``VOCAB`` ids and no EOS (batched and single runs generate as many tokens)."""
    if not _available(family):
        pytest.skip(f"this transformers release has no {family!r} models")
    fields = dict(vocab_size=VOCAB, max_position_embeddings=128, eos_token_id=None, **FAMILIES[family])
    fields.update(overrides)
    return tiny_model(family, attn=attn or ATTN.get(family, "sdpa"), seed=seed, **fields)


def wrapped_lm(family: str, granularity: str = "attn", **config):
    model = msk.get_mindskip_model(family_lm(family), msk.MindSkipConfig(granularity=granularity, **config))
    randomize_routers(model)
    return model


def _granularities(families):
    return [(f, g) for f in families for g in (["attn"] if ARCHITECTURES[f].moe else ["attn", "mlp", "block"])]


def _mixed(capacity: dict) -> None:
    """The test is not vacuous: some layer kept some sequences and skipped others."""
    assert any(0.0 < c < 1.0 for c in capacity.values()), capacity


# ----------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("family, granularity", _granularities(FAMILIES))
def test_a_fresh_conversion_is_the_identity(family, granularity):
    model = family_lm(family)
    _, ids, mask = padded_batch(LENGTHS)
    ref = logits_of(model, ids, mask)
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(granularity=granularity))
    assert torch.equal(logits_of(wrapped, ids, mask), ref)
    assert wrapped.last_capacity == {1: 1.0, 2: 1.0}


@pytest.mark.parametrize("family, granularity, attn", [
    (f, g, a) for f, g in _granularities(FAMILIES) for a in ([ATTN[f]] if f in ATTN else ["eager", "sdpa"])])
def test_forced_skip_is_the_residual_path_with_the_familys_norms(family, granularity, attn):
    """A skipped sublayer adds nothing: the stock model whose skipped sublayer outputs zeros (through the family's
    output norm, dropout and residual scale, which all keep a zero a zero) gives the same logits."""
    layer = 2
    model = family_lm(family, attn=attn)
    _, ids, mask = padded_batch([6, 8])
    reference = copy.deepcopy(model)
    stock = reference.model.layers[layer]
    spec = ARCHITECTURES[family]
    if granularity in ("attn", "block"):
        getattr(stock, spec.attn).register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), out[1]))
    if granularity in ("mlp", "block"):
        getattr(stock, spec.mlp).register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    expected = logits_of(reference, ids, mask)
    wrapped = msk.get_mindskip_model(model, msk.MindSkipConfig(granularity=granularity, layers=[layer]))
    with torch.no_grad():
        wrapped.routers[layer].bias.fill_(-10.0)
    got = logits_of(wrapped, ids, mask)
    assert wrapped.last_capacity == {layer: 0.0}
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, logits_of(copy.deepcopy(wrapped).unload(), ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_token_routing_skips_exactly_the_attention_or_refuses_the_family(family):
    """Token routing (every token writes its K/V, a skipped token computes no attention) with every token skipped is
    the stock model with a zeroed attention output; a family whose attention it cannot recompute is refused by name."""
    layer = 2
    model = family_lm(family)
    config = msk.MindSkipConfig(layers=[layer], routing="token")
    if family not in TOKEN_ROUTING_FAMILIES:
        with pytest.raises(ValueError, match=f"token routing does not support '{family}' models"):
            msk.get_mindskip_model(model, config)
        return
    _, ids, mask = padded_batch([6, 8])
    dense = logits_of(model, ids, mask)
    reference = copy.deepcopy(model)
    stock = getattr(reference.model.layers[layer], ARCHITECTURES[family].attn)
    stock.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), out[1]))
    wrapped = msk.get_mindskip_model(model, config)
    assert torch.equal(logits_of(wrapped, ids, mask), dense)  # a fresh conversion is the identity
    with torch.no_grad():
        wrapped.routers[layer].bias.fill_(-10.0)
    got = logits_of(wrapped, ids, mask)
    torch.testing.assert_close(got, logits_of(reference, ids, mask), rtol=0, atol=1e-6)
    assert not torch.allclose(got, logits_of(copy.deepcopy(wrapped).unload(), ids, mask))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family, granularity", [(f, g) for f, g in _granularities(FAMILIES) if g != "mlp"])
def test_mixed_decisions_are_batch_invariant(family, granularity, side):
    model = wrapped_lm(family, granularity)
    seqs, ids, mask = padded_batch(LENGTHS, side)
    batched = logits_of(model, ids, mask)
    _mixed(model.last_capacity)
    width = ids.shape[1]
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        torch.testing.assert_close(batched[i, span], logits_of(model, s[None])[0], rtol=1e-4, atol=1e-4)


def _kv_rows(cache) -> dict[int, tuple]:
    return {idx: tuple(slot.keys.shape) for idx, slot in enumerate(cache.layers)
            if getattr(slot, "keys", None) is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_is_batch_invariant_with_compact_kv_dynamic_and_static(family):
    model = wrapped_lm(family)
    seqs, ids, mask = padded_batch(LENGTHS, "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                  return_dict_in_generate=True)
    dynamic = model.generate(**kwargs)
    capacity = model.last_capacity
    _mixed(capacity)
    width = ids.shape[1]
    for i, s in enumerate(seqs):
        alone = model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long),
                               max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(alone[0, len(s):], dynamic.sequences[i, width:]), f"sequence {i}"
    static = model.generate(**kwargs, cache_implementation="static")
    assert model.last_capacity == capacity
    assert torch.equal(static.sequences, dynamic.sequences)

    # Compact KV: a MindSkip layer holds its kept rows of what the unconverted model's layer holds (a sliding layer
    # its window, a full one every position), in both caches.
    dense = copy.deepcopy(model).unload()
    for cache_kind in ({}, {"cache_implementation": "static"}):
        held = kv_bytes(output_cache(model.generate(**kwargs, **cache_kind)))
        dense_cache = output_cache(dense.generate(**kwargs, **cache_kind))
        dense_held, dense_rows = kv_bytes(dense_cache), _kv_rows(dense_cache)
        for idx, frac in capacity.items():
            assert held[idx] == pytest.approx(dense_held[idx] * frac, rel=1e-9), (cache_kind, idx, frac)
        if cache_kind:
            rows = _kv_rows(output_cache(model.generate(**kwargs, **cache_kind)))
            for idx, frac in capacity.items():
                if frac > 0:
                    assert rows[idx] == (round(frac * len(seqs)), *dense_rows[idx][1:]), idx


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_unload(family, tmp_path):
    model = family_lm(family)
    pristine = copy.deepcopy(model)
    _, ids, mask = padded_batch([5, 9, 7])
    original = logits_of(model, ids, mask)
    wrapped = msk.get_mindskip_model(model)
    randomize_routers(wrapped)
    routed = logits_of(wrapped, ids, mask)
    wrapped.save_pretrained(tmp_path)
    loaded = msk.MindSkipModel.from_pretrained(pristine, tmp_path)
    assert torch.equal(logits_of(loaded, ids, mask), routed)
    layers = list(model.model.layers)
    back = wrapped.unload()
    assert back is model and not any(isinstance(m, MindSkipDecoderLayer) for m in back.modules())
    assert all(a is getattr(b, "base_layer", b) for a, b in zip(back.model.layers, layers, strict=True))
    assert torch.equal(logits_of(back, ids, mask), original)
    assert all(p.requires_grad for p in back.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_routers_get_gradients(family):
    model = wrapped_lm(family)
    model.train()
    _, ids, mask = padded_batch([5, 9, 7])
    labels = ids.masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in model.named_parameters() if ".router." in name}
    assert all(bool(router.weight.grad.abs().sum() > 0) for router in model.routers.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_varlen_path_equals_the_gathered_path(family, monkeypatch):
    base = family_lm(family)
    gathered = msk.get_mindskip_model(copy.deepcopy(base), msk.MindSkipConfig(packed_attention="off"))
    packed = msk.get_mindskip_model(copy.deepcopy(base), msk.MindSkipConfig(packed_attention="on"))
    randomize_routers(gathered)
    randomize_routers(packed)
    calls = []
    original = MindSkipDecoderLayer._packed_attention
    monkeypatch.setattr(MindSkipDecoderLayer, "_packed_attention",
                        lambda self, *a: calls.append(self.layer_idx) or original(self, *a))
    _, ids, mask = padded_batch(LENGTHS, "left")
    ref, got = logits_of(gathered, ids, mask), logits_of(packed, ids, mask)
    assert packed.last_capacity == gathered.last_capacity
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-4)
    # The packed path ran on every full causal layer that kept a sequence; sliding and soft-capped layers gather.
    assert bool(calls) == (family not in NOT_PACKED), calls


# ----------------------------------------------------------------------------------- mixture of experts


@pytest.mark.parametrize("family", MOE)
def test_moe_router_logits_and_auxiliary_loss_are_untouched(family):
    """The MoE block runs as the stock layer runs it: at init the router logits and the auxiliary loss are the
    unconverted model's; with an attention skipped they still cover every token of every layer; training adds the
    auxiliary loss to the task loss and still only the MindSkip routers get gradients."""
    model = family_lm(family)
    _, ids, mask = padded_batch([5, 9, 7])
    labels = ids.masked_fill(mask == 0, -100)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, output_router_logits=True)
    with torch.no_grad():
        ref = model(**inputs)
    wrapped = msk.get_mindskip_model(model)
    with torch.no_grad():
        got = wrapped(**inputs)
    assert ref.aux_loss is not None and torch.equal(got.aux_loss, ref.aux_loss)
    assert len(got.router_logits) == len(ref.router_logits)
    assert all(torch.equal(a, b) for a, b in zip(got.router_logits, ref.router_logits))

    with torch.no_grad():
        wrapped.routers[1].bias.fill_(-10.0)  # layer 1 skips its attention for every sequence
        skipped = wrapped(**inputs)
    assert wrapped.last_capacity[1] == 0.0
    assert [t.shape for t in skipped.router_logits] == [t.shape for t in ref.router_logits]
    assert torch.isfinite(skipped.aux_loss) and not torch.equal(skipped.router_logits[2], ref.router_logits[2])

    randomize_routers(wrapped)
    wrapped.train()
    out = wrapped(**inputs)
    coefficient = wrapped.config.router_aux_loss_coef
    plain = wrapped(**dict(inputs, output_router_logits=False))
    torch.testing.assert_close(out.loss, plain.loss + coefficient * out.aux_loss)
    out.loss.backward()
    assert {n for n, p in wrapped.named_parameters() if p.grad is not None} == {
        n for n, _ in wrapped.named_parameters() if ".router." in n}


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("granularity", ["mlp", "block"])
def test_moe_refuses_to_gate_the_expert_block(family, granularity):
    model = family_lm(family)
    with pytest.raises(ValueError, match=f"granularity '{granularity}' would gate the mixture-of-experts block"):
        msk.get_mindskip_model(model, msk.MindSkipConfig(granularity=granularity))
    assert not any(isinstance(m, MindSkipDecoderLayer) for m in model.modules())


@pytest.mark.slow
def test_mindskip_train_tunes_the_routers_of_an_moe_model(tmp_path, capsys, tok):
    """`mindskip train` (the default recipe) on a tiny Qwen3-MoE checkpoint, then `mindskip eval` with its routers."""
    import json

    from mindskip_ext import cli
    from mindskip_ext.testing import synthetic_instructions

    if not _available("qwen3_moe"):
        pytest.skip("this transformers release has no 'qwen3_moe' models")
    model = tiny_model("qwen3_moe", tokenizer=tok, layers=6, seed=0)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_instructions(200, seed=3)))
    common = ["--model", str(tmp_path / "model"), "--data", str(data), "--no-progress"]
    code = cli.main(["train", *common, "--target-capacity", "0.5", "--output", str(tmp_path / "routers"),
                     "--max-steps", "6", "--batch-size", "8", "--calibration-sequences", "16"])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 6 and result["perplexity"] > 1.0 and 0.0 <= result["capacity"] <= 1.0
    assert set(result["capacity_per_layer"]) == {str(i) for i in range(1, 5)}
    code = cli.main(["eval", *common, "--routers", str(tmp_path / "routers")])
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] > 1.0


# ----------------------------------------------------------------------------------- sliding-window layers


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_sliding_slots_crop_and_reorder_like_the_dense_cache(family):
    """Decode two tokens, crop them away and decode them again, on a dynamic and a static cache (window 16, so that
    the stock sliding layers can crop too); then beam search, which reorders the compact slots, equals per sequence
    the unbatched run and the dynamic cache's."""
    model = msk.get_mindskip_model(family_lm(family, sliding_window=16))
    randomize_routers(model)
    _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    nxt = torch.randint(1, VOCAB, (ids.shape[0], 2), generator=torch.Generator().manual_seed(5))
    step_mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    logits = []
    for cache in DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=32):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                  **cache_kwargs(model, cache))
            first = _step(model, nxt, step_mask, cache)
        assert any(layer.is_sliding for layer in cache.layers)
        _crop(cache, 2)
        assert int(cache.get_seq_length()) == ids.shape[1]
        again = _step(model, nxt, step_mask, cache)
        torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)
        logits.append(again)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    _mixed(model.last_capacity)

    model = wrapped_lm(family)  # window 6: the beams run past it
    seqs, ids, mask = padded_batch([7, 12, 4, 9], "left")
    beams = dict(num_beams=3, do_sample=False, max_new_tokens=5)
    batched = model.generate(input_ids=ids, attention_mask=mask, **beams)
    _mixed(model.last_capacity)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **beams),
                       batched)
    for i, s in enumerate(seqs):
        alone = model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **beams)
        assert torch.equal(alone[0, len(s):], batched[i, ids.shape[1]:]), i


def _crop(cache, tokens: int) -> None:
    for layer in cache.layers:  # the MindSkip slots crop; transformers < 5.18's own static layers have no crop
        if hasattr(layer, "crop"):
            layer.crop(-tokens)
        else:
            layer.cumulative_length.sub_(tokens)
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int -= tokens


def _step(model, ids, mask, cache):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)[:, -ids.shape[1]:],
                     use_cache=True, **cache_kwargs(model, cache)).logits


# ----------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_parallel_attention_and_mlp_families_are_refused_by_name(family):
    if not _available(family):
        pytest.skip(f"this transformers release has no {family!r} models")
    config = tiny_config(family, vocab_size=VOCAB, layers=2)
    with pytest.raises(ValueError, match=f"model type '{family}' is not supported by MindSkip: its attention and MLP "
                                         "read the same normalised input in parallel.*Supported: gemma, gemma2"):
        msk.get_mindskip_model(AutoModelForCausalLM.from_config(config))


def test_an_unknown_family_is_refused_naming_the_supported_ones():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    supported = ", ".join(sorted(FAMILIES))
    with pytest.raises(ValueError, match=f"model type 'gpt2' is not supported by MindSkip; supported: {supported}$"):
        msk.get_mindskip_model(model)


def test_a_layer_whose_structure_changed_is_refused():
    """The spec is checked against the layer: a norm the spec does not name, or a named part that is missing."""
    model = family_lm("llama")
    model.model.layers[1].post_feedforward_layernorm = copy.deepcopy(model.model.layers[1].input_layernorm)
    with pytest.raises(ValueError, match="has norms MindSkip does not know where to apply: post_feedforward_layer"):
        msk.get_mindskip_model(model)
    model = family_lm("gemma3_text")
    del model.model.layers[2].pre_feedforward_layernorm
    with pytest.raises(ValueError, match="'gemma3_text' decoder layer .* has no pre_feedforward_layernorm"):
        msk.get_mindskip_model(model)
    assert not any(isinstance(m, MindSkipDecoderLayer) for m in model.modules())
