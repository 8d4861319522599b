"""Every compiled op once at the shapes where an index or a bound goes wrong, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 -m bench.gpu_sanitize --device cuda   # what bench/gpu_session.sh runs
    python -m bench.gpu_sanitize --device cpu                                         # the same calls on the CPU

The shapes: an empty kept set, every sequence kept, hidden sizes that are no multiple of 8 (the tail after
the vector loads), a batch of one, a single token, and sequences with no real token. Tensors are tiny: memcheck
slows every access. Each result is also compared with :mod:`mindskip_ext.reference`, so that a kernel that stays
in bounds but computes the wrong rows is reported too, and an op of the library that no case calls is reported
as a failure. Ends with one line ``sanitize: N cases, M failed``; the exit status is 1 when anything failed.

Run it with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``: the caching allocator carves tensors out of larger blocks, and
memcheck only sees an access that leaves the block, not one that leaves the tensor.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mindskip_ext import ops
from mindskip_ext import reference as ref

# (B, T, D, dtype, mask): "none" passes no mask; "right" pads the ends; "empty_row" also leaves one sequence
# with no real token at all.
SHAPES = [
    (1, 1, 1, torch.float32, "none"),
    (1, 7, 13, torch.bfloat16, "right"),
    (3, 5, 4095, torch.float16, "empty_row"),
    (5, 9, 2049, torch.bfloat16, "empty_row"),
    (4, 3, 8, torch.float32, "right"),
]
# Router biases that keep no sequence and all of them (the weights are small, so +-30 dominates); "some kept" has
# its bias set between the two middle logits of the case (see middle_bias).
BIASES = {"none kept": -30.0, "some kept": None, "all kept": 30.0}
# The ops run_case calls (router_gate_varlen where the library has it); any other op of the library fails the run.
COVERED = {"router_gate", "router_gate_backward", "router_gate_varlen", "gather_kept", "scatter_add_kept_",
           "scatter_add_kept", "rotary_embedding", "token_decode_attention", "pack_plan", "pack_kept",
           "unpack_add_kept_"}
# Low-precision outputs are rounded once from fp32 by both sides, but reductions run in another order.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(batch, seqlen, dim, dtype, mask_kind, seed=0):
    """(hidden, mask or None, weight) on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seqlen, dim, generator=gen).to(dtype)
    weight = torch.randn(dim, generator=gen) * dim**-0.5
    if mask_kind == "none":
        return hidden, None, weight
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=gen)
    mask = torch.arange(seqlen)[None, :] < lengths[:, None]
    if mask_kind == "empty_row":
        mask[batch // 2] = False
    return hidden, mask, weight


def check(name, got, want, dtype):
    """Raise AssertionError naming ``name`` unless ``got`` matches ``want`` (exactly for integer and bool
    tensors)."""
    tol = TOLERANCE[dtype] if got.is_floating_point() else 0
    try:
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol, check_dtype=True)
    except AssertionError as err:
        raise AssertionError(f"{name}: {err}") from None


def check_outputs(op, names, got, want, dtype):
    for name, g, w in zip(names, got, want, strict=True):
        check(f"{op} {name}", g, w, dtype)


def registered_ops() -> set[str]:
    """The names of every op of the mindskip library (``router_gate``, ...)."""
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mindskip::")}


def middle_bias(hidden, mask, weight) -> float:
    """A bias that keeps the upper half of the sequences: halfway between two logits, so that no score sits on
    the threshold where the kernel's and the reference's rounding could decide differently."""
    logits = torch.logit(ref.router_gate(hidden, mask, weight, None, 0.5)[0].double()).sort().values
    mid = len(logits) // 2
    return -float(logits[mid - 1] + logits[mid]) / 2 if len(logits) > 1 else 0.0


