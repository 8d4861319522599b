// CUDA token_decode_attention: flash-decoding of one query token per row, for the kept rows only.
//
// split_kernel: one block of kWarps warps per (row, key/value head, split of the positions). A
// skipped row's blocks return at once, so its keys and values are never read. Each warp walks
// its share of the split's positions with an online softmax for each of the G query heads of the
// group: lane l holds elements l, l + 32, ... of the head dimension, and a position's score is a
// warp reduction. The warps' states are merged in shared memory one warp after another (a fixed
// order: deterministic), and the block writes its split's (max, sum, accumulator) to a workspace.
// combine_kernel: one block per (row, query head) merges the splits in order and writes the
// output: zero for a skipped row or a row with no position to attend to.
//
// The entry (token_attention.cpp) checks the inputs; the split count depends on the shapes only,
// so the launches are the same at every decode step of a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>

#include "../token_attention.h"
#include "utils.cuh"

namespace mindskip::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxGroups = 8;  // query heads per key/value head
constexpr int kMaxDim = 256;
constexpr int64_t kChunk = 256;  // positions per split, at least
constexpr int64_t kMaxSplits = 64;

struct Strides {
  int64_t batch, head, position;
};

// (m, l, acc) of softmax state a merged with b's weight factors: exp(m - max), 0 for an empty state.
template <typename acc_t>
__device__ __forceinline__ acc_t state_weight(acc_t m, acc_t top) {
  return m == -INFINITY ? acc_t(0) : exp(m - top);
}

template <typename scalar_t, int kVPL>
__global__ void __launch_bounds__(kThreads)
    split_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ key,
                 const scalar_t* __restrict__ value, const bool* __restrict__ keep,
                 const bool* __restrict__ allowed, const int64_t* __restrict__ limit_ptr, Strides ks,
                 Strides vs, int64_t kv_heads, int groups, int dim, int64_t positions, int64_t chunk,
                 int64_t splits, at::opmath_type<scalar_t> scale, at::opmath_type<scalar_t>* part_acc,
                 at::opmath_type<scalar_t>* part_max, at::opmath_type<scalar_t>* part_sum) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bh = blockIdx.x, split = blockIdx.y;
  const int64_t b = bh / kv_heads, h = bh % kv_heads;
  if (!keep[b]) {
    return;  // combine_kernel writes the row's zeros; its keys and values are never read
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t limit = *limit_ptr < positions ? *limit_ptr : positions;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < limit ? begin + chunk : limit;

  acc_t q[kMaxGroups][kVPL], acc[kMaxGroups][kVPL], top[kMaxGroups], total[kMaxGroups];
  const scalar_t* qrow = query + (b * kv_heads + h) * groups * dim;
#pragma unroll
  for (int g = 0; g < kMaxGroups; ++g) {
    top[g] = -INFINITY;
    total[g] = 0;
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      const int e = lane + i * kWarpSize;
      q[g][i] = g < groups && e < dim ? static_cast<acc_t>(qrow[g * dim + e]) * scale : acc_t(0);
      acc[g][i] = 0;
    }
  }
  const scalar_t* krow0 = key + b * ks.batch + h * ks.head;
  const scalar_t* vrow0 = value + b * vs.batch + h * vs.head;
  const bool* mask = allowed == nullptr ? nullptr : allowed + b * positions;
  for (int64_t s = begin + warp; s < end; s += kWarps) {
    if (mask != nullptr && !mask[s]) {
      continue;
    }
    acc_t kf[kVPL], vf[kVPL];
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      const int e = lane + i * kWarpSize;
      kf[i] = e < dim ? static_cast<acc_t>(krow0[s * ks.position + e]) : acc_t(0);
      vf[i] = e < dim ? static_cast<acc_t>(vrow0[s * vs.position + e]) : acc_t(0);
    }
#pragma unroll
    for (int g = 0; g < kMaxGroups; ++g) {
      if (g >= groups) {
        break;
      }
      acc_t partial = 0;
#pragma unroll
      for (int i = 0; i < kVPL; ++i) {
        partial += q[g][i] * kf[i];
      }
      const acc_t score = warp_sum(partial);
      const acc_t next = max(top[g], score);
      const acc_t decay = state_weight(top[g], next);
      const acc_t weight = exp(score - next);
      total[g] = total[g] * decay + weight;
#pragma unroll
      for (int i = 0; i < kVPL; ++i) {
        acc[g][i] = acc[g][i] * decay + weight * vf[i];
      }
      top[g] = next;
    }
  }

  // Merge the warps' states, warp 0 first, then each in turn.
  __shared__ acc_t merged_acc[kMaxGroups][kMaxDim];
  __shared__ acc_t merged_top[kMaxGroups], merged_total[kMaxGroups];
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int g = 0; g < kMaxGroups; ++g) {
        if (g >= groups) {
          break;
        }
        const acc_t before = w == 0 ? acc_t(-INFINITY) : merged_top[g];
        const acc_t next = max(before, top[g]);
        const acc_t old_weight = w == 0 ? acc_t(0) : state_weight(before, next);
        const acc_t own_weight = state_weight(top[g], next);
#pragma unroll
        for (int i = 0; i < kVPL; ++i) {
          const int e = lane + i * kWarpSize;
          if (e < dim) {
            const acc_t old = w == 0 ? acc_t(0) : merged_acc[g][e];
            merged_acc[g][e] = old * old_weight + acc[g][i] * own_weight;
          }
        }
        __syncwarp();
        if (lane == 0) {
          merged_total[g] = (w == 0 ? acc_t(0) : merged_total[g] * old_weight) + total[g] * own_weight;
          merged_top[g] = next;
        }
      }
    }
    __syncthreads();
  }
  const int64_t base = (bh * splits + split) * groups;
  for (int idx = threadIdx.x; idx < groups * dim; idx += kThreads) {
    part_acc[base * dim + idx] = merged_acc[idx / dim][idx % dim];
  }
  if (threadIdx.x < groups) {
    part_max[base + threadIdx.x] = merged_top[threadIdx.x];
    part_sum[base + threadIdx.x] = merged_total[threadIdx.x];
  }
}

