// CUDA regroup ops. gather_kept / pack_kept share one row-gather kernel and scatter_add_kept_ /
// unpack_add_kept_ one row scatter-add kernel: a "row" is a whole sequence or a single token.
// scatter_add_kept (out of place) writes every row of a fresh tensor in one pass.
// Both move 16 bytes per thread access when the rows allow it, and are one pass over the data.
// pack_plan is three small kernels: per-row real-token counts, a scan into cu_seqlens, and a
// per-row block scan that writes the token indices. The ops' entries, which check the inputs and
// call the launchers at the end of this file, are in ops.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>

#include "../common.h"
#include "launch.h"
#include "utils.cuh"

namespace mindskip::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // vectors per thread per block tile
constexpr int64_t kTile = kThreads * kItems;

// ---------------------------------------------------------------------------------------------
// Row kernels. Block item i handles tile (i % tiles) of packed row (i / tiles), for the `items` =
// rows * tiles items in a grid-stride loop (a grid holds fewer blocks than a long batch has tokens).

// dst[i] = src[index[i]], rows of `width` words of type V.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const V* __restrict__ src, V* __restrict__ dst,
                       const int64_t* __restrict__ index, int64_t src_rows, int64_t width,
                       int64_t tiles, int64_t items) {
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / tiles;
    const int64_t first = (item % tiles) * kTile + threadIdx.x;
    const int64_t from = index[row];
    CUDA_KERNEL_ASSERT(from >= 0 && from < src_rows);
    const V* in = src + from * width;
    V* out = dst + row * width;
    V values[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t v = first + i * kThreads;
      if (v < width) values[i] = in[v];
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t v = first + i * kThreads;
      if (v < width) out[v] = values[i];
    }
  }
}

// dst[index[i]] += src[i] in opmath precision, rows of `width` vectors of kVec elements.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    scatter_add_rows_kernel(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src,
                            const int64_t* __restrict__ index, int64_t dst_rows, int64_t width,
                            int64_t tiles, int64_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / tiles;
    const int64_t first = (item % tiles) * kTile + threadIdx.x;
    const int64_t to = index[row];
    CUDA_KERNEL_ASSERT(to >= 0 && to < dst_rows);
    scalar_t* out = dst + to * width * kVec;
    const scalar_t* in = src + row * width * kVec;
    if constexpr (kVec == 1) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t v = first + i * kThreads;
        if (v < width) {
          out[v] = static_cast<scalar_t>(static_cast<acc_t>(out[v]) + static_cast<acc_t>(in[v]));
        }
      }
    } else {
      Pack<scalar_t, kVec> a[kItems], b[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t v = first + i * kThreads;
        if (v < width) {
          a[i] = load_pack<scalar_t, kVec>(out + v * kVec);
          b[i] = load_pack<scalar_t, kVec>(in + v * kVec);
        }
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t v = first + i * kThreads;
        if (v < width) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            a[i].v[j] = static_cast<scalar_t>(static_cast<acc_t>(a[i].v[j]) +
                                              static_cast<acc_t>(b[i].v[j]));
          }
          store_pack<scalar_t, kVec>(out + v * kVec, a[i]);
        }
      }
    }
  }
}

// out[order[j]] = residual[order[j]] (+ src[j] for j < count) in opmath precision, for the `rows`
// = B rows of order (a permutation, so every row of out is written once); rows of `width` vectors
// of kVec elements.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    scatter_add_rows_out_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ residual,
                                const scalar_t* __restrict__ src, const int64_t* __restrict__ order,
                                int64_t rows, int64_t count, int64_t width, int64_t tiles,
                                int64_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t j = item / tiles;
    const int64_t first = (item % tiles) * kTile + threadIdx.x;
    const int64_t to = order[j];
    CUDA_KERNEL_ASSERT(to >= 0 && to < rows);
    const bool kept = j < count;
    scalar_t* dst = out + to * width * kVec;
    const scalar_t* base = residual + to * width * kVec;
    const scalar_t* add = src + j * width * kVec;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t v = first + i * kThreads;
      if (v >= width) continue;
      if constexpr (kVec == 1) {
        dst[v] = kept ? static_cast<scalar_t>(static_cast<acc_t>(base[v]) + static_cast<acc_t>(add[v]))
                      : base[v];
      } else {
        Pack<scalar_t, kVec> a = load_pack<scalar_t, kVec>(base + v * kVec);
        if (kept) {
          const Pack<scalar_t, kVec> b = load_pack<scalar_t, kVec>(add + v * kVec);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            a.v[e] = static_cast<scalar_t>(static_cast<acc_t>(a.v[e]) + static_cast<acc_t>(b.v[e]));
          }
        }
        store_pack<scalar_t, kVec>(dst + v * kVec, a);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// pack_plan's kernels: one block per kept sequence counts its real tokens; one block scans the
