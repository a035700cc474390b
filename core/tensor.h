// A tensor is a typed, shaped view of memory on one device, optionally keeping its storage alive.
// Tensors are row-major and contiguous; shapes carry up to 4 dimensions.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "absl/container/inlined_vector.h"
#include "absl/status/statusor.h"
#include "core/dtype.h"

namespace specontext {

enum class DeviceKind : uint8_t { kCpu, kCuda };

using Shape = absl::InlinedVector<int64_t, 4>;

std::string ShapeToString(const Shape& shape);
int64_t NumElements(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;
  Tensor(void* data, DType dtype, Shape shape, DeviceKind device = DeviceKind::kCpu,
         std::shared_ptr<void> storage = nullptr)
      : data_(data), dtype_(dtype), shape_(std::move(shape)), device_(device),
        storage_(std::move(storage)) {}

  // Allocates zero-initialised, 64-byte aligned host memory.
  static Tensor HostEmpty(DType dtype, Shape shape);

  void* data() const { return data_; }
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int64_t numel() const { return NumElements(shape_); }
  size_t nbytes() const { return DTypeBytes(dtype_, static_cast<uint64_t>(numel())); }
  DeviceKind device() const { return device_; }
  bool empty() const { return data_ == nullptr; }
  const std::shared_ptr<void>& storage() const { return storage_; }

  // Same memory, another shape with the same element count.
  absl::StatusOr<Tensor> Reshape(Shape shape) const;
  // Rows [begin, end) along dimension 0.
  Tensor Rows(int64_t begin, int64_t end) const;

  std::string DebugString() const;

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  Shape shape_;
  DeviceKind device_ = DeviceKind::kCpu;
  std::shared_ptr<void> storage_;
};

}  // namespace specontext
