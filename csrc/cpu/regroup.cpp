// CPU regroup ops. gather_kept / pack_kept are both a row gather, scatter_add_kept_ /
// unpack_add_kept_ both a row scatter-add; they differ only in what a "row" is (a whole
// sequence, or one token) and so share the two row kernels below.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../common.h"
#include "simd.h"

namespace mindskip::cpu {
namespace {

// Rows are split into tiles of this many bytes so a few long rows still use every thread.
constexpr int64_t kTileBytes = 64 * 1024;

void check_rows_in_range(const int64_t* index, int64_t count, int64_t rows, const char* op,
                         const char* name) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(index[i] >= 0 && index[i] < rows, op, ": ", name, "[", i, "] = ", index[i],
                " is out of range [0, ", rows, ")");
  }
}

// Calls body(i, offset, n) for each tile of rows i < count: a row of row_size units (bytes or
// elements) is cut into tiles of at most `tile` units, and the tiles are spread over the threads.
template <typename Body>
void for_each_tile(int64_t count, int64_t row_size, int64_t tile, const Body& body) {
  const int64_t tiles = (row_size + tile - 1) / tile;
  at::parallel_for(0, count * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t offset = (item % tiles) * tile;
      body(item / tiles, offset, std::min(tile, row_size - offset));
    }
  });
}

// A fresh output is first touched by the copy that fills it. On Linux, ask for transparent huge
// pages on its 2 MiB-aligned interior, so that first touch costs one page fault per 2 MiB instead
// of one per 4 KiB (several times faster for large outputs). Only a hint: no effect when THP is off.
void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < static_cast<int64_t>(2 * kHuge)) {
    return;
  }
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
}

// dst[i] = src[index[i]] for i < count; rows of row_bytes bytes (any dtype). dst is a fresh
// allocation of count * row_bytes bytes.
void gather_rows(const char* src, char* dst, const int64_t* index, int64_t count,
                 int64_t row_bytes) {
  if (count == 0 || row_bytes == 0) {
    return;
  }
  advise_huge_pages(dst, count * row_bytes);
  for_each_tile(count, row_bytes, kTileBytes, [&](int64_t i, int64_t offset, int64_t bytes) {
    std::memcpy(dst + i * row_bytes + offset, src + index[i] * row_bytes + offset, bytes);
  });
}

// dst[index[i]] += src[i] for i < count, accumulated in fp32 (fp64 for double). The indices
// must be distinct; rows not named are never read or written.
template <typename scalar_t>
void scatter_add_rows(scalar_t* dst, const scalar_t* src, const int64_t* index, int64_t count,
                      int64_t row_elems) {
  if (count == 0 || row_elems == 0) {
    return;
  }
  const int64_t tile = std::max<int64_t>(1, kTileBytes / static_cast<int64_t>(sizeof(scalar_t)));
  for_each_tile(count, row_elems, tile, [&](int64_t i, int64_t offset, int64_t n) {
    add_inplace(dst + index[i] * row_elems + offset, src + i * row_elems + offset, n);
  });
}

// out[order[j]] = residual[order[j]] (+ src[j] for j < count) for j < batch, accumulated in fp32
// (fp64 for double): residual with the rows order[:count] added to, as a fresh tensor. order is a
// permutation of range(batch), so every row of out is written once.
template <typename scalar_t>
void scatter_add_rows_out(scalar_t* out, const scalar_t* residual, const scalar_t* src,
                          const int64_t* order, int64_t batch, int64_t count, int64_t row_elems) {
  if (batch == 0 || row_elems == 0) {
    return;
  }
  advise_huge_pages(out, batch * row_elems * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t tile = std::max<int64_t>(1, kTileBytes / static_cast<int64_t>(sizeof(scalar_t)));
  for_each_tile(batch, row_elems, tile, [&](int64_t j, int64_t offset, int64_t n) {
    const int64_t base = order[j] * row_elems + offset;
    std::memcpy(out + base, residual + base, n * sizeof(scalar_t));
    if (j < count) {
      add_inplace(out + base, src + j * row_elems + offset, n);
    }
  });
}

// The body of gather_kept and pack_kept, given their checked plan: x's rows index[:count], in a
// fresh tensor.
at::Tensor gather_by_plan(const at::Tensor& x_in, const at::Tensor& index_in, const RowPlan& plan,
                          const char* op, const char* index_name) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t* rows = index.const_data_ptr<int64_t>();
  check_rows_in_range(rows, plan.count, plan.rows, op, index_name);
  at::Tensor out = at::empty(plan.packed_shape(x), x.options());
  gather_rows(static_cast<const char*>(x.const_data_ptr()), static_cast<char*>(out.mutable_data_ptr()),
              rows, plan.count, plan.row_elems * x.element_size());
  return out;
}