// counts; one block per kept sequence writes its token indices.

__global__ void __launch_bounds__(kThreads)
    pack_lengths_kernel(const bool* __restrict__ mask, const int64_t* __restrict__ order,
                        int64_t batch, int64_t seqlen, int* __restrict__ lengths) {
  __shared__ int scratch[kWarpSize];
  const int64_t b = order[blockIdx.x];
  CUDA_KERNEL_ASSERT(b >= 0 && b < batch);
  int count = 0;
  for (int64_t t = threadIdx.x; t < seqlen; t += blockDim.x) {
    count += mask == nullptr || mask[b * seqlen + t];
  }
  count = block_sum(count, scratch);
  if (threadIdx.x == 0) {
    lengths[blockIdx.x] = count;
  }
}

__global__ void __launch_bounds__(1024)
    pack_offsets_kernel(const int* __restrict__ lengths, int64_t k,
                        int* __restrict__ cu_seqlens, int* __restrict__ max_len) {
  __shared__ int scratch[kWarpSize];
  int running = 0;
  int longest = 0;
  for (int64_t base = 0; base < k; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const int length = j < k ? lengths[j] : 0;
    int tile_total = 0;
    const int before = running + block_exclusive_scan(length, &tile_total, scratch);
    if (j < k) {
      cu_seqlens[j + 1] = before + length;
    }
    longest = max(longest, length);
    running += tile_total;
  }
  longest = block_max(longest, scratch);
  if (threadIdx.x == 0) {
    cu_seqlens[0] = 0;
    max_len[0] = longest;
  }
}

