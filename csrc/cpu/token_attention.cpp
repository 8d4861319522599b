// CPU token_decode_attention: the attention of one decode step under token routing. Each row's
// single query attends over its own row of the KV cache, for the rows that keep the attention
// sublayer only: a skipped row's keys and values are never read, and its output is zero.
//
// One work item per (kept row, key/value head): the item reads each allowed key row once for all
// the query heads of its group (a dot product per head), takes the softmax in the compute dtype,
// then reads each allowed value row once (an axpy per head). Items are independent, so the result
// does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../token_attention.h"
#include "simd.h"

namespace mindskip::cpu {
namespace {

constexpr const char* kOp = "mindskip::token_decode_attention";

template <typename scalar_t, typename acc_t>
void attend(const scalar_t* query, const scalar_t* key, const scalar_t* value, const bool* mask,
            const std::vector<int64_t>& rows, const TokenDecodeShape& shape, at::IntArrayRef key_strides,
            at::IntArrayRef value_strides, int64_t limit, acc_t scale, scalar_t* out) {
  const int64_t groups = shape.q_heads / shape.kv_heads;
  const int64_t dim = shape.head_dim;
  const int64_t items = static_cast<int64_t>(rows.size()) * shape.kv_heads;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(groups * dim), p(groups * std::max<int64_t>(limit, 1)), acc(groups * dim);
    std::vector<acc_t> top(groups), total(groups);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = rows[item / shape.kv_heads];
      const int64_t h = item % shape.kv_heads;
      const bool* allowed = mask == nullptr ? nullptr : mask + b * shape.keys;
      const scalar_t* k = key + b * key_strides[0] + h * key_strides[1];
      const scalar_t* v = value + b * value_strides[0] + h * value_strides[1];
      const scalar_t* qrow = query + (b * shape.q_heads + h * groups) * dim;
      for (int64_t i = 0; i < groups * dim; ++i) {
        q[i] = static_cast<acc_t>(qrow[i]) * scale;
      }
      std::fill(top.begin(), top.end(), -std::numeric_limits<acc_t>::infinity());
      bool any = false;
      for (int64_t s = 0; s < limit; ++s) {
        if (allowed != nullptr && !allowed[s]) {
          continue;
        }
        any = true;
        const scalar_t* krow = k + s * key_strides[2];
        for (int64_t g = 0; g < groups; ++g) {
          const acc_t score = dot(krow, q.data() + g * dim, dim);
          p[g * limit + s] = score;
          top[g] = std::max(top[g], score);
        }
      }
      scalar_t* o = out + (b * shape.q_heads + h * groups) * dim;
      if (!any) {
        continue;  // no position to attend to: the output stays zero
      }
      std::fill(total.begin(), total.end(), acc_t(0));
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t s = 0; s < limit; ++s) {
        if (allowed != nullptr && !allowed[s]) {
          continue;
        }
        const scalar_t* vrow = v + s * value_strides[2];
        for (int64_t g = 0; g < groups; ++g) {
          const acc_t weight = std::exp(p[g * limit + s] - top[g]);
          total[g] += weight;
          axpy(acc.data() + g * dim, weight, vrow, dim);
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t i = 0; i < dim; ++i) {
          o[g * dim + i] = static_cast<scalar_t>(acc[g * dim + i] / total[g]);
        }
      }
    }
  });
}

at::Tensor token_decode_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                      const at::Tensor& value, const at::Tensor& keep,
                                      const std::optional<at::Tensor>& mask,
                                      const std::optional<at::Tensor>& length, double scale) {
  const TokenDecodeShape shape = check_token_decode_attention(query, key, value, keep, length, scale, kOp);
  const at::Tensor allowed = real_token_mask(mask, shape.batch, shape.keys, query, kOp, "key");
  int64_t limit = shape.keys;
  if (length.has_value() && length->defined()) {
    const int64_t n = length->item<int64_t>();
    TORCH_CHECK(n >= 0, kOp, ": length must be non-negative, got ", n);
    limit = std::min(n, limit);
  }
  const at::Tensor q = query.contiguous();
  const at::Tensor kept = keep.contiguous();
  at::Tensor out = at::zeros_like(q);
  std::vector<int64_t> rows;
  const bool* keep_data = kept.const_data_ptr<bool>();
  for (int64_t b = 0; b < shape.batch; ++b) {
    if (keep_data[b]) {
      rows.push_back(b);
    }
  }
  if (rows.empty() || shape.head_dim == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "token_decode_attention", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attend<scalar_t, acc_t>(q.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                            value.const_data_ptr<scalar_t>(), mask_data(allowed), rows, shape,
                            key.strides(), value.strides(), limit, static_cast<acc_t>(scale),
                            out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mindskip, CPU, m) {
  m.impl("token_decode_attention", &token_decode_attention_cpu);
}

}  // namespace mindskip::cpu