// The body of scatter_add_kept_ and unpack_add_kept_, given their checked plan: residual's rows
// index[:count] += src's rows, in place.
void scatter_add_by_plan(const at::Tensor& residual, const at::Tensor& src_in,
                         const at::Tensor& index_in, const RowPlan& plan, const char* op,
                         const char* index_name) {
  const at::Tensor index = index_in.contiguous();
  const int64_t* rows = index.const_data_ptr<int64_t>();
  check_rows_in_range(rows, plan.count, plan.rows, op, index_name);
  const at::Tensor src = src_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "scatter_add_rows", [&] {
    scatter_add_rows<scalar_t>(residual.mutable_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(),
                               rows, plan.count, plan.row_elems);
  });
}

at::Tensor gather_kept_cpu(const at::Tensor& x, const at::Tensor& order, int64_t k) {
  constexpr const char* op = "mindskip::gather_kept";
  return gather_by_plan(x, order, check_gather_kept(x, order, k, op), op, "order");
}

void scatter_add_kept_cpu(const at::Tensor& residual, const at::Tensor& y,
                          const at::Tensor& order) {
  constexpr const char* op = "mindskip::scatter_add_kept_";
  scatter_add_by_plan(residual, y, order, check_scatter_add_kept(residual, y, order, op), op,
                      "order");
}

at::Tensor scatter_add_kept_out_cpu(const at::Tensor& residual_in, const at::Tensor& y_in,
                                    const at::Tensor& order_in) {
  constexpr const char* op = "mindskip::scatter_add_kept";
  const RowPlan plan = check_scatter_add_kept(residual_in, y_in, order_in, op, /*in_place=*/false);
  const at::Tensor order = order_in.contiguous();
  const int64_t* rows = order.const_data_ptr<int64_t>();
  check_rows_in_range(rows, plan.rows, plan.rows, op, "order");
  const at::Tensor residual = residual_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  at::Tensor out = at::empty(residual.sizes(), residual.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "scatter_add_rows_out", [&] {
    scatter_add_rows_out<scalar_t>(out.mutable_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(),
                                   y.const_data_ptr<scalar_t>(), rows, plan.rows, plan.count,
                                   plan.row_elems);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_plan_cpu(
    const std::optional<at::Tensor>& mask_in, const at::Tensor& order_in, int64_t k,
    int64_t seqlen) {
  constexpr const char* op = "mindskip::pack_plan";
  const int64_t batch = check_pack_plan(order_in, k, seqlen, op);
  const at::Tensor order = order_in.contiguous();
  const at::Tensor mask = real_token_mask(mask_in, batch, seqlen, order, op, "order");
  const bool* real = mask_data(mask);
  const int64_t* rows = order.const_data_ptr<int64_t>();
  check_rows_in_range(rows, k, batch, op, "order");

  const auto opts = order.options();
  at::Tensor cu_seqlens = at::empty({k + 1}, opts.dtype(at::kInt));
  at::Tensor token_index = at::empty({k * seqlen}, opts.dtype(at::kLong));
  at::Tensor max_len = at::empty({1}, opts.dtype(at::kInt));
  int32_t* cu = cu_seqlens.mutable_data_ptr<int32_t>();
  int64_t* index = token_index.mutable_data_ptr<int64_t>();

  cu[0] = 0;
  int32_t longest = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t length =
        real == nullptr ? seqlen : std::count(real + rows[j] * seqlen, real + (rows[j] + 1) * seqlen, true);
    cu[j + 1] = cu[j] + static_cast<int32_t>(length);
    longest = std::max(longest, static_cast<int32_t>(length));
  }
  max_len.mutable_data_ptr<int32_t>()[0] = longest;

  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int64_t pos = cu[j];
      const int64_t base = rows[j] * seqlen;
      for (int64_t t = 0; t < seqlen; ++t) {
        if (real == nullptr || real[base + t]) {
          index[pos++] = base + t;
        }
      }
    }
  });
  std::fill(index + cu[k], index + k * seqlen, int64_t(0));
  return {cu_seqlens, token_index, max_len};
}

at::Tensor pack_kept_cpu(const at::Tensor& x, const at::Tensor& token_index, int64_t total) {
  constexpr const char* op = "mindskip::pack_kept";
  return gather_by_plan(x, token_index, check_pack_kept(x, token_index, total, op), op,
                        "token_index");
}

void unpack_add_kept_cpu(const at::Tensor& residual, const at::Tensor& packed,
                         const at::Tensor& token_index) {
  constexpr const char* op = "mindskip::unpack_add_kept_";
  scatter_add_by_plan(residual, packed, token_index,
                      check_unpack_add_kept(residual, packed, token_index, op), op, "token_index");
}

}  // namespace

TORCH_LIBRARY_IMPL(mindskip, CPU, m) {
  m.impl("gather_kept", &gather_kept_cpu);
  m.impl("scatter_add_kept_", &scatter_add_kept_cpu);
  m.impl("scatter_add_kept", &scatter_add_kept_out_cpu);
  m.impl("pack_plan", &pack_plan_cpu);
  m.impl("pack_kept", &pack_kept_cpu);
  m.impl("unpack_add_kept_", &unpack_add_kept_cpu);
}

}  // namespace mindskip::cpu
