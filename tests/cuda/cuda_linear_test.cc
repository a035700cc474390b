// Linear (cuBLAS and the custom GEMV) against the CPU backend: odd shapes, bias, f32 logits out.
#include <cmath>
#include <string>

#include "core/backend.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct Shape3 {
  int64_t n, k, m;
};

void CheckLinear(Backend& gpu, const Shape3& s, bool with_bias, DType out_dtype, std::mt19937& rng) {
  auto cpu = MakeCpuBackend();
  // Weights scaled by 1/sqrt(k) keep outputs O(1) whatever k is.
  const float ws = 1.0f / std::sqrt(static_cast<float>(s.k));
  Tensor x = RandomHost({s.n, s.k}, rng), w = RandomHost({s.m, s.k}, rng, -ws, ws);
  Tensor bias = RandomHost({s.m}, rng, -0.5f, 0.5f);
  auto cx = *cpu->ToDevice(x, DType::kF32, MemoryKind::kOther);
  auto cw = *cpu->ToDevice(w, DType::kF32, MemoryKind::kWeights);
  auto cb = *cpu->ToDevice(bias, DType::kF32, MemoryKind::kWeights);
  auto cout = *cpu->Alloc(DType::kF32, {s.n, s.m}, MemoryKind::kOther);
  ASSERT_TRUE(cpu->Linear(cx, cw, with_bias ? &cb : nullptr, &cout).ok());
  auto gx = *gpu.ToDevice(x, DType::kBF16, MemoryKind::kOther);
  auto gw = *gpu.ToDevice(w, DType::kBF16, MemoryKind::kWeights);
  auto gb = *gpu.ToDevice(bias, DType::kBF16, MemoryKind::kWeights);
  // Poison the output so an unwritten element cannot pass.
  Tensor poison = RandomHost({s.n, s.m}, rng, 1e4f, 2e4f);
  auto gout = *gpu.ToDevice(poison, out_dtype, MemoryKind::kOther);
  absl::Status st = gpu.Linear(gx, gw, with_bias ? &gb : nullptr, &gout);
  ASSERT_TRUE(st.ok()) << st;
  const std::string what = "linear n=" + std::to_string(s.n) + " k=" + std::to_string(s.k) + " m=" +
                           std::to_string(s.m) + (with_bias ? " bias" : "") +
                           (out_dtype == DType::kF32 ? " f32out" : " bf16out");
  // f32 accumulation of exact bf16 products; bf16 output rounding dominates when out is bf16.
  const Tolerance tol = out_dtype == DType::kF32 ? Tolerance{2e-3, 2e-3, 2e-3} : Tolerance{1e-2, 1e-2, 8e-3};
  ExpectClose(DeviceToF32(gpu, gout), cout, tol, what);
}

TEST(CudaLinearTest, CublasMatchesCpu) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  for (const Shape3& s : {Shape3{1, 4096, 97}, Shape3{3, 17, 33}, Shape3{17, 2049, 130}, Shape3{32, 512, 1000},
                          Shape3{97, 64, 2049}, Shape3{256, 1024, 384}}) {
    for (bool bias : {false, true}) {
      for (DType out : {DType::kBF16, DType::kF32}) CheckLinear(*gpu, s, bias, out, rng);
    }
  }
}

TEST(CudaLinearTest, GemvPathMatchesCpu) {
  CudaBackendOptions opts;
  opts.gemv_max_n = 8;
  SPC_GPU_OR_SKIP(gpu, opts);
  std::mt19937 rng(FreshSeed());
  for (int64_t n : {1, 2, 3, 5, 8, 9}) {  // 9 falls back to cuBLAS
    for (const Shape3& s : {Shape3{n, 4096, 97}, Shape3{n, 72, 17}, Shape3{n, 2048 + 8, 1031}, Shape3{n, 8, 5}}) {
      for (bool bias : {false, true}) {
        for (DType out : {DType::kBF16, DType::kF32}) CheckLinear(*gpu, s, bias, out, rng);
      }
    }
  }
}

TEST(CudaLinearTest, RejectsMismatchedShapes) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  auto gx = *gpu->ToDevice(RandomHost({2, 16}, rng), DType::kBF16, MemoryKind::kOther);
  auto gw = *gpu->ToDevice(RandomHost({8, 15}, rng), DType::kBF16, MemoryKind::kOther);
  auto gout = *gpu->Alloc(DType::kBF16, {2, 8}, MemoryKind::kOther);
  EXPECT_EQ(gpu->Linear(gx, gw, nullptr, &gout).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace specontext::testing
