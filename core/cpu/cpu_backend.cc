#include "core/cpu/cpu_backend.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_gemm.h"
#include "core/parallel/parallel_for.h"
#include "core/status_macros.h"

namespace specontext {

absl::Status CheckTensor(const Tensor& t, std::string_view what, DType dtype, int ndim) {
  if (t.empty() && t.numel() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": null tensor"));
  }
  if (t.dtype() != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": dtype ",
                                                   std::string(DTypeName(t.dtype())), ", expected ",
                                                   std::string(DTypeName(dtype))));
  }
  if (ndim >= 0 && t.ndim() != ndim) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": shape ",
                                                   ShapeToString(t.shape()), " has ", t.ndim(),
                                                   " dims, expected ", ndim));
  }
  return absl::OkStatus();
}

absl::Status CheckSameShape(const Tensor& a, const Tensor& b, std::string_view what) {
  if (a.shape() != b.shape()) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": shapes ",
                                                   ShapeToString(a.shape()), " and ",
                                                   ShapeToString(b.shape()), " differ"));
  }
  return absl::OkStatus();
}

absl::Status CheckBatch(const BatchDesc& batch, int layer, int64_t n_rows) {
  if (batch.seqs.size() != batch.kv.size()) {
    return absl::InvalidArgumentError("batch: one SequenceKv per slice is required");
  }
  if (batch.n_tokens != n_rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch has ", batch.n_tokens, " tokens but the activations have ", n_rows));
  }
  for (size_t i = 0; i < batch.seqs.size(); ++i) {
    const SeqSlice& s = batch.seqs[i];
    const SequenceKv* kv = batch.kv[i];
    if (kv == nullptr || layer < 0 || layer >= static_cast<int>(kv->k.size()) ||
        kv->k.size() != kv->v.size()) {
      return absl::InvalidArgumentError(absl::StrCat("batch: sequence ", i, " has no KV for layer ", layer));
    }
    if (s.n_tokens < 0 || s.past_len < 0 || s.token_begin < 0 || s.token_begin + s.n_tokens > n_rows) {
      return absl::InvalidArgumentError(absl::StrCat("batch: slice ", i, " is out of range"));
    }
    if (s.past_len + s.n_tokens > kv->capacity) {
      return absl::OutOfRangeError(absl::StrCat("batch: sequence ", i, " needs ", s.past_len + s.n_tokens,
                                                " KV slots but has capacity ", kv->capacity));
    }
    // Resident layers may hold fewer rows than the capacity (device KV grows in chunks).
    const Tensor &k = kv->k[layer], &v = kv->v[layer];
    if (k.ndim() != 3 || v.shape() != k.shape() || k.dim(1) < s.past_len + s.n_tokens || k.dim(1) > kv->capacity) {
      return absl::OutOfRangeError(absl::StrCat("batch: sequence ", i, " layer ", layer, " cache ", k.DebugString(),
                                                " / ", v.DebugString(), " does not hold ", s.past_len + s.n_tokens,
                                                " rows (capacity ", kv->capacity, ")"));
    }
  }
  return absl::OkStatus();
}

CpuBackend::CpuBackend(int64_t memory_limit) : memory_(std::make_shared<CpuMemory>(memory_limit)) {}

std::unique_ptr<Backend> MakeCpuBackend(int64_t memory_limit) {
  return std::make_unique<CpuBackend>(memory_limit);
}

int64_t CpuBackend::available_bytes() const {
  const MemoryReport r = memory_->Report();
  if (r.limit > 0) return std::max<int64_t>(0, r.limit - r.total);
  return int64_t{1} << 50;
}

absl::StatusOr<Tensor> CpuBackend::Alloc(DType dtype, Shape shape, MemoryKind kind) {
  return memory_->Alloc(dtype, std::move(shape), kind);
}

absl::StatusOr<Tensor> CpuBackend::ToDevice(const Tensor& host, DType dtype, MemoryKind kind) {
  ASSIGN_OR_RETURN(Tensor t, Alloc(dtype, host.shape(), kind));
  if (host.dtype() == dtype) {
    std::memcpy(t.data(), host.data(), host.nbytes());
  } else if (IsFloating(host.dtype()) && IsFloating(dtype)) {
    if (dtype == DType::kF32) {
      ConvertToF32(host.data(), host.dtype(), t.as<float>(), host.numel());
    } else {
      Tensor tmp = Tensor::HostEmpty(DType::kF32, host.shape());
      ConvertToF32(host.data(), host.dtype(), tmp.as<float>(), host.numel());
      ConvertFromF32(tmp.as<float>(), dtype, t.data(), host.numel());
    }
  } else {
    return absl::InvalidArgumentError(absl::StrCat("cannot convert ", std::string(DTypeName(host.dtype())),
                                                   " to ", std::string(DTypeName(dtype))));
  }
  return t;
}

