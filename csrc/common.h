// Input validation and shape helpers shared by the CPU and CUDA kernels of every mindskip op.
//
// Each check raises a c10::Error (RuntimeError in Python) whose message names the op and the
// problem, and returns the inputs normalised the way the kernels expect them (contiguous,
// bool masks, compute-dtype weights).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace mindskip {

// Floating dtypes the router and the scatter-add kernels accept.
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// fp64 inputs are computed in fp64 (so gradcheck works); every other float dtype in fp32.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; move them to the same device");
}

// A (B, T) padding mask (nonzero = real token) as a contiguous bool tensor, or an undefined
// tensor when there is no mask (every token real).
inline at::Tensor real_token_mask(const std::optional<at::Tensor>& mask, int64_t batch,
                                  int64_t seqlen, const at::Tensor& ref, const char* op,
                                  const char* ref_name) {
  if (!mask.has_value() || !mask->defined()) {
    return at::Tensor();
  }
  const at::Tensor& m = *mask;
  check_same_device(m, ref, op, "mask", ref_name);
  TORCH_CHECK(m.dim() == 2 && m.size(0) == batch && m.size(1) == seqlen, op,
              ": mask must have shape (B, T) = (", batch, ", ", seqlen, "), got ", m.sizes());
  TORCH_CHECK(!m.is_complex(), op, ": mask must be bool, integer or floating, got ",
              m.scalar_type());
  at::Tensor real = m.scalar_type() == at::kBool ? m : m.ne(0);
  return real.contiguous();
}

// hidden (B, T, D) floating; weight (D,) or (1, D); bias with one element; threshold in (0, 1).
inline void check_router_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                const at::Tensor& bias, double threshold, const char* op) {
  TORCH_CHECK(hidden.dim() == 3, op, ": hidden must have shape (B, T, D), got rank ",
              hidden.dim(), " with shape ", hidden.sizes());
  TORCH_CHECK(is_kernel_float(hidden.scalar_type()), op,
              ": hidden must be float32, float16, bfloat16 or float64, got ",
              hidden.scalar_type());
  const int64_t dim = hidden.size(2);
  TORCH_CHECK(weight.dim() == 1 || (weight.dim() == 2 && weight.size(0) == 1), op,
              ": weight must have shape (D,) or (1, D), got ", weight.sizes());
  TORCH_CHECK(weight.size(-1) == dim, op, ": weight has D = ", weight.size(-1),
              " but hidden has D = ", dim);
  TORCH_CHECK(weight.is_floating_point(), op, ": weight must be floating, got ",
              weight.scalar_type());
  check_same_device(weight, hidden, op, "weight", "hidden");
  TORCH_CHECK(bias.numel() == 1 && bias.dim() <= 1, op,
              ": bias must be a 0-d or 1-element tensor, got shape ", bias.sizes());
  TORCH_CHECK(bias.is_floating_point(), op, ": bias must be floating, got ",
              bias.scalar_type());
  check_same_device(bias, hidden, op, "bias", "hidden");
  TORCH_CHECK(threshold > 0.0 && threshold < 1.0, op,
              ": threshold must lie strictly between 0 and 1, got ", threshold);
}

// order: a (B,) int64 permutation of range(B) listing the kept rows first.
inline void check_order(const at::Tensor& order, int64_t batch, const at::Tensor& ref,
                        const char* op, const char* ref_name) {
  check_same_device(order, ref, op, "order", ref_name);
  TORCH_CHECK(order.scalar_type() == at::kLong, op, ": order must be int64, got ",
              order.scalar_type());
  TORCH_CHECK(order.dim() == 1 && order.size(0) == batch, op,
              ": order must have shape (B,) = (", batch, ",), got ", order.sizes());
}

inline void check_count(int64_t k, int64_t limit, const char* op, const char* name,
                        const char* limit_name) {
  TORCH_CHECK(k >= 0 && k <= limit, op, ": ", name, " = ", k, " is out of range [0, ",
              limit_name, " = ", limit, "]");
}

// Two tensors whose rows (everything after the leading `lead` dims) must line up.
inline void check_same_row_shape(const at::Tensor& a, int64_t a_lead, const at::Tensor& b,
                                 int64_t b_lead, const char* op, const char* a_name,
                                 const char* b_name) {
  TORCH_CHECK(a.sizes().slice(a_lead) == b.sizes().slice(b_lead), op, ": ", a_name,
              " has shape ", a.sizes(), " and ", b_name, " has shape ", b.sizes(),
              "; their trailing dimensions must match");
}

inline void check_scatter_dtypes(const at::Tensor& dst, const at::Tensor& src, const char* op,
                                 const char* dst_name, const char* src_name) {
  TORCH_CHECK(is_kernel_float(dst.scalar_type()), op, ": ", dst_name,
              " must be float32, float16, bfloat16 or float64, got ", dst.scalar_type());
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), op, ": ", src_name, " is ",
              src.scalar_type(), " but ", dst_name, " is ", dst.scalar_type(),
              "; they must have the same dtype");
  TORCH_CHECK(dst.is_contiguous(), op, ": ", dst_name,
              " must be contiguous (it is updated in place)");
}

// An index vector of int64 row ids, at least `count` long.
inline void check_index(const at::Tensor& index, int64_t count, const at::Tensor& ref,
                        const char* op, const char* name, const char* ref_name) {
  check_same_device(index, ref, op, name, ref_name);
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.dim() == 1, op, ": ", name, " must be 1-D, got shape ", index.sizes());
  check_count(count, index.size(0), op, "the row count", name);
}

// {lead, rest...}: the output shape of a row gather.
inline std::vector<int64_t> with_leading(int64_t lead, at::IntArrayRef rest) {
  std::vector<int64_t> shape{lead};
  shape.insert(shape.end(), rest.begin(), rest.end());
  return shape;
}

}  // namespace mindskip
