"""The MindSkip decoder layer: a router in front of a stock Hugging Face decoder layer.

Per sequence, with ``keep = 1[sigmoid(router(mean over real tokens of norm(x))) >= threshold]``:

* granularity ``attn``:  ``h = x + keep * Attn(norm(x))``, then the MLP as usual;
* granularity ``mlp``:   the attention as usual, then ``out = h + keep * MLP(norm(h))``;
* granularity ``block``: both sublayers gated by the same decision.

At inference a skipped sequence does not enter the gated sublayer at all: the kept rows are
gathered (or packed with their padding removed for variable-length FlashAttention), run, and
scatter-added into the residual stream with the compiled ops. The decision is made once per
sequence at prefill and stored in the KV cache (see :mod:`mindskip_ext.cache`); decode steps
reuse it, and the attention KV of a skipped sequence is never written.

In training mode the routers learn through the straight-through estimator: the gate is
``keep + score - score.detach()``. With ``train_all_sequences`` (the default) the gated sublayer
is computed for every sequence so that skipped sequences also send a gradient to the router.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from . import attention as _attention
from . import ops
from .architectures import ArchSpec, takes_use_cache
from .cache import Decision, StaticCompactMixin, routing_slot
from .config import MindSkipConfig
from .hf_compat import CACHE_NAMES, cache_name, pop_cache

# Name of the keyword argument that carries the per-forward MindSkip state from the patched decoder
# forward down to the MindSkip layers (through the stock decoder's **kwargs).
STATE_KWARG = "mindskip_state"

# The decoder layers whose decode step a mixed MindSkip layer (some sequences kept) runs itself: transformers' Llama
# layer and its copies (input norm, attention, residual add, post-attention norm, MLP, residual add), whose attention
# projects q/k/v, applies optional per-head q/k norms and the rotate-half rotary embedding, updates the KV cache and
# calls the attention interface. The step gathers the kept rows once, runs that attention on them with the rotary
# embedding of q and k as one op, and adds the result into the residual with one out-of-place scatter-add: sixteen
# ops fewer than the stock layer's step, where the attention module on the gathered rows costs row selections and a
# copy more than it. Any other layer or attention class takes the general path (the attention module's forward).
_FUSED_DECODE_CLASSES = frozenset(
    f"transformers.models.{family}.modeling_{family}.{prefix}{part}"
    for family, prefix in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))
    for part in ("DecoderLayer", "Attention")
)
# The attention implementations whose interface ignores the arguments the fused step does not pass (position ids, the
# sliding window: the mask carries it).
_FUSED_DECODE_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class LayerRouting:
    """What one MindSkip layer decided in one forward. A unit is what one decision covers: a sequence, or under token
    routing a real token (``score``, ``keep`` and ``gate`` are then ``(B, T)``, and ``real`` says which count)."""

    score: torch.Tensor  # (B,) fp32 router probability (differentiable in training); (B, T) per token
    keep: torch.Tensor  # (B,) bool; (B, T) per token
    gate: torch.Tensor | None  # (B,) straight-through gate when gradients are recorded, else None; (B, T) per token
    num_kept: int  # kept units
    batch_size: int  # units: sequences, or real tokens
    real: torch.Tensor | None = None  # token routing: (B, T) bool real-token mask, None when every token is real

    @property
    def capacity(self) -> float:
        return self.num_kept / self.batch_size if self.batch_size else 0.0

    def units(self, t: torch.Tensor) -> torch.Tensor:
        """A per-unit tensor (``score``, ``keep``, ``gate``, the gate's gradient) as a flat vector of the units."""
        return t.reshape(-1) if self.real is None else t[self.real]

    def logit(self) -> torch.Tensor:
        """Float64 router logits of the units, from the scores (saturating at about +-16)."""
        return torch.logit(self.units(self.score.detach()).double(), eps=1e-7)


@dataclass
class RoutingRecord:
    """The routing decisions made during one forward call (the forward's own data, never module state)."""

    layers: dict[int, LayerRouting] = field(default_factory=dict)

    def capacity(self) -> dict[int, float]:
        return {idx: r.capacity for idx, r in sorted(self.layers.items())}

    def overall_capacity(self) -> float:
        """Kept fraction over all (MindSkip layer, sequence) pairs."""
        kept = sum(r.num_kept for r in self.layers.values())
        total = sum(r.batch_size for r in self.layers.values())
        return kept / total if total else 1.0

    def gates(self) -> dict[int, torch.Tensor]:
        """Straight-through gates per layer (only when the forward recorded gradients)."""
        return {idx: r.gate for idx, r in sorted(self.layers.items()) if r.gate is not None}


class CapacityMeter:
    """Kept / total sequence counts per MindSkip layer, summed over the records of many forwards.

    Capacity is the kept fraction: per MindSkip layer, the share of sequences that ran the gated sublayer;
    overall, the mean over (MindSkip layer, sequence) pairs. ``skipped_layers_per_sequence`` (the sum over
    layers of the skipped fraction) compares directly with a static drop of that many layers.
    """

    def __init__(self):
        self.kept: Counter = Counter()
        self.total: Counter = Counter()

    def add(self, record: RoutingRecord) -> None:
        for idx, routing in record.layers.items():
            self.kept[idx] += routing.num_kept
            self.total[idx] += routing.batch_size

    def merge(self, other: CapacityMeter) -> None:
        self.kept.update(other.kept)
        self.total.update(other.total)

    def per_layer(self) -> dict[int, float]:
        return {idx: self.kept[idx] / self.total[idx] for idx in sorted(self.total) if self.total[idx]}

    def overall(self) -> float | None:
        """Kept fraction over all (layer, sequence) pairs; None when no MindSkip layer ran."""
        total = sum(self.total.values())
        return sum(self.kept.values()) / total if total else None

    def summary(self) -> dict:
        per_layer = self.per_layer()
        return {
            "capacity": self.overall(),
            "capacity_per_layer": {str(idx): round(c, 6) for idx, c in per_layer.items()},
            "skipped_layers_per_sequence": round(sum(1.0 - c for c in per_layer.values()), 6),
        }


class ForwardState:
    """Per-call data the patched decoder forward hands to its MindSkip layers."""

    def __init__(self, attention_mask, num_tokens: int, record: RoutingRecord, bypass: bool = False):
        # Any mask is taken here and checked where routing reads it: a decode step reuses cached decisions and never
        # does, and generate() with a static cache passes the masks it prepared (see prefill_padding_mask).
        self._attention_mask = attention_mask
        self._num_tokens = num_tokens
        self.record = record
        # Every MindSkip layer runs its original layer, unrouted (a self-distillation teacher, a dense reference).
        self.bypass = bypass
        self._fused_interface = None  # (config, eager default, attention function): see fused_attention_interface

    def fused_attention_interface(self, config, eager):
        """:func:`_fused_attention_interface` of this forward's layers, looked up once per forward: a config's
        ``_attn_implementation`` alone is a dozen Python calls, which every mixed layer's decode step would repeat."""
        cached = self._fused_interface
        if cached is None or cached[0] is not config or cached[1] is not eager:
            cached = self._fused_interface = (config, eager, _fused_attention_interface(config, eager))
        return cached[2]

    @functools.cached_property
    def padding_mask(self) -> torch.Tensor | None:
        """``(B, T)`` real-token mask of this forward's tokens, or None when every token is real.

        Computed on first use only: decode steps reuse cached decisions and never need it.
        """
        mask = self._attention_mask
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"MindSkip routes on the 2D padding mask (batch, sequence); got attention_mask of shape {shape}. "
                "Pass the tokenizer's attention_mask rather than a prepared 4D mask."
            )
        step = mask[:, -self._num_tokens :]
        return None if bool(step.all()) else step

    @functools.cached_property
    def prefill_padding_mask(self) -> torch.Tensor | None:
        """:attr:`padding_mask` of the first forward on a fresh static cache, where the mask may be one transformers
        prepared: generate() builds the 4D masks (one per layer type in a dict, None where no mask is needed) before
        the forward when the cache is compileable. Query ``i`` is then key ``i``, and every mask transformers builds
        hides a padding key from all queries and shows a real key to its own query: the diagonal is the padding mask.
        """
        mask = self._attention_mask
        if isinstance(mask, dict):
            mask = next((m for m in mask.values() if m is not None), None)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            return self.padding_mask
        n = self._num_tokens
        own = torch.diagonal(mask[:, 0, :n, :n], dim1=-2, dim2=-1)
        real = own if own.dtype == torch.bool else own == 0  # eager's additive masks: 0 where attended
        return None if bool(real.all()) else real


