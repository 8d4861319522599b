// CPU rotary_embedding: the rotate-half rotary embedding of q and k in one pass over both, for a
// decode step's few tokens (the unfused form is sixteen ops: two unsqueezes and, per tensor, two
// slices, a negation, a concatenation, two products and a sum).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../common.h"

namespace mindskip::cpu {
namespace {

// out = x * c + rotate_half(x) * s for `heads` vectors of `dim` elements sharing c and s, where
// rotate_half(x) = (-x[half:], x[:half]); head h is read at x + h * dim and written at
// out + h * out_stride. Each product and the sum are rounded to scalar_t, as the unfused ops round
// them (every step in opmath, then stored), so the result is theirs bit for bit; the statements are
// kept apart so that no multiply-add is contracted.
template <typename scalar_t>
void rotate_heads(const scalar_t* x, scalar_t* out, const scalar_t* c, const scalar_t* s,
                  int64_t heads, int64_t dim, int64_t out_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const scalar_t* in = x + h * dim;
    scalar_t* o = out + h * out_stride;
    for (int64_t j = 0; j < dim; ++j) {
      const acc_t rotated = j < half ? -static_cast<acc_t>(in[j + half]) : static_cast<acc_t>(in[j - half]);
      const scalar_t direct = static_cast<scalar_t>(static_cast<acc_t>(in[j]) * static_cast<acc_t>(c[j]));
      const scalar_t turned = static_cast<scalar_t>(rotated * static_cast<acc_t>(s[j]));
      o[j] = static_cast<scalar_t>(static_cast<acc_t>(direct) + static_cast<acc_t>(turned));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& cos_in, const at::Tensor& sin_in,
                                                        const std::optional<at::Tensor>& rows_in) {
  constexpr const char* op = "mindskip::rotary_embedding";
  const RotaryShape shape = check_rotary_embedding(q_in, k_in, cos_in, sin_in, rows_in, op);
  const bool indexed = rows_in.has_value() && rows_in->defined();
  const at::Tensor rows = indexed ? rows_in->contiguous() : at::Tensor();
  const int64_t* table_row = indexed ? rows.const_data_ptr<int64_t>() : nullptr;
  for (int64_t n = 0; indexed && n < shape.rows; ++n) {
    TORCH_CHECK(table_row[n] >= 0 && table_row[n] < shape.table_rows, op, ": rows[", n, "] = ",
                table_row[n], " is out of range [0, ", shape.table_rows, ")");
  }
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor q_out = at::empty({shape.rows, shape.q_heads, shape.seqlen, shape.dim}, q.options());
  at::Tensor k_out = at::empty({shape.rows, shape.k_heads, shape.seqlen, shape.dim}, k.options());
  const int64_t tokens = shape.rows * shape.seqlen;
  if (tokens == 0 || shape.dim == 0) {
    return {q_out, k_out};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary_embedding", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* cp = cos.const_data_ptr<scalar_t>();
    const scalar_t* sp = sin.const_data_ptr<scalar_t>();
    scalar_t* qo = q_out.mutable_data_ptr<scalar_t>();
    scalar_t* ko = k_out.mutable_data_ptr<scalar_t>();
    const int64_t q_width = shape.q_heads * shape.dim, k_width = shape.k_heads * shape.dim;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, q_width + k_width));
    at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
      for (int64_t token = begin; token < end; ++token) {
        const int64_t n = token / shape.seqlen, t = token % shape.seqlen;
        const int64_t table = indexed ? table_row[n] : (shape.table_rows == 1 ? 0 : n);
        const int64_t base = (table * shape.seqlen + t) * shape.dim;
        // Output head h of token (n, t) is at ((n * H + h) * T + t) * D.
        const int64_t stride = shape.seqlen * shape.dim;
        rotate_heads(qp + token * q_width, qo + n * q_width * shape.seqlen + t * shape.dim, cp + base, sp + base,
                     shape.q_heads, shape.dim, stride);
        rotate_heads(kp + token * k_width, ko + n * k_width * shape.seqlen + t * shape.dim, cp + base, sp + base,
                     shape.k_heads, shape.dim, stride);
      }
    });
  });
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(mindskip, CPU, m) {
  m.impl("rotary_embedding", &rotary_embedding_cpu);
}

}  // namespace mindskip::cpu
