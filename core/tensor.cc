#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace specontext {

std::string ShapeToString(const Shape& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Tensor Tensor::HostEmpty(DType dtype, Shape shape) {
  const size_t bytes = DTypeBytes(dtype, static_cast<uint64_t>(NumElements(shape)));
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  std::memset(p, 0, rounded == 0 ? 64 : rounded);
  std::shared_ptr<void> storage(p, [](void* q) { std::free(q); });
  return Tensor(p, dtype, std::move(shape), DeviceKind::kCpu, std::move(storage));
}

absl::StatusOr<Tensor> Tensor::Reshape(Shape shape) const {
  if (NumElements(shape) != numel()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot reshape ", ShapeToString(shape_), " to ",
                                                   ShapeToString(shape)));
  }
  return Tensor(data_, dtype_, std::move(shape), device_, storage_);
}

Tensor Tensor::Rows(int64_t begin, int64_t end) const {
  int64_t row = numel() / (shape_.empty() || shape_[0] == 0 ? 1 : shape_[0]);
  Shape s = shape_;
  s[0] = end - begin;
  char* p = static_cast<char*>(data_) + begin * row * static_cast<int64_t>(DTypeSize(dtype_));
  return Tensor(p, dtype_, std::move(s), device_, storage_);
}

std::string Tensor::DebugString() const {
  return absl::StrCat(std::string(DTypeName(dtype_)), ShapeToString(shape_),
                      device_ == DeviceKind::kCuda ? "@cuda" : "@cpu");
}

}  // namespace specontext