def _select_rows(t, rows: torch.Tensor, batch: int):
    """Rows of a per-batch tensor (masks, positions); tensors broadcast over the batch pass through."""
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
        return t.index_select(0, rows)
    return t


def _fused_attention_interface(config, eager):
    """The attention function a fused decode step calls for ``config``'s attention implementation (transformers'
    registry entry, ``eager`` for "eager"), as the stock attention resolves it; None for an implementation the fused
    step does not take (see ``_FUSED_DECODE_ATTN_IMPLEMENTATIONS``)."""
    impl = config._attn_implementation
    if impl not in _FUSED_DECODE_ATTN_IMPLEMENTATIONS:
        return None
    # Imported here: transformers.modeling_utils loads safetensors and accelerate, which `import mindskip_ext` does
    # not need (a model that reaches this step has imported it already).
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)


def _qualified_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``t`` (``(N, H, d)``) on its first ``cos.shape[-1]`` channels (all of them, or the rotary
    part under a partial rotary factor, as Phi-3's ``apply_rotary_pos_emb``)."""
    rot = cos.shape[-1]
    if rot == t.shape[-1]:
        return t * cos + _rotate_half(t) * sin
    head, tail = t[..., :rot], t[..., rot:]
    return torch.cat((head * cos + _rotate_half(head) * sin, tail), dim=-1)


def attention_window(attn: nn.Module) -> int | None:
    """The sliding window of a stock attention module: its own (Gemma, Qwen2/3: per layer type), else its config's
    (Mistral, Mixtral, Phi-3: every layer); None for full causal attention."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    config = getattr(attn, "config", None)
    return getattr(config, "sliding_window", None)


class MindSkipDecoderLayer(nn.Module):
    """Wraps one decoder layer; ``base_layer`` is the untouched original (given back by ``unload``)."""

    def __init__(
        self, base_layer: nn.Module, layer_idx: int, spec: ArchSpec, config: MindSkipConfig, hidden_size: int
    ):
        super().__init__()
        self.base_layer = base_layer
        # Also a plain attribute, so that reading it (every forward does, several times) is a dictionary lookup
        # rather than nn.Module.__getattr__ and this class's, two Python calls a read on the host-bound decode step.
        # Assigning another module to it goes through nn.Module.__setattr__, which drops this copy.
        self.__dict__["base_layer"] = base_layer
        self.layer_idx = layer_idx
        self.spec = spec
        self.granularity = config.granularity
        self.routing = config.routing_of(layer_idx)
        # Which sublayers the decision gates: plain attributes, read by every forward.
        self.gates_attention = config.granularity in ("attn", "block")
        self.gates_mlp = config.granularity in ("mlp", "block")
        self.threshold = config.threshold
        self.packed_attention = config.packed_attention
        self.train_all_sequences = config.train_all_sequences
        self.pool_padding = config.pool_padding
        param = next(base_layer.parameters())
        self.router = nn.Linear(hidden_size, 1, bias=True, device=param.device, dtype=torch.float32)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        # Router-Tuning may centre the router's pooled input (see set_router_centre); None at inference.
        self.register_buffer("router_centre", None, persistent=False)
        # A post-norm family (OLMo 2) has no norm before the attention, which reads the residual stream itself. Its
        # router pools that stream RMS-normalised per token, without weights: as a pre-norm family's router pools
        # its input norm's output, so that a few tokens of large norm do not outweigh the rest of the sequence (see
        # docs/families.md). A norm weight would only rescale the router's own weight, so it has none.
        self.router_norm = (
            nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False) if spec.post_norm else None
        )
        # The keywords the attention module and the wrapped layer take the cache by, found once here: a compiled
        # decode step then traces no signature inspection.
        attn = self._attn_module()
        self._attn_cache_name = cache_name(attn)
        self._base_cache_name = cache_name(base_layer)
        self._other_cache_name = next(n for n in CACHE_NAMES if n != self._base_cache_name)
        # Gemma's layers take no use_cache: it is passed on only where the stock layer passes it.
        self._takes_use_cache = takes_use_cache(base_layer)
        # A mixed decode step runs the layer itself (see _FUSED_DECODE_CLASSES) with its module's eager attention as
        # the interface's default, as the stock attention does; None where it takes the general path.
        fused = self.gates_attention and {_qualified_name(base_layer), _qualified_name(attn)} <= _FUSED_DECODE_CLASSES
        module = sys.modules[type(attn).__module__]
        self._fused_eager = getattr(module, "eager_attention_forward", None) if fused else None
        if self.routing == "token":
            from . import token_routing  # it builds on this module

            self._token_forward = token_routing.forward

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, granularity={self.granularity!r}, threshold={self.threshold}"

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Stock decoders read attributes such as `attention_type` off their layers.
            return getattr(super().__getattr__("base_layer"), name)

    # ------------------------------------------------------------------ routing

    def router_bias(self) -> torch.Tensor:
        """The bias the gate applies: ``router.bias``, less ``router.weight . router_centre`` while centred."""
        if self.router_centre is None:
            return self.router.bias
        return self.router.bias - self.router.weight @ self.router_centre

    @torch.no_grad()
    def set_router_centre(self, centre: torch.Tensor | None) -> None:
        """Centre the router's input on ``centre`` (``(hidden,)``), or stop centring (None), keeping every decision.

        Centred, the logit is ``w . (mean - centre) + b'``: ``router.bias`` holds ``b'``, re-expressed here so that
        the logit of any input is unchanged. The point is the optimiser's view: the pooled input has a large part
        common to every sequence, through which a weight step moves all logits together like a bias step; centring
        on that part leaves the weights only the per-input differences.
        """
        effective = self.router_bias().clone()
        if centre is None:
            self.router_centre = None
            self.router.bias.copy_(effective)
            return
        size = self.router.weight.shape[1]
        if centre.shape != (size,) or not centre.is_floating_point() or not torch.isfinite(centre).all():
            raise ValueError(f"MindSkip layer {self.layer_idx}: a router centre must be a finite float vector of "
                             f"shape ({size},), got {centre.dtype} of shape {tuple(centre.shape)}")
        self.router_centre = centre.detach().to(self.router.weight.device, torch.float32).clone()
        self.router.bias.copy_(effective + self.router.weight @ self.router_centre)

    def _input_norm(self, x):
        """The attention's input: the pre-attention norm of ``x``, or ``x`` itself in a post-norm family."""
        name = self.spec.input_norm
        return x if name is None else getattr(self.base_layer, name)(x)

    @property
    def router_input_module(self) -> nn.Module:
        """The module whose output the router pools (its forward hooks see the router's input per token): the
        pre-attention norm, or :attr:`router_norm` in a post-norm family."""
        if self.router_norm is not None:
            return self.router_norm
        return getattr(self.base_layer, self.spec.input_norm)

    def router_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)``: what the router pools, per token, for the layer input ``x``."""
        return self._router_input(self._input_norm(x))

    def _router_input(self, normed):
        return normed if self.router_norm is None else self.router_norm(normed)

    def _decide(self, x, state: ForwardState | None, slot):
        """The routing of this batch: reused from the cache slot, or made now (prefill / no cache) on the normalised
        input, which is returned too (None where the decision was reused: a decode step normalises only for a
        sublayer that runs)."""
        batch = x.shape[0]
        if slot is not None and slot.mindskip_decision is not None:
            decision = slot.mindskip_decision
            if decision.from_training:
                raise RuntimeError(
                    f"the KV cache of MindSkip layer {self.layer_idx} was filled by a training-mode forward, which "
                    "computes every sequence and stores no compact KV; call model.eval() before generating"
                )
            if decision.batch_size != batch:
                raise ValueError(
                    f"MindSkip layer {self.layer_idx}: the cache holds decisions for {decision.batch_size} sequences "
                    f"but this step has {batch}"
                )
            return decision, None, None
        normed = self._input_norm(x)
        mask = None
        if state is not None and not self.pool_padding:
            if isinstance(slot, StaticCompactMixin):
                if int(slot.get_seq_length()) != 0:
                    raise ValueError(
                        f"MindSkip layer {self.layer_idx} routes at the first forward on a static cache, but its slot "
                        "already holds tokens written without MindSkip routing; start generation from a fresh cache"
                    )
                mask = state.prefill_padding_mask
            else:
                mask = state.padding_mask
        score, keep, order, num_kept = ops.router_gate(
            self._router_input(normed), mask, self.router.weight, self.router_bias(), self.threshold
        )
        # The one host sync of a MindSkip layer: the kept count sizes the gathered batch.
        decision = Decision(keep=keep, order=order, num_kept=int(num_kept.item()))
        gate = ops.straight_through(score, keep) if score.requires_grad else None
        routing = LayerRouting(score=score, keep=keep, gate=gate, num_kept=decision.num_kept, batch_size=batch)
        if state is not None:
            state.record.layers[self.layer_idx] = routing
        if slot is not None:
            slot.mindskip_decision = decision
        return decision, routing, normed

    # ------------------------------------------------------------------ sublayers

    def _attn_module(self):
        return getattr(self.base_layer, self.spec.attn)

    def _run_attention(self, normed, rows, batch, attention_mask, position_ids, position_embeddings, cache, kwargs):
        if rows is not None:
            attention_mask = _select_rows(attention_mask, rows, batch)
            position_ids = _select_rows(position_ids, rows, batch)
            if position_embeddings is not None:
                position_embeddings = tuple(_select_rows(t, rows, batch) for t in position_embeddings)
        attn = self._attn_module()
        out, _ = attn(
            hidden_states=normed,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **{self._attn_cache_name: cache},
            **kwargs,
        )
        return self._attention_output(out)

    def _residual_delta(self, y, norm: str | None, dropout: str | None):
        """What a sublayer whose output is ``y`` adds to the residual stream: ``y`` through the family's output norm
        and dropout, times its residual scale."""
        base = self.base_layer
        if norm is not None:
            y = getattr(base, norm)(y)
        if dropout is not None:
            y = getattr(base, dropout)(y)
        if self.spec.residual_scale is not None:
            y = y * getattr(base, self.spec.residual_scale)
        return y

    def _attention_output(self, a):
        """The attention's addition to the residual stream from the attention module's output ``a`` (per token)."""
        return self._residual_delta(a, self.spec.attn_out_norm, self.spec.attn_out_dropout)

    def _run_mlp(self, h):
        """The MLP sublayer's addition to the residual stream ``h``: pre-MLP norm (if any), MLP, output norm, scale.
        A mixture-of-experts block runs as the stock layer runs it (its router logits are recorded as usual)."""
        spec, base = self.spec, self.base_layer
        y = h if spec.mlp_norm is None else getattr(base, spec.mlp_norm)(h)
        return self._residual_delta(getattr(base, spec.mlp)(y), spec.mlp_out_norm, spec.mlp_out_dropout)

    def _packed_backend(self, normed, cache, kwargs) -> str | None:
        """The varlen backend for the packed path, or None to use the gathered-rows path."""
        if self.packed_attention == "off" or cache is not None or kwargs.get("output_attentions"):
            return None
        attn = self._attn_module()
        # The varlen kernels compute plain causal attention: no window, no logit soft-capping (Gemma 2).
        if attention_window(attn) is not None or getattr(attn, "attn_logit_softcapping", None) is not None:
            return None
        if self.training and (getattr(attn, "attention_dropout", 0.0) or getattr(attn, "residual_dropout", 0.0)):
            return None
        fast = _attention.best_fast_backend(normed.device, normed.dtype)
        if self.packed_attention == "on":
            return fast or "reference"
        return fast

    def _packed_attention(self, normed, mask, decision, position_embeddings, backend):
        """Attention of the kept sequences, packed without padding: ``(total_tokens, D)`` plus the plan."""
        batch, seqlen = normed.shape[:2]
        cu_seqlens, token_index, total, max_len = ops.pack_plan_with_sizes(
            mask, decision.order, decision.num_kept, seqlen
        )
        packed = ops.pack_kept(normed, token_index, total)
        attn = self._attn_module()
        q, k, v = self._packed_qkv(attn, packed)
        if getattr(attn, "use_rope", True):  # SmolLM3 leaves out the rotary embedding in some layers
            cos, sin = position_embeddings
            if cos.shape[0] == batch and batch > 1:
                cos, sin = ops.pack_kept(cos, token_index, total), ops.pack_kept(sin, token_index, total)
            else:
                positions = token_index[:total] % seqlen
                cos, sin = cos[0].index_select(0, positions), sin[0].index_select(0, positions)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        out = _attention.varlen_causal_attention(q, k, v, cu_seqlens, max_len, attn.scaling, backend)
        return self._attention_output(attn.o_proj(out.reshape(total, -1))), token_index

    def _packed_qkv(self, attn, packed):
        """``(N, H, d)`` queries, keys and values of packed tokens ``(N, D)``, before the rotary embedding, as the
        stock attention module computes them: separate or fused projections, q/k norms per head or over all heads,
        and OLMo's clipping."""
        spec = self.spec
        head_dim = attn.head_dim
        if spec.qkv_proj is not None:
            config = attn.config
            kv = config.num_key_value_heads * head_dim
            q, k, v = getattr(attn, spec.qkv_proj)(packed).split([config.num_attention_heads * head_dim, kv, kv], -1)
        else:
            q, k, v = attn.q_proj(packed), attn.k_proj(packed), attn.v_proj(packed)
        if spec.q_norm is not None and not spec.qk_norm_per_head:
            q, k = getattr(attn, spec.q_norm)(q), getattr(attn, spec.k_norm)(k)
        clip = getattr(getattr(attn, "config", None), "clip_qkv", None)
        if clip is not None:
            q, k, v = (t.clamp(min=-clip, max=clip) for t in (q, k, v))
        q, k, v = (t.reshape(t.shape[0], -1, head_dim) for t in (q, k, v))
        if spec.q_norm is not None and spec.qk_norm_per_head:
            q, k = getattr(attn, spec.q_norm)(q), getattr(attn, spec.k_norm)(k)
        return q, k, v

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        position_ids=None,
        use_cache=False,
        position_embeddings=None,
        **kwargs,
    ):
        # The stock decoder passes the KV cache as `cache` (transformers >= 5.24) or `past_key_values`: under the name
        # the wrapped layer takes, popped directly (a decode step runs this in every layer; pop_cache is a call more).
        cache = pop_cache(kwargs) if self._other_cache_name in kwargs else kwargs.pop(self._base_cache_name, None)
        state: ForwardState | None = kwargs.pop(STATE_KWARG, None)

        if self._takes_use_cache:
            kwargs["use_cache"] = use_cache

        def stock_layer():
            base = self.base_layer
            return base(
                hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                position_embeddings=position_embeddings, **{self._base_cache_name: cache}, **kwargs,
            )

        if state is not None and state.bypass:
            return stock_layer()
        if self.routing == "token":
            return self._token_forward(self, hidden_states, attention_mask, position_ids, use_cache,
                                       position_embeddings, cache, state, kwargs)
        if hidden_states.ndim != 3:
            raise ValueError(f"hidden_states must be (batch, seq, hidden), got shape {tuple(hidden_states.shape)}")
        x = hidden_states
        slot = None
        if cache is not None:
            # The slot is converted at the first use (routing_slot); every decode step after that finds it with plain
            # attribute reads and no call (this runs in every routed layer, and eager decode on a GPU is host-bound).
            try:
                slot = cache.layers[self.layer_idx]
                if slot.mindskip_compact != self.gates_attention:  # a stock slot has no such attribute
                    slot = None
            except (AttributeError, IndexError):
                slot = None
            if slot is None:
                slot = routing_slot(cache, self.layer_idx, self.gates_attention, x.device)
        decision = slot.mindskip_decision if slot is not None else None
        if decision is not None and not decision.from_training and decision.batch_size == x.shape[0]:
            routing = normed = None  # a decode step reusing its prefill's decision (what _decide returns for it)
        else:
            decision, routing, normed = self._decide(x, state, slot)
        if routing is None and not (self.training and torch.is_grad_enabled()):
            if decision.num_kept == decision.batch_size:
                # A decode step in which every sequence runs every sublayer is the stock layer's own step, on the same
                # cache slot: calling it saves the host the routed path's calls (eager decode is host-bound on a GPU).
                return self.base_layer(
                    hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                    position_embeddings=position_embeddings, **{self._base_cache_name: cache}, **kwargs,
                )
            # Autocast computes q/k in another dtype than cos/sin, which the stock attention's products promote.
            fused = self._fused_eager is not None and decision.num_kept
            if fused and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
                # Submodules read from _modules: a plain lookup where nn.Module.__getattr__ is a Python call.
                modules = self.base_layer._modules
                attn = modules[self.spec.attn]
                interface = (state.fused_attention_interface(attn.config, self._fused_eager) if state is not None
                             else _fused_attention_interface(attn.config, self._fused_eager))
                # Hooks on the attention module (e.g. transformers' recording of attention weights) need its forward.
                if interface is not None and not (attn._forward_hooks or attn._forward_pre_hooks):
                    out = self._mixed_decode(x, decision, modules, attn, interface, attention_mask,
                                             position_embeddings, cache, kwargs)
                    if self.base_layer._forward_hooks:
                        self._fire_base_hooks(hidden_states, out)
                    return out
        gate = routing.gate if routing is not None else None
        sublayers = functools.partial(
            self._sublayers, decision=decision, state=state, attention_mask=attention_mask, position_ids=position_ids,
            position_embeddings=position_embeddings, kwargs=kwargs,
        )
        if self.training and torch.is_grad_enabled() and getattr(self.base_layer, "gradient_checkpointing", False):
            # Activation checkpointing (transformers' gradient/activation_checkpointing_enable sets it on the wrapped
            # layer). The routing stays outside: the decision is made once, and its gate keeps its graph to the
            # router. The sublayers are recomputed in the backward pass from x and the gate, with no KV cache.
            if slot is not None:
                decision.from_training = True
            out = self.base_layer._gradient_checkpointing_func(sublayers, x, gate, None, None, None)
        else:
            out = sublayers(x, gate, normed, cache, slot)
        self._fire_base_hooks(hidden_states, out)
        return out

    def _mixed_decode(self, x, decision, modules, attn, interface, attention_mask, position_embeddings, cache,
                      kwargs):
        """A decode step of a layer that keeps some of the batch, for the layers of ``_FUSED_DECODE_CLASSES``
        (``modules``: the wrapped layer's submodules, ``attn`` its attention, ``interface`` its attention function).

        The decision was made at prefill, so its kept rows (``decision.order``, ``decision.rows``) are fixed; a step
        gathers those rows of ``x`` once, normalises them and runs the attention on them in place on the compact KV
        cache slot, as the stock attention does (its projections, q/k norms, cache update and attention interface),
        with the rotary embedding of q and k as one op that picks each kept row's cos/sin itself; then one
        out-of-place scatter-add puts ``x`` plus the attention output of the kept rows into a new tensor, and the MLP
        runs on every row, as the stock layer runs it. The per-row mask is the one row selection left (the mask
        changes every step). The host work is counted against the stock layer's in the tests: the ops are called
        through ``torch.ops`` (no wrapper) and the submodules read from ``modules``.
        """
        order, rows, kept = decision.order, decision.rows, decision.num_kept
        spec = self.spec
        # A few rows of one token: the native gather costs the host less than gather_kept (whose Python autograd
        # kernel runs on every call) and moves as little.
        sub = modules[spec.input_norm](x.index_select(0, rows))
        seqlen = sub.shape[1]
        shape = (kept, seqlen, -1, attn.head_dim)
        q = attn.q_proj(sub).view(shape)
        k = attn.k_proj(sub).view(shape)
        v = attn.v_proj(sub).view(shape).transpose(1, 2)
        if spec.q_norm is not None:
            q = getattr(attn, spec.q_norm)(q)
            k = getattr(attn, spec.k_norm)(k)
        cos, sin = position_embeddings
        q, k = torch.ops.mindskip.rotary_embedding(q, k, cos, sin, None if cos.shape[0] == 1 else rows)
        k, v = cache.update(k, v, attn.layer_idx)
        if attention_mask is not None and attention_mask.shape[0] == decision.batch_size:
            attention_mask = attention_mask.index_select(0, rows)
        out, _ = interface(
            attn, q, k, v, attention_mask, dropout=attn.attention_dropout if attn.training else 0.0,
            scaling=attn.scaling, **kwargs,
        )
        h = torch.ops.mindskip.scatter_add_kept(x, attn.o_proj(out.reshape(kept, seqlen, -1).contiguous()), order)
        mlp, norm = modules[spec.mlp], modules[spec.mlp_norm]
        if not self.gates_mlp:
            return h + mlp(norm(h))
        torch.ops.mindskip.scatter_add_kept_(h, mlp(norm(h.index_select(0, rows))), order)
        return h

    def _sublayers(self, x, gate, normed, cache, slot, *, decision, state, attention_mask, position_ids,
                   position_embeddings, kwargs):
        """The gated and ungated sublayers of this layer for a made ``decision``; ``gate`` is the straight-through
        gate when gradients are recorded, else None. ``normed`` is computed from ``x`` when not given, if a sublayer
        reads it: an attention sublayer that every sequence skips does not."""
        batch, seqlen = x.shape[:2]
        ste = gate is not None and self.training
        full = ste and self.train_all_sequences
        k = decision.num_kept
        if normed is None and (not self.gates_attention or full or k > 0):
            normed = self._input_norm(x)
        rows = decision.rows if 0 < k < batch else None
        attn_kwargs = kwargs

        # ---- attention sublayer
        if not self.gates_attention:
            a = self._run_attention(
                normed, None, batch, attention_mask, position_ids, position_embeddings, cache, attn_kwargs
            )
            h = x + a
        elif full:
            # Every sequence is computed so the straight-through gradient reaches all of them. This layer's
            # cache slot gets no KV (a training-mode cache is not meant for decoding); mark it as such.
            if slot is not None:
                decision.from_training = True
            a = self._run_attention(
                normed, None, batch, attention_mask, position_ids, position_embeddings, None, attn_kwargs
            )
            h = x + gate.view(batch, 1, 1).to(a.dtype) * a
        elif k == 0:
            if slot is not None:
                slot.skip_tokens(seqlen)
            h = x
        else:
            backend = self._packed_backend(normed, cache, kwargs)
            if backend is not None:
                mask = state.padding_mask if state is not None else None
                packed_out, token_index = self._packed_attention(normed, mask, decision, position_embeddings, backend)
                if ste:
                    seq_of_token = torch.div(token_index[: packed_out.shape[0]], seqlen, rounding_mode="floor")
                    packed_out = packed_out * gate.index_select(0, seq_of_token).unsqueeze(-1).to(packed_out.dtype)
                h = ops.unpack_add_kept_(x.clone(memory_format=torch.contiguous_format), packed_out, token_index)
            elif rows is None:  # every sequence kept
                a = self._run_attention(
                    normed, None, batch, attention_mask, position_ids, position_embeddings, cache, attn_kwargs
                )
                h = x + (gate.view(batch, 1, 1).to(a.dtype) * a if ste else a)
            else:
                sub = ops.gather_kept(normed, decision.order, k)
                a = self._run_attention(
                    sub, rows, batch, attention_mask, position_ids, position_embeddings, cache, attn_kwargs
                )
                if ste:
                    a = gate.index_select(0, rows).view(k, 1, 1).to(a.dtype) * a
                h = ops.scatter_add_kept(x, a, decision.order)

        # ---- MLP sublayer
        if not self.gates_mlp:
            return h + self._run_mlp(h)
        if full:
            return h + gate.view(batch, 1, 1).to(h.dtype) * self._run_mlp(h)
        if k == 0:
            return h
        if rows is None:
            m = self._run_mlp(h)
            return h + (gate.view(batch, 1, 1).to(m.dtype) * m if ste else m)
        m = self._run_mlp(ops.gather_kept(h, decision.order, k))
        if ste:
            m = gate.index_select(0, rows).view(k, 1, 1).to(m.dtype) * m
        return ops.scatter_add_kept_(h, m, decision.order)  # h is this layer's own tensor here, never x

    def _fire_base_hooks(self, hidden_states, out):
        """Run forward hooks registered on the wrapped layer (e.g. transformers' output_hidden_states capture)."""
        base = self.base_layer
        if not base._forward_hooks:
            return
        for hook_id, hook in list(base._forward_hooks.items()):
            if hook_id in base._forward_hooks_with_kwargs:
                hook(base, (hidden_states,), {}, out)
            else:
                hook(base, (hidden_states,), out)
