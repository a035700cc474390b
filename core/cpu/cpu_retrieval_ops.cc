// CPU backend ops used by the retrieval head on the backend (core/sparse/retrieval_head_device.h):
// column concatenation, per-head row copies, row scatter into per-sequence caches, and top-B selection (the reference).
// The argument checks are shared with the CUDA backend so both reject the same inputs.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/sparse/selection.h"
#include "core/status_macros.h"

namespace specontext {

absl::Status CheckCopyToColumns(const Tensor& src, int64_t col_begin, const Tensor& dst) {
  if (src.ndim() != 2 || dst.ndim() != 2 || src.dtype() != dst.dtype() || src.dim(0) != dst.dim(0) ||
      col_begin < 0 || col_begin + src.dim(1) > dst.dim(1)) {
    return absl::InvalidArgumentError(absl::StrCat("CopyToColumns: ", src.DebugString(), " into columns from ",
                                                   col_begin, " of ", dst.DebugString()));
  }
  return absl::OkStatus();
}

absl::Status CheckCopyHeadRows(const Tensor& src, const Tensor* dst, int64_t rows) {
  if (dst == nullptr || src.ndim() != 3 || dst->ndim() != 3 || src.dtype() != dst->dtype() ||
      src.dim(0) != dst->dim(0) || src.dim(2) != dst->dim(2) || rows < 0 || rows > src.dim(1) ||
      rows > dst->dim(1)) {
    return absl::InvalidArgumentError(absl::StrCat("CopyHeadRows: ", rows, " rows of ", src.DebugString(), " into ",
                                                   dst == nullptr ? std::string("null") : dst->DebugString()));
  }
  return absl::OkStatus();
}

absl::Status CheckCopyKvPairRows(const Tensor* k, const Tensor* v, const Tensor* pair, int64_t rows) {
  const auto fits = [&](const Tensor* t) {
    return t != nullptr && t->ndim() == 3 && t->dtype() == pair->dtype() && t->dim(0) == pair->dim(0) &&
           t->dim(2) == pair->dim(-1) && rows <= t->dim(1);
  };
  if (pair == nullptr || !IsKvPair(*pair) || !fits(k) || !fits(v) || rows < 0 || rows > pair->dim(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CopyKvPairRows: ", rows, " rows between k ", k == nullptr ? std::string("null") : k->DebugString(), ", v ",
        v == nullptr ? std::string("null") : v->DebugString(), " and pair ",
        pair == nullptr ? std::string("null") : pair->DebugString(), " (expected [heads, rows, d] and [heads, C, 2, d] or [heads, C, G, 2, d])"));
  }
  return absl::OkStatus();
}

void CopyKvPairRowsOn(const KvPairCopy& c, const std::function<void(void*, size_t, const void*, size_t, size_t, int64_t)>& copy_2d) {
  const int64_t pitch = c.pair_pitch > 0 ? c.pair_pitch : 2 * c.row_bytes;
  for (int64_t h = 0; h < c.heads && c.rows > 0; ++h) {
    for (int half = 0; half < 2; ++half) {
      char* plain = (half == 0 ? c.k : c.v) + h * (half == 0 ? c.k_rows : c.v_rows) * c.row_bytes;
      char* inter = c.pair + h * c.pair_rows * pitch + half * c.row_bytes;
      if (c.to_pair) {
        copy_2d(inter, pitch, plain, c.row_bytes, c.row_bytes, c.rows);
      } else {
        copy_2d(plain, c.row_bytes, inter, pitch, c.row_bytes, c.rows);
      }
    }
  }
}

KvPairCopy KvPairCopyOf(Tensor* k, Tensor* v, Tensor* pair, int64_t rows, bool to_pair) {
  const int64_t es = static_cast<int64_t>(DTypeSize(pair->dtype()));
  return {static_cast<char*>(k->data()), k->dim(1), static_cast<char*>(v->data()), v->dim(1),
          static_cast<char*>(pair->data()), pair->dim(1), pair->dim(0), rows, pair->dim(-1) * es, to_pair,
          KvRowsOf(*pair, *pair).stride * es};
}

absl::Status CheckScatterRows(const Tensor& src, std::span<const RowScatter> segments) {
  if (src.ndim() != 3) {
    return absl::InvalidArgumentError(absl::StrCat("ScatterRows: source ", src.DebugString(),
                                                   " must be [n, heads, d]"));
  }
  const int64_t n = src.dim(0), heads = src.dim(1), d = src.dim(2);
  for (size_t s = 0; s < segments.size(); ++s) {
    const RowScatter& g = segments[s];
    const Tensor* dst = g.dst;
    if (dst == nullptr || dst->ndim() != 3 || dst->dtype() != src.dtype() || dst->dim(0) != heads ||
        dst->dim(2) != d) {
      return absl::InvalidArgumentError(absl::StrCat("ScatterRows: segment ", s, " destination ",
                                                     dst == nullptr ? "null" : dst->DebugString(),
                                                     " does not fit source ", src.DebugString()));
    }
    if (g.n_rows < 0 || g.row_begin < 0 || g.row_begin + g.n_rows > n || g.pos < 0 ||
        g.pos + static_cast<int64_t>(g.n_rows) > dst->dim(1)) {
      return absl::OutOfRangeError(absl::StrCat("ScatterRows: segment ", s, " rows [", g.row_begin, ", ",
                                                g.row_begin + g.n_rows, ") of ", n, " to positions [", g.pos,
                                                ", ", g.pos + g.n_rows, ") of capacity ", dst->dim(1)));
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyToColumns(const Tensor& src, int64_t col_begin, Tensor* dst) {
  RETURN_IF_ERROR(CheckCopyToColumns(src, col_begin, *dst));
  const size_t es = DTypeSize(src.dtype());
  Copy2D(static_cast<char*>(dst->data()) + col_begin * es, dst->dim(1) * es, src.data(), src.dim(1) * es,
         src.dim(1) * es, src.dim(0));
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyHeadRows(const Tensor& src, Tensor* dst, int64_t rows) {
  RETURN_IF_ERROR(CheckCopyHeadRows(src, dst, rows));
  const size_t row_bytes = src.dim(2) * DTypeSize(src.dtype());
  Copy2D(dst->data(), dst->dim(1) * row_bytes, src.data(), src.dim(1) * row_bytes, rows * row_bytes, src.dim(0));
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyKvPairRows(Tensor* k, Tensor* v, Tensor* pair, int64_t rows, bool to_pair) {
  RETURN_IF_ERROR(CheckCopyKvPairRows(k, v, pair, rows));
  CopyKvPairRowsOn(KvPairCopyOf(k, v, pair, rows, to_pair), Copy2D);
  return absl::OkStatus();
}

absl::Status CpuBackend::ScatterRows(const Tensor& src, std::span<const RowScatter> segments) {
  RETURN_IF_ERROR(CheckScatterRows(src, segments));
  const int64_t heads = src.dim(1);
  const size_t row_bytes = src.dim(2) * DTypeSize(src.dtype());
  for (const RowScatter& g : segments) {
    const int64_t cap = g.dst->dim(1);
    for (int32_t r = 0; r < g.n_rows; ++r) {
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(static_cast<char*>(g.dst->data()) + (h * cap + g.pos + r) * row_bytes,
                    static_cast<const char*>(src.data()) + ((g.row_begin + r) * heads + h) * row_bytes, row_bytes);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::SelectIndexSets(const SelectionQuery* batch, size_t n, const SelectionOptions& options,
                                         SelectionResult* out) {
  return SelectTopB(std::span<const SelectionQuery>(batch, n), options, out);
}

}  // namespace specontext
