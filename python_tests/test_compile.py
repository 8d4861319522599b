"""torch.compile of the decode step on the fixed-shape static cache: generate() with a compile config traces the
MindSkip decode step into one graph (no graph break, no recompilation from step to step), and compiled decoding
gives the eager tokens (CPU: inductor's default mode; CUDA: CUDA graphs, mode="reduce-overhead"). Prefill stays
eager, as transformers runs it (its beam search never compiles; test_cache checks it on the static cache). Tiny
models built from configs; no downloads."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import mindskip_ext as msk
from mindskip_ext.cache import decode_compile_config

from tiny import GRANULARITIES, padded_batch, randomize_routers, tiny_lm

pytestmark = pytest.mark.hf


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(granularity="attn", model_type="llama", device="cpu"):
    model = msk.get_mindskip_model(tiny_lm(model_type).to(device), msk.MindSkipConfig(granularity=granularity))
    randomize_routers(model)
    return model


def _generate(model, compile_config=None, **kwargs):
    _, ids, mask = padded_batch([7, 12, 3, 9, 12, 5], "left")
    device = next(model.parameters()).device
    return model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=6, do_sample=False,
                          cache_implementation="static", compile_config=compile_config, **kwargs)


@pytest.mark.parametrize(("granularity", "model_type"), [(g, "llama") for g in GRANULARITIES] + [("attn", "qwen3")])
def test_decode_step_is_one_graph_without_breaks(granularity, model_type):
    model = _model(granularity, model_type)
    eager = _generate(model)
    capacity = model.last_capacity
    assert any(0.0 < c < 1.0 for c in capacity.values()), capacity
    # The "eager" backend runs what dynamo captured as it is: the count of graphs and breaks, without inductor's time.
    traced = _generate(model, decode_compile_config(backend="eager", fullgraph=False))
    assert torch.equal(traced, eager)
    assert dict(counters["graph_break"]) == {}
    # Five decode steps, one graph: no recompilation as the token count grows.
    assert counters["stats"]["unique_graphs"] == 1


def test_a_layer_that_keeps_every_sequence_decodes_in_the_same_one_graph():
    """Its decode step calls the stock layer (test_cache checks the eager side): traced with the routed layers, one
    graph without breaks, and the eager tokens."""
    model = _model()
    keeping = next(iter(model.routers))
    with torch.no_grad():
        model.routers[keeping].weight.zero_()
        model.routers[keeping].bias.fill_(10.0)  # keeps every sequence
    eager = _generate(model)
    capacity = model.last_capacity
    assert capacity[keeping] == 1.0 and any(0.0 < c < 1.0 for c in capacity.values()), capacity
    traced = _generate(model, decode_compile_config(backend="eager", fullgraph=True))
    assert torch.equal(traced, eager)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


def test_inductor_decode_equals_eager_on_cpu():
    model = _model("block")
    eager = _generate(model)
    compiled = _generate(model, decode_compile_config(mode="default", fullgraph=True))
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cuda_graph_decode_equals_eager(granularity):
    model = _model(granularity, device="cuda")
    eager = _generate(model, disable_compile=True)
    # On CUDA transformers compiles the decode step of a static cache by itself (mode="reduce-overhead").
    compiled = _generate(model)
    assert torch.equal(compiled, eager)
    assert dict(counters["graph_break"]) == {}
