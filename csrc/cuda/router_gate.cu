// CUDA router gate, deterministic two-kernel design:
//   1. router_partial_kernel: one block per (sequence, token chunk); each warp takes one token
//      at a time, skips padding without reading it, and computes w . x_bt with 16-byte loads.
//      The block writes its partial sum and real-token count. router_varlen_partial_kernel does
//      the same over the segments of a flat token batch (router_gate_varlen).
//   2. router_finish_kernel (shared): one block sums the partials of each sequence in a fixed
//      order, computes score / keep, and writes the stable kept-first order with a block scan.
// No host sync; everything runs on the current stream. The ops' entries, which check the inputs and
// call the launchers at the end of this file, are in ops.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "../common.h"
#include "launch.h"
#include "utils.cuh"

namespace mindskip::cuda {
namespace {

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

// The block's sum over rows [row0, row1) of w . x_row and its count of real rows, written to
// partial[item] and partial_count[item]: each warp takes one row at a time, skips padding without
// reading it, and computes the dot product with 16-byte loads when kVector.
template <typename scalar_t, typename acc_t, bool kVector>
__device__ void block_rows_dot(const scalar_t* __restrict__ hidden, const bool* __restrict__ mask,
                               const acc_t* __restrict__ weight, int64_t row0, int64_t row1,
                               int64_t dim, int64_t item, acc_t* __restrict__ partial,
                               int* __restrict__ partial_count) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  __shared__ acc_t warp_sums[kPartialWarps];
  __shared__ int warp_counts[kPartialWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;

  acc_t sum = 0;
  int count = 0;
  for (int64_t row = row0 + warp; row < row1; row += kPartialWarps) {
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

// One block per (sequence b, chunk of `chunk` tokens) of a padded (B, T, D) hidden.
template <typename scalar_t, typename acc_t, bool kVector>
__global__ void __launch_bounds__(kPartialThreads)
    router_partial_kernel(const scalar_t* __restrict__ hidden, const bool* __restrict__ mask,
                          const acc_t* __restrict__ weight, acc_t* __restrict__ partial,
                          int* __restrict__ partial_count, int64_t seqlen, int64_t dim,
                          int64_t chunk, int64_t chunks) {
  const int64_t item = blockIdx.x;
  const int64_t b = item / chunks;
  const int64_t t0 = (item % chunks) * chunk;
  const int64_t t1 = min(seqlen, t0 + chunk);
  block_rows_dot<scalar_t, acc_t, kVector>(hidden, mask, weight, b * seqlen + t0,
                                           b * seqlen + t1, dim, item, partial, partial_count);
}

// One block per (segment b, chunk c): the segment's tokens [cu[b], cu[b+1]) of a flat (N, D)
// hidden are cut into `chunks` equal parts.
template <typename scalar_t, typename acc_t, bool kVector>
__global__ void __launch_bounds__(kPartialThreads)
    router_varlen_partial_kernel(const scalar_t* __restrict__ hidden,
                                 const int64_t* __restrict__ cu, const acc_t* __restrict__ weight,
                                 acc_t* __restrict__ partial, int* __restrict__ partial_count,
                                 int64_t tokens, int64_t dim, int64_t chunks) {
  const int64_t item = blockIdx.x;
  const int64_t b = item / chunks;
  const int64_t begin = cu[b], end = cu[b + 1];
  CUDA_KERNEL_ASSERT(begin >= 0 && begin <= end && end <= tokens);
  const int64_t chunk = (end - begin + chunks - 1) / chunks;
  const int64_t row0 = min(end, begin + (item % chunks) * chunk);
  block_rows_dot<scalar_t, acc_t, kVector>(hidden, nullptr, weight, row0, min(end, row0 + chunk),
                                           dim, item, partial, partial_count);
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

// The partial sums of `chunks` blocks per sequence, then the finish kernel. `launch_partial(vector,
// partial, partial_count)` launches the op's partial kernel (with 16-byte loads when `vector`).
template <typename scalar_t, typename LaunchPartial>
void launch_router(const RouterTensors& in, const at::Tensor& bias, double threshold,
                   const RouterGateOutputs& out, int64_t batch, int64_t dim, int64_t chunks,
                   const LaunchPartial& launch_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const auto opts = in.hidden.options();
  at::Tensor partial = at::empty({batch * chunks}, opts.dtype(in.acc_type));
  at::Tensor partial_count = at::empty({batch * chunks}, opts.dtype(at::kInt));
  const bool vector = dim % kVec == 0 && aligned16(in.hidden.const_data_ptr()) &&
                      aligned16(in.weight.const_data_ptr());
  launch_partial(vector, partial.mutable_data_ptr<acc_t>(), partial_count.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  router_finish_kernel<acc_t><<<1, one_block_threads(batch), 0, c10::cuda::getCurrentCUDAStream()>>>(
      partial.const_data_ptr<acc_t>(), partial_count.const_data_ptr<int>(),
      bias.const_data_ptr<acc_t>(), static_cast<acc_t>(threshold), batch, chunks,
      out.score.mutable_data_ptr<acc_t>(), out.keep.mutable_data_ptr<bool>(),
      out.order.mutable_data_ptr<int64_t>(), out.num_kept.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Chunks per sequence: enough (sequence, chunk) blocks to fill the GPU about four times over, and
// no more than a sequence of `tokens_per_sequence` tokens gives each warp of a block one token.
int64_t router_chunks(int64_t batch, int64_t tokens_per_sequence) {
  const int64_t max_chunks =
      std::max<int64_t>(1, (tokens_per_sequence + kPartialWarps - 1) / kPartialWarps);
  const int64_t wanted = (4 * static_cast<int64_t>(sm_count()) + batch - 1) / batch;
  return std::clamp<int64_t>(wanted, 1, max_chunks);
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

}  // namespace

void launch_router_gate(const RouterTensors& in, const at::Tensor& bias, double threshold,
                        const RouterShape& shape, const RouterGateOutputs& out) {
  const int64_t batch = shape.batch, seqlen = shape.seqlen, dim = shape.dim;
  // Equal chunks of whole tokens; the count is recomputed so that no chunk is empty.
  const int64_t wanted = router_chunks(batch, seqlen);
  const int64_t chunk = std::max<int64_t>(1, (seqlen + wanted - 1) / wanted);
  const int64_t chunks = std::max<int64_t>(1, (seqlen + chunk - 1) / chunk);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.hidden.scalar_type(), "router_gate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_router<scalar_t>(in, bias, threshold, out, batch, dim, chunks,
                            [&](bool vector, acc_t* partial, int* partial_count) {
      const auto kernel = vector ? router_partial_kernel<scalar_t, acc_t, true>
                                 : router_partial_kernel<scalar_t, acc_t, false>;
      kernel<<<static_cast<unsigned>(batch * chunks), kPartialThreads, 0, stream>>>(
          in.hidden.const_data_ptr<scalar_t>(), mask_data(in.mask),
          in.weight.const_data_ptr<acc_t>(), partial, partial_count, seqlen, dim, chunk, chunks);
    });
  });
}

void launch_router_gate_varlen(const RouterTensors& in, const at::Tensor& bias,
                               const at::Tensor& offsets, double threshold,
                               const VarlenRouterShape& shape, const RouterGateOutputs& out) {
  const int64_t batch = shape.batch, tokens = shape.tokens, dim = shape.dim;
  // The segment lengths stay on the device (no host sync): size the chunks for the mean length.
  const int64_t chunks = router_chunks(batch, (tokens + batch - 1) / batch);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.hidden.scalar_type(), "router_gate_varlen", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_router<scalar_t>(in, bias, threshold, out, batch, dim, chunks,
                            [&](bool vector, acc_t* partial, int* partial_count) {
      const auto kernel = vector ? router_varlen_partial_kernel<scalar_t, acc_t, true>
                                 : router_varlen_partial_kernel<scalar_t, acc_t, false>;
      kernel<<<static_cast<unsigned>(batch * chunks), kPartialThreads, 0, stream>>>(
          in.hidden.const_data_ptr<scalar_t>(), offsets.const_data_ptr<int64_t>(),
          in.weight.const_data_ptr<acc_t>(), partial, partial_count, tokens, dim, chunks);
    });
  });
}

void launch_router_gate_backward(const RouterTensors& in, const at::Tensor& grad_score,
                                 const at::Tensor& score, const RouterShape& shape,
                                 const RouterGateGrads& grad) {
  const int64_t batch = shape.batch, seqlen = shape.seqlen, dim = shape.dim;
  const int64_t rows = batch * seqlen;
  constexpr int kThreads = 256;
  const int64_t rows_per_chunk = std::max<int64_t>(64, (rows + 1023) / 1024);
  const int64_t chunks = std::max<int64_t>(1, (rows + rows_per_chunk - 1) / rows_per_chunk);
  const auto acc_opts = in.hidden.options().dtype(in.acc_type);
  at::Tensor coef = at::empty({batch}, acc_opts);
  at::Tensor partial = at::empty({chunks * dim}, acc_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.hidden.scalar_type(), "router_gate_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool* mask_ptr = mask_data(in.mask);
    router_coef_kernel<acc_t><<<1, one_block_threads(seqlen), 0, stream>>>(
        grad_score.const_data_ptr<acc_t>(), score.const_data_ptr<acc_t>(), mask_ptr, batch,
        seqlen, coef.mutable_data_ptr<acc_t>(), grad.bias.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (rows == 0 || dim == 0) {
      return;
    }
    router_grad_hidden_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        coef.const_data_ptr<acc_t>(), mask_ptr, in.weight.const_data_ptr<acc_t>(),
        grad.hidden.mutable_data_ptr<scalar_t>(), seqlen, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned column_blocks = static_cast<unsigned>((dim + kThreads - 1) / kThreads);
    router_grad_weight_partial_kernel<scalar_t, acc_t>
        <<<dim3(column_blocks, static_cast<unsigned>(chunks)), kThreads, 0, stream>>>(
            in.hidden.const_data_ptr<scalar_t>(), mask_ptr, coef.const_data_ptr<acc_t>(),
            partial.mutable_data_ptr<acc_t>(), rows, seqlen, dim, rows_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    router_grad_weight_final_kernel<acc_t><<<column_blocks, kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), chunks, dim, grad.weight.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mindskip::cuda
