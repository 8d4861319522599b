"""Attention-Drop: static dropping of the most redundant attention sublayers (He et al., "What Matters in
Transformers? Not All Attention Is Needed"), as a baseline for MindSkip at the same skip ratio.

Each sublayer is scored by the cosine similarity between its input ``X`` and its output with the
residual added, ``Y = X + Attn(LN(X))``, averaged over the real (non-padding) tokens of calibration
data; the ``n`` layers with the highest similarity change the hidden state least and are dropped.
``granularity="mlp"`` / ``"block"`` score the MLP sublayer / the whole block instead (MLP-Drop,
Block-Drop in the same paper).

The result is saved as a MindSkip router directory whose routers skip always (zero weight, a
large negative bias) on the dropped layers, so it loads with ``MindSkipModel.from_pretrained`` and
is evaluated with the same commands as a Router-Tuned model; ``attention_drop.json`` beside it
records the scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .._io import atomic_write_json
from ..architectures import arch_for, layer_list
from ..config import MindSkipConfig
from ..data import Example, collate, length_batches, load_examples, pad_token_id
from ..devices import autocast_for, model_device
from ..model import MindSkipModel

FORCED_SKIP_BIAS = -1.0e4  # sigmoid(-1e4) == 0.0 in float32: below any threshold in (0, 1)
FORCED_KEEP_BIAS = 1.0e4  # sigmoid(1e4) == 1.0: at or above any threshold in (0, 1)
REPORT_NAME = "attention_drop.json"


class _Capture:
    """Sums per-token cosine similarities between a sublayer's input and its output (with residual)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.inputs: dict[int, torch.Tensor] = {}
        self.total: dict[int, float] = {}
        self.tokens: dict[int, int] = {}

    def keep_input(self, idx):
        def hook(module, args, kwargs):
            self.inputs[idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    def add_residual_output(self, idx, scale: float = 1.0):
        def hook(module, args, kwargs, output):
            delta = output[0] if isinstance(output, tuple) else output
            x = self.inputs.pop(idx)
            self._add(idx, x, x + delta * scale)

        return hook

    def full_output(self, idx):
        def hook(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            self._add(idx, self.inputs.pop(idx), y)

        return hook

    def _add(self, idx, x, y):
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
        mask = self.mask.to(cos.device, torch.bool)
        self.total[idx] = self.total.get(idx, 0.0) + float(cos[mask].sum())
        self.tokens[idx] = self.tokens.get(idx, 0) + int(mask.sum())


@torch.no_grad()
def redundancy_scores(
    model,
    examples: Sequence[Example],
    pad_id: int,
    granularity: str = "attn",
    batch_size: int = 8,
    bf16: bool = False,
) -> dict[int, float]:
    """Layer index -> mean cosine similarity between the sublayer's input and output (higher: more redundant).

    ``model`` is a Hugging Face causal LM of a supported architecture; a :class:`MindSkipModel` is scored as
    its unconverted model (its routers bypassed).
    """
    bypass = {"mindskip_bypass": True} if isinstance(model, MindSkipModel) else {}
    if granularity not in ("attn", "mlp", "block"):
        raise ValueError(f"granularity must be 'attn', 'mlp' or 'block', got {granularity!r}")
    if not examples:
        raise ValueError("no calibration examples")
    spec = arch_for(model.config)
    capture = _Capture()
    handles = []
    for idx, layer in enumerate(layer_list(model, spec)):
        layer = getattr(layer, "base_layer", layer)  # a MindSkip layer runs its original layer when bypassed
        if granularity in ("attn", "mlp"):
            # The family's own residual branch: e.g. Gemma's output norm is part of what the sublayer adds.
            pre, post, scale = spec.residual_branch(layer, granularity)
            hook = capture.add_residual_output(idx, scale)
        else:
            pre, post, hook = layer, layer, capture.full_output(idx)
        handles.append(pre.register_forward_pre_hook(capture.keep_input(idx), with_kwargs=True))
        handles.append(post.register_forward_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for index in length_batches([len(e) for e in examples], batch_size, shuffle=False):
            batch = collate([examples[i] for i in index], pad_id)
            capture.mask = batch["attention_mask"]
            with autocast_for(device, bf16):
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                    logits_to_keep=1,  # the scores need the hidden states only, not the vocabulary logits
                    **bypass,
                )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {idx: capture.total[idx] / capture.tokens[idx] for idx in sorted(capture.total)}


def select_dropped(scores: dict[int, float], n: int, candidates: Sequence[int] | None = None,
                   ordered: bool = False) -> list[int]:
    """The ``n`` candidate layers with the highest similarity (ties: the later layer), sorted (``ordered``: the
    highest first)."""
    pool = list(scores) if candidates is None else list(candidates)
    unknown = [i for i in pool if i not in scores]
    if unknown:
        raise ValueError(f"layer {unknown[0]} is not a decoder layer of this model (0..{len(scores) - 1})")
    if not 1 <= n <= len(pool):
        raise ValueError(f"n must be between 1 and the number of candidate layers ({len(pool)}), got {n}")
    ranked = sorted(pool, key=lambda i: (scores[i], i), reverse=True)[:n]
    return ranked if ordered else sorted(ranked)


def set_static_routing(
    model: MindSkipModel,
    dropped: Sequence[int],
    skip_bias: float = FORCED_SKIP_BIAS,
    keep_bias: float = FORCED_KEEP_BIAS,
) -> None:
    """Make every router of ``model`` input-independent: zero weights, ``skip_bias`` on the layers in ``dropped``
    and ``keep_bias`` on the other MindSkip layers. The defaults skip / keep every sequence at any threshold;
    biases near the threshold make a trainable static start (:mod:`mindskip_ext.training.init`)."""
    unknown = sorted(set(dropped) - set(model.routers))
    if unknown:
        raise ValueError(f"layer {unknown[0]} is not a MindSkip layer of this model ({sorted(model.routers)})")
    with torch.no_grad():
        for idx, router in model.routers.items():
            router.weight.zero_()
            router.bias.fill_(skip_bias if idx in dropped else keep_bias)


def dropped_model(model, dropped: Sequence[int], granularity: str = "attn") -> MindSkipModel:
    """Convert ``model`` so that the ``granularity`` sublayer of every layer in ``dropped`` is always skipped."""
    converted = MindSkipModel(model, MindSkipConfig(granularity=granularity, layers=list(dropped)))
    set_static_routing(converted, dropped)
    return converted


def attention_drop(
    model,
    tokenizer,
    data,
    n: int,
    output_dir=None,
    granularity: str = "attn",
    candidates: Sequence[int] | None = None,
    max_records: int | None = 256,
    max_length: int = 512,
    batch_size: int = 8,
    bf16: bool = False,
) -> tuple[MindSkipModel, dict]:
    """Score on calibration ``data`` (a source for :func:`~mindskip_ext.data.load_examples`), drop the ``n``
    most redundant sublayers, and save the result to ``output_dir`` (when given).

    Returns the converted model and a report with the scores and the dropped layers.
    """
    prepared = load_examples(data, tokenizer, max_length, max_records=max_records)
    scores = redundancy_scores(model, prepared.examples, pad_token_id(tokenizer), granularity, batch_size, bf16)
    dropped = select_dropped(scores, n, candidates)
    converted = dropped_model(model, dropped, granularity)
    report = {
        "method": f"{granularity}-drop",
        "granularity": granularity,
        "n": n,
        "dropped_layers": dropped,
        "num_layers": len(scores),
        "similarity": {str(i): round(s, 6) for i, s in scores.items()},
        "calibration": prepared.stats,
    }
    if output_dir is not None:
        converted.save_pretrained(output_dir)
        atomic_write_json(Path(output_dir) / REPORT_NAME, report)
        report["output_dir"] = str(output_dir)
    return converted, report