__global__ void __launch_bounds__(kThreads)
    pack_index_kernel(const bool* __restrict__ mask, const int64_t* __restrict__ order,
                      const int* __restrict__ cu_seqlens, int64_t seqlen,
                      int64_t* __restrict__ token_index) {
  __shared__ int scratch[kWarpSize];
  const int64_t base = order[blockIdx.x] * seqlen;
  int64_t pos = cu_seqlens[blockIdx.x];
  for (int64_t t0 = 0; t0 < seqlen; t0 += blockDim.x) {
    const int64_t t = t0 + threadIdx.x;
    const int real = t < seqlen && (mask == nullptr || mask[base + t]) ? 1 : 0;
    int tile_total = 0;
    const int before = block_exclusive_scan(real, &tile_total, scratch);
    if (real) {
      token_index[pos + before] = base + t;
    }
    pos += tile_total;
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers (launch.h).

// Blocks for `count` rows of `width` vectors: one per (row, tile) up to a full grid, and `items`,
// the (row, tile) pairs the kernel's grid-stride loop covers.
unsigned row_blocks(int64_t count, int64_t width, int64_t* tiles, int64_t* items) {
  *tiles = std::max<int64_t>(1, (width + kTile - 1) / kTile);
  *items = count * *tiles;
  return static_cast<unsigned>(std::min(*items, kMaxBlocks));
}

template <typename V>
void launch_gather(const char* src, char* dst, const int64_t* index, const RowPlan& plan,
                   int64_t row_bytes, cudaStream_t stream) {
  const int64_t width = row_bytes / static_cast<int64_t>(sizeof(V));
  int64_t tiles = 0, items = 0;
  const unsigned blocks = row_blocks(plan.count, width, &tiles, &items);
  gather_rows_kernel<V><<<blocks, kThreads, 0, stream>>>(
      reinterpret_cast<const V*>(src), reinterpret_cast<V*>(dst), index, plan.rows, width, tiles,
      items);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Any dtype: the rows move as the widest word (16, 8, 4, 2 or 1 bytes) that divides the row and
// both base pointers.
void launch_gather_rows(const at::Tensor& src, const at::Tensor& out, const at::Tensor& index,
                        const RowPlan& plan) {
  const int64_t row_bytes = plan.row_elems * src.element_size();
  if (plan.count == 0 || row_bytes == 0) {
    return;
  }
  const char* in = static_cast<const char*>(src.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* rows = index.const_data_ptr<int64_t>();
  const auto fits = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && reinterpret_cast<uintptr_t>(in) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(dst) % bytes == 0;
  };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (fits(16)) {
    launch_gather<uint4>(in, dst, rows, plan, row_bytes, stream);
  } else if (fits(8)) {
    launch_gather<uint2>(in, dst, rows, plan, row_bytes, stream);
  } else if (fits(4)) {
    launch_gather<uint32_t>(in, dst, rows, plan, row_bytes, stream);
  } else if (fits(2)) {
    launch_gather<uint16_t>(in, dst, rows, plan, row_bytes, stream);
  } else {
    launch_gather<uint8_t>(in, dst, rows, plan, row_bytes, stream);
  }
}

void launch_scatter_add_rows(const at::Tensor& dst, const at::Tensor& src, const at::Tensor& index,
                             const RowPlan& plan) {
  if (plan.count == 0 || plan.row_elems == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "scatter_add_rows", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    const bool vector = plan.row_elems % kVec == 0 && aligned16(out) && aligned16(in);
    const int64_t width = vector ? plan.row_elems / kVec : plan.row_elems;
    int64_t tiles = 0, items = 0;
    const unsigned blocks = row_blocks(plan.count, width, &tiles, &items);
    const auto kernel = vector ? scatter_add_rows_kernel<scalar_t, kVec>
                               : scatter_add_rows_kernel<scalar_t, 1>;
    kernel<<<blocks, kThreads, 0, stream>>>(out, in, index.const_data_ptr<int64_t>(), plan.rows,
                                            width, tiles, items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_scatter_add_rows_out(const at::Tensor& out, const at::Tensor& residual,
                                 const at::Tensor& src, const at::Tensor& order,
                                 const RowPlan& plan) {
  if (plan.rows == 0 || plan.row_elems == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter_add_rows_out", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t* base = residual.const_data_ptr<scalar_t>();
    const scalar_t* add = src.const_data_ptr<scalar_t>();
    const bool vector = plan.row_elems % kVec == 0 && aligned16(dst) && aligned16(base) && aligned16(add);
    const int64_t width = vector ? plan.row_elems / kVec : plan.row_elems;
    int64_t tiles = 0, items = 0;
    const unsigned blocks = row_blocks(plan.rows, width, &tiles, &items);
    const auto kernel = vector ? scatter_add_rows_out_kernel<scalar_t, kVec>
                               : scatter_add_rows_out_kernel<scalar_t, 1>;
    kernel<<<blocks, kThreads, 0, stream>>>(dst, base, add, order.const_data_ptr<int64_t>(), plan.rows,
                                            plan.count, width, tiles, items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_pack_plan(const at::Tensor& mask, const at::Tensor& order, int64_t k, int64_t batch,
                      int64_t seqlen, const at::Tensor& lengths, const at::Tensor& cu_seqlens,
                      const at::Tensor& max_len, const at::Tensor& token_index) {
  const bool* mask_ptr = mask_data(mask);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (k > 0) {
    pack_lengths_kernel<<<static_cast<unsigned>(k), kThreads, 0, stream>>>(
        mask_ptr, order.const_data_ptr<int64_t>(), batch, seqlen, lengths.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  pack_offsets_kernel<<<1, 1024, 0, stream>>>(lengths.const_data_ptr<int>(), k,
                                              cu_seqlens.mutable_data_ptr<int>(),
                                              max_len.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (k > 0 && seqlen > 0) {
    pack_index_kernel<<<static_cast<unsigned>(k), kThreads, 0, stream>>>(
        mask_ptr, order.const_data_ptr<int64_t>(), cu_seqlens.const_data_ptr<int>(), seqlen,
        token_index.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace mindskip::cuda