absl::Status CpuBackend::CopyToDevice(const Tensor& host, Tensor* device) {
  if (host.dtype() != device->dtype() || host.numel() != device->numel()) {
    return absl::InvalidArgumentError(absl::StrCat("CopyToDevice: ", host.DebugString(), " into ",
                                                   device->DebugString()));
  }
  std::memcpy(device->data(), host.data(), host.nbytes());
  return absl::OkStatus();
}

absl::Status CheckCopyColumns(const Tensor& src, int64_t col_begin, const Tensor& dst) {
  if (src.ndim() != 2 || dst.ndim() != 2 || src.dtype() != dst.dtype() || src.dim(0) != dst.dim(0) ||
      col_begin < 0 || col_begin + dst.dim(1) > src.dim(1)) {
    return absl::InvalidArgumentError(absl::StrCat("CopyColumns: ", src.DebugString(), " columns from ", col_begin,
                                                   " into ", dst.DebugString()));
  }
  return absl::OkStatus();
}

void Copy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, int64_t height) {
  for (int64_t i = 0; i < height; ++i) {
    std::memcpy(static_cast<char*>(dst) + i * dpitch, static_cast<const char*>(src) + i * spitch, width);
  }
}

absl::Status CpuBackend::CopyColumns(const Tensor& src, int64_t col_begin, Tensor* dst) {
  RETURN_IF_ERROR(CheckCopyColumns(src, col_begin, *dst));
  const size_t es = DTypeSize(src.dtype());
  Copy2D(dst->data(), dst->dim(1) * es, static_cast<const char*>(src.data()) + col_begin * es, src.dim(1) * es,
         dst->dim(1) * es, src.dim(0));
  return absl::OkStatus();
}

absl::Status CpuBackend::Zero(Tensor* t) {
  std::memset(t->data(), 0, t->nbytes());
  return absl::OkStatus();
}

absl::Status CpuBackend::ToHost(const Tensor& device, Tensor* host) { return CopyToDevice(device, host); }

absl::Status CpuBackend::Embedding(const Tensor& table, const Tensor& ids, Tensor* out) {
  if (table.dtype() != DType::kBF16) RETURN_IF_ERROR(CheckTensor(table, "embedding table", DType::kF32, 2));
  RETURN_IF_ERROR(CheckTensor(ids, "embedding ids", DType::kI32, 1));
  RETURN_IF_ERROR(CheckTensor(*out, "embedding out", DType::kF32, 2));
  const int64_t n = ids.dim(0), d = table.dim(1), rows = table.dim(0);
  if (out->dim(0) != n || out->dim(1) != d) {
    return absl::InvalidArgumentError(absl::StrCat("embedding out ", ShapeToString(out->shape()),
                                                   ", expected [", n, ", ", d, "]"));
  }
  const int32_t* id = ids.as<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (id[i] < 0 || id[i] >= rows) {
      return absl::OutOfRangeError(absl::StrCat("token id ", id[i], " outside [0, ", rows, ")"));
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (table.dtype() == DType::kBF16) {
      ConvertToF32(table.as<uint16_t>() + id[i] * d, DType::kBF16, out->as<float>() + i * d, d);
    } else {
      std::memcpy(out->as<float>() + i * d, table.as<float>() + id[i] * d, d * sizeof(float));
    }
  }
  return absl::OkStatus();
}

namespace {

inline void RmsNormRow(const float* x, const float* w, float eps, int64_t d, float* out) {
  double ss = 0;
  for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(x[j]) * x[j];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / d) + eps);
  for (int64_t j = 0; j < d; ++j) out[j] = x[j] * inv * w[j];
}

}  // namespace

