"""Data-parallel Router-Tuning across processes: ``torchrun --nproc_per_node N`` or ``accelerate launch``.

Only the routers train, so no DistributedDataParallel wrapper is used: it would hook every parameter of the
model, and with ``--kept-only`` a router that routed no kept sequence in a step has no gradient, which DDP
handles only with ``find_unused_parameters`` (an extra pass over the graph every step). Instead every rank
sums its routers' gradients with one ``all_reduce`` of a flat buffer per step, a zero for a missing gradient.
The loss of every micro-batch is normalised by the *global* step's token and sequence counts, so the summed
gradient is exactly the gradient one process would compute on the whole global batch.

The launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` starts the process group from them
(NCCL on CUDA, gloo on the CPU) when it is not running yet. One process without them is a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """The one process that writes the log, the checkpoints and the router directory."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.active:
            return list(values)
        buffer = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(buffer)
        return buffer.tolist()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum ``params``' gradients over the ranks, in place (a missing gradient counts as zero)."""
        if not self.active:
            return
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32) for p in params
        ])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def current() -> World:
    """The world of the running process group, or a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def setup(device: torch.device) -> World:
    """Join the process group the launcher describes (environment ``WORLD_SIZE`` > 1), if not joined yet."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current()


def local_device(device: torch.device) -> torch.device:
    """This process's CUDA device under a launcher (``cuda:LOCAL_RANK``); other devices as given."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shard_frozen_layers(model, device: torch.device) -> int:
    """FSDP2: shard the frozen weights of ``model`` (a MindSkipModel) over the ranks. The routers stay replicated
    (their gradients are summed by :meth:`World.sum_gradients`). Returns the number of sharded units.

    An ordinary decoder layer is one unit. A MindSkip layer calls the parts of its original layer itself (the
    norms, the attention or, on the packed path, its projections, and the MLP), never the layer as a whole, so
    each of those parts is a unit: FSDP gathers a unit's weights in the hooks around the unit's own call. The
    embeddings and the LM head are units too, unless they are tied (one weight cannot be split over two units).
    ``model`` may still be on the CPU: each rank moves only its shards to ``device``, then the rest (the
    replicated routers and small parts) follows.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..architectures import layer_list
    from ..layer import MindSkipDecoderLayer

    spec = model._spec
    units = []
    for layer in layer_list(model.base_model, spec):
        if isinstance(layer, MindSkipDecoderLayer):
            base = layer.base_layer
            attn = getattr(base, spec.attn)
            units += [m for m in attn.children() if next(m.parameters(), None) is not None]  # children first
            # The attention, then the layer's other parts with weights (its norms and MLP, whatever the family).
            units += [attn, *(m for m in base.children() if m is not attn and next(m.parameters(), None) is not None)]
        else:
            units.append(layer)
    embed, head = model.base_model.get_input_embeddings(), model.base_model.get_output_embeddings()
    if head is None or head.weight is not embed.weight:
        units += [embed] + ([head] if head is not None else [])
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in units:
        if any(p.requires_grad for p in unit.parameters()):
            raise ValueError("FSDP sharding here is for frozen weights; a router-tuned model trains its routers only")
        fully_shard(unit, mesh=mesh)
    model.to(device)
    return len(units)
