"""The KV-cache calling convention across transformers releases (`past_key_values` before 5.24, `cache` after):
reading it from either name, handing it on under the name a module takes, and no deprecation warning from our
code paths."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import DynamicCache

import mindskip_ext as msk
from mindskip_ext.cache import kv_bytes
from mindskip_ext.hf_compat import CACHE_NAMES, cache_kwargs, cache_name, output_cache, pop_cache

from tiny import VOCAB, tiny_lm

pytestmark = pytest.mark.hf


class OldStyle(nn.Module):
    def forward(self, hidden_states, past_key_values=None, **kwargs):
        return past_key_values


class NewStyle(nn.Module):
    def forward(self, hidden_states, cache=None, **kwargs):
        return cache


class KwargsOnly(nn.Module):
    def forward(self, *args, **kwargs):
        return kwargs


def test_pop_cache_reads_either_name_and_removes_both():
    cache = object()
    for name in CACHE_NAMES:
        kwargs = {name: cache, "use_cache": True}
        assert pop_cache(kwargs) is cache
        assert kwargs == {"use_cache": True}
    kwargs = {"cache": cache, "past_key_values": None}
    assert pop_cache(kwargs) is cache and kwargs == {}
    assert pop_cache({"cache": cache, "past_key_values": cache}) is cache
    assert pop_cache({}) is None


def test_pop_cache_refuses_two_different_caches():
    with pytest.raises(ValueError, match="pass the KV cache once"):
        pop_cache({"cache": object(), "past_key_values": object()})


def test_cache_kwargs_follow_each_modules_own_signature():
    cache = object()
    assert OldStyle()(None, **cache_kwargs(OldStyle(), cache)) is cache
    assert NewStyle()(None, **cache_kwargs(NewStyle(), cache)) is cache
    # A **kwargs-only forward gets the name this transformers release uses.
    assert cache_name(KwargsOnly()) in CACHE_NAMES


def test_library_names_match_the_installed_transformers():
    renamed = Version(transformers.__version__).release >= (5, 24)
    expected = "cache" if renamed else "past_key_values"
    model = tiny_lm()
    assert cache_name(model) == expected
    assert cache_name(model.model.layers[0].self_attn) == expected
    assert cache_name(msk.get_mindskip_model(model)) == expected


def test_no_deprecation_warning_from_generate_decode_and_training():
    model = msk.get_mindskip_model(tiny_lm())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 4)
    ids = torch.randint(2, VOCAB, (4, 7), generator=gen)
    mask = torch.ones_like(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False)
        cache = DynamicCache()
        with torch.no_grad():
            first = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
            model(input_ids=first.logits[:, -1:].argmax(-1), attention_mask=torch.ones(4, 8, dtype=torch.long),
                  use_cache=True, **cache_kwargs(model, cache))
        model.train()
        record = msk.RoutingRecord()
        model(input_ids=ids, attention_mask=mask, use_cache=False, mindskip_record=record).logits.sum().backward()
        model.eval()
    assert output_cache(first) is cache
    # The decisions were made once and kept: the compact cache holds only the kept rows.
    held = kv_bytes(output_cache(out))
    capacity = model.last_capacity
    assert any(0.0 < c < 1.0 for c in capacity.values()), capacity
    for idx, frac in capacity.items():
        assert held[idx] == pytest.approx(held[0] * frac)
    assert len(record.gates()) == len(model.routers)
