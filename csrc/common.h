// Input validation and shape helpers shared by the CPU and CUDA kernels of every mindskip op.
//
// Each check raises a c10::Error (RuntimeError in Python) whose message names the op and the
// problem. The per-op checks at the end also return the sizes the kernels need, and the other
// helpers return the inputs normalised the way the kernels expect them (contiguous, bool masks,
// compute-dtype weights).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <initializer_list>
#include <optional>
#include <utility>
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

// dst and src of one floating dtype; dst contiguous when it is updated in place.
inline void check_scatter_dtypes(const at::Tensor& dst, const at::Tensor& src, const char* op,
                                 const char* dst_name, const char* src_name,
                                 bool in_place = true) {
  TORCH_CHECK(is_kernel_float(dst.scalar_type()), op, ": ", dst_name,
              " must be float32, float16, bfloat16 or float64, got ", dst.scalar_type());
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), op, ": ", src_name, " is ",
              src.scalar_type(), " but ", dst_name, " is ", dst.scalar_type(),
              "; they must have the same dtype");
  TORCH_CHECK(!in_place || dst.is_contiguous(), op, ": ", dst_name,
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

// The data of an optional bool mask, or nullptr when there is none (every token real).
inline const bool* mask_data(const at::Tensor& mask) {
  return mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Per-op checks. Each op's CPU and CUDA kernels start with the same function, so both backends
// accept the same inputs and reject the rest with the same messages. The CUDA entries
// (csrc/cuda/ops.cpp, host-compiled) call it before taking their device guard, so a tensor on the wrong device gets check_same_device's
// message rather than the guard's.

// The (B, T, D) of a router op's hidden.
struct RouterShape {
  int64_t batch;
  int64_t seqlen;
  int64_t dim;
};

// The router parameters of router_gate and router_gate_varlen: weight (D,) or (1, D) for the D of
// hidden, bias with one element, both floating and on hidden's device; threshold in (0, 1).
inline void check_router_parameters(const at::Tensor& hidden, int64_t dim, const at::Tensor& weight,
                                    const at::Tensor& bias, double threshold, const char* op) {
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

inline void check_router_hidden(const at::Tensor& hidden, int64_t rank, const char* shape,
                                const char* op) {
  TORCH_CHECK(hidden.dim() == rank, op, ": hidden must have shape ", shape, ", got rank ",
              hidden.dim(), " with shape ", hidden.sizes());
  TORCH_CHECK(is_kernel_float(hidden.scalar_type()), op,
              ": hidden must be float32, float16, bfloat16 or float64, got ",
              hidden.scalar_type());
}

// router_gate: hidden (B, T, D) floating, and the router parameters. The mask is checked by
// router_tensors.
inline RouterShape check_router_gate(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& bias, double threshold, const char* op) {
  check_router_hidden(hidden, 3, "(B, T, D)", op);
  check_router_parameters(hidden, hidden.size(2), weight, bias, threshold, op);
  return {hidden.size(0), hidden.size(1), hidden.size(2)};
}

// The sizes of router_gate_varlen's flat hidden (N, D) and its B = cu_seqlens.size(0) - 1 segments.
struct VarlenRouterShape {
  int64_t batch;
  int64_t tokens;
  int64_t dim;
};

// router_gate_varlen: hidden (N, D) floating; cu_seqlens (B + 1,) int32 or int64 on hidden's
// device; the router parameters. The values of cu_seqlens (0 <= cu[0] <= ... <= cu[B] <= N) are
// checked by the kernels, which read them.
inline VarlenRouterShape check_router_gate_varlen(const at::Tensor& hidden,
                                                  const at::Tensor& cu_seqlens,
                                                  const at::Tensor& weight, const at::Tensor& bias,
                                                  double threshold, const char* op) {
  check_router_hidden(hidden, 2, "(N, D)", op);
  check_same_device(cu_seqlens, hidden, op, "cu_seqlens", "hidden");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong, op,
              ": cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op,
              ": cu_seqlens must have shape (B + 1,) with B >= 0, got ", cu_seqlens.sizes());
  check_router_parameters(hidden, hidden.size(1), weight, bias, threshold, op);
  return {cu_seqlens.size(0) - 1, hidden.size(0), hidden.size(1)};
}

// router_gate_backward: hidden (B, T, D) floating, weight D elements, grad_score and score B
// elements each, all on hidden's device. The mask is checked by router_tensors.
inline RouterShape check_router_gate_backward(const at::Tensor& grad_score,
                                              const at::Tensor& hidden, const at::Tensor& weight,
                                              const at::Tensor& score, const char* op) {
  TORCH_CHECK(hidden.dim() == 3 && is_kernel_float(hidden.scalar_type()), op,
              ": hidden must be a floating (B, T, D) tensor, got ", hidden.scalar_type(), " ",
              hidden.sizes());
  const RouterShape shape{hidden.size(0), hidden.size(1), hidden.size(2)};
  TORCH_CHECK(weight.numel() == shape.dim, op, ": weight has ", weight.numel(),
              " elements but hidden has D = ", shape.dim);
  TORCH_CHECK(grad_score.numel() == shape.batch && score.numel() == shape.batch, op,
              ": grad_score and score must have B = ", shape.batch, " elements");
  for (const at::Tensor* t : {&grad_score, &weight, &score}) {
    check_same_device(*t, hidden, op, "every input", "hidden");
  }
  return shape;
}

// A router op's inputs as its kernels read them: the bool mask (undefined when there is none),
// contiguous hidden, and the weight as a (D,) vector in the compute dtype. Called after the
// checks; the CUDA entries call it under their device guard, since the conversions may launch
// kernels.
struct RouterTensors {
  at::Tensor mask;
  at::Tensor hidden;
  at::ScalarType acc_type;
  at::Tensor weight;

  // t (n elements) as a contiguous (n,) vector in the compute dtype.
  at::Tensor vector(const at::Tensor& t, int64_t n) const {
    return t.reshape({n}).to(acc_type).contiguous();
  }
};

// Without a mask: router_gate_varlen, whose segments hold only real tokens.
inline RouterTensors router_tensors(const at::Tensor& hidden, const at::Tensor& weight,
                                    int64_t dim) {
  RouterTensors in;
  in.hidden = hidden.contiguous();
  in.acc_type = compute_dtype(in.hidden.scalar_type());
  in.weight = in.vector(weight, dim);
  return in;
}

inline RouterTensors router_tensors(const at::Tensor& hidden,
                                    const std::optional<at::Tensor>& mask,
                                    const at::Tensor& weight, const RouterShape& shape,
                                    const char* op) {
  at::Tensor real = real_token_mask(mask, shape.batch, shape.seqlen, hidden, op, "hidden");
  RouterTensors in = router_tensors(hidden, weight, shape.dim);
  in.mask = std::move(real);
  return in;
}

// cu_seqlens as the contiguous int64 offsets the router_gate_varlen kernels read.
inline at::Tensor segment_offsets(const at::Tensor& cu_seqlens) {
  return cu_seqlens.to(at::kLong).contiguous();
}

// router_gate's outputs, allocated for the kernels to fill: score (B,) in the compute dtype,
// keep (B,) bool, order (B,) int64, num_kept (1,) int64.
struct RouterGateOutputs {
  at::Tensor score;
  at::Tensor keep;
  at::Tensor order;
  at::Tensor num_kept;
};

inline RouterGateOutputs router_gate_outputs(const RouterTensors& in, int64_t batch) {
  const auto opts = in.hidden.options();
  return {at::empty({batch}, opts.dtype(in.acc_type)), at::empty({batch}, opts.dtype(at::kBool)),
          at::empty({batch}, opts.dtype(at::kLong)), at::empty({1}, opts.dtype(at::kLong))};
}

// router_gate_backward's outputs, allocated for the kernels to fill: grad_hidden like hidden,
// grad_weight (D,) and grad_bias () in the compute dtype.
struct RouterGateGrads {
  at::Tensor hidden;
  at::Tensor weight;
  at::Tensor bias;
};

inline RouterGateGrads router_gate_grads(const RouterTensors& in, int64_t dim) {
  const auto acc_opts = in.hidden.options().dtype(in.acc_type);
  return {at::empty_like(in.hidden), at::empty({dim}, acc_opts), at::empty({}, acc_opts)};
}

// A regroup op moves `count` rows between a full tensor, seen as `rows` rows of `row_elems`
// elements, and a packed (count, ...) tensor. A row is the full tensor's first `lead` dims: a
// whole sequence (lead 1: gather_kept, scatter_add_kept_) or one token (lead 2: pack_kept,
// unpack_add_kept_).
struct RowPlan {
  int64_t lead;
  int64_t rows;
  int64_t row_elems;  // 0 when there are no rows
  int64_t count;

  // The packed tensor's shape: (count, the full tensor's dims after the row).
  std::vector<int64_t> packed_shape(const at::Tensor& full) const {
    std::vector<int64_t> shape{count};
    const at::IntArrayRef rest = full.sizes().slice(lead);
    shape.insert(shape.end(), rest.begin(), rest.end());
    return shape;
  }
};

inline RowPlan row_plan(const at::Tensor& full, int64_t lead, int64_t count) {
  const int64_t rows = c10::multiply_integers(full.sizes().slice(0, lead));
  return {lead, rows, rows == 0 ? 0 : full.numel() / rows, count};
}

// gather_kept: x (B, ...); order a (B,) int64 permutation; 0 <= k <= B.
inline RowPlan check_gather_kept(const at::Tensor& x, const at::Tensor& order, int64_t k,
                                 const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-d tensor");
  const int64_t batch = x.size(0);
  check_order(order, batch, x, op, "x");
  check_count(k, batch, op, "k", "B");
  return row_plan(x, 1, k);
}

// scatter_add_kept_ and scatter_add_kept: residual (B, ...) floating (and contiguous, for the
// in-place op); y (k, ...) with k <= B and residual's dtype, rank and row shape; order a (B,) int64
// permutation.
inline RowPlan check_scatter_add_kept(const at::Tensor& residual, const at::Tensor& y,
                                      const at::Tensor& order, const char* op,
                                      bool in_place = true) {
  TORCH_CHECK(residual.dim() >= 1, op, ": residual must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(y.dim() == residual.dim(), op, ": y must have the rank of residual (",
              residual.dim(), "), got shape ", y.sizes());
  check_same_device(y, residual, op, "y", "residual");
  check_same_row_shape(y, 1, residual, 1, op, "y", "residual");
  check_scatter_dtypes(residual, y, op, "residual", "y", in_place);
  const int64_t batch = residual.size(0);
  check_order(order, batch, residual, op, "residual");
  const int64_t k = y.size(0);
  check_count(k, batch, op, "y.size(0)", "B");
  return row_plan(residual, 1, k);
}

// The sizes of rotary_embedding's q (N, T, Hq, D), k (N, T, Hk, D) and cos/sin (C, T, D).
struct RotaryShape {
  int64_t rows;  // N
  int64_t seqlen;  // T
  int64_t q_heads;
  int64_t k_heads;
  int64_t dim;  // D
  int64_t table_rows;  // C
};

// rotary_embedding: q and k (N, T, H, D) of one floating dtype with an even D; cos and sin (C, T, D)
// of that dtype; rows, when given, (N,) int64 (its values, in [0, C), are checked by the kernels
// that read them), else C is N or 1. All on q's device.
inline RotaryShape check_rotary_embedding(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& cos, const at::Tensor& sin,
                                          const std::optional<at::Tensor>& rows, const char* op) {
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape (N, T, heads, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3),
              op, ": k must have shape (N, T, heads, D) = (", q.size(0), ", ", q.size(1),
              ", heads, ", q.size(3), ") like q, got ", k.sizes());
  TORCH_CHECK(is_kernel_float(q.scalar_type()), op,
              ": q must be float32, float16, bfloat16 or float64, got ", q.scalar_type());
  const RotaryShape shape{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), cos.size(0)};
  TORCH_CHECK(shape.dim % 2 == 0, op, ": the head dim D must be even (rotate_half splits it), got ",
              shape.dim);
  TORCH_CHECK(cos.dim() == 3 && cos.size(1) == shape.seqlen && cos.size(2) == shape.dim, op,
              ": cos must have shape (C, T, D) = (C, ", shape.seqlen, ", ", shape.dim, "), got ",
              cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin must have cos's shape ", cos.sizes(),
              ", got ", sin.sizes());
  const std::pair<const at::Tensor*, const char*> same[] = {{&k, "k"}, {&cos, "cos"}, {&sin, "sin"}};
  for (const auto& [t, name] : same) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " is ", t->scalar_type(),
                " but q is ", q.scalar_type(), "; they must have the same dtype");
    check_same_device(*t, q, op, name, "q");
  }
  if (rows.has_value() && rows->defined()) {
    check_index(*rows, shape.rows, q, op, "rows", "q");
    TORCH_CHECK(rows->size(0) == shape.rows, op, ": rows must have shape (N,) = (", shape.rows,
                ",), got ", rows->sizes());
  } else {
    TORCH_CHECK(shape.table_rows == shape.rows || shape.table_rows == 1, op,
                ": cos has ", shape.table_rows, " rows for ", shape.rows,
                " rows of q; pass rows (which row of cos each row of q takes) or a cos of 1 or ",
                shape.rows, " rows");
  }
  return shape;
}

