// CPU router gate: z_b = bias + (1/n_b) * sum_t m_bt (w . x_bt), score = sigmoid(z), keep =
// score >= threshold, order = stable kept-first permutation, num_kept = sum(keep). The varlen form
// takes the sequences as segments of a flat token batch instead of padded rows.
//
// One pass over hidden. The (b, token-chunk) work items are fixed by the shape alone, and the
// partial sums are combined in a fixed order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../common.h"
#include "simd.h"

namespace mindskip::cpu {
namespace {

constexpr const char* kOp = "mindskip::router_gate";
constexpr const char* kBackwardOp = "mindskip::router_gate_backward";
constexpr const char* kVarlenOp = "mindskip::router_gate_varlen";

// Tokens per work item: about 32K elements, so a chunk is worth scheduling but B * chunks still
// spreads over the threads when B is small.
int64_t chunk_tokens(int64_t seqlen, int64_t dim) {
  return std::clamp<int64_t>(32768 / std::max<int64_t>(dim, 1), 1, std::max<int64_t>(seqlen, 1));
}

template <typename acc_t>
acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
}

// sum over rows r in [row0, row1) of w . x_r, skipping padding rows when there is a mask.
template <typename scalar_t, typename acc_t>
acc_t rows_dot_sum(const scalar_t* hidden, const bool* mask, const acc_t* weight, int64_t row0,
                   int64_t row1, int64_t dim) {
  acc_t sum = 0;
  for (int64_t r = row0; r < row1; ++r) {
    if (mask == nullptr || mask[r]) {
      sum += dot(hidden + r * dim, weight, dim);
    }
  }
  return sum;
}

// From each sequence's dot-product sum and real-token count: score, keep, the stable kept-first
// order and the kept count. Shared by router_gate and router_gate_varlen, so that both make the
// same decision from the same sums.
template <typename acc_t>
void finish_router(const acc_t* sums, const int64_t* real, acc_t bias, acc_t threshold,
                   int64_t batch, acc_t* score, bool* keep, int64_t* order, int64_t* num_kept) {
  int64_t kept = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const acc_t z = bias + (real[b] > 0 ? sums[b] / static_cast<acc_t>(real[b]) : acc_t(0));
    score[b] = sigmoid(z);
    keep[b] = score[b] >= threshold;
    kept += keep[b];
  }
  int64_t next_kept = 0;
  int64_t next_skipped = kept;
  for (int64_t b = 0; b < batch; ++b) {
    order[keep[b] ? next_kept++ : next_skipped++] = b;
  }
  num_kept[0] = kept;
}

template <typename scalar_t, typename acc_t>
void router_gate_kernel(const scalar_t* hidden, const bool* mask, const acc_t* weight,
                        acc_t bias, acc_t threshold, int64_t batch, int64_t seqlen, int64_t dim,
                        acc_t* score, bool* keep, int64_t* order, int64_t* num_kept) {
  const int64_t chunk = chunk_tokens(seqlen, dim);
  const int64_t chunks = seqlen == 0 ? 0 : (seqlen + chunk - 1) / chunk;
  std::vector<acc_t> partial(static_cast<size_t>(batch * chunks), acc_t(0));
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t t0 = (item % chunks) * chunk;
      const int64_t t1 = std::min(seqlen, t0 + chunk);
      partial[item] = rows_dot_sum(hidden, mask, weight, b * seqlen + t0, b * seqlen + t1, dim);
    }
  });

  std::vector<acc_t> sums(static_cast<size_t>(batch), acc_t(0));
  std::vector<int64_t> real(static_cast<size_t>(batch), seqlen);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t c = 0; c < chunks; ++c) {
      sums[b] += partial[b * chunks + c];
    }
    if (mask != nullptr) {
      real[b] = std::count(mask + b * seqlen, mask + (b + 1) * seqlen, true);
    }
  }
  finish_router(sums.data(), real.data(), bias, threshold, batch, score, keep, order, num_kept);
}

