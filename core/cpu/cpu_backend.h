// The CPU backend: f32 everywhere, GEMMs through OpenBLAS, other ops threaded with OpenMP.
// It is the reference every other backend is compared with.
#pragma once

#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/cpu/cpu_memory.h"

namespace specontext {

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(int64_t memory_limit);

  DeviceKind device() const override { return DeviceKind::kCpu; }
  std::string name() const override { return "cpu"; }
  DType compute_dtype() const override { return DType::kF32; }
  // bf16 checkpoints stay bf16 (half the bytes decode must read); everything else becomes f32.
  DType weight_dtype(DType stored) const override { return stored == DType::kBF16 ? DType::kBF16 : DType::kF32; }

  absl::StatusOr<Tensor> Alloc(DType dtype, Shape shape, MemoryKind kind) override;
  absl::StatusOr<Tensor> ToDevice(const Tensor& host, DType dtype, MemoryKind kind) override;
  absl::Status CopyToDevice(const Tensor& host, Tensor* device) override;
  absl::Status ToHost(const Tensor& device, Tensor* host) override;
  absl::Status CopyDevice(const Tensor& src, Tensor* dst) override { return CopyToDevice(src, dst); }
  absl::Status Zero(Tensor* t) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }
  MemoryReport memory_report() const override { return memory_->Report(); }
  int64_t available_bytes() const override;

  absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor* out) override;
  absl::Status RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor* out) override;
  absl::Status AddRmsNorm(Tensor* residual, const Tensor& x, const Tensor& w, float eps,
                          Tensor* out) override;
  absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor* out) override;
  absl::Status Rope(Tensor* x, const Tensor& positions, const RopeArgs& rope) override;
  absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor* out) override;
  absl::Status PrepareBatch(const BatchDesc& batch) override;
  absl::Status KvAppend(int layer, const Tensor& k, const Tensor& v) override;
  absl::Status Attention(int layer, const Tensor& q, float scale, Tensor* out) override;

 private:
  std::shared_ptr<CpuMemory> memory_;
  BatchDesc batch_;
};

// Shape checks shared by the backends' argument validation.
absl::Status CheckTensor(const Tensor& t, std::string_view what, DType dtype, int ndim);
absl::Status CheckSameShape(const Tensor& a, const Tensor& b, std::string_view what);
// Validates a ragged batch against q/k rows and each sequence's KV capacity and layer count.
absl::Status CheckBatch(const BatchDesc& batch, int layer, int64_t n_rows);

}  // namespace specontext
