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

The subset metadata comes from the attention backend's own metadata builder. :func:`routed_backend` gives a
MindSkip layer's ``Attention`` a copy of the platform's backend whose builder leaves the step's
``CommonAttentionMetadata`` (in a :class:`StepRouting`) on the metadata it returns. Subsets are built by a
second builder instance: GPU builders keep state (FlashAttention's scheduler-metadata buffer, FlashInfer's
planned wrappers) that a subset build must not overwrite while the whole batch's metadata is still in use.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn
from vllm.forward_context import get_forward_context, is_forward_context_available
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


def attach_router(self_attn: nn.Module, router: LayerRouter) -> None:
    """Route a stock vLLM attention module (an instance: no class is changed): its ``forward(positions,
    hidden_states)`` then runs only for the kept requests' tokens and returns zeros for the others."""
    attn = self_attn.attn
    stock_forward = self_attn.forward
    self_attn.mindskip_router = router
    attn.attn_backend = routed_backend(attn.attn_backend)

    def forward(positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        step = _step_routing(attn.layer_name)
        if step is None:
            return stock_forward(positions, hidden_states, **kwargs)
        plan = step.plan(router.decide(hidden_states, step), hidden_states.shape[0])
        if plan is True:
            return stock_forward(positions, hidden_states, **kwargs)
        out = torch.zeros_like(hidden_states, memory_format=torch.contiguous_format)
        if plan is False:
            return out
        with _subset_context(attn.layer_name, plan):
            kept = stock_forward(
                ops.gather_kept(positions, plan.order, plan.num_tokens),
                ops.gather_kept(hidden_states, plan.order, plan.num_tokens),
                **kwargs,
            )
        return ops.scatter_add_kept_(out, kept, plan.order)

    self_attn.forward = forward


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
