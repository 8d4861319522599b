"""Routing inside vLLM's flat token batch: per-request decisions, and attention for the kept requests only.

vLLM runs one flat batch of tokens with no batch dimension, in which new requests' prompts (prefill) and
running requests' single new tokens (decode) are mixed. At each MindSkip layer:

* **Decide.** The router pools the layer's normalised input (the input_layernorm output the attention
  receives) over each request's tokens of this step with ``mindskip::router_gate_varlen``; vLLM's
  ``query_start_loc`` is its ``cu_seqlens``. A request in prefill brings its whole prompt in one step
  (chunked prefill is off), so its decision is the transformers path's: the same fp32 math over the same
  tokens.
* **Remember.** The decision goes into the layer's table indexed by the request's first KV block id: the
  model never sees request ids, but it sees the block table, and with prefix caching off a block belongs
  to one live request (block 0 is vLLM's null block). Each decode step reads the decision back from there.
* **Attend for the kept requests only.** Their tokens are gathered, the layer's stock attention module
  (q/k/v projection, norms, rotary, ``Attention``, o_proj) runs on them with attention metadata built for
  that subset of the requests, and its output is scattered back. Every other token gets zeros, so the
  decoder's fused add leaves its residual unchanged; it never reaches the attention, which writes no KV for
  it at that layer. The MLP runs for every token as usual.

The three steps are one registered custom op, ``mindskip_vllm::routed_attention`` (:func:`routed_attention`),
which writes into an output buffer its caller allocates, as vLLM's ``unified_attention_with_output`` does.
torch.compile sees it as one opaque node, so the rest of the layer (norms, MLP, residual adds) compiles; on
vLLM's piecewise path (``VLLM_COMPILE``, GPUs) it is a splitting op, so the pieces between captures stay CUDA
graphs while the routed attention, with its host syncs and data-dependent sizes, runs eagerly between them.
With ``enforce_eager`` the same op runs eagerly.

The subset metadata comes from the attention backend's own metadata builder. :func:`routed_backend` gives a
MindSkip layer's ``Attention`` a copy of the platform's backend whose builder leaves the step's
``CommonAttentionMetadata`` (in a :class:`StepRouting`) on the metadata it returns. Subsets are built by a
second builder instance: GPU builders keep state (FlashAttention's scheduler-metadata buffer, FlashInfer's
planned wrappers) that a subset build must not overwrite while the whole batch's metadata is still in use.
"""

import contextlib
import functools
import types
from dataclasses import dataclass

import torch
from torch import nn
from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.utils.torch_utils import LayerNameType, _encode_layer_name, _resolve_layer_name, direct_register_custom_op
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata, subclass_attention_backend

from .. import ops


@dataclass
class SubsetPlan:
    """The kept tokens of one step and the attention metadata of their requests."""

    order: torch.Tensor  # (rows,) int64: the kept token rows first (ascending), then the others
    num_tokens: int  # kept tokens: order[:num_tokens]
    metadata: object  # the backend's attention metadata for the kept requests
    slot_mapping: torch.Tensor  # (num_tokens,) KV slots of the kept tokens