// Each segment is cut into chunks exactly as router_gate cuts an unpadded sequence of its length,
// and its chunk sums are added in the same order: a segment gets bit for bit the score that
// router_gate gives that sequence alone, whatever the other segments are.
template <typename scalar_t, typename acc_t>
void router_gate_varlen_kernel(const scalar_t* hidden, const int64_t* cu, const acc_t* weight,
                               acc_t bias, acc_t threshold, int64_t batch, int64_t dim,
                               acc_t* score, bool* keep, int64_t* order, int64_t* num_kept) {
  // Work items: the chunks of every segment, segment by segment.
  std::vector<int64_t> first_item(static_cast<size_t>(batch + 1), 0);
  std::vector<int64_t> chunk(static_cast<size_t>(batch), 1);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = cu[b + 1] - cu[b];
    chunk[b] = chunk_tokens(length, dim);
    first_item[b + 1] = first_item[b] + (length + chunk[b] - 1) / chunk[b];
  }
  std::vector<int64_t> segment_of(static_cast<size_t>(first_item[batch]));
  for (int64_t b = 0; b < batch; ++b) {
    std::fill(segment_of.begin() + first_item[b], segment_of.begin() + first_item[b + 1], b);
  }
  std::vector<acc_t> partial(segment_of.size(), acc_t(0));
  at::parallel_for(0, first_item[batch], 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = segment_of[item];
      const int64_t t0 = cu[b] + (item - first_item[b]) * chunk[b];
      partial[item] = rows_dot_sum<scalar_t, acc_t>(hidden, nullptr, weight, t0,
                                                    std::min(cu[b + 1], t0 + chunk[b]), dim);
    }
  });

  std::vector<acc_t> sums(static_cast<size_t>(batch), acc_t(0));
  std::vector<int64_t> real(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t item = first_item[b]; item < first_item[b + 1]; ++item) {
      sums[b] += partial[item];
    }
    real[b] = cu[b + 1] - cu[b];
  }
  finish_router(sums.data(), real.data(), bias, threshold, batch, score, keep, order, num_kept);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_gate_cpu(
    const at::Tensor& hidden_in, const std::optional<at::Tensor>& mask_in,
    const at::Tensor& weight_in, const at::Tensor& bias_in, double threshold) {
  const RouterShape shape = check_router_gate(hidden_in, weight_in, bias_in, threshold, kOp);
  const RouterTensors in = router_tensors(hidden_in, mask_in, weight_in, shape, kOp);
  const at::Tensor bias = in.vector(bias_in, 1);
  const RouterGateOutputs out = router_gate_outputs(in, shape.batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.hidden.scalar_type(), "router_gate", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float, or double for double
    router_gate_kernel<scalar_t, acc_t>(
        in.hidden.const_data_ptr<scalar_t>(), mask_data(in.mask), in.weight.const_data_ptr<acc_t>(),
        bias.item<acc_t>(), static_cast<acc_t>(threshold), shape.batch, shape.seqlen, shape.dim,
        out.score.mutable_data_ptr<acc_t>(), out.keep.mutable_data_ptr<bool>(),
        out.order.mutable_data_ptr<int64_t>(), out.num_kept.mutable_data_ptr<int64_t>());
  });
  return {out.score, out.keep, out.order, out.num_kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_gate_varlen_cpu(
    const at::Tensor& hidden_in, const at::Tensor& cu_seqlens, const at::Tensor& weight_in,
    const at::Tensor& bias_in, double threshold) {
  const VarlenRouterShape shape =
      check_router_gate_varlen(hidden_in, cu_seqlens, weight_in, bias_in, threshold, kVarlenOp);
  const at::Tensor offsets = segment_offsets(cu_seqlens);
  const int64_t* cu = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK(cu[0] >= 0 && cu[shape.batch] <= shape.tokens, kVarlenOp, ": cu_seqlens spans [",
              cu[0], ", ", cu[shape.batch], "), outside the ", shape.tokens, " rows of hidden");
  for (int64_t b = 0; b < shape.batch; ++b) {
    TORCH_CHECK(cu[b] <= cu[b + 1], kVarlenOp, ": cu_seqlens must be non-decreasing, but cu_seqlens[",
                b, "] = ", cu[b], " > cu_seqlens[", b + 1, "] = ", cu[b + 1]);
  }
  const RouterTensors in = router_tensors(hidden_in, weight_in, shape.dim);
  const at::Tensor bias = in.vector(bias_in, 1);
  const RouterGateOutputs out = router_gate_outputs(in, shape.batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.hidden.scalar_type(), "router_gate_varlen", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float, or double for double
    router_gate_varlen_kernel<scalar_t, acc_t>(
        in.hidden.const_data_ptr<scalar_t>(), cu, in.weight.const_data_ptr<acc_t>(), bias.item<acc_t>(),
        static_cast<acc_t>(threshold), shape.batch, shape.dim, out.score.mutable_data_ptr<acc_t>(),
        out.keep.mutable_data_ptr<bool>(), out.order.mutable_data_ptr<int64_t>(),
        out.num_kept.mutable_data_ptr<int64_t>());
  });
  return {out.score, out.keep, out.order, out.num_kept};
}

