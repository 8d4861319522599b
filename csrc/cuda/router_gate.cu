// CUDA router gate, deterministic two-kernel design:
//   1. router_partial_kernel: one block per (sequence, token chunk); each warp takes one token
//      at a time, skips padding without reading it, and computes w . x_bt with 16-byte loads.
//      The block writes its partial sum and real-token count.
//   2. router_finish_kernel: one block sums the partials of each sequence in a fixed order,
//      computes score / keep, and writes the stable kept-first order with a block scan.
// No host sync; everything runs on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../common.h"
#include "utils.cuh"

namespace mindskip::cuda {
namespace {

constexpr const char* kOp = "mindskip::router_gate";
constexpr const char* kBackwardOp = "mindskip::router_gate_backward";

constexpr int kPartialThreads = 256;
constexpr int kPartialWarps = kPartialThreads / kWarpSize;
constexpr int kMaxThreads = 1024;

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t z) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return 1.0 / (1.0 + ::exp(-z));
  } else {
    return 1.0f / (1.0f + ::expf(-z));
  }
}

// Threads for a one-block kernel over `n` items: a multiple of 32, at most 1024.
int one_block_threads(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>((n + kWarpSize - 1) / kWarpSize * kWarpSize,
                                              kWarpSize, kMaxThreads));
}