// pack_plan: order a (B,) int64 permutation; 0 <= k <= B; seqlen >= 0. Returns B. The mask is
// checked by real_token_mask.
inline int64_t check_pack_plan(const at::Tensor& order, int64_t k, int64_t seqlen,
                               const char* op) {
  TORCH_CHECK(order.dim() == 1, op, ": order must have shape (B,), got ", order.sizes());
  const int64_t batch = order.size(0);
  check_order(order, batch, order, op, "order");
  check_count(k, batch, op, "k", "B");
  TORCH_CHECK(seqlen >= 0, op, ": seqlen must be non-negative, got ", seqlen);
  return batch;
}

// pack_kept: x (B, T, ...); token_index int64, 1-D, with at least `total` entries.
inline RowPlan check_pack_kept(const at::Tensor& x, const at::Tensor& token_index, int64_t total,
                               const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (B, T, ...), got rank ", x.dim());
  check_index(token_index, total, x, op, "token_index", "x");
  return row_plan(x, 2, total);
}

// unpack_add_kept_: residual (B, T, ...) floating and contiguous; packed (total, ...) with
// residual's dtype and token shape; token_index int64, 1-D, with at least `total` entries.
inline RowPlan check_unpack_add_kept(const at::Tensor& residual, const at::Tensor& packed,
                                     const at::Tensor& token_index, const char* op) {
  TORCH_CHECK(residual.dim() >= 2, op, ": residual must have shape (B, T, ...), got rank ",
              residual.dim());
  TORCH_CHECK(packed.dim() == residual.dim() - 1, op,
              ": packed must have shape (total, ...) with rank ", residual.dim() - 1, ", got ",
              packed.sizes());
  check_same_device(packed, residual, op, "packed", "residual");
  check_same_row_shape(packed, 1, residual, 2, op, "packed", "residual");
  check_scatter_dtypes(residual, packed, op, "residual", "packed");
  const int64_t total = packed.size(0);
  check_index(token_index, total, residual, op, "token_index", "residual");
  return row_plan(residual, 2, total);
}

}  // namespace mindskip