// d score_b / d z_b = s (1 - s); z_b = b + (1/n_b) sum_t m_bt (w . x_bt). With
// coef_b = grad_b s_b (1 - s_b) / n_b:
//   grad_hidden[b, t] = coef_b m_bt w,  grad_weight = sum_bt coef_b m_bt x_bt,
//   grad_bias = sum_b grad_b s_b (1 - s_b).
template <typename scalar_t, typename acc_t>
void router_gate_backward_kernel(const acc_t* grad_score, const scalar_t* hidden,
                                 const bool* mask, const acc_t* weight, const acc_t* score,
                                 int64_t batch, int64_t seqlen, int64_t dim,
                                 scalar_t* grad_hidden, acc_t* grad_weight, acc_t* grad_bias) {
  std::vector<acc_t> coef(static_cast<size_t>(batch));
  acc_t bias_sum = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const acc_t dz = grad_score[b] * score[b] * (acc_t(1) - score[b]);
    const int64_t real =
        mask == nullptr ? seqlen : std::count(mask + b * seqlen, mask + (b + 1) * seqlen, true);
    coef[b] = real > 0 ? dz / static_cast<acc_t>(real) : acc_t(0);
    bias_sum += dz;
  }
  *grad_bias = bias_sum;

  // Every real token of sequence b gets the same gradient row coef_b * w; padding gets zeros.
  std::vector<scalar_t> rows(static_cast<size_t>(batch * dim));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t d = 0; d < dim; ++d) {
      rows[b * dim + d] = static_cast<scalar_t>(coef[b] * weight[d]);
    }
  }
  const int64_t row_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, batch * seqlen, row_grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* out = grad_hidden + r * dim;
      if (mask == nullptr || mask[r]) {
        std::copy_n(rows.data() + (r / seqlen) * dim, dim, out);
      } else {
        std::fill_n(out, dim, scalar_t(0));
      }
    }
  });

  // Columns split across threads; each column sums its rows in order (deterministic).
  at::parallel_for(0, dim, 256, [&](int64_t d0, int64_t d1) {
    std::vector<acc_t> acc(static_cast<size_t>(d1 - d0), acc_t(0));
    for (int64_t r = 0; r < batch * seqlen; ++r) {
      const acc_t c = coef[r / seqlen];
      if (c == acc_t(0) || (mask != nullptr && !mask[r])) {
        continue;
      }
      const scalar_t* x = hidden + r * dim;
      for (int64_t d = d0; d < d1; ++d) {
        acc[d - d0] += c * static_cast<acc_t>(x[d]);
      }
    }
    std::copy(acc.begin(), acc.end(), grad_weight + d0);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_gate_backward_cpu(
    const at::Tensor& grad_score_in, const at::Tensor& hidden_in,
    const std::optional<at::Tensor>& mask_in, const at::Tensor& weight_in,
    const at::Tensor& score_in) {
  const RouterShape shape =
      check_router_gate_backward(grad_score_in, hidden_in, weight_in, score_in, kBackwardOp);
  const RouterTensors in = router_tensors(hidden_in, mask_in, weight_in, shape, kBackwardOp);
  const at::Tensor grad_score = in.vector(grad_score_in, shape.batch);
  const at::Tensor score = in.vector(score_in, shape.batch);
  const RouterGateGrads grad = router_gate_grads(in, shape.dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.hidden.scalar_type(), "router_gate_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float, or double for double
    router_gate_backward_kernel<scalar_t, acc_t>(
        grad_score.const_data_ptr<acc_t>(), in.hidden.const_data_ptr<scalar_t>(),
        mask_data(in.mask), in.weight.const_data_ptr<acc_t>(), score.const_data_ptr<acc_t>(),
        shape.batch, shape.seqlen, shape.dim, grad.hidden.mutable_data_ptr<scalar_t>(),
        grad.weight.mutable_data_ptr<acc_t>(), grad.bias.mutable_data_ptr<acc_t>());
  });
  return {grad.hidden, grad.weight, grad.bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mindskip, CPU, m) {
  m.impl("router_gate", &router_gate_cpu);
  m.impl("router_gate_backward", &router_gate_backward_cpu);
  m.impl("router_gate_varlen", &router_gate_varlen_cpu);
}

}  // namespace mindskip::cpu
