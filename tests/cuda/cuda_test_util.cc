#include "tests/cuda/cuda_test_util.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace specontext::testing {

std::unique_ptr<Backend> MakeGpuOrNull(const CudaBackendOptions& options) {
  if (CudaDeviceCount() == 0) return nullptr;
  auto b = MakeCudaBackend(options);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

uint32_t FreshSeed() {
  static std::random_device rd;
  return rd();
}

Tensor RandomHost(const Shape& shape, std::mt19937& rng, float lo, float hi) {
  Tensor t = Tensor::HostEmpty(DType::kF32, shape);
  std::uniform_real_distribution<float> dist(lo, hi);
  float* p = t.as<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = Bf16ToF32(F32ToBf16(dist(rng)));
  return t;
}

Tensor DeviceToF32(Backend& backend, const Tensor& t) {
  Tensor raw = Tensor::HostEmpty(t.dtype(), t.shape());
  absl::Status s = backend.ToHost(t, &raw);
  EXPECT_TRUE(s.ok()) << s;
  if (t.dtype() == DType::kF32) return raw;
  Tensor f = Tensor::HostEmpty(DType::kF32, t.shape());
  ConvertToF32(raw.data(), raw.dtype(), f.as<float>(), raw.numel());
  return f;
}

void ExpectClose(const Tensor& got, const Tensor& ref, const Tolerance& tol, const std::string& what) {
  ASSERT_EQ(got.numel(), ref.numel()) << what;
  const float* g = got.as<float>();
  const float* r = ref.as<float>();
  int64_t bad = 0;
  double diff2 = 0, ref2 = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double d = std::fabs(static_cast<double>(g[i]) - r[i]);
    diff2 += d * d;
    ref2 += static_cast<double>(r[i]) * r[i];
    if (!std::isfinite(g[i]) || !(d <= tol.atol + tol.rtol * std::fabs(r[i]))) {
      if (++bad <= 5) {
        ADD_FAILURE() << what << ": element " << i << " got " << g[i] << " want " << r[i];
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.numel() << " elements out of tolerance";
  const double rel = ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
  EXPECT_LE(rel, tol.max_rel_norm) << what << ": relative L2 error";
}

}  // namespace specontext::testing