class StepRouting:
    """What the MindSkip layers of one forward step share: the requests of the batch, built once per step."""

    def __init__(self, common: CommonAttentionMetadata, subset_builder):
        self.common = common
        self._subset_builder = subset_builder
        start = common.query_start_loc
        self.query_start_loc = start
        self.query_lens = start[1:] - start[:-1]
        # The host copy: the token count costs no device sync.
        self.num_tokens = int(common.query_start_loc_cpu[-1])
        # The whole context arrives in this step: a prefill (chunked prefill and prefix caching are off).
        self.is_prefill = common.seq_lens == self.query_lens
        self.first_block = common.block_table_tensor[:, 0].to(torch.int64)
        self.table_size = int(self.first_block.max()) + 1 if common.num_reqs else 1
        requests = torch.arange(common.num_reqs, device=start.device)
        self.token_request = torch.repeat_interleave(requests, self.query_lens, output_size=self.num_tokens)
        # Layers often agree: the last subset is reused for the same decisions.
        self._last: tuple[torch.Tensor, SubsetPlan] | None = None

    def plan(self, keep: torch.Tensor, rows: int) -> SubsetPlan | bool:
        """The subset for per-request decisions ``keep`` over a layer input of ``rows`` token rows, or True when
        every request's tokens are kept (the stock path) and False when none is."""
        token_keep = keep.index_select(0, self.token_request)
        kept = int(token_keep.sum())  # the one host sync of a routed layer: it sizes the gathered batch
        if kept == self.num_tokens:
            return True  # rows past num_tokens are vLLM's padding, computed as usual
        if kept == 0:
            return False
        if self._last is not None and torch.equal(self._last[0], keep):
            return self._last[1]
        row_keep = torch.zeros(rows, dtype=torch.int8, device=keep.device)
        row_keep[: self.num_tokens] = token_keep.to(torch.int8)
        order = torch.sort(1 - row_keep, stable=True).indices
        token_index = order[:kept]
        metadata, slot_mapping = self._subset_metadata(keep.nonzero().squeeze(1), token_index)
        plan = SubsetPlan(order=order, num_tokens=kept, metadata=metadata, slot_mapping=slot_mapping)
        self._last = (keep.clone(), plan)
        return plan

    def _subset_metadata(self, requests: torch.Tensor, token_index: torch.Tensor):
        common = self.common
        lens = self.query_lens.index_select(0, requests)
        start = torch.zeros(requests.numel() + 1, dtype=self.query_start_loc.dtype, device=lens.device)
        start[1:] = torch.cumsum(lens, 0)
        requests_cpu = requests.cpu()

        def cpu_rows(t):
            return None if t is None else t.index_select(0, requests_cpu)

        slot_mapping = common.slot_mapping.index_select(0, token_index)
        subset = CommonAttentionMetadata(
            query_start_loc=start,
            query_start_loc_cpu=start.cpu(),
            seq_lens=common.seq_lens.index_select(0, requests),
            num_reqs=requests.numel(),
            num_actual_tokens=token_index.numel(),
            # The whole batch's longest query and context bound the subset's.
            max_query_len=common.max_query_len,
            max_seq_len=common.max_seq_len,
            block_table_tensor=common.block_table_tensor.index_select(0, requests),
            slot_mapping=slot_mapping,
            causal=common.causal,
            positions=None if common.positions is None else common.positions.index_select(-1, token_index),
            is_prefilling=cpu_rows(common.is_prefilling),
            seq_lens_cpu_upper_bound=cpu_rows(common.seq_lens_cpu_upper_bound),
        )
        return self._subset_builder.build(0, subset), slot_mapping


class LayerRouter(nn.Module):
    """The router of one MindSkip layer and its decisions, one per live request.

    The weights are fp32 buffers rather than parameters: vLLM loads every parameter from the base checkpoint,
    and the routers come from their own directory.
    """

    def __init__(self, hidden_size: int, threshold: float):
        super().__init__()
        self.register_buffer("weight", torch.zeros(hidden_size, dtype=torch.float32), persistent=False)
        self.register_buffer("bias", torch.zeros((), dtype=torch.float32), persistent=False)
        self.threshold = threshold
        # keep_by_block[b]: the decision for the request whose first KV block is b. Sized on first use.
        self.keep_by_block: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.numel()}, threshold={self.threshold}"

    def keep_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """``(rows,)`` bool, per token of ``normed`` (the flat batch's normalised layer input): the decision of a
        layer routed per token, each token's own fp32 logit as transformers' token routing computes it
        (:func:`mindskip_ext.token_routing.token_logits`)."""
        logits = (normed.to(torch.float32) * self.weight).sum(-1) + self.bias
        return torch.sigmoid(logits) >= self.threshold

    def decide(self, normed: torch.Tensor, step: StepRouting) -> torch.Tensor:
        """``(num_reqs,)`` bool: made now for requests in prefill, read back for the others."""
        _, made, _, _ = ops.router_gate_varlen(normed, step.query_start_loc, self.weight, self.bias, self.threshold)
        table = self.keep_by_block
        if table is None or table.numel() < step.table_size:
            grown = torch.ones(max(step.table_size, 2 * (0 if table is None else table.numel())), dtype=torch.bool,
                               device=normed.device)
            if table is not None:
                grown[: table.numel()] = table
            self.keep_by_block = table = grown
        keep = torch.where(step.is_prefill, made, table.index_select(0, step.first_block))
        table[step.first_block] = keep
        return keep