def run_case(batch, seqlen, dim, dtype, mask_kind, bias, device) -> int:
    """Every op once on one shape and router bias (None: :func:`middle_bias`), chained as a MindSkip layer chains
    them, on ``device``; the reference runs the same chain on the CPU, so that the device runs nothing but the ops
    and copies. Returns the number of sequences kept."""
    hidden, mask, weight = make_inputs(batch, seqlen, dim, dtype, mask_kind)
    bias = torch.tensor(middle_bias(hidden, mask, weight) if bias is None else bias)
    on_device = [None if t is None else t.to(device) for t in (hidden, mask, weight, bias)]
    d_hidden, d_mask, d_weight, d_bias = on_device
    if "router_gate_varlen" in registered_ops():
        run_varlen(hidden, mask, weight, bias, device)

    got = ops.router_gate(d_hidden, d_mask, d_weight, d_bias, 0.5)
    want = ref.router_gate(hidden, mask, weight, bias, 0.5)
    check_outputs("router_gate", ("score", "keep", "order", "num_kept"), got, want, dtype)
    (score, _, order, num_kept), (want_score, want_keep, want_order, _) = got, want
    k = int(num_kept)

    grad = torch.ones(batch)
    got = ops.router_gate_backward(grad.to(device), d_hidden, d_mask, d_weight, score)
    want = ref.router_gate_backward(grad, hidden, mask, weight, want_score)
    check_outputs("router_gate_backward", ("grad_hidden", "grad_weight", "grad_bias"), got, want, dtype)

    kept, want_kept = ops.gather_kept(d_hidden, order, k), ref.gather_kept(hidden, want_order, k)
    check("gather_kept", kept, want_kept, dtype)
    check("scatter_add_kept_", ops.scatter_add_kept_(torch.ones_like(d_hidden), kept, order),
          ref.scatter_add_kept_(torch.ones_like(hidden), want_kept, want_order), dtype)
    check("scatter_add_kept", ops.scatter_add_kept(d_hidden, kept, order),
          ref.scatter_add_kept(hidden, want_kept, want_order), dtype)
    run_rotary(hidden, kept, order, want_kept, want_order, device)
    run_token_decode(hidden, mask, want_keep, device)

    cu_seqlens, token_index, max_len = ops.pack_plan(d_mask, order, k, seqlen)
    want_cu, want_index, want_max = ref.pack_plan(mask, want_order, k, seqlen)
    total = int(cu_seqlens[-1])
    check("pack_plan cu_seqlens", cu_seqlens, want_cu, dtype)
    check("pack_plan token_index", token_index[:total], want_index[:total], dtype)  # the rest is unspecified
    check("pack_plan max_len", max_len, want_max, dtype)
    packed, want_packed = ops.pack_kept(d_hidden, token_index, total), ref.pack_kept(hidden, want_index, total)
    check("pack_kept", packed, want_packed, dtype)
    check("unpack_add_kept_", ops.unpack_add_kept_(torch.ones_like(d_hidden), packed, token_index),
          ref.unpack_add_kept_(torch.ones_like(hidden), want_packed, want_index), dtype)
    return k


def run_rotary(hidden, kept, order, want_kept, want_order, device) -> None:
    """rotary_embedding of the kept rows (one query head, two key heads, the even part of D) with a cos/sin table of
    every row, each kept row picking its own: as a mixed layer's decode step calls it."""
    even = hidden.shape[-1] - hidden.shape[-1] % 2
    table = hidden[..., :even]
    k = want_kept.shape[0]

    def heads(x):
        x = x[..., :even]
        return x.unsqueeze(2), torch.stack([x, -x], dim=2)

    with torch.no_grad():
        got = ops.rotary_embedding(*heads(kept), table.cos().to(device), table.sin().to(device), order[:k])
    want = ref.rotary_embedding(*heads(want_kept), table.cos(), table.sin(), want_order[:k])
    check_outputs("rotary_embedding", ("q_out", "k_out"), got, want, hidden.dtype)


def run_token_decode(hidden, mask, keep, device) -> None:
    """token_decode_attention as a token-routed decode step calls it: the last position's query (two query heads on
    one key/value head) over each row's cache of ``hidden``, only the rows of ``keep``, the padding ``mask``, and a
    static cache's fill length one position short of the buffer."""
    batch, seqlen, dim = hidden.shape
    last = hidden[:, -1]
    query = torch.stack([last, -last], dim=1)
    key, value = hidden.unsqueeze(1), hidden.flip(-1).unsqueeze(1)
    length = torch.tensor([max(1, seqlen - 1)])
    scale = dim ** -0.5
    args = (query, key, value, keep, mask, length)
    got = ops.token_decode_attention(*(None if t is None else t.to(device) for t in args), scale)
    check("token_decode_attention", got, ref.token_decode_attention(*args, scale), hidden.dtype)


def run_varlen(hidden, mask, weight, bias, device) -> None:
    """router_gate_varlen on the real tokens of ``hidden`` laid flat: an empty segment where a row has none."""
    real = torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask
    flat = hidden[real]
    cu_seqlens = torch.nn.functional.pad(real.sum(1).cumsum(0), (1, 0))
    got = ops.router_gate_varlen(*(t.to(device) for t in (flat, cu_seqlens, weight, bias)), 0.5)
    want = ref.router_gate_varlen(flat, cu_seqlens, weight, bias, 0.5)
    check_outputs("router_gate_varlen", ("score", "keep", "order", "num_kept"), got, want, hidden.dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_sanitize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (under compute-sanitizer) or cpu (default: cuda)")
    device = torch.device(parser.parse_args(argv).device)
    cases = failed = 0
    for batch, seqlen, dim, dtype, mask_kind in SHAPES:
        for label, bias in BIASES.items():
            cases += 1
            case = f"B={batch} T={seqlen} D={dim} {str(dtype).removeprefix('torch.')} mask={mask_kind} {label}"
            try:
                k = run_case(batch, seqlen, dim, dtype, mask_kind, bias, device)
            except (AssertionError, RuntimeError) as err:  # a CUDA fault surfaces as a RuntimeError
                failed += 1
                print(f"FAIL {case}: {err}", flush=True)
            else:
                print(f"ok   {case}: k={k}", flush=True)
    uncalled = sorted(registered_ops() - COVERED)
    if uncalled:
        failed += 1
        print(f"FAIL no case calls {', '.join(uncalled)}: add it to run_case")
    print(f"sanitize: {cases} cases, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
