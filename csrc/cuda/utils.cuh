// Small CUDA helpers shared by the mindskip kernels: warp/block reductions and scans, aligned
// vector loads, and the SM count.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mindskip::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// Number of SMs of the current device (queried once per device).
inline int sm_count() {
  static int counts[64] = {0};
  const int device = c10::cuda::current_device();
  if (device < 64 && counts[device] > 0) {
    return counts[device];
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) {
    counts[device] = count;
  }
  return count;
}

inline bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// The combining operations of the reductions below (device lambdas would need
// --extended-lambda).
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return b > a ? b : a;
  }
};

// `combine` over the warp, returned to every lane.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T value, Op combine) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = combine(value, __shfl_xor_sync(kFullMask, value, offset));
  }
  return value;
}

// `combine` over the block, returned to every thread. blockDim.x must be a multiple of 32
// (<= 1024). `scratch` holds 32 values; the call ends with a barrier so the scratch can be
// reused. The warp results are combined in a fixed order, so sums are deterministic.
template <typename T, typename Op>
__device__ T block_reduce(T value, T* scratch, Op combine) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  value = warp_reduce(value, combine);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  T result = scratch[0];
  for (int w = 1; w < warps; ++w) result = combine(result, scratch[w]);
  __syncthreads();
  return result;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  return warp_reduce(value, SumOp{});
}

template <typename T>
__device__ T block_sum(T value, T* scratch) {
  return block_reduce(value, scratch, SumOp{});
}

template <typename T>
__device__ T block_max(T value, T* scratch) {
  return block_reduce(value, scratch, MaxOp{});
}

// Exclusive prefix sum over the block in thread order; *total gets the block-wide sum.
// blockDim.x must be a multiple of 32 (<= 1024); `scratch` holds 32 ints; ends with a barrier.
__device__ inline int block_exclusive_scan(int value, int* total, int* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int warp_total = lane < warps ? scratch[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int up = __shfl_up_sync(kFullMask, warp_total, offset);
      if (lane >= offset) warp_total += up;
    }
    if (lane < warps) scratch[lane] = warp_total;  // inclusive scan of the warp totals
  }
  __syncthreads();
  const int before = (warp > 0 ? scratch[warp - 1] : 0) + inclusive - value;
  *total = scratch[warps - 1];
  __syncthreads();
  return before;
}

// N elements of T loaded or stored as one or more 16-byte transactions (ptr 16-byte aligned).
// Plain (coherent) loads, so a thread may read then write the same row.
template <typename T, int N>
struct alignas(16) Pack {
  static_assert(sizeof(T) * N % 16 == 0, "a Pack must be a whole number of 16-byte vectors");
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* ptr) {
  Pack<T, N> out;
  const uint4* src = reinterpret_cast<const uint4*>(ptr);
  uint4* dst = reinterpret_cast<uint4*>(&out);
#pragma unroll
  for (int i = 0; i < int(sizeof(out) / 16); ++i) dst[i] = src[i];
  return out;
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, N>& value) {
  const uint4* src = reinterpret_cast<const uint4*>(&value);
  uint4* dst = reinterpret_cast<uint4*>(ptr);
#pragma unroll
  for (int i = 0; i < int(sizeof(value) / 16); ++i) dst[i] = src[i];
}

}  // namespace mindskip::cuda
