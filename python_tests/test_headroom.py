"""How much could per-sequence (per-token) routing gain: the per-sequence (per-token) cost of skipping each layer
alone, and the static best, oracle, routers and shuffled routing at the routers' budget."""

from __future__ import annotations

import pytest
import torch

import mindskip_ext as msk
from mindskip_ext import data as D
from mindskip_ext.eval.attention_drop import set_static_routing
from mindskip_ext.eval.headroom import SkipCosts, headroom, oracle_decisions, skip_costs, token_decisions
from mindskip_ext.eval.routing import routing_decisions
from mindskip_ext.testing import synthetic_instructions, tiny_model
from mindskip_ext.training.loss import distillation_kl


@pytest.fixture(scope="module")
def examples(tok):
    return D.prepare_examples(tok, synthetic_instructions(20, seed=7), 96).examples


def random_routers(tok, routing: str, seed: int) -> msk.MindSkipModel:
    model = msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=5),
                                   msk.MindSkipConfig(layers=[1, 2, 3], routing=routing))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.routers.values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 2.0)
    return model


@pytest.fixture
def model(tok):
    return random_routers(tok, "sequence", seed=1)


def test_costs_are_the_kl_of_skipping_one_layer_and_leave_the_routers_as_they_were(tok, examples, model):
    pad = D.pad_token_id(tok)
    before = {k: v.clone() for k, v in model.router_state_dict().items()}
    costs = skip_costs(model, examples, pad, batch_size=6)
    assert costs.layers == [1, 2, 3] and costs.costs.shape == (len(examples), 3)
    assert all(torch.equal(v, model.router_state_dict()[k]) for k, v in before.items())
    assert bool((costs.costs >= -1e-6).all()) and float(costs.costs.sum()) > 0
    # One sequence, one layer, computed directly: KL(bypassed || only layer 2 skipped) over its supervised tokens.
    i = 3
    batch = D.collate([examples[i]], pad)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with torch.no_grad():
        teacher = model(**inputs, mindskip_bypass=True).logits
        set_static_routing(model, [2])
        student = model(**inputs).logits
    kl, count = distillation_kl(student, teacher, batch["labels"])
    assert float(costs.costs[i, 1]) == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    assert int(costs.tokens[i]) == count
    # Every layer computes again afterwards (the replayed prefixes are gone), and a forward set on an instance
    # before (as accelerate's hooks do) is put back.
    assert all("forward" not in layer.__dict__ for layer in model.decoder_layers)
    hooked = model.decoder_layers[0]
    calls, own = [], hooked.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    hooked.forward = wrapped
    skip_costs(model, examples[:2], pad, layers=[3], batch_size=2)
    assert hooked.__dict__["forward"] is wrapped and len(calls) == 2  # ran in the dense and recorded forwards only
    del hooked.forward
    # Padding does not change a sequence's costs.
    model.load_router_state_dict(before)
    alone = skip_costs(model, examples[:5], pad, layers=[3, 1], batch_size=1)
    assert alone.layers == [1, 3]
    torch.testing.assert_close(alone.costs, costs.costs[:5, [0, 2]], rtol=1e-4, atol=1e-5)


def test_costs_with_layers_already_skipped_are_those_of_the_whole_set(tok, examples, model):
    """``also_skipped`` costs each layer together with those: the joint cost a greedy search adds layers by."""
    pad = D.pad_token_id(tok)
    joint = skip_costs(model, examples[:6], pad, batch_size=6, also_skipped=[1])
    assert joint.layers == [2, 3]  # every MindSkip layer but those already skipped
    batch = D.collate(examples[:6], pad)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    saved = {k: v.clone() for k, v in model.router_state_dict().items()}
    with torch.no_grad():
        teacher = model(**inputs, mindskip_bypass=True).logits
        set_static_routing(model, [1, 3])
        student = model(**inputs).logits
    model.load_router_state_dict(saved)
    kl, _ = distillation_kl(student, teacher, batch["labels"])
    assert float(joint.costs[:, 1].sum()) == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    alone = skip_costs(model, examples[:6], pad, layers=[3], batch_size=6)
    assert not torch.allclose(alone.costs[:, 0], joint.costs[:, 1])  # skipping 1 as well changes the cost


