// The CUDA entries of every mindskip op: input checks (common.h, shared with the CPU kernels),
// device guard, normalised inputs and allocated outputs, then the kernels' launcher (launch.h).
// Compiled by the host C++ compiler, so that a bad input raises from here and never from
// nvcc-compiled code.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common.h"
#include "launch.h"

namespace mindskip::cuda {
namespace {

// The router kernels run B * chunks blocks, at most B + 4 * (the SM count) (see router_chunks in
// router_gate.cu); this bound on B keeps that within a grid on any GPU.
constexpr int64_t kMaxRouterBatch = int64_t{1} << 30;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_gate_cuda(
    const at::Tensor& hidden_in, const std::optional<at::Tensor>& mask_in,
    const at::Tensor& weight_in, const at::Tensor& bias_in, double threshold) {
  constexpr const char* op = "mindskip::router_gate";
  const RouterShape shape = check_router_gate(hidden_in, weight_in, bias_in, threshold, op);
  TORCH_CHECK(shape.batch <= kMaxRouterBatch, op, ": batch of ", shape.batch, " is too large");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const RouterTensors in = router_tensors(hidden_in, mask_in, weight_in, shape, op);
  const at::Tensor bias = in.vector(bias_in, 1);
  const RouterGateOutputs out = router_gate_outputs(in, shape.batch);
  if (shape.batch == 0) {
    out.num_kept.zero_();
  } else {
    launch_router_gate(in, bias, threshold, shape, out);
  }
  return {out.score, out.keep, out.order, out.num_kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_gate_varlen_cuda(
    const at::Tensor& hidden_in, const at::Tensor& cu_seqlens, const at::Tensor& weight_in,
    const at::Tensor& bias_in, double threshold) {
  constexpr const char* op = "mindskip::router_gate_varlen";
  const VarlenRouterShape shape =
      check_router_gate_varlen(hidden_in, cu_seqlens, weight_in, bias_in, threshold, op);
  TORCH_CHECK(shape.batch <= kMaxRouterBatch, op, ": batch of ", shape.batch, " is too large");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const RouterTensors in = router_tensors(hidden_in, weight_in, shape.dim);
  const at::Tensor bias = in.vector(bias_in, 1);
  const at::Tensor offsets = segment_offsets(cu_seqlens);
  const RouterGateOutputs out = router_gate_outputs(in, shape.batch);
  if (shape.batch == 0) {
    out.num_kept.zero_();
  } else {
    launch_router_gate_varlen(in, bias, offsets, threshold, shape, out);
  }
  return {out.score, out.keep, out.order, out.num_kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_gate_backward_cuda(
    const at::Tensor& grad_score_in, const at::Tensor& hidden_in,
    const std::optional<at::Tensor>& mask_in, const at::Tensor& weight_in,
    const at::Tensor& score_in) {
  constexpr const char* op = "mindskip::router_gate_backward";
  const RouterShape shape =
      check_router_gate_backward(grad_score_in, hidden_in, weight_in, score_in, op);
  TORCH_CHECK(shape.batch * shape.seqlen <= kMaxBlocks, op, ": B * T = ",
              shape.batch * shape.seqlen, " is too large");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const RouterTensors in = router_tensors(hidden_in, mask_in, weight_in, shape, op);
  const at::Tensor grad_score = in.vector(grad_score_in, shape.batch);
  const at::Tensor score = in.vector(score_in, shape.batch);
  const RouterGateGrads grad = router_gate_grads(in, shape.dim);
  if (shape.dim == 0 || shape.batch * shape.seqlen == 0) {
    grad.weight.zero_();
  }
  if (shape.batch == 0) {
    grad.bias.zero_();
  } else {
    launch_router_gate_backward(in, grad_score, score, shape, grad);
  }
  return {grad.hidden, grad.weight, grad.bias};
}

// The body of gather_kept and pack_kept, given their checked plan: x's rows index[:count], in a
// fresh tensor.
at::Tensor gather_by_plan(const at::Tensor& x_in, const at::Tensor& index_in, const RowPlan& plan) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(plan.packed_shape(x), x.options());
  launch_gather_rows(x, out, index_in.contiguous(), plan);
  return out;
}

// The body of scatter_add_kept_ and unpack_add_kept_, given their checked plan: residual's rows
// index[:count] += src's rows, in place.
void scatter_add_by_plan(const at::Tensor& residual, const at::Tensor& src,
                         const at::Tensor& index, const RowPlan& plan) {
  const c10::cuda::CUDAGuard guard(residual.device());
  launch_scatter_add_rows(residual, src.contiguous(), index.contiguous(), plan);
}

at::Tensor gather_kept_cuda(const at::Tensor& x, const at::Tensor& order, int64_t k) {
  return gather_by_plan(x, order, check_gather_kept(x, order, k, "mindskip::gather_kept"));
}

void scatter_add_kept_cuda(const at::Tensor& residual, const at::Tensor& y,
                           const at::Tensor& order) {
  scatter_add_by_plan(residual, y, order,
                      check_scatter_add_kept(residual, y, order, "mindskip::scatter_add_kept_"));
}

at::Tensor scatter_add_kept_out_cuda(const at::Tensor& residual_in, const at::Tensor& y_in,
                                     const at::Tensor& order_in) {
  const RowPlan plan = check_scatter_add_kept(residual_in, y_in, order_in, "mindskip::scatter_add_kept",
                                              /*in_place=*/false);
  TORCH_CHECK(plan.rows <= kMaxBlocks, "mindskip::scatter_add_kept: batch of ", plan.rows, " is too large");
  const c10::cuda::CUDAGuard guard(residual_in.device());
  const at::Tensor residual = residual_in.contiguous();
  at::Tensor out = at::empty(residual.sizes(), residual.options());
  launch_scatter_add_rows_out(out, residual, y_in.contiguous(), order_in.contiguous(), plan);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& cos_in, const at::Tensor& sin_in,
                                                         const std::optional<at::Tensor>& rows_in) {
  constexpr const char* op = "mindskip::rotary_embedding";
  const RotaryShape shape = check_rotary_embedding(q_in, k_in, cos_in, sin_in, rows_in, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  at::Tensor q_out = at::empty({shape.rows, shape.q_heads, shape.seqlen, shape.dim}, q.options());
  at::Tensor k_out = at::empty({shape.rows, shape.k_heads, shape.seqlen, shape.dim}, k.options());
  const at::Tensor rows = rows_in.has_value() && rows_in->defined() ? rows_in->contiguous() : at::Tensor();
  launch_rotary_embedding(q, k, cos_in.contiguous(), sin_in.contiguous(), rows, shape, q_out, k_out);
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_plan_cuda(
    const std::optional<at::Tensor>& mask_in, const at::Tensor& order_in, int64_t k,
    int64_t seqlen) {
  constexpr const char* op = "mindskip::pack_plan";
  const int64_t batch = check_pack_plan(order_in, k, seqlen, op);
  TORCH_CHECK(batch <= kMaxBlocks, op, ": batch of ", batch, " is too large");
  const c10::cuda::CUDAGuard guard(order_in.device());
  const at::Tensor mask = real_token_mask(mask_in, batch, seqlen, order_in, op, "order");
  const auto opts = order_in.options();
  at::Tensor cu_seqlens = at::empty({k + 1}, opts.dtype(at::kInt));
  at::Tensor token_index = at::zeros({k * seqlen}, opts.dtype(at::kLong));
  at::Tensor max_len = at::empty({1}, opts.dtype(at::kInt));
  at::Tensor lengths = at::empty({k}, opts.dtype(at::kInt));
  launch_pack_plan(mask, order_in.contiguous(), k, batch, seqlen, lengths, cu_seqlens, max_len,
                   token_index);
  return {cu_seqlens, token_index, max_len};
}

at::Tensor pack_kept_cuda(const at::Tensor& x, const at::Tensor& token_index, int64_t total) {
  return gather_by_plan(x, token_index,
                        check_pack_kept(x, token_index, total, "mindskip::pack_kept"));
}

void unpack_add_kept_cuda(const at::Tensor& residual, const at::Tensor& packed,
                          const at::Tensor& token_index) {
  scatter_add_by_plan(
      residual, packed, token_index,
      check_unpack_add_kept(residual, packed, token_index, "mindskip::unpack_add_kept_"));
}

}  // namespace

TORCH_LIBRARY_IMPL(mindskip, CUDA, m) {
  m.impl("router_gate", &router_gate_cuda);
  m.impl("router_gate_backward", &router_gate_backward_cuda);
  m.impl("router_gate_varlen", &router_gate_varlen_cuda);
  m.impl("gather_kept", &gather_kept_cuda);
  m.impl("scatter_add_kept_", &scatter_add_kept_cuda);
  m.impl("scatter_add_kept", &scatter_add_kept_out_cuda);
  m.impl("rotary_embedding", &rotary_embedding_cuda);
  m.impl("pack_plan", &pack_plan_cuda);
  m.impl("pack_kept", &pack_kept_cuda);
  m.impl("unpack_add_kept_", &unpack_add_kept_cuda);
}

}  // namespace mindskip::cuda
