// The schema of every mindskip op, in one place. Kernels are registered per backend in
// csrc/cpu/*.cpp and csrc/cuda/ops.cpp; fake kernels and autograd live in mindskip_ext/ops.py.
// Each op has a Python function of the same name, with these arguments in this order and these
// returns, in mindskip_ext/ops.py (the public wrapper) and mindskip_ext/reference.py (its
// plain-PyTorch definition); python_tests/test_ops.py checks both against these schemas, so a
// change here is made in all three places.
#include <torch/library.h>

TORCH_LIBRARY(mindskip, m) {
  // Fused router: masked mean over real tokens, score = sigmoid(w . mean + b), keep = score >=
  // threshold, order = stable kept-first permutation, num_kept = (1,) count. No host sync.
  m.def(
      "router_gate(Tensor hidden, Tensor? mask, Tensor weight, Tensor bias, float threshold)"
      " -> (Tensor score, Tensor keep, Tensor order, Tensor num_kept)",
      {at::Tag::pt2_compliant_tag});
  // Gradient of router_gate through `score` (w.r.t. hidden, weight and bias).
  m.def(
      "router_gate_backward(Tensor grad_score, Tensor hidden, Tensor? mask, Tensor weight,"
      " Tensor score) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
  // router_gate over the segments [cu_seqlens[b], cu_seqlens[b+1]) of a flat (N, D) token batch,
  // every token real (vLLM's layout: no batch dimension, no padding). Same outputs; no gradient.
  m.def(
      "router_gate_varlen(Tensor hidden, Tensor cu_seqlens, Tensor weight, Tensor bias,"
      " float threshold) -> (Tensor score, Tensor keep, Tensor order, Tensor num_kept)",
      {at::Tag::pt2_compliant_tag});
  // x (B, T, ...) -> x[order[:k]] (k, T, ...), contiguous.
  m.def("gather_kept(Tensor x, Tensor order, SymInt k) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // residual[order[j]] += y[j] for j < y.size(0), in place, fp32 accumulation.
  m.def("scatter_add_kept_(Tensor(a!) residual, Tensor y, Tensor order) -> ()",
        {at::Tag::pt2_compliant_tag});
  // Out of place: residual with rows order[j] += y[j] for j < y.size(0), fp32 accumulation, every
  // other row copied (a mixed layer's residual add in one pass).
  m.def("scatter_add_kept(Tensor residual, Tensor y, Tensor order) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Rotate-half rotary embedding of q (N, T, Hq, D) and k (N, T, Hk, D) with cos, sin (C, T, D):
  // x * cos + rotate_half(x) * sin, rounded as the unfused ops round; cos and sin row rows[n] (or
  // n, or 0 when C = 1) for row n. Returns new contiguous tensors in the attention layout:
  // q_out (N, Hq, T, D), k_out (N, Hk, T, D).
  m.def(
      "rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? rows)"
      " -> (Tensor q_out, Tensor k_out)",
      {at::Tag::pt2_compliant_tag});
  // Varlen layout of the kept sequences' real tokens: cu_seqlens (k+1) int32, token_index
  // (k*seqlen) int64 (flat b*seqlen+t source rows, zero-filled past the total), max_len (1) int32.
  m.def(
      "pack_plan(Tensor? mask, Tensor order, SymInt k, SymInt seqlen)"
      " -> (Tensor cu_seqlens, Tensor token_index, Tensor max_len)",
      {at::Tag::pt2_compliant_tag});
  // x.view(B*T, ...)[token_index[:total]] -> (total, ...).
  m.def("pack_kept(Tensor x, Tensor token_index, SymInt total) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // residual.view(B*T, ...)[token_index[i]] += packed[i] for i < packed.size(0), in place.
  m.def("unpack_add_kept_(Tensor(a!) residual, Tensor packed, Tensor token_index) -> ()",
        {at::Tag::pt2_compliant_tag});
  // Token routing's decode attention: query (B, Hq, D) of one token per row over its row's key and
  // value (B, Hkv, S, D), positions where mask (B, S) is nonzero and below length, for the rows
  // where keep (B,) is true only; the other rows are zero and their key and value never read.
  m.def(
      "token_decode_attention(Tensor query, Tensor key, Tensor value, Tensor keep, Tensor? mask,"
      " Tensor? length, float scale) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

#ifdef MINDSKIP_PYTHON_MODULE
// `import mindskip_ext._C` loads this library, which runs the registrations above. The module
// itself is empty: the ops are reached through torch.ops.mindskip.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mindskip_ext compiled ops (see torch.ops.mindskip)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
#endif
