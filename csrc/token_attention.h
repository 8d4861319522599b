// Input checks of token_decode_attention, shared by its CPU and CUDA kernels (as common.h's are
// by the other ops), so that both backends accept the same inputs and reject the rest with the
// same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace mindskip {

// The sizes of one decode step: B rows, Hq query heads in groups of Hq / Hkv per key/value head,
// S key positions, head dimension D.
struct TokenDecodeShape {
  int64_t batch;
  int64_t q_heads;
  int64_t kv_heads;
  int64_t keys;
  int64_t head_dim;
};

// query (B, Hq, D) floating; key and value (B, Hkv, S, D) of query's dtype and device, their last
// dimension contiguous (any other strides: a view of a longer buffer is read in place); Hq a
// multiple of Hkv; keep (B,) bool; length, when given, one integer element. The mask is checked
// by real_token_mask; scale finite.
inline TokenDecodeShape check_token_decode_attention(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value, const at::Tensor& keep,
                                                     const std::optional<at::Tensor>& length,
                                                     double scale, const char* op) {
  TORCH_CHECK(query.dim() == 3, op, ": query must have shape (B, Hq, D), got ", query.sizes());
  TORCH_CHECK(is_kernel_float(query.scalar_type()), op,
              ": query must be float32, float16, bfloat16 or float64, got ", query.scalar_type());
  TORCH_CHECK(key.dim() == 4, op, ": key must have shape (B, Hkv, S, D), got ", key.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value has shape ", value.sizes(),
              " but key has shape ", key.sizes(), "; they must match");
  const int64_t batch = query.size(0), q_heads = query.size(1), head_dim = query.size(2);
  TORCH_CHECK(key.size(0) == batch && key.size(3) == head_dim, op, ": key has shape ", key.sizes(),
              " but query has B = ", batch, " and D = ", head_dim);
  const int64_t kv_heads = key.size(1);
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, op, ": query heads (", q_heads,
              ") must be a multiple of key/value heads (", kv_heads, ")");
  for (const at::Tensor* t : {&key, &value}) {
    check_same_device(*t, query, op, "key and value", "query");
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), op, ": key and value must have query's dtype (",
                query.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, op,
                ": the last dimension of key and value must be contiguous (stride 1), got strides ",
                t->strides());
  }
  check_same_device(keep, query, op, "keep", "query");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() == 1 && keep.size(0) == batch, op,
              ": keep must be a bool tensor of shape (B,) = (", batch, ",), got ", keep.scalar_type(),
              " ", keep.sizes());
  if (length.has_value() && length->defined()) {
    check_same_device(*length, query, op, "length", "query");
    TORCH_CHECK(length->numel() == 1 && !length->is_floating_point() && !length->is_complex() &&
                    length->scalar_type() != at::kBool,
                op, ": length must be one integer element, got ", length->scalar_type(), " ",
                length->sizes());
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  return {batch, q_heads, kv_heads, key.size(2), head_dim};
}

namespace cuda {

// The CUDA kernels (csrc/cuda/token_attention_kernels.cu), launched by the CUDA entry
// (csrc/cuda/token_attention.cpp) on checked inputs: query contiguous, key and value with a
// contiguous last dimension, keep contiguous bool, allowed a contiguous (B, S) bool tensor or
// undefined, limit a 1-element int64 tensor on the device (the positions read are
// s < min(limit, S)); fills out (query's shape and dtype).
void launch_token_decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const at::Tensor& keep, const at::Tensor& allowed, const at::Tensor& limit,
                                   double scale, const TokenDecodeShape& shape, const at::Tensor& out);

}  // namespace cuda
}  // namespace mindskip