def test_a_layer_of_the_base_set_is_toggled_and_its_marginal_cost_is_what_keeping_it_saves(tok, examples, model):
    pad = D.pad_token_id(tok)
    around = skip_costs(model, examples[:6], pad, layers=[1, 2, 3], batch_size=4, also_skipped=[1, 3])
    assert around.base_layers == [1, 3] and around.base.shape == (6,)
    whole = skip_costs(model, examples[:6], pad, layers=[3], batch_size=6, also_skipped=[1])
    torch.testing.assert_close(around.base, whole.costs[:, 0], rtol=1e-4, atol=1e-6)  # KL of skipping 1 and 3
    alone = {i: skip_costs(model, examples[:6], pad, layers=[i], batch_size=6).costs[:, 0] for i in (1, 3)}
    torch.testing.assert_close(around.costs[:, 0], alone[3], rtol=1e-4, atol=1e-6)  # 1 kept: only 3 skipped
    torch.testing.assert_close(around.costs[:, 2], alone[1], rtol=1e-4, atol=1e-6)
    joint = skip_costs(model, examples[:6], pad, layers=[2], batch_size=6, also_skipped=[1, 3])
    torch.testing.assert_close(around.costs[:, 1], joint.costs[:, 0], rtol=1e-4, atol=1e-6)  # 2 added
    marginal = around.marginal()
    torch.testing.assert_close(marginal[:, 0], around.base - alone[3])
    torch.testing.assert_close(marginal[:, 1], joint.costs[:, 0] - around.base)
    assert torch.equal(alone[1], skip_costs(model, examples[:6], pad, layers=[1], batch_size=6).marginal()[:, 0])


