// Row and element ops of the CUDA backend against the CPU backend: embedding (with sentinel rows
// around the output), RMSNorm, residual-add + RMSNorm, RoPE (both pair layouts), SwiGLU.
#include <cmath>
#include <cstring>
#include <vector>

#include "core/backend.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct Env {
  std::unique_ptr<Backend> cpu = MakeCpuBackend();
  std::mt19937 rng{FreshSeed()};
};

Tensor Gpu(Backend& gpu, const Tensor& host, DType dtype = DType::kBF16) {
  auto t = gpu.ToDevice(host, dtype, MemoryKind::kOther);
  EXPECT_TRUE(t.ok()) << t.status();
  return *t;
}

Tensor Cpu(Backend& cpu, const Tensor& host) {
  auto t = cpu.ToDevice(host, DType::kF32, MemoryKind::kOther);
  EXPECT_TRUE(t.ok()) << t.status();
  return *t;
}

Tensor IdsHost(const std::vector<int32_t>& ids) {
  Tensor t = Tensor::HostEmpty(DType::kI32, {static_cast<int64_t>(ids.size())});
  std::memcpy(t.data(), ids.data(), ids.size() * 4);
  return t;
}

TEST(CudaOpsTest, EmbeddingGathersRowsAndLeavesSentinelsAlone) {
  SPC_GPU_OR_SKIP(gpu);
  Env e;
  for (int64_t d : {17, 64, 2049}) {
    for (DType dt : {DType::kBF16, DType::kF32}) {
      const int64_t rows = 97;
      Tensor table = RandomHost({rows, d}, e.rng);
      std::vector<int32_t> ids;
      for (int i = 0; i < 13; ++i) ids.push_back(static_cast<int32_t>(e.rng() % rows));
      const int64_t n = static_cast<int64_t>(ids.size());
      // Output with one sentinel row before and after.
      Tensor sentinel = RandomHost({n + 2, d}, e.rng, 100.0f, 200.0f);
      Tensor out_full = Gpu(*gpu, sentinel, dt);
      Tensor out = out_full.Rows(1, n + 1);
      Tensor gtable = Gpu(*gpu, table, dt);
      Tensor gids = Gpu(*gpu, IdsHost(ids), DType::kI32);
      ASSERT_TRUE(gpu->Embedding(gtable, gids, &out).ok());
      Tensor got = DeviceToF32(*gpu, out_full);
      for (int64_t i = 0; i < n + 2; ++i) {
        for (int64_t j = 0; j < d; ++j) {
          const float want = (i == 0 || i == n + 1) ? sentinel.as<float>()[i * d + j]
                                                    : table.as<float>()[ids[i - 1] * d + j];
          ASSERT_EQ(got.as<float>()[i * d + j], want) << "row " << i << " col " << j << " d " << d;
        }
      }
    }
  }
}

TEST(CudaOpsTest, EmbeddingRejectsOutOfRangeIdAtSync) {
  SPC_GPU_OR_SKIP(gpu);
  Env e;
  Tensor gtable = Gpu(*gpu, RandomHost({10, 8}, e.rng));
  Tensor gids = Gpu(*gpu, IdsHost({1, 10}), DType::kI32);
  auto out = gpu->Alloc(DType::kBF16, {2, 8}, MemoryKind::kWorkspace);
  ASSERT_TRUE(out.ok());
  ASSERT_TRUE(gpu->Embedding(gtable, gids, &*out).ok());
  EXPECT_EQ(gpu->Synchronize().code(), absl::StatusCode::kOutOfRange);
  EXPECT_TRUE(gpu->Synchronize().ok());  // the flag is cleared once reported
}