template <typename scalar_t>
__global__ void combine_kernel(const at::opmath_type<scalar_t>* __restrict__ part_acc,
                               const at::opmath_type<scalar_t>* __restrict__ part_max,
                               const at::opmath_type<scalar_t>* __restrict__ part_sum,
                               const bool* __restrict__ keep, int64_t q_heads, int64_t kv_heads,
                               int groups, int dim, int64_t splits, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bq = blockIdx.x;
  const int64_t b = bq / q_heads, head = bq % q_heads;
  const int64_t h = head / groups, g = head % groups;
  const int e = threadIdx.x;
  if (e >= dim) {
    return;
  }
  acc_t result = 0;
  if (keep[b]) {
    const int64_t first = (b * kv_heads + h) * splits * groups + g;  // split s: first + s * groups
    acc_t top = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) {
      top = max(top, part_max[first + s * groups]);
    }
    acc_t total = 0, acc = 0;
    for (int64_t s = 0; s < splits; ++s) {
      const acc_t weight = state_weight(part_max[first + s * groups], top);
      total += part_sum[first + s * groups] * weight;
      acc += part_acc[(first + s * groups) * dim + e] * weight;
    }
    result = total > 0 ? acc / total : acc_t(0);
  }
  out[bq * dim + e] = static_cast<scalar_t>(result);
}

template <typename scalar_t, int kVPL>
void launch_split(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const at::Tensor& keep, const at::Tensor& allowed, const at::Tensor& limit,
                  double scale, const TokenDecodeShape& shape, int64_t chunk, int64_t splits,
                  const at::Tensor& part_acc, const at::Tensor& part_max, const at::Tensor& part_sum,
                  cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const dim3 grid(static_cast<unsigned>(shape.batch * shape.kv_heads), static_cast<unsigned>(splits));
  split_kernel<scalar_t, kVPL><<<grid, kThreads, 0, stream>>>(
      query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
      keep.const_data_ptr<bool>(), allowed.defined() ? allowed.const_data_ptr<bool>() : nullptr,
      limit.const_data_ptr<int64_t>(), Strides{key.stride(0), key.stride(1), key.stride(2)},
      Strides{value.stride(0), value.stride(1), value.stride(2)}, shape.kv_heads,
      static_cast<int>(shape.q_heads / shape.kv_heads), static_cast<int>(shape.head_dim), shape.keys, chunk,
      splits, static_cast<acc_t>(scale), part_acc.mutable_data_ptr<acc_t>(), part_max.mutable_data_ptr<acc_t>(),
      part_sum.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_token_decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const at::Tensor& keep, const at::Tensor& allowed, const at::Tensor& limit,
                                   double scale, const TokenDecodeShape& shape, const at::Tensor& out) {
  if (shape.batch == 0 || shape.q_heads == 0 || shape.head_dim == 0) {
    return;
  }
  const int64_t groups = shape.q_heads / shape.kv_heads;
  const int64_t splits = std::clamp<int64_t>((shape.keys + kChunk - 1) / kChunk, 1, kMaxSplits);
  const int64_t chunk = std::max<int64_t>(1, (shape.keys + splits - 1) / splits);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc_type = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = query.options().dtype(acc_type);
  const at::Tensor part_acc = at::empty({shape.batch * shape.kv_heads * splits * groups * shape.head_dim}, opts);
  const at::Tensor part_max = at::empty({shape.batch * shape.kv_heads * splits * groups}, opts);
  const at::Tensor part_sum = at::empty({shape.batch * shape.kv_heads * splits * groups}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "token_decode_attention", [&] {
    if (shape.head_dim <= 32) {
      launch_split<scalar_t, 1>(query, key, value, keep, allowed, limit, scale, shape, chunk, splits, part_acc,
                                part_max, part_sum, stream);
    } else if (shape.head_dim <= 64) {
      launch_split<scalar_t, 2>(query, key, value, keep, allowed, limit, scale, shape, chunk, splits, part_acc,
                                part_max, part_sum, stream);
    } else if (shape.head_dim <= 128) {
      launch_split<scalar_t, 4>(query, key, value, keep, allowed, limit, scale, shape, chunk, splits, part_acc,
                                part_max, part_sum, stream);
    } else {
      launch_split<scalar_t, 8>(query, key, value, keep, allowed, limit, scale, shape, chunk, splits, part_acc,
                                part_max, part_sum, stream);
    }
    const int threads = static_cast<int>((shape.head_dim + kWarpSize - 1) / kWarpSize * kWarpSize);
    combine_kernel<scalar_t><<<static_cast<unsigned>(shape.batch * shape.q_heads), threads, 0, stream>>>(
        part_acc.const_data_ptr<at::opmath_type<scalar_t>>(), part_max.const_data_ptr<at::opmath_type<scalar_t>>(),
        part_sum.const_data_ptr<at::opmath_type<scalar_t>>(), keep.const_data_ptr<bool>(), shape.q_heads,
        shape.kv_heads, static_cast<int>(groups), static_cast<int>(shape.head_dim), splits,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mindskip::cuda