def test_bad_inputs_are_refused(tok, examples, model):
    pad = D.pad_token_id(tok)
    with pytest.raises(TypeError, match="MindSkipModel"):
        skip_costs(model.base_model, examples, pad)
    with pytest.raises(ValueError, match="layer 4 is not a MindSkip layer"):
        skip_costs(model, examples, pad, layers=[1, 4])
    with pytest.raises(ValueError, match="at least one layer and one example"):
        skip_costs(model, [], pad)
    with pytest.raises(ValueError, match="layer 0 is not a MindSkip layer"):
        skip_costs(model, examples, pad, also_skipped=[0])
    costs = SkipCosts([1, 2], torch.ones(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no skip costs for router layer 3"):
        headroom(costs, {1: torch.ones(3, dtype=torch.bool), 3: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"decisions of layer 1 are \(2,\), skip costs are for 3 sequences"):
        headroom(costs, {1: torch.ones(2, dtype=torch.bool)})


def costs_of(rows, tokens, layers=None):
    rows = torch.tensor(rows, dtype=torch.float64)
    return SkipCosts(layers or list(range(rows.shape[1])), rows, torch.tensor(tokens))


def test_headroom_by_hand():
    # Each sequence has a free layer; a static drop must pay for one of them.
    costs = costs_of([[0.0, 4.0], [4.0, 0.0]], [1, 1])
    free = headroom(costs, {0: torch.tensor([False, True]), 1: torch.tensor([True, False])})
    assert free == {"layers": [0, 1], "sequences": 2, "tokens": 2, "skips_per_sequence": 1.0,
                    "skips_per_token": 1.0, "static": 2.0, "oracle": 0.0, "routers": 0.0, "shuffled": 2.0,
                    "headroom": 1.0}
    wrong = headroom(costs, {0: torch.tensor([True, False]), 1: torch.tensor([False, True])})
    assert wrong["routers"] == 4.0 and wrong["shuffled"] == 2.0 and wrong["oracle"] == 0.0
    # The budget is counted in tokens: skipping the 3-token sequence spends 3 of 4 token-skips. The oracle takes
    # the cheaper sequence per token whole and two thirds of the other.
    weighted = headroom(costs_of([[0.5], [3.0]], [1, 3]), {0: torch.tensor([True, False])})
    assert weighted["skips_per_sequence"] == 0.5 and weighted["skips_per_token"] == 0.75
    assert weighted["oracle"] == pytest.approx((0.5 + 2.0) / 4)
    assert weighted["static"] == pytest.approx(0.75 * 3.5 / 4)
    assert weighted["routers"] == pytest.approx(3.0 / 4)
    # Sequences without supervised tokens count for nothing.
    empty = headroom(costs_of([[0.5], [3.0], [9.0]], [1, 3, 0]), {0: torch.tensor([True, False, False])})
    assert {k: empty[k] for k in ("oracle", "static", "routers")} == pytest.approx(
        {k: weighted[k] for k in ("oracle", "static", "routers")})


def test_the_oracle_is_a_lower_bound_of_trained_decisions(tok, examples, model):
    pad = D.pad_token_id(tok)
    costs = skip_costs(model, examples, pad)
    report = headroom(costs, routing_decisions(model, examples, pad))
    assert 0.0 < report["skips_per_sequence"] < 3.0, "random routers must skip some (layer, sequence) pairs"
    assert report["oracle"] <= report["static"] + 1e-9 and report["oracle"] <= report["routers"] + 1e-9
    assert 0.0 <= report["headroom"] <= 1.0


def test_the_budget_may_count_processed_tokens_and_the_oracle_gives_its_decisions():
    costs = costs_of([[0.5, 2.0], [3.0, 0.1]], [1, 3])
    # Counted in processed tokens (4 and 4), both sequences spend the same per skip: the cheapest pair wins.
    lengths = torch.tensor([4, 4])
    report = headroom(costs, {0: torch.tensor([False, True]), 1: torch.tensor([True, True])}, lengths=lengths)
    assert report["skips_per_token"] == 0.5 and report["oracle"] == pytest.approx(0.1 / 4)
    assert report["static"] == pytest.approx(0.5 * 2.1 / 4)  # half of the cheaper layer (2.1 in all)
    chosen = oracle_decisions(costs, 1.0, lengths)
    assert chosen[0].tolist() == [False, True] and chosen[1].tolist() == [True, False]
    assert oracle_decisions(costs, 0.5, lengths, layers=[1])[1].tolist() == [True, False]
    # By supervised tokens (1 and 3), 0.1 per token on the second sequence is the cheapest.
    by_targets = oracle_decisions(costs, 0.75, layers=[0, 1])
    assert by_targets[1].tolist() == [True, False] and by_targets[0].tolist() == [True, True]
    with pytest.raises(ValueError, match="lengths for 3 sequences"):
        headroom(costs, {0: torch.tensor([True, False])}, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="no skip costs for layer 5"):
        oracle_decisions(costs, 1.0, layers=[5])


def test_around_a_base_set_every_routing_pays_for_the_base_layers_it_does_not_route():
    # Base set {0}: KL(skip 0) = 1.0 per sequence; keeping 0 costs 0.25 (toggle), adding 1 costs 3.0 in total.
    costs = SkipCosts([0, 1], torch.tensor([[0.25, 3.0], [0.25, 1.5]], dtype=torch.float64), torch.tensor([1, 1]),
                      base_layers=[0], base=torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert costs.marginal().tolist() == [[0.75, 2.0], [0.75, 0.5]]
    assert costs.subset(torch.tensor([1])).marginal().tolist() == [[0.75, 0.5]]
    static = {0: torch.tensor([False, False]), 1: torch.tensor([True, True])}
    assert headroom(costs, static)["routers"] == pytest.approx(1.0)  # the base set itself
    keep_base = {0: torch.tensor([True, True]), 1: torch.tensor([True, True])}
    assert headroom(costs, keep_base)["routers"] == pytest.approx(0.25)  # nothing skipped: the toggled cost
    # Routing only layer 1, the base layer 0 stays skipped: it is paid for in every number.
    only = headroom(costs, {1: torch.tensor([True, False])})
    assert only["routers"] == pytest.approx((2 * 1.0 + 0.5) / 2) and only["oracle"] == only["routers"]
    assert only["static"] == pytest.approx((2 * 1.0 + 0.5 * 2.5) / 2)


def test_level_decisions_skip_the_lowest_scores_per_budget_unit_until_the_budget():
    from mindskip_ext.eval.headroom import level_decisions

    scores = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.3, 0.05]], dtype=torch.float64)
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)  # a skip of sequence 1 spends 3 of the budget
    skipped = {}
    for per_token in (1.0, 1.25, 1.5, 1.75):  # 4, 5, 6, 7 weighted skips
        keep = level_decisions(scores, weights, per_token, [4, 5, 7])
        skipped[per_token] = sorted((s, i) for i, k in keep.items() for s in (~k).nonzero()[:, 0].tolist())
    # In order: (1, 7) for 3, (0, 4) for 1, then (1, 4) for 3, taken when more than half of it fits.
    assert skipped[1.0] == skipped[1.25] == [(0, 4), (1, 7)]
    assert skipped[1.5] == skipped[1.75] == [(0, 4), (1, 4), (1, 7)]
    with pytest.raises(ValueError, match="scores of shape"):
        level_decisions(scores, weights, 1.0, [4, 5])