TEST(CudaOpsTest, RmsNormMatchesCpu) {
  SPC_GPU_OR_SKIP(gpu);
  Env e;
  for (int64_t n : {1, 5, 33}) {
    for (int64_t d : {17, 97, 2049, 4096}) {
      Tensor x = RandomHost({n, d}, e.rng, -3.0f, 3.0f);
      Tensor w = RandomHost({d}, e.rng, 0.5f, 1.5f);
      Tensor cx = Cpu(*e.cpu, x), cw = Cpu(*e.cpu, w), cout = Cpu(*e.cpu, x);
      ASSERT_TRUE(e.cpu->RmsNorm(cx, cw, 1e-5f, &cout).ok());
      for (DType dt : {DType::kBF16, DType::kF32}) {
        Tensor gx = Gpu(*gpu, x, dt), gw = Gpu(*gpu, w, dt), gout = Gpu(*gpu, x, dt);
        ASSERT_TRUE(gpu->RmsNorm(gx, gw, 1e-5f, &gout).ok());
        const double tol = dt == DType::kBF16 ? 1e-2 : 1e-5;
        ExpectClose(DeviceToF32(*gpu, gout), cout, {tol, tol, tol},
                    "rmsnorm n=" + std::to_string(n) + " d=" + std::to_string(d));
      }
    }
  }
}

TEST(CudaOpsTest, AddRmsNormMatchesCpu) {
  SPC_GPU_OR_SKIP(gpu);
  Env e;
  for (int64_t n : {1, 7}) {
    for (int64_t d : {17, 2049, 4096}) {
      Tensor res = RandomHost({n, d}, e.rng, -2.0f, 2.0f);
      Tensor x = RandomHost({n, d}, e.rng, -2.0f, 2.0f);
      Tensor w = RandomHost({d}, e.rng, 0.5f, 1.5f);
      Tensor cres = Cpu(*e.cpu, res), cx = Cpu(*e.cpu, x), cw = Cpu(*e.cpu, w), cout = Cpu(*e.cpu, x);
      ASSERT_TRUE(e.cpu->AddRmsNorm(&cres, cx, cw, 1e-6f, &cout).ok());
      Tensor gres = Gpu(*gpu, res), gx = Gpu(*gpu, x), gw = Gpu(*gpu, w), gout = Gpu(*gpu, x);
      ASSERT_TRUE(gpu->AddRmsNorm(&gres, gx, gw, 1e-6f, &gout).ok());
      const std::string what = "add_rmsnorm n=" + std::to_string(n) + " d=" + std::to_string(d);
      // The residual sum is rounded to bf16 on the GPU: one bf16 ulp.
      ExpectClose(DeviceToF32(*gpu, gres), cres, {1e-2, 8e-3, 8e-3}, what + " residual");
      ExpectClose(DeviceToF32(*gpu, gout), cout, {2e-2, 1.6e-2, 1e-2}, what + " out");
    }
  }
}

TEST(CudaOpsTest, RopeMatchesCpuForBothLayouts) {
  SPC_GPU_OR_SKIP(gpu);
  Env e;
  for (int hd : {8, 64, 128}) {
    for (bool interleaved : {false, true}) {
      const int64_t n = 19, heads = 5;
      Tensor x = RandomHost({n, heads, hd}, e.rng);
      Tensor inv = Tensor::HostEmpty(DType::kF32, {hd / 2});
      for (int j = 0; j < hd / 2; ++j) inv.as<float>()[j] = std::pow(500000.0f, -2.0f * j / hd);
      std::vector<int32_t> pos;
      for (int i = 0; i < n; ++i) pos.push_back(static_cast<int32_t>(e.rng() % 32768));
      RopeArgs cargs, gargs;
      Tensor cinv = Cpu(*e.cpu, inv), ginv = Gpu(*gpu, inv, DType::kF32);
      cargs.inv_freq = &cinv;
      gargs.inv_freq = &ginv;
      cargs.interleaved = gargs.interleaved = interleaved;
      cargs.attention_scaling = gargs.attention_scaling = 1.25f;
      Tensor cx = Cpu(*e.cpu, x), gx = Gpu(*gpu, x);
      Tensor cpos = IdsHost(pos), gpos = Gpu(*gpu, IdsHost(pos), DType::kI32);
      ASSERT_TRUE(e.cpu->Rope(&cx, cpos, cargs).ok());
      ASSERT_TRUE(gpu->Rope(&gx, gpos, gargs).ok());
      ExpectClose(DeviceToF32(*gpu, gx), cx, {1.5e-2, 1e-2, 1e-2},
                  "rope hd=" + std::to_string(hd) + (interleaved ? " interleaved" : " halves"));
    }
  }
}