def _step_routing(layer_name: str) -> StepRouting | None:
    """This step's routing, or None in runs without attention metadata (vLLM's profiling and warm-up)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict):
        return None
    return getattr(metadata.get(layer_name), "mindskip_step", None)


@contextlib.contextmanager
def _subset_context(layer_name: str, plan: SubsetPlan):
    """The forward context with this layer's attention metadata and KV slots narrowed to the kept requests."""
    context = get_forward_context()
    saved = context.attn_metadata[layer_name], context.slot_mapping.get(layer_name)
    context.attn_metadata[layer_name] = plan.metadata
    if saved[1] is not None:
        context.slot_mapping[layer_name] = plan.slot_mapping
    try:
        yield
    finally:
        context.attn_metadata[layer_name] = saved[0]
        if saved[1] is not None:
            context.slot_mapping[layer_name] = saved[1]


class RoutedAttention:
    """What :func:`routed_attention` runs for one MindSkip layer: its router and its stock attention module.

    It sits in vLLM's static forward context (the per-engine table that maps a layer name to its module, where
    vLLM's attention op finds its layer too) under :func:`routed_key`; it is not an attention layer, so vLLM
    gives it no KV cache.
    """

    def __init__(self, self_attn: nn.Module, attn: nn.Module, router: LayerRouter):
        # The class's forward, bound: the instance's own forward becomes the call of the op.
        self.stock_forward = types.MethodType(type(self_attn).forward, self_attn)
        self.layer_name = attn.layer_name
        self.router = router

    def run(self, positions: torch.Tensor, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        step = _step_routing(self.layer_name)
        plan = True if step is None else step.plan(self.router.decide(hidden_states, step), hidden_states.shape[0])
        if plan is True:  # every request kept, or a run without metadata (profiling, warm-up)
            output.copy_(self.stock_forward(positions, hidden_states))
            return
        output.zero_()
        if plan is False:
            return
        with _subset_context(self.layer_name, plan):
            kept = self.stock_forward(
                ops.gather_kept(positions, plan.order, plan.num_tokens),
                ops.gather_kept(hidden_states, plan.order, plan.num_tokens),
            )
        ops.scatter_add_kept_(output, kept, plan.order)


def routed_key(layer_name: str) -> str:
    """The static forward context's key of the :class:`RoutedAttention` of attention layer ``layer_name``."""
    return f"{layer_name}.mindskip"


_LIBRARY = torch.library.Library("mindskip_vllm", "FRAGMENT")


@eager_break_during_capture
def routed_attention(
    hidden_states: torch.Tensor, positions: torch.Tensor, output: torch.Tensor, layer_name: LayerNameType
) -> None:
    """The MindSkip attention sublayer of ``layer_name`` over vLLM's flat batch, written into ``output``:
    decide, gather the kept requests' tokens, attend for them, scatter (zeros for the skipped ones)."""
    key = routed_key(_resolve_layer_name(layer_name))
    get_forward_context().no_compile_layers[key].run(positions, hidden_states, output)


def _routed_attention_fake(
    hidden_states: torch.Tensor, positions: torch.Tensor, output: torch.Tensor, layer_name: LayerNameType
) -> None:
    return None


direct_register_custom_op(
    op_name="routed_attention", op_func=routed_attention, mutates_args=["output"], fake_impl=_routed_attention_fake,
    target_lib=_LIBRARY,
)


def _routed_forward(self_attn: nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs
                    ) -> torch.Tensor:
    """A routed attention module's forward: one call of the op, into a buffer allocated here (inside the
    compiled graph, where vLLM's own attention allocates its output).

    Gemma 3's decoder layer passes its own keyword arguments on to the attention module, which ignores them; the op
    carries none, so a call that brings any is refused rather than routed without them."""
    if kwargs:
        raise ValueError("MindSkip routes attention modules called with positions and hidden states only; this "
                         f"model passes {sorted(kwargs)} to its attention modules too")
    output = torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
    torch.ops.mindskip_vllm.routed_attention(hidden_states, positions, output, self_attn.mindskip_layer_name)
    return output


def attach_router(self_attn: nn.Module, attn: nn.Module, router: LayerRouter, static_forward_context: dict
                  ) -> None:
    """Route a stock vLLM attention module ``self_attn`` whose ``Attention`` layer is ``attn`` (an instance: no
    class is changed): its ``forward(positions, hidden_states)`` then runs only for the kept requests' tokens and
    returns zeros for the others."""
    self_attn.mindskip_router = router
    attn.attn_backend = routed_backend(attn.attn_backend)
    key = routed_key(attn.layer_name)
    if key in static_forward_context:
        raise ValueError(f"duplicate MindSkip layer name: {key}")
    static_forward_context[key] = RoutedAttention(self_attn, attn, router)
    # The name as vLLM passes it to its own ops (a graph input rather than a constant on torch >= 2.11), so
    # that the compiled code of every routed layer is the same.
    self_attn.mindskip_layer_name = _encode_layer_name(attn.layer_name)
    self_attn.forward = types.MethodType(_routed_forward, self_attn)


def _token_routed_forward(self_attn: nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs
                          ) -> torch.Tensor:
    """A per-token routed attention module's forward: the stock module for every token (each token's key and value
    are written, as a token-routed transformers layer computes them for every token), its output zeroed where the
    token's router skips."""
    keep = self_attn.mindskip_router.keep_tokens(hidden_states)
    output = self_attn.mindskip_stock_forward(positions, hidden_states, **kwargs)
    return output * keep.unsqueeze(-1).to(output.dtype)


def attach_token_router(self_attn: nn.Module, router: LayerRouter) -> None:
    """Route a stock vLLM attention module ``self_attn`` per token (an instance: no class is changed): a skipped
    token's attention output is zeros, so the decoder's residual add leaves it unchanged. Every token still attends
    (the saving of a per-token layer is in transformers' kernels, not here); the decisions are tensor ops without a
    host sync, so the layer compiles and graphs like the stock one."""
    self_attn.mindskip_router = router
    self_attn.mindskip_stock_forward = types.MethodType(type(self_attn).forward, self_attn)
    self_attn.forward = types.MethodType(_token_routed_forward, self_attn)


@functools.cache
def routed_backend(backend: type) -> type:
    """``backend`` with a metadata builder that leaves a :class:`StepRouting` on the metadata it builds."""
    base_builder = backend.get_builder_cls()

    class MindSkipMetadataBuilder(base_builder):
        # Built every step (never patched from another group's build), so each step gets its own StepRouting.
        supports_update_block_table = False

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            self._subset_builder = base_builder(kv_cache_spec, layer_names, vllm_config, device)

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
            return AttentionCGSupport.NEVER  # subsets are data-dependent

        def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
            metadata = super().build(common_prefix_len, common_attn_metadata, *args, **kwargs)
            metadata.mindskip_step = StepRouting(common_attn_metadata, self._subset_builder)
            return metadata

    return subclass_attention_backend("MindSkip", backend, MindSkipMetadataBuilder)
