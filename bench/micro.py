"""Micro-benchmarks: each compiled op against the eager PyTorch composition doing the same work,
in the same run. Reports the median time, the speedup over eager, the achieved GB/s (bytes that
must move at least once / time) and, on GPU, the fraction of the measured peak bandwidth.

* router_gate vs masked mean + linear + sigmoid + compare + nonzero (both end with the one host
  read of the kept count a MindSkip layer needs);
* gather_kept + scatter_add_kept_ vs index_select + index_add_;
* pack_plan + pack_kept + unpack_add_kept_ as the MindSkip layer runs them (one plan for both, with the one host
  read of the packed sizes) vs nonzero-built token indices + index_select + index_add_.
"""

from __future__ import annotations

import functools
import statistics

import torch

from mindskip_ext import ops
from mindskip_ext.timing import time_ms

from .common import peak_bandwidth_gbps

SECTION = "micro"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def plan(args, device: torch.device):
    """(kind, B, T, D, dtype, padding) cases for this run."""
    goal = [("router", 32, 1024, 2048, dt, "none") for dt in ("fp32", "bf16")]
    regroup = [(kind, 32, 1024, 2048, "bf16", pad)
               for kind, pad in (("gather_scatter", "none"), ("pack_unpack", "right"))]
    if args.quick:
        return goal + regroup + [("gather_scatter", 32, 1024, 2048, "fp32", "none")]
    cases = goal + [("router", 32, 1024, 2048, "fp16", "none"), ("router", 32, 1024, 2048, "bf16", "right")]
    cases += [("router", b, t, d, "bf16", "right") for b, t, d in ((8, 4096, 4096), (64, 256, 1024), (1, 8192, 4096))]
    cases += regroup
    cases += [("gather_scatter", 32, 1024, 2048, dt, "none") for dt in ("fp32", "fp16")]
    cases += [("gather_scatter", 64, 512, 4096, "bf16", "none"), ("pack_unpack", 64, 512, 4096, "bf16", "right")]
    if device.type == "cuda":
        cases += [(kind, 64, 2048, 4096, "bf16", pad)
                  for kind, pad in (("router", "none"), ("gather_scatter", "none"), ("pack_unpack", "right"))]
    return cases


def make_mask(batch, seqlen, padding, device):
    if padding == "none":
        return torch.ones(batch, seqlen, dtype=torch.bool, device=device)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,), generator=gen)
    return (torch.arange(seqlen)[None, :] < lengths[:, None]).to(device)


def kept_first(batch, k, device):
    """A kept-first order keeping every other sequence."""
    idx = torch.arange(batch)
    keep = idx % 2 == 0
    keep[idx >= 2 * k] = False
    return torch.cat([idx[keep], idx[~keep]]).to(device)


# ---------------------------------------------------------------------------------------------
# The eager compositions


def router_eager(hidden, mask, weight, bias, threshold):
    real = mask.to(torch.float32)
    mean = (hidden.float() * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1)
    score = torch.sigmoid(mean @ weight.float() + bias)
    kept = torch.nonzero(score >= threshold).squeeze(1)
    return score, kept.numel()


def router_ours(hidden, mask, weight, bias, threshold):
    score, _, _, num_kept = ops.router_gate(hidden, mask, weight, bias, threshold)
    return score, int(num_kept)


def gather_scatter_eager(x, residual, order, k):
    rows = order[:k]
    residual.index_add_(0, rows, x.index_select(0, rows))


def gather_scatter_ours(x, residual, order, k):
    ops.scatter_add_kept_(residual, ops.gather_kept(x, order, k), order)


def pack_unpack_eager(x, residual, mask, order, k):
    batch, seqlen, dim = x.shape
    rows = order[:k]
    real = mask.index_select(0, rows)
    flat = (rows[:, None] * seqlen + torch.arange(seqlen, device=x.device)[None, :])[real]
    lengths = real.sum(1)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    max_len = int(lengths.max())
    packed = x.reshape(batch * seqlen, dim).index_select(0, flat)
    residual.view(batch * seqlen, dim).index_add_(0, flat, packed)
    return cu_seqlens, max_len


def pack_unpack_ours(x, residual, mask, order, k):
    cu_seqlens, token_index, total, max_len = ops.pack_plan_with_sizes(mask, order, k, x.shape[1])
    ops.unpack_add_kept_(residual, ops.pack_kept(x, token_index, total), token_index)
    return cu_seqlens, max_len


# ---------------------------------------------------------------------------------------------


def run(args, writer) -> None:
    device = writer.device
    reps, budget = (5, 3.0) if args.quick else (15, 10.0)
    if device.type == "cuda":
        reps *= 10
    peak = peak_bandwidth_gbps(device)
    if peak is not None:
        print(f"peak bandwidth (device copy): {peak:.0f} GB/s")
    for kind, batch, seqlen, dim, dtype_name, padding in plan(args, device):
        dtype = DTYPES[dtype_name]
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, seqlen, dim, generator=gen).to(device=device, dtype=dtype)
        mask = make_mask(batch, seqlen, padding, device)
        params = {"B": batch, "T": seqlen, "D": dim, "dtype": dtype_name, "padding": padding}
        row_bytes = seqlen * dim * x.element_size()
        if kind == "router":
            weight = (torch.randn(dim, generator=gen) * dim**-0.5).to(device)
            args_ = (x, mask, weight, 0.0, 0.5)
            moved = int(mask.sum()) * dim * x.element_size() + mask.numel()
            providers = {
                "eager": functools.partial(router_eager, *args_),
                "mindskip": functools.partial(router_ours, *args_),
            }
            check = (router_eager(*args_)[1], router_ours(*args_)[1])
        else:
            k = batch // 2
            order = kept_first(batch, k, device)
            residual = torch.zeros_like(x)
            params["k"] = k
            if kind == "gather_scatter":
                moved = 5 * k * row_bytes  # gather: read + write; scatter-add: read y, read + write residual
                providers = {
                    "eager": functools.partial(gather_scatter_eager, x, residual, order, k),
                    "mindskip": functools.partial(gather_scatter_ours, x, residual, order, k),
                }
                check = None
            else:
                moved = 5 * int(mask[order[:k]].sum()) * dim * x.element_size()
                providers = {
                    "eager": functools.partial(pack_unpack_eager, x, residual, mask, order, k),
                    "mindskip": functools.partial(pack_unpack_ours, x, residual, mask, order, k),
                }
                eager_cu, eager_max = pack_unpack_eager(x, residual, mask, order, k)
                ours_cu, ours_max = pack_unpack_ours(x, residual, mask, order, k)
                check = (eager_max, ours_max) if torch.equal(eager_cu, ours_cu) else (eager_cu, ours_cu)
        if check is not None and check[0] != check[1]:
            raise AssertionError(f"{kind} {params}: eager and mindskip disagree: {check}")
        medians = {}
        for provider, fn in providers.items():
            times = time_ms(fn, device, reps=reps, warmup=1, budget_s=budget)
            medians[provider] = statistics.median(times)
            gbps = moved / (medians[provider] * 1e6)
            writer.add(
                SECTION, kind, provider, params, times,
                gbps=gbps,
                frac_peak_bw=gbps / peak if peak else None,
                speedup_vs_eager=medians["eager"] / medians[provider] if provider != "eager" else None,
            )
        del x, mask, providers