TEST(CudaOpsTest, SwiGluMatchesCpu) {
  SPC_GPU_OR_SKIP(gpu);
  Env e;
  for (int64_t n : {1, 3}) {
    for (int64_t f : {17, 97, 2049, 14336}) {
      Tensor g = RandomHost({n, f}, e.rng, -6.0f, 6.0f), u = RandomHost({n, f}, e.rng, -2.0f, 2.0f);
      Tensor cg = Cpu(*e.cpu, g), cu = Cpu(*e.cpu, u), cout = Cpu(*e.cpu, g);
      ASSERT_TRUE(e.cpu->SwiGlu(cg, cu, &cout).ok());
      Tensor gg = Gpu(*gpu, g), gu = Gpu(*gpu, u), gout = Gpu(*gpu, g);
      ASSERT_TRUE(gpu->SwiGlu(gg, gu, &gout).ok());
      ExpectClose(DeviceToF32(*gpu, gout), cout, {1e-2, 1e-2, 1e-2}, "swiglu f=" + std::to_string(f));
    }
  }
}

TEST(CudaOpsTest, CopyColumnsMatchesCpuAndKeepsSentinels) {
  SPC_GPU_OR_SKIP(gpu);
  Env e;
  for (auto [n, m, begin, c] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 97, 3, 17},
                                {5, 6144, 4096, 1024}, {33, 2049, 0, 2049}}) {
    Tensor src = RandomHost({n, m}, e.rng);
    Tensor cdst = Cpu(*e.cpu, RandomHost({n, c}, e.rng));
    ASSERT_TRUE(e.cpu->CopyColumns(Cpu(*e.cpu, src), begin, &cdst).ok());
    // The GPU destination sits inside a larger buffer whose other rows must stay untouched.
    Tensor guard = Gpu(*gpu, RandomHost({n + 2, c}, e.rng));
    const Tensor before = DeviceToF32(*gpu, guard);
    Tensor gdst = guard.Rows(1, n + 1);
    ASSERT_TRUE(gpu->CopyColumns(Gpu(*gpu, src), begin, &gdst).ok());
    const Tensor after = DeviceToF32(*gpu, guard);
    ExpectClose(after.Rows(1, n + 1), cdst, {1e-2, 8e-3, 8e-3}, "copy_columns");
    for (int64_t j = 0; j < c; ++j) {
      ASSERT_EQ(after.as<float>()[j], before.as<float>()[j]);
      ASSERT_EQ(after.as<float>()[(n + 1) * c + j], before.as<float>()[(n + 1) * c + j]);
    }
  }
  Tensor small = Gpu(*gpu, RandomHost({2, 8}, e.rng)), big = Gpu(*gpu, RandomHost({2, 8}, e.rng));
  EXPECT_FALSE(gpu->CopyColumns(small, 4, &big).ok());
}

TEST(CudaOpsTest, RejectsHostTensorsAndWrongDtypes) {
  SPC_GPU_OR_SKIP(gpu);
  Env e;
  Tensor x = RandomHost({2, 8}, e.rng);
  Tensor gw = Gpu(*gpu, RandomHost({8}, e.rng));
  Tensor gout = Gpu(*gpu, x);
  EXPECT_EQ(gpu->RmsNorm(x, gw, 1e-5f, &gout).code(), absl::StatusCode::kInvalidArgument);
  Tensor gx32 = Gpu(*gpu, x, DType::kF32);
  EXPECT_EQ(gpu->SwiGlu(gx32, gx32, &gx32).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace specontext::testing