absl::Status CpuBackend::RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor* out) {
  RETURN_IF_ERROR(CheckTensor(x, "rmsnorm x", DType::kF32, 2));
  RETURN_IF_ERROR(CheckTensor(w, "rmsnorm weight", DType::kF32, 1));
  RETURN_IF_ERROR(CheckSameShape(x, *out, "rmsnorm x/out"));
  const int64_t n = x.dim(0), d = x.dim(1);
  if (w.dim(0) != d) return absl::InvalidArgumentError("rmsnorm weight size differs from row size");
  ParallelFor(n, 3 * d, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) RmsNormRow(x.as<float>() + i * d, w.as<float>(), eps, d, out->as<float>() + i * d);
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::AddRmsNorm(Tensor* residual, const Tensor& x, const Tensor& w, float eps,
                                    Tensor* out) {
  RETURN_IF_ERROR(CheckTensor(*residual, "add_rmsnorm residual", DType::kF32, 2));
  RETURN_IF_ERROR(CheckSameShape(*residual, x, "add_rmsnorm residual/x"));
  RETURN_IF_ERROR(CheckSameShape(*residual, *out, "add_rmsnorm residual/out"));
  const int64_t n = x.dim(0), d = x.dim(1);
  if (w.dim(0) != d) return absl::InvalidArgumentError("add_rmsnorm weight size differs from row size");
  ParallelFor(n, 4 * d, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* r = residual->as<float>() + i * d;
      const float* xi = x.as<float>() + i * d;
      for (int64_t j = 0; j < d; ++j) r[j] += xi[j];
      RmsNormRow(r, w.as<float>(), eps, d, out->as<float>() + i * d);
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor* out) {
  RETURN_IF_ERROR(CheckTensor(x, "linear x", DType::kF32, 2));
  if (w.dtype() != DType::kBF16) RETURN_IF_ERROR(CheckTensor(w, "linear weight", DType::kF32, 2));
  RETURN_IF_ERROR(CheckTensor(*out, "linear out", DType::kF32, 2));
  const int64_t n = x.dim(0), k = x.dim(1), m = w.dim(0);
  if (w.dim(1) != k || out->dim(0) != n || out->dim(1) != m) {
    return absl::InvalidArgumentError(absl::StrCat("linear: x ", ShapeToString(x.shape()), " w ",
                                                   ShapeToString(w.shape()), " out ",
                                                   ShapeToString(out->shape())));
  }
  if (bias != nullptr && (bias->ndim() != 1 || bias->dim(0) != m)) {
    return absl::InvalidArgumentError("linear: bias size differs from output features");
  }
  if (n == 0) return absl::OkStatus();
  if (w.dtype() == DType::kBF16) {
    LinearBf16(x.as<float>(), w.as<uint16_t>(), out->as<float>(), n, k, m, batch_invariant_);
  } else {
    LinearF32(x.as<float>(), w.as<float>(), out->as<float>(), n, k, m, batch_invariant_);
  }
  if (bias != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      float* o = out->as<float>() + i * m;
      for (int64_t j = 0; j < m; ++j) o[j] += bias->as<float>()[j];
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Rope(Tensor* x, const Tensor& positions, const RopeArgs& rope) {
  RETURN_IF_ERROR(CheckTensor(*x, "rope x", DType::kF32, 3));
  RETURN_IF_ERROR(CheckTensor(positions, "rope positions", DType::kI32, 1));
  if (rope.inv_freq == nullptr) return absl::InvalidArgumentError("rope: no inv_freq table");
  const int64_t n = x->dim(0), heads = x->dim(1), hd = x->dim(2), half = hd / 2;
  if (positions.dim(0) != n || rope.inv_freq->numel() != half || hd % 2 != 0) {
    return absl::InvalidArgumentError("rope: positions or inv_freq do not fit x");
  }
  const float* inv = rope.inv_freq->as<float>();
  ParallelFor(n, heads * hd * 8, [&](int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float pos = static_cast<float>(positions.as<int32_t>()[i]);
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x->as<float>() + (i * heads + h) * hd;
      for (int64_t j = 0; j < half; ++j) {
        const float angle = pos * inv[j];
        const float c = std::cos(angle) * rope.attention_scaling;
        const float s = std::sin(angle) * rope.attention_scaling;
        float* a = rope.interleaved ? &v[2 * j] : &v[j];
        float* b = rope.interleaved ? &v[2 * j + 1] : &v[j + half];
        const float x0 = *a, x1 = *b;
        *a = x0 * c - x1 * s;
        *b = x1 * c + x0 * s;
      }
    }
  }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::SwiGlu(const Tensor& gate, const Tensor& up, Tensor* out) {
  RETURN_IF_ERROR(CheckTensor(gate, "swiglu gate", DType::kF32, 2));
  RETURN_IF_ERROR(CheckSameShape(gate, up, "swiglu gate/up"));
  RETURN_IF_ERROR(CheckSameShape(gate, *out, "swiglu gate/out"));
  const int64_t total = gate.numel();
  const float* g = gate.as<float>();
  const float* u = up.as<float>();
  float* o = out->as<float>();
  ParallelFor(total, 10, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::PrepareBatch(const BatchDesc& batch) {
  int64_t n = 0;
  for (const SeqSlice& s : batch.seqs) n += s.n_tokens;
  if (n != batch.n_tokens) return absl::InvalidArgumentError("batch: n_tokens differs from the slices' sum");
  batch_ = batch;
  sparse_sets_.n_seqs = -1;  // a new batch needs its own PrepareSparseDecode
  dense_resident_sets_.n_seqs = 0;
  return absl::OkStatus();
}

}  // namespace specontext
