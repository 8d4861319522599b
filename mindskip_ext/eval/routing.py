"""Is the routing dynamic? Per-layer decisions of trained routers on held-out data, and their static projection.

For each MindSkip layer: the kept fraction, the layer's majority decision, and the share of sequences (of tokens, for a
layer routed per token) whose decision differs from that majority (0 for a layer that always keeps or always skips: a
static layer). The
*static projection* of a set of routers freezes every layer to its majority decision (or drops the layers it
keeps least, as many as it skips per sequence). If a router-tuned model cannot beat its own static projection,
its routing does no work beyond choosing which layers to drop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import Example
from .attention_drop import set_static_routing
from .perplexity import routed_forwards


def routing_decisions(model, examples: Sequence[Example], pad_id: int, batch_size: int = 16, bf16: bool = False):
    """Layer index -> bool keep decisions: ``(len(examples),)`` in the order of ``examples`` for a layer routed per
    sequence; for a layer routed per token (token routers, a hybrid's ``token_layers``), one per real token of the
    examples, in no particular order (what a kept fraction and a majority need; per position:
    :func:`mindskip_ext.eval.headroom.token_decisions`)."""
    decisions: dict[int, torch.Tensor] = {}
    per_token: dict[int, list[torch.Tensor]] = {}
    for index, _, _, record in routed_forwards(model, examples, pad_id, batch_size, bf16):
        rows = torch.tensor(index)
        for idx, routing in record.layers.items():
            if routing.keep.dim() == 2:
                keep = routing.keep if routing.real is None else routing.keep[routing.real]
                per_token.setdefault(idx, []).append(keep.flatten().cpu())
                continue
            out = decisions.setdefault(idx, torch.zeros(len(examples), dtype=torch.bool))
            out[rows] = routing.keep.cpu()
    decisions.update({idx: torch.cat(parts) for idx, parts in per_token.items()})
    return dict(sorted(decisions.items()))


def routing_report(decisions: dict[int, torch.Tensor], num_layers: int) -> dict:
    """Per-layer kept fraction, majority and disagreement, and the static projection's dropped layers.

    ``num_layers`` is the model's decoder-layer count, for skip ratios over all attention sublayers.
    """
    layers = {}
    for idx, keep in decisions.items():
        kept = float(keep.float().mean())
        majority_keep = kept >= 0.5
        layers[str(idx)] = {
            "kept": round(kept, 6),
            "majority": "keep" if majority_keep else "skip",
            "disagreement": round(1.0 - kept if majority_keep else kept, 6),
        }
    skipped = sum(1.0 - v["kept"] for v in layers.values())
    dropped = [int(idx) for idx, v in layers.items() if v["majority"] == "skip"]
    dynamic = [idx for idx, v in layers.items() if v["disagreement"] > 0.0]
    return {
        "layers": layers,
        "skipped_layers_per_sequence": round(skipped, 6),
        "skip_ratio": round(skipped / num_layers, 6),
        "mean_disagreement": round(sum(v["disagreement"] for v in layers.values()) / max(1, len(layers)), 6),
        "dynamic_layers": [int(i) for i in dynamic],
        "static_projection": {"dropped_layers": dropped, "skip_ratio": round(len(dropped) / num_layers, 6)},
    }


def apply_static_projection(model, report: dict, num_dropped: int | None = None) -> list[int]:
    """Freeze every router of ``model`` (in place) and return the layers that now always skip.

    By default each layer takes its majority decision. With ``num_dropped``, the ``num_dropped`` layers with
    the lowest kept fraction always skip and the others always keep: a static model at the skip ratio of the
    dynamic one (``round(report["skipped_layers_per_sequence"])``), where the majority rule may land elsewhere.
    """
    if num_dropped is None:
        dropped = report["static_projection"]["dropped_layers"]
    else:
        ranked = sorted(report["layers"], key=lambda i: (report["layers"][i]["kept"], -int(i)))
        dropped = sorted(int(i) for i in ranked[:num_dropped])
    set_static_routing(model, dropped)
    return dropped
