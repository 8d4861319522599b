// The CUDA kernels' launchers, between csrc/cuda/ops.cpp and the .cu files (FlashAttention's split
// between its flash_api.cpp and its kernels).
//
// ops.cpp, compiled by the host C++ compiler, is each op's entry: it checks the inputs (the checks
// of common.h, shared with the CPU kernels), takes the device guard, normalises the inputs and
// allocates the outputs. The launchers below, compiled by nvcc, get inputs that already passed
// those checks: they pick the kernel for the dtype and alignment and launch it on the current
// stream. So a bad input raises from host-compiled code, and nvcc-compiled host code throws only
// when CUDA itself reports an error.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../common.h"

namespace mindskip::cuda {

// Launches have one block per (row, tile) or per (sequence, chunk); the ops bound their inputs so
// that the block counts fit a grid.
constexpr int64_t kMaxBlocks = 2147483647;

// router_gate: fills out (score, keep, order, num_kept) for in's B > 0 sequences.
void launch_router_gate(const RouterTensors& in, const at::Tensor& bias, double threshold,
                        const RouterShape& shape, const RouterGateOutputs& out);

// router_gate_varlen: the same over the B > 0 segments of the contiguous int64 `offsets`.
void launch_router_gate_varlen(const RouterTensors& in, const at::Tensor& bias,
                               const at::Tensor& offsets, double threshold,
                               const VarlenRouterShape& shape, const RouterGateOutputs& out);

// router_gate_backward: fills grad (hidden, weight, bias) for B > 0 and B * T <= kMaxBlocks;
// grad_score and score are (B,) vectors in the compute dtype.
void launch_router_gate_backward(const RouterTensors& in, const at::Tensor& grad_score,
                                 const at::Tensor& score, const RouterShape& shape,
                                 const RouterGateGrads& grad);

// out's rows = src's rows index[:plan.count], rows of plan.row_elems elements (src and out
// contiguous, index contiguous int64).
void launch_gather_rows(const at::Tensor& src, const at::Tensor& out, const at::Tensor& index,
                        const RowPlan& plan);

// dst's rows index[:plan.count] += src's rows, in opmath precision (dst and src contiguous, of one
// floating dtype; index contiguous int64 with distinct entries).
void launch_scatter_add_rows(const at::Tensor& dst, const at::Tensor& src, const at::Tensor& index,
                             const RowPlan& plan);

// out's rows order[j] = residual's (+ src's row j for j < plan.count), for the plan.rows entries of
// order, a permutation; out, residual and src contiguous, of one floating dtype.
void launch_scatter_add_rows_out(const at::Tensor& out, const at::Tensor& residual,
                                 const at::Tensor& src, const at::Tensor& order,
                                 const RowPlan& plan);

// rotary_embedding's kernel: q_out, k_out (contiguous (N, H, T, D)) = the rotary embedding of q, k
// (contiguous (N, T, H, D)) with cos, sin (contiguous (C, T, D)), table row rows[n] for row n when
// rows is defined (contiguous int64), else n (or 0 when C = 1).
void launch_rotary_embedding(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                             const at::Tensor& sin, const at::Tensor& rows, const RotaryShape& shape,
                             const at::Tensor& q_out, const at::Tensor& k_out);

// pack_plan's three kernels: the k kept sequences' real-token counts (into `lengths`), their scan
// into cu_seqlens and max_len, and the token indices. mask is a contiguous (B, seqlen) bool tensor
// or undefined (every token real); order contiguous int64.
void launch_pack_plan(const at::Tensor& mask, const at::Tensor& order, int64_t k, int64_t batch,
                      int64_t seqlen, const at::Tensor& lengths, const at::Tensor& cu_seqlens,
                      const at::Tensor& max_len, const at::Tensor& token_index);

}  // namespace mindskip::cuda
