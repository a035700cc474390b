// Shared helpers of the CUDA tests: backends, random bf16-representable inputs, copies, and an
// element-wise comparison of the form |got - ref| <= atol + rtol * |ref| with a NaN/Inf check.
#pragma once

#include <memory>
#include <random>
#include <string>

#include "core/backend.h"
#include "core/cuda/cuda_backend.h"
#include "gtest/gtest.h"

namespace specontext::testing {

// The GPU backend, or null (the caller skips) when no GPU is present.
std::unique_ptr<Backend> MakeGpuOrNull(const CudaBackendOptions& options = {});

#define SPC_GPU_OR_SKIP(var, ...)                                \
  std::unique_ptr<Backend> var = ::specontext::testing::MakeGpuOrNull(__VA_ARGS__); \
  if (var == nullptr) GTEST_SKIP() << "no CUDA device"

// A fresh seed per call (and printed on failure through the test's own messages).
uint32_t FreshSeed();

// Host f32 tensor with values uniform in [lo, hi), rounded to bf16 so that both backends see
// exactly the same inputs.
Tensor RandomHost(const Shape& shape, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f);

// Copies a device tensor (any float dtype) back as host f32.
Tensor DeviceToF32(Backend& backend, const Tensor& t);

struct Tolerance {
  double atol = 1e-2;
  double rtol = 1e-2;
  double max_rel_norm = 1e-2;  // ||got - ref|| / ||ref||
};

// Non-fatal expectations; reports the first mismatches with their index.
void ExpectClose(const Tensor& got, const Tensor& ref, const Tolerance& tol, const std::string& what);

}  // namespace specontext::testing
