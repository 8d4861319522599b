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
  const int64_t tiles = (row_bytes + kTileBytes - 1) / kTileBytes;
  at::parallel_for(0, count * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / tiles;
      const int64_t offset = (item % tiles) * kTileBytes;
      const int64_t bytes = std::min(kTileBytes, row_bytes - offset);
      std::memcpy(dst + i * row_bytes + offset, src + index[i] * row_bytes + offset, bytes);
    }
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
  const int64_t tiles = (row_elems + tile - 1) / tile;
  at::parallel_for(0, count * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / tiles;
      const int64_t offset = (item % tiles) * tile;
      const int64_t n = std::min(tile, row_elems - offset);
      add_inplace(dst + index[i] * row_elems + offset, src + i * row_elems + offset, n);
    }
  });
}

void scatter_add_rows(const at::Tensor& dst, const at::Tensor& src, const int64_t* index,
                      int64_t count, int64_t row_elems) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "scatter_add_rows", [&] {
    scatter_add_rows<scalar_t>(dst.mutable_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(),
                               index, count, row_elems);
  });
}

at::Tensor gather_kept_cpu(const at::Tensor& x_in, const at::Tensor& order_in, int64_t k) {
  constexpr const char* op = "mindskip::gather_kept";
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have a batch dimension, got a 0-d tensor");
  const int64_t batch = x_in.size(0);
  check_order(order_in, batch, x_in, op, "x");
  check_count(k, batch, op, "k", "B");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const int64_t* rows = order.const_data_ptr<int64_t>();
  check_rows_in_range(rows, k, batch, op, "order");
  at::Tensor out = at::empty(with_leading(k, x.sizes().slice(1)), x.options());
  const int64_t row_bytes = (batch == 0 ? 0 : x.numel() / batch) * x.element_size();
  gather_rows(static_cast<const char*>(x.const_data_ptr()), static_cast<char*>(out.mutable_data_ptr()),
              rows, k, row_bytes);
  return out;
}

void scatter_add_kept_cpu(const at::Tensor& residual, const at::Tensor& y_in,
                          const at::Tensor& order_in) {
  constexpr const char* op = "mindskip::scatter_add_kept_";
  TORCH_CHECK(residual.dim() >= 1, op, ": residual must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(y_in.dim() == residual.dim(), op, ": y must have the rank of residual (",
              residual.dim(), "), got shape ", y_in.sizes());
  check_same_device(y_in, residual, op, "y", "residual");
  check_same_row_shape(y_in, 1, residual, 1, op, "y", "residual");
  check_scatter_dtypes(residual, y_in, op, "residual", "y");
  const int64_t batch = residual.size(0);
  check_order(order_in, batch, residual, op, "residual");
  const at::Tensor order = order_in.contiguous();
  const int64_t k = y_in.size(0);
  check_count(k, batch, op, "y.size(0)", "B");
  const int64_t* rows = order.const_data_ptr<int64_t>();
  check_rows_in_range(rows, k, batch, op, "order");
  const at::Tensor y = y_in.contiguous();
  const int64_t row_elems = batch == 0 ? 0 : residual.numel() / batch;
  scatter_add_rows(residual, y, rows, k, row_elems);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_plan_cpu(
    const std::optional<at::Tensor>& mask_in, const at::Tensor& order_in, int64_t k,
    int64_t seqlen) {
  constexpr const char* op = "mindskip::pack_plan";
  TORCH_CHECK(order_in.dim() == 1, op, ": order must have shape (B,), got ", order_in.sizes());
  const int64_t batch = order_in.size(0);
  check_order(order_in, batch, order_in, op, "order");
  const at::Tensor order = order_in.contiguous();
  check_count(k, batch, op, "k", "B");
  TORCH_CHECK(seqlen >= 0, op, ": seqlen must be non-negative, got ", seqlen);
  const at::Tensor mask = real_token_mask(mask_in, batch, seqlen, order, op, "order");
  const bool* real = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
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

at::Tensor pack_kept_cpu(const at::Tensor& x_in, const at::Tensor& index_in, int64_t total) {
  constexpr const char* op = "mindskip::pack_kept";
  TORCH_CHECK(x_in.dim() >= 2, op, ": x must have shape (B, T, ...), got rank ", x_in.dim());
  check_index(index_in, total, x_in, op, "token_index", "x");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor token_index = index_in.contiguous();
  const int64_t tokens = x.size(0) * x.size(1);
  const int64_t* rows = token_index.const_data_ptr<int64_t>();
  check_rows_in_range(rows, total, tokens, op, "token_index");
  at::Tensor out = at::empty(with_leading(total, x.sizes().slice(2)), x.options());
  const int64_t row_bytes = (tokens == 0 ? 0 : x.numel() / tokens) * x.element_size();
  gather_rows(static_cast<const char*>(x.const_data_ptr()), static_cast<char*>(out.mutable_data_ptr()),
              rows, total, row_bytes);
  return out;
}

void unpack_add_kept_cpu(const at::Tensor& residual, const at::Tensor& packed_in,
                         const at::Tensor& index_in) {
  constexpr const char* op = "mindskip::unpack_add_kept_";
  TORCH_CHECK(residual.dim() >= 2, op, ": residual must have shape (B, T, ...), got rank ",
              residual.dim());
  TORCH_CHECK(packed_in.dim() == residual.dim() - 1, op,
              ": packed must have shape (total, ...) with rank ", residual.dim() - 1, ", got ",
              packed_in.sizes());
  check_same_device(packed_in, residual, op, "packed", "residual");
  check_same_row_shape(packed_in, 1, residual, 2, op, "packed", "residual");
  check_scatter_dtypes(residual, packed_in, op, "residual", "packed");
  const int64_t total = packed_in.size(0);
  check_index(index_in, total, residual, op, "token_index", "residual");
  const at::Tensor token_index = index_in.contiguous();
  const int64_t tokens = residual.size(0) * residual.size(1);
  const int64_t* rows = token_index.const_data_ptr<int64_t>();
  check_rows_in_range(rows, total, tokens, op, "token_index");
  const at::Tensor packed = packed_in.contiguous();
  const int64_t row_elems = tokens == 0 ? 0 : residual.numel() / tokens;
  scatter_add_rows(residual, packed, rows, total, row_elems);
}

}  // namespace

TORCH_LIBRARY_IMPL(mindskip, CPU, m) {
  m.impl("gather_kept", &gather_kept_cpu);
  m.impl("scatter_add_kept_", &scatter_add_kept_cpu);
  m.impl("pack_plan", &pack_plan_cpu);
  m.impl("pack_kept", &pack_kept_cpu);
  m.impl("unpack_add_kept_", &unpack_add_kept_cpu);
}

}  // namespace mindskip::cpu
