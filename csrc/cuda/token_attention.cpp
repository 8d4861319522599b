// The CUDA entry of token_decode_attention: the input checks shared with the CPU kernel
// (token_attention.h), device guard, normalised inputs and the output, then the launcher.
// Compiled by the host C++ compiler, so that a bad input raises from here (as csrc/cuda/ops.cpp
// does for the other ops).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../common.h"
#include "../token_attention.h"

namespace mindskip::cuda {
namespace {

constexpr const char* kOp = "mindskip::token_decode_attention";
// One block per (row, key/value head, split of the positions): bounded so the grid fits.
constexpr int64_t kMaxRowsHeads = int64_t{1} << 30;

at::Tensor token_decode_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                       const at::Tensor& value, const at::Tensor& keep,
                                       const std::optional<at::Tensor>& mask,
                                       const std::optional<at::Tensor>& length, double scale) {
  const TokenDecodeShape shape = check_token_decode_attention(query, key, value, keep, length, scale, kOp);
  TORCH_CHECK(shape.batch * shape.kv_heads <= kMaxRowsHeads, kOp, ": B * Hkv = ",
              shape.batch * shape.kv_heads, " is too large");
  TORCH_CHECK(shape.head_dim <= 256, kOp, ": the CUDA kernel takes a head dimension up to 256, got ",
              shape.head_dim);
  TORCH_CHECK(shape.q_heads / shape.kv_heads <= 8, kOp,
              ": the CUDA kernel takes up to 8 query heads per key/value head, got ",
              shape.q_heads / shape.kv_heads);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor allowed = real_token_mask(mask, shape.batch, shape.keys, query, kOp, "key");
  // The positions read: all S, or below `length` (read on the device: no host sync).
  const at::Tensor limit = length.has_value() && length->defined()
                               ? length->reshape({1}).to(at::kLong).clamp_min(0)
                               : at::full({1}, shape.keys, query.options().dtype(at::kLong));
  const at::Tensor q = query.contiguous();
  at::Tensor out = at::empty_like(q);
  launch_token_decode_attention(q, key, value, keep.contiguous(), allowed, limit, scale, shape, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mindskip, CUDA, m) {
  m.impl("token_decode_attention", &token_decode_attention_cuda);
}

}  // namespace mindskip::cuda
