// CUDA rotary_embedding: the rotate-half rotary embedding of q and k in one launch (the unfused
// form is sixteen launches per layer). One thread per output element, in a grid-stride loop; the
// op's entry, which checks the inputs, is in ops.cpp.
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

// Products and sums rounded on their own (never contracted into a multiply-add), as the unfused
// ops compute them.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Element e of the `width` = (Hq + Hk) * D outputs of token `token`: q's heads first, then k's.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                  const scalar_t* __restrict__ cos, const scalar_t* __restrict__ sin,
                  const int64_t* __restrict__ rows, scalar_t* __restrict__ q_out,
                  scalar_t* __restrict__ k_out, int64_t seqlen, int64_t q_width, int64_t k_width,
                  int64_t dim, int64_t table_rows, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = q_width + k_width, half = dim / 2;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t token = i / width, e = i % width;
    const int64_t n = token / seqlen, t = token % seqlen;
    int64_t table = table_rows == 1 ? 0 : n;
    if (rows != nullptr) {
      table = rows[n];
      CUDA_KERNEL_ASSERT(table >= 0 && table < table_rows);
    }
    const bool is_q = e < q_width;
    const int64_t at_head = is_q ? e : e - q_width;
    const int64_t h = at_head / dim, j = at_head % dim;
    const scalar_t* in = (is_q ? q + token * q_width : k + token * k_width) + h * dim;
    // The output is in the attention layout (N, H, T, D).
    const int64_t heads = (is_q ? q_width : k_width) / dim;
    scalar_t* out = (is_q ? q_out : k_out) + ((n * heads + h) * seqlen + t) * dim + j;
    const int64_t c_at = (table * seqlen + t) * dim + j;
    const acc_t rotated = j < half ? -static_cast<acc_t>(in[j + half]) : static_cast<acc_t>(in[j - half]);
    const scalar_t direct = static_cast<scalar_t>(mul_rn(static_cast<acc_t>(in[j]), static_cast<acc_t>(cos[c_at])));
    const scalar_t turned = static_cast<scalar_t>(mul_rn(rotated, static_cast<acc_t>(sin[c_at])));
    *out = static_cast<scalar_t>(add_rn(static_cast<acc_t>(direct), static_cast<acc_t>(turned)));
  }
}

}  // namespace

void launch_rotary_embedding(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                             const at::Tensor& sin, const at::Tensor& rows, const RotaryShape& shape,
                             const at::Tensor& q_out, const at::Tensor& k_out) {
  const int64_t q_width = shape.q_heads * shape.dim, k_width = shape.k_heads * shape.dim;
  const int64_t total = shape.rows * shape.seqlen * (q_width + k_width);
  if (total == 0) {
    return;
  }
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{sm_count()} * 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* table = rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary_embedding", [&] {
    rotary_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), cos.const_data_ptr<scalar_t>(),
        sin.const_data_ptr<scalar_t>(), table, q_out.mutable_data_ptr<scalar_t>(),
        k_out.mutable_data_ptr<scalar_t>(), shape.seqlen, q_width, k_width, shape.dim,
        shape.table_rows, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mindskip::cuda