template <typename scalar_t, typename acc_t, bool kVector>
__global__ void __launch_bounds__(kPartialThreads)
    router_partial_kernel(const scalar_t* __restrict__ hidden, const bool* __restrict__ mask,
                          const acc_t* __restrict__ weight, acc_t* __restrict__ partial,
                          int* __restrict__ partial_count, int64_t seqlen, int64_t dim,
                          int64_t chunk, int64_t chunks) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  __shared__ acc_t warp_sums[kPartialWarps];
  __shared__ int warp_counts[kPartialWarps];
  const int64_t item = blockIdx.x;
  const int64_t b = item / chunks;
  const int64_t t0 = (item % chunks) * chunk;
  const int64_t t1 = min(seqlen, t0 + chunk);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;

  acc_t sum = 0;
  int count = 0;
  for (int64_t t = t0 + warp; t < t1; t += kPartialWarps) {
    const int64_t row = b * seqlen + t;
    if (mask != nullptr && !mask[row]) {
      continue;  // the same for the whole warp: padding rows are never read
    }
    const scalar_t* x = hidden + row * dim;
    acc_t dot = 0;
    if constexpr (kVector) {
      const int64_t vecs = dim / kVec;
#pragma unroll 4
      for (int64_t v = lane; v < vecs; v += kWarpSize) {
        const Pack<scalar_t, kVec> xs = load_pack<scalar_t, kVec>(x + v * kVec);
        const Pack<acc_t, kVec> ws = load_pack<acc_t, kVec>(weight + v * kVec);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          dot += static_cast<acc_t>(xs.v[i]) * ws.v[i];
        }
      }
    } else {
      for (int64_t d = lane; d < dim; d += kWarpSize) {
        dot += static_cast<acc_t>(x[d]) * weight[d];
      }
    }
    sum += warp_sum(dot);
    ++count;
  }
  if (lane == 0) {
    warp_sums[warp] = sum;
    warp_counts[warp] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
    int real = 0;
    for (int w = 0; w < kPartialWarps; ++w) {
      total += warp_sums[w];
      real += warp_counts[w];
    }
    partial[item] = total;
    partial_count[item] = real;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    router_finish_kernel(const acc_t* __restrict__ partial, const int* __restrict__ partial_count,
                         const acc_t* __restrict__ bias, acc_t threshold, int64_t batch,
                         int64_t chunks, acc_t* __restrict__ score, bool* __restrict__ keep,
                         int64_t* __restrict__ order, int64_t* __restrict__ num_kept) {
  __shared__ int scratch[kWarpSize];
  const acc_t bias_value = bias[0];
  int kept_here = 0;
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    acc_t sum = 0;
    int64_t real = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      sum += partial[b * chunks + c];
      real += partial_count[b * chunks + c];
    }
    const acc_t z = bias_value + (real > 0 ? sum / static_cast<acc_t>(real) : acc_t(0));
    const acc_t s = sigmoid(z);
    score[b] = s;
    keep[b] = s >= threshold;
    kept_here += s >= threshold;
  }
  const int kept = block_sum(kept_here, scratch);

  // Kept row b goes to (kept rows before b); skipped row b to kept + (skipped rows before b).
  // Each thread reads back only the keep flags it wrote itself.
  int64_t kept_before_tile = 0;
  for (int64_t base = 0; base < batch; base += blockDim.x) {
    const int64_t b = base + threadIdx.x;
    const int flag = (b < batch && keep[b]) ? 1 : 0;
    int tile_kept = 0;
    const int64_t kept_before = kept_before_tile + block_exclusive_scan(flag, &tile_kept, scratch);
    if (b < batch) {
      order[flag ? kept_before : kept + (b - kept_before)] = b;
    }
    kept_before_tile += tile_kept;
  }
  if (threadIdx.x == 0) {
    num_kept[0] = kept;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_gate_cuda(
    const at::Tensor& hidden_in, const std::optional<at::Tensor>& mask_in,
    const at::Tensor& weight_in, const at::Tensor& bias_in, double threshold) {
  check_router_inputs(hidden_in, weight_in, bias_in, threshold, kOp);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const int64_t batch = hidden_in.size(0), seqlen = hidden_in.size(1), dim = hidden_in.size(2);
  const at::Tensor mask = real_token_mask(mask_in, batch, seqlen, hidden_in, kOp, "hidden");
  const at::Tensor hidden = hidden_in.contiguous();
  const at::ScalarType acc_type = compute_dtype(hidden.scalar_type());
  const at::Tensor weight = weight_in.reshape({dim}).to(acc_type).contiguous();
  const at::Tensor bias = bias_in.reshape({1}).to(acc_type).contiguous();

  const auto opts = hidden.options();
  at::Tensor score = at::empty({batch}, opts.dtype(acc_type));
  at::Tensor keep = at::empty({batch}, opts.dtype(at::kBool));
  at::Tensor order = at::empty({batch}, opts.dtype(at::kLong));
  at::Tensor num_kept = at::empty({1}, opts.dtype(at::kLong));
  if (batch == 0) {
    num_kept.zero_();
    return {score, keep, order, num_kept};
  }

  // Enough (sequence, chunk) blocks to fill the GPU about four times over.
  const int64_t max_chunks = std::max<int64_t>(1, (seqlen + kPartialWarps - 1) / kPartialWarps);
  const int64_t wanted = (4 * static_cast<int64_t>(sm_count()) + batch - 1) / batch;
  int64_t chunks = std::clamp<int64_t>(wanted, 1, max_chunks);
  const int64_t chunk = std::max<int64_t>(1, (seqlen + chunks - 1) / chunks);
  chunks = std::max<int64_t>(1, (seqlen + chunk - 1) / chunk);
  TORCH_CHECK(batch * chunks <= INT32_MAX, kOp, ": batch of ", batch, " is too large");
  at::Tensor partial = at::empty({batch * chunks}, opts.dtype(acc_type));
  at::Tensor partial_count = at::empty({batch * chunks}, opts.dtype(at::kInt));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "router_gate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vector = dim % kVec == 0 && aligned16(hidden.const_data_ptr()) &&
                        aligned16(weight.const_data_ptr());
    const bool* mask_ptr = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    const auto partial_kernel = vector ? router_partial_kernel<scalar_t, acc_t, true>
                                       : router_partial_kernel<scalar_t, acc_t, false>;
    partial_kernel<<<static_cast<unsigned>(batch * chunks), kPartialThreads, 0, stream>>>(
        hidden.const_data_ptr<scalar_t>(), mask_ptr, weight.const_data_ptr<acc_t>(),
        partial.mutable_data_ptr<acc_t>(), partial_count.mutable_data_ptr<int>(), seqlen, dim,
        chunk, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    router_finish_kernel<acc_t><<<1, one_block_threads(batch), 0, stream>>>(
        partial.const_data_ptr<acc_t>(), partial_count.const_data_ptr<int>(),
        bias.const_data_ptr<acc_t>(), static_cast<acc_t>(threshold), batch, chunks,
        score.mutable_data_ptr<acc_t>(), keep.mutable_data_ptr<bool>(),
        order.mutable_data_ptr<int64_t>(), num_kept.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {score, keep, order, num_kept};
}

// ---------------------------------------------------------------------------------------------
// Backward. With dz_b = grad_b s_b (1 - s_b) and coef_b = dz_b / n_b:
//   grad_hidden[b, t] = coef_b m_bt w,  grad_weight = sum_bt coef_b m_bt x_bt,  grad_bias = sum_b dz_b.

template <typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    router_coef_kernel(const acc_t* __restrict__ grad_score, const acc_t* __restrict__ score,
                       const bool* __restrict__ mask, int64_t batch, int64_t seqlen,
                       acc_t* __restrict__ coef, acc_t* __restrict__ grad_bias) {
  __shared__ int scratch[kWarpSize];
  acc_t bias_sum = 0;
  for (int64_t b = 0; b < batch; ++b) {
    int real_here = 0;
    for (int64_t t = threadIdx.x; t < seqlen; t += blockDim.x) {
      real_here += mask == nullptr || mask[b * seqlen + t];
    }
    const int real = block_sum(real_here, scratch);
    if (threadIdx.x == 0) {
      const acc_t dz = grad_score[b] * score[b] * (acc_t(1) - score[b]);
      coef[b] = real > 0 ? dz / static_cast<acc_t>(real) : acc_t(0);
      bias_sum += dz;
    }
  }
  if (threadIdx.x == 0) {
    grad_bias[0] = bias_sum;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void router_grad_hidden_kernel(const acc_t* __restrict__ coef,
                                          const bool* __restrict__ mask,
                                          const acc_t* __restrict__ weight,
                                          scalar_t* __restrict__ grad_hidden, int64_t seqlen,
                                          int64_t dim) {
  const int64_t row = blockIdx.x;
  const acc_t c = (mask == nullptr || mask[row]) ? coef[row / seqlen] : acc_t(0);
  scalar_t* out = grad_hidden + row * dim;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    out[d] = static_cast<scalar_t>(c * weight[d]);
  }
}

// partial[chunk, d] = sum over the chunk's rows of coef m x[row, d]; one thread per column.
template <typename scalar_t, typename acc_t>
__global__ void router_grad_weight_partial_kernel(const scalar_t* __restrict__ hidden,
                                                  const bool* __restrict__ mask,
                                                  const acc_t* __restrict__ coef,
                                                  acc_t* __restrict__ partial, int64_t rows,
                                                  int64_t seqlen, int64_t dim,
                                                  int64_t rows_per_chunk) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= dim) {
    return;
  }
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = min(rows, r0 + rows_per_chunk);
  acc_t acc = 0;
  for (int64_t r = r0; r < r1; ++r) {
    if (mask == nullptr || mask[r]) {
      acc += coef[r / seqlen] * static_cast<acc_t>(hidden[r * dim + d]);
    }
  }
  partial[blockIdx.y * dim + d] = acc;
}

template <typename acc_t>
__global__ void router_grad_weight_final_kernel(const acc_t* __restrict__ partial,
                                                int64_t chunks, int64_t dim,
                                                acc_t* __restrict__ grad_weight) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= dim) {
    return;
  }
  acc_t acc = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    acc += partial[c * dim + d];
  }
  grad_weight[d] = acc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_gate_backward_cuda(
    const at::Tensor& grad_score_in, const at::Tensor& hidden_in,
    const std::optional<at::Tensor>& mask_in, const at::Tensor& weight_in,
    const at::Tensor& score_in) {
  TORCH_CHECK(hidden_in.dim() == 3 && is_kernel_float(hidden_in.scalar_type()), kBackwardOp,
              ": hidden must be a floating (B, T, D) tensor, got ", hidden_in.scalar_type(), " ",
              hidden_in.sizes());
  const int64_t batch = hidden_in.size(0), seqlen = hidden_in.size(1), dim = hidden_in.size(2);
  TORCH_CHECK(weight_in.numel() == dim, kBackwardOp, ": weight has ", weight_in.numel(),
              " elements but hidden has D = ", dim);
  TORCH_CHECK(grad_score_in.numel() == batch && score_in.numel() == batch, kBackwardOp,
              ": grad_score and score must have B = ", batch, " elements");
  for (const at::Tensor* t : {&grad_score_in, &weight_in, &score_in}) {
    check_same_device(*t, hidden_in, kBackwardOp, "every input", "hidden");
  }
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor mask = real_token_mask(mask_in, batch, seqlen, hidden_in, kBackwardOp, "hidden");
  const at::Tensor hidden = hidden_in.contiguous();
  const at::ScalarType acc_type = compute_dtype(hidden.scalar_type());
  const at::Tensor grad_score = grad_score_in.reshape({batch}).to(acc_type).contiguous();
  const at::Tensor score = score_in.reshape({batch}).to(acc_type).contiguous();
  const at::Tensor weight = weight_in.reshape({dim}).to(acc_type).contiguous();

  const auto acc_opts = hidden.options().dtype(acc_type);
  at::Tensor grad_hidden = at::empty_like(hidden);
  at::Tensor grad_weight = at::empty({dim}, acc_opts);
  at::Tensor grad_bias = at::empty({}, acc_opts);
  at::Tensor coef = at::empty({batch}, acc_opts);
  const int64_t rows = batch * seqlen;
  if (dim == 0 || rows == 0) {
    grad_weight.zero_();
  }
  if (batch == 0) {
    grad_bias.zero_();
    return {grad_hidden, grad_weight, grad_bias};
  }
  TORCH_CHECK(rows <= INT32_MAX, kBackwardOp, ": B * T = ", rows, " is too large");

  constexpr int kThreads = 256;
  const int64_t rows_per_chunk = std::max<int64_t>(64, (rows + 1023) / 1024);
  const int64_t chunks = std::max<int64_t>(1, (rows + rows_per_chunk - 1) / rows_per_chunk);
  at::Tensor partial = at::empty({chunks * dim}, acc_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "router_gate_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool* mask_ptr = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    router_coef_kernel<acc_t><<<1, one_block_threads(seqlen), 0, stream>>>(
        grad_score.const_data_ptr<acc_t>(), score.const_data_ptr<acc_t>(), mask_ptr, batch,
        seqlen, coef.mutable_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (rows == 0 || dim == 0) {
      return;
    }
    router_grad_hidden_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        coef.const_data_ptr<acc_t>(), mask_ptr, weight.const_data_ptr<acc_t>(),
        grad_hidden.mutable_data_ptr<scalar_t>(), seqlen, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned column_blocks = static_cast<unsigned>((dim + kThreads - 1) / kThreads);
    router_grad_weight_partial_kernel<scalar_t, acc_t>
        <<<dim3(column_blocks, static_cast<unsigned>(chunks)), kThreads, 0, stream>>>(
            hidden.const_data_ptr<scalar_t>(), mask_ptr, coef.const_data_ptr<acc_t>(),
            partial.mutable_data_ptr<acc_t>(), rows, seqlen, dim, rows_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    router_grad_weight_final_kernel<acc_t><<<column_blocks, kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), chunks, dim, grad_weight.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mindskip, CUDA, m) {
  m.impl("router_gate", &router_gate_cuda);
  m.impl("router_gate_backward", &router_gate_backward_cuda);
}

}  // namespace mindskip::cuda
