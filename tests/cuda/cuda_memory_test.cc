// The device allocator: the limit, per-kind accounting, workspace address reuse (graph replay
// needs it) and size classes, and host<->device conversion.
#include <algorithm>
#include <cstring>
#include <set>
#include <vector>

#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

TEST(CudaMemoryTest, LimitAndAccounting) {
  CudaBackendOptions opts;
  opts.memory_limit = int64_t{64} << 20;
  opts.cublas_workspace_bytes = int64_t{4} << 20;
  SPC_GPU_OR_SKIP(gpu, opts);
  const MemoryReport r0 = gpu->memory_report();
  EXPECT_EQ(r0.limit, opts.memory_limit);
  {
    auto w = gpu->Alloc(DType::kBF16, {1000, 1000}, MemoryKind::kWeights);  // 2,000,000 bytes
    ASSERT_TRUE(w.ok());
    auto kv = gpu->Alloc(DType::kBF16, {7, 17}, MemoryKind::kKvCache);      // 238 -> 256 bytes
    ASSERT_TRUE(kv.ok());
    const MemoryReport r = gpu->memory_report();
    EXPECT_EQ(r.bytes[static_cast<size_t>(MemoryKind::kWeights)] - r0.bytes[0], 2000128);
    EXPECT_EQ(r.bytes[static_cast<size_t>(MemoryKind::kKvCache)], 256);
    EXPECT_EQ(r.total, r0.total + 2000128 + 256);
    auto big = gpu->Alloc(DType::kU8, {int64_t{70} << 20}, MemoryKind::kKvCache);
    EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_LE(gpu->available_bytes(), opts.memory_limit - r.total);
  }
  EXPECT_EQ(gpu->memory_report().bytes[static_cast<size_t>(MemoryKind::kWeights)], 0);
  EXPECT_EQ(gpu->memory_report().bytes[static_cast<size_t>(MemoryKind::kKvCache)], 0);
}

TEST(CudaMemoryTest, WorkspaceSequenceRepeatsAddresses) {
  SPC_GPU_OR_SKIP(gpu);
  auto run = [&]() {
    std::vector<void*> addrs;
    std::vector<Tensor> live;
    for (int64_t n : {1000, 5000, 1000, 123457}) {
      auto t = gpu->Alloc(DType::kBF16, {n}, MemoryKind::kWorkspace);
      EXPECT_TRUE(t.ok());
      addrs.push_back(t->data());
      live.push_back(*t);
    }
    live.erase(live.begin() + 1);  // free one in the middle, then allocate again
    auto t = gpu->Alloc(DType::kBF16, {5000}, MemoryKind::kWorkspace);
    addrs.push_back(t->data());
    return addrs;
  };
  run();  // warm-up: fills the cache
  const std::vector<void*> second = run();
  EXPECT_EQ(run(), second);
  EXPECT_EQ(run(), second);
  EXPECT_EQ(second[1], second[4]);  // the freed block is reused for the same size
}

// A workspace that grows a little every decode step (the selection's scores grow with the context) keeps its
// block within a size class, and the blocks it outgrows do not pile up in the cache.
TEST(CudaMemoryTest, GrowingWorkspaceReusesItsBlock) {
  SPC_GPU_OR_SKIP(gpu);
  const auto ws = [&] { return gpu->memory_report().bytes[static_cast<size_t>(MemoryKind::kWorkspace)]; };
  std::set<void*> addrs;
  const int64_t base = ws();
  int64_t most = 0;
  for (int step = 0; step < 2000; ++step) {
    auto t = gpu->Alloc(DType::kU8, {int64_t{3'000'000} + 200 * step}, MemoryKind::kWorkspace);
    ASSERT_TRUE(t.ok());
    addrs.insert(t->data());
    most = std::max(most, ws() - base);
  }
  // 400 kB of growth over 16 classes per doubling (at most 1/16 wider): a handful of blocks, not one per step.
  EXPECT_LE(addrs.size(), 4u);
  EXPECT_LE(most, int64_t{2 * 3'500'000});
  auto small = gpu->Alloc(DType::kU8, {1000}, MemoryKind::kWorkspace);  // below 64 KiB: 256-byte granules
  ASSERT_TRUE(small.ok());
}

TEST(CudaMemoryTest, ToDeviceConvertsAndRoundTrips) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  Tensor h = RandomHost({3, 97}, rng, -5.0f, 5.0f);
  for (int i = 0; i < 3 * 97; ++i) h.as<float>()[i] += 1e-3f * (i % 7);  // not bf16-exact
  auto d = gpu->ToDevice(h, DType::kBF16, MemoryKind::kOther);
  ASSERT_TRUE(d.ok());
  Tensor back = Tensor::HostEmpty(DType::kBF16, {3, 97});
  ASSERT_TRUE(gpu->ToHost(*d, &back).ok());
  for (int i = 0; i < 3 * 97; ++i) EXPECT_EQ(back.as<uint16_t>()[i], F32ToBf16(h.as<float>()[i])) << i;
  Tensor wrong = Tensor::HostEmpty(DType::kF32, {3, 97});
  EXPECT_EQ(gpu->ToHost(*d, &wrong).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gpu->ToDevice(Tensor::HostEmpty(DType::kI32, {4}), DType::kBF16, MemoryKind::kOther).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CudaMemoryTest, NoDeviceMeansFailedPrecondition) {
  if (CudaDeviceCount() > 0) {
    CudaBackendOptions opts;
    opts.device = CudaDeviceCount();  // one past the last
    EXPECT_EQ(MakeCudaBackend(opts).status().code(), absl::StatusCode::kFailedPrecondition);
  } else {
    EXPECT_EQ(MakeCudaBackend({}).status().code(), absl::StatusCode::kFailedPrecondition);
  }
}

}  // namespace
}  // namespace specontext::testing