@pytest.fixture
def token_model(tok):
    return random_routers(tok, "token", seed=3)


def test_per_token_costs_are_each_positions_kl_and_sum_to_the_sequences(tok, examples, token_model):
    pad = D.pad_token_id(tok)
    per_sequence = skip_costs(token_model, examples[:7], pad, batch_size=3)
    per_token = skip_costs(token_model, examples[:7], pad, batch_size=4, per_token=True)
    counts = [e.num_targets for e in examples[:7]]
    assert per_token.costs.shape == (sum(counts), 3) and bool((per_token.tokens == 1).all())
    assert per_token.sequence.tolist() == [i for i, n in enumerate(counts) for _ in range(n)]
    summed = torch.zeros_like(per_sequence.costs).index_add_(0, per_token.sequence, per_token.costs)
    torch.testing.assert_close(summed, per_sequence.costs, rtol=1e-4, atol=1e-6)
    # One example's positions computed directly: the KL at each supervised position with layer 3 skipped everywhere.
    i = 5
    batch = D.collate([examples[i]], pad)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    saved = {k: v.clone() for k, v in token_model.router_state_dict().items()}
    with torch.no_grad():
        teacher = token_model(**inputs, mindskip_bypass=True).logits[0, :-1]
        set_static_routing(token_model, [3])
        student = token_model(**inputs).logits[0, :-1]
    token_model.load_router_state_dict(saved)
    covered = batch["labels"][0, 1:] != D.IGNORE_INDEX
    kl = torch.nn.functional.kl_div(student[covered].log_softmax(-1), teacher[covered].log_softmax(-1),
                                    log_target=True, reduction="none").sum(-1)
    first = sum(counts[:i])
    torch.testing.assert_close(per_token.costs[first:first + counts[i], 2], kl.double(), rtol=1e-4, atol=1e-6)


def test_token_decisions_are_the_forwards_own_at_the_supervised_positions(tok, examples, token_model):
    pad = D.pad_token_id(tok)
    decisions = token_decisions(token_model, examples[:6], pad, batch_size=4)
    assert sorted(decisions) == [1, 2, 3]
    rows = []
    for e in examples[:6]:
        batch = D.collate([e], pad)
        with torch.no_grad():
            token_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        covered = batch["labels"][0, 1:] != D.IGNORE_INDEX
        rows.append({i: r.keep[0, :-1][covered] for i, r in token_model.last_record.layers.items()})
    for idx, keep in decisions.items():
        assert torch.equal(keep, torch.cat([r[idx] for r in rows]))
    assert 0 < sum(int(k.sum()) for k in decisions.values()) < 3 * len(decisions[1]), "random routers must split"
    with pytest.raises(ValueError, match="one decision per token"):
        token_decisions(msk.get_mindskip_model(tiny_model(tokenizer=tok, layers=5), msk.MindSkipConfig(layers=[1])),
                        examples[:2], pad)
    report = headroom(skip_costs(token_model, examples[:6], pad, per_token=True), decisions)
    assert report["oracle"] <= report["sequence_oracle"] + 1e-9 <= report["static"] + 2e-9
    assert report["oracle"] <= report["routers"] + 1e-9


def test_per_token_headroom_by_hand():
    # Two sequences of two tokens; each token has a free layer. Per token the oracle pays nothing. Per sequence a
    # (layer, sequence) pair costs 2 in sequence 0 and 3 in sequence 1: the oracle spends the budget of 4 token-skips
    # on both layers of sequence 0; the static drop pays (2 + 3) / 4 per token.
    costs = SkipCosts([0, 1], torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 3.0], [3.0, 0.0]], dtype=torch.float64),
                      torch.ones(4, dtype=torch.long), sequence=torch.tensor([0, 0, 1, 1]))
    keep = {0: torch.tensor([False, True, False, True]), 1: torch.tensor([True, False, True, False])}
    report = headroom(costs, keep)
    assert report["skips_per_token"] == 1.0 and report["routers"] == 0.0 and report["oracle"] == 0.0
    assert report["static"] == pytest.approx(5.0 / 4) and report["sequence_oracle"] == pytest.approx(4.0 / 4)
    assert report["headroom"] == 1.0 and report["sequence_headroom"] == pytest.approx(0.2)
