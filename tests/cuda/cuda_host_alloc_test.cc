// Pinned, device-mapped host memory of every HostPinMode (core/cuda/cuda_memory.h): the host KV tier's
// kernels work through it (KvAppendHost writes rows, ElasticLoad gathers them; both against a CPU
// reference of the bytes), huge-page modes really get huge pages, blocks can be freed and allocated again,
// and an unavailable mode falls back to one that works.
#include <algorithm>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_memory.h"
#include "core/sparse/elastic.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

using cuda::HostPinMode;

constexpr HostPinMode kModes[] = {HostPinMode::kCudaHostAlloc, HostPinMode::kRegister4K,
                                  HostPinMode::kTransparentHuge, HostPinMode::kHugeTlb};

std::string ThpEnabled() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  std::getline(f, line);
  return line;
}

int64_t MeminfoKb(const std::string& key) {
  std::ifstream f("/proc/meminfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::atoll(line.c_str() + key.size() + 1);
  }
  return -1;
}

// The modes that must work on any Linux host with a GPU; THP only when the kernel allows it.
bool MustWork(HostPinMode m) {
  return m == HostPinMode::kCudaHostAlloc || m == HostPinMode::kRegister4K ||
         (m == HostPinMode::kTransparentHuge && ThpEnabled().find("[never]") == std::string::npos);
}

// A host tensor [n_kv, cap, hd] bf16 over a block of `mode`, filled with fresh random bits on the CPU.
struct HostKv {
  cuda::MappedHostBlock block;
  Tensor t;
};

// Per mode and shape: sequences whose offloaded layer lives in `mode` memory; one token appended per
// sequence by the append kernel (a kernel write into the mapped rows), then a random copy list gathered
// into the slots (kernel reads); host rows and slots must equal the CPU reference byte for byte.
// A backend of its own per call: its tier tables are keyed by addresses, which freed and re-made blocks reuse.
void AppendAndGather(HostPinMode mode, int n_kv, int hd, std::vector<int> caps, std::mt19937& rng) {
  std::unique_ptr<Backend> backend = MakeGpuOrNull();
  ASSERT_NE(backend, nullptr);
  Backend& gpu = *backend;
  const std::string what = absl::StrCat(cuda::HostPinModeName(mode), " n_kv ", n_kv, " hd ", hd);
  const int budget = 24, n = static_cast<int>(caps.size());
  std::vector<SequenceKv> kv(n);
  std::vector<cuda::MappedHostBlock> blocks;
  std::vector<std::vector<uint16_t>> ref_k(n), ref_v(n);
  for (int i = 0; i < n; ++i) {
    const size_t elems = size_t(n_kv) * caps[i] * hd;
    kv[i].capacity = caps[i];
    kv[i].slot_budget = budget;
    std::vector<Tensor> ts;
    for (int kvi = 0; kvi < 2; ++kvi) {
      auto b = cuda::AllocMappedHost(0, elems * 2, mode);
      ASSERT_TRUE(b.ok()) << what << ": " << b.status();
      ASSERT_EQ(b->mode, mode);
      ASSERT_GE(b->mapped, elems * 2);
      blocks.push_back(*b);
      auto* p = static_cast<uint16_t*>(b->ptr);
      for (size_t e = 0; e < elems; ++e) p[e] = static_cast<uint16_t>(rng());
      (kvi == 0 ? ref_k : ref_v)[i].assign(p, p + elems);
      ts.emplace_back(b->ptr, DType::kBF16, Shape{n_kv, caps[i], hd}, DeviceKind::kCuda);
    }
    kv[i].host_k = kv[i].k = {ts[0]};
    kv[i].host_v = kv[i].v = {ts[1]};
    kv[i].slot_k = {*gpu.Alloc(DType::kBF16, {n_kv, budget, hd}, MemoryKind::kPrefetch)};
    kv[i].slot_v = {*gpu.Alloc(DType::kBF16, {n_kv, budget, hd}, MemoryKind::kPrefetch)};
  }
  BatchDesc batch;
  std::vector<int> past(n);
  for (int i = 0; i < n; ++i) {
    past[i] = static_cast<int>(rng() % caps[i]);  // the appended row lands anywhere in the region
    batch.seqs.push_back({i, 1, past[i]});
    batch.kv.push_back(&kv[i]);
  }
  batch.n_tokens = n;
  ASSERT_TRUE(gpu.PrepareBatch(batch).ok()) << what;
  Tensor k = RandomHost({n, n_kv, hd}, rng), v = RandomHost({n, n_kv, hd}, rng);
  auto gk = *gpu.ToDevice(k, DType::kBF16, MemoryKind::kWorkspace);
  auto gv = *gpu.ToDevice(v, DType::kBF16, MemoryKind::kWorkspace);
  absl::Status st = gpu.KvAppendHost(0, gk, gv);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < n_kv; ++h) {
      for (int d = 0; d < hd; ++d) {
        const size_t dst = (size_t(h) * caps[i] + past[i]) * hd + d, src = (size_t(i) * n_kv + h) * hd + d;
        ref_k[i][dst] = F32ToBf16(k.as<float>()[src]);
        ref_v[i][dst] = F32ToBf16(v.as<float>()[src]);
      }
    }
  }
  // Copies: per (sequence, head) up to `budget` distinct random tokens (the appended one included) to
  // distinct random slots.
  CopyList cl;
  cl.Reset(n, n_kv, n_kv, budget);
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < n_kv; ++h) {
      std::vector<int32_t> toks(caps[i]), slots(budget);
      std::iota(toks.begin(), toks.end(), 0);
      std::iota(slots.begin(), slots.end(), 0);
      std::shuffle(toks.begin(), toks.end(), rng);
      std::shuffle(slots.begin(), slots.end(), rng);
      const int m = std::min(budget, caps[i]);
      toks.resize(m);
      if (std::find(toks.begin(), toks.end(), past[i]) == toks.end()) toks[0] = past[i];
      for (int c = 0; c < m; ++c) cl.copies.push_back({toks[c], slots[c]});
      cl.copy_ptr.push_back(static_cast<int32_t>(cl.copies.size()));
    }
  }
  st = gpu.ElasticLoad(0, cl, nullptr);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  ASSERT_TRUE(dynamic_cast<cuda::CudaBackend&>(gpu).SyncCopyStream().ok());
  ASSERT_TRUE(gpu.Synchronize().ok());
  for (int i = 0; i < n; ++i) {
    // Kernel writes: the host rows equal the reference (the appended row, nothing else touched).
    EXPECT_EQ(std::memcmp(kv[i].host_k[0].data(), ref_k[i].data(), ref_k[i].size() * 2), 0) << what << " seq " << i;
    EXPECT_EQ(std::memcmp(kv[i].host_v[0].data(), ref_v[i].data(), ref_v[i].size() * 2), 0) << what << " seq " << i;
    Tensor sk = Tensor::HostEmpty(DType::kBF16, kv[i].slot_k[0].shape());
    Tensor sv = Tensor::HostEmpty(DType::kBF16, kv[i].slot_v[0].shape());
    ASSERT_TRUE(gpu.ToHost(kv[i].slot_k[0], &sk).ok());
    ASSERT_TRUE(gpu.ToHost(kv[i].slot_v[0], &sv).ok());
    for (int h = 0; h < n_kv; ++h) {
      const int set = i * n_kv + h;
      for (int c = cl.copy_ptr[set]; c < cl.copy_ptr[set + 1]; ++c) {
        const RowCopy rc = cl.copies[c];
        const size_t src = (size_t(h) * caps[i] + rc.token) * hd, dst = (size_t(h) * budget + rc.slot) * hd;
        ASSERT_EQ(std::memcmp(sk.as<uint16_t>() + dst, ref_k[i].data() + src, hd * 2), 0)
            << what << " seq " << i << " head " << h << " token " << rc.token << " K";
        ASSERT_EQ(std::memcmp(sv.as<uint16_t>() + dst, ref_v[i].data() + src, hd * 2), 0)
            << what << " seq " << i << " head " << h << " token " << rc.token << " V";
      }
    }
  }
  kv.clear();
  ASSERT_TRUE(gpu.Synchronize().ok());
  for (const auto& b : blocks) cuda::FreeMappedHost(b);
}

TEST(CudaHostAllocTest, KernelsReadAndWriteEveryMode) {
  SPC_GPU_OR_SKIP(gpu);
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  for (HostPinMode mode : kModes) {
    auto probe = cuda::AllocMappedHost(0, 4096, mode);
    if (!probe.ok()) {
      EXPECT_FALSE(MustWork(mode)) << cuda::HostPinModeName(mode) << ": " << probe.status();
      EXPECT_EQ(probe.status().code(), absl::StatusCode::kUnavailable) << probe.status();
      std::printf("[ mode %s unavailable here: %s ]\n", cuda::HostPinModeName(mode), probe.status().ToString().c_str());
      continue;
    }
    cuda::FreeMappedHost(*probe);
    // Capacities whose tensors end inside a page and inside a 2 MiB page.
    AppendAndGather(mode, 2, 64, {5, 1000, 3 + int(rng() % 50)}, rng);
    AppendAndGather(mode, 8, 128, {1031, 4097 + int(rng() % 100)}, rng);
  }
  std::printf("[ seed %u ]\n", seed);
}

TEST(CudaHostAllocTest, HugePageModesGetHugePages) {
  SPC_GPU_OR_SKIP(gpu);
  const size_t bytes = (size_t{16} << 20) + 12345;
  for (HostPinMode mode : kModes) {
    auto b = cuda::AllocMappedHost(0, bytes, mode);
    if (!b.ok()) continue;  // covered by KernelsReadAndWriteEveryMode
    const int64_t huge = cuda::HugePageBytes(b->ptr, b->mapped);
    ASSERT_GE(huge, 0) << "/proc/self/smaps unreadable";
    if (mode == HostPinMode::kRegister4K) {
      EXPECT_EQ(huge, 0) << "register4k must stay on 4 KiB pages";
    }
    if (mode == HostPinMode::kHugeTlb) {
      EXPECT_GE(huge, int64_t(b->mapped));
    }
    if (mode == HostPinMode::kTransparentHuge) {
      EXPECT_EQ(b->mapped % (size_t{2} << 20), 0u);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(b->ptr) % (uintptr_t{2} << 20), 0u);
      // A fresh 16 MiB range with THP on gets at least some 2 MiB pages (all of them, unless memory is fragmented).
      EXPECT_GT(huge, 0) << ThpEnabled();
    }
    cuda::FreeMappedHost(*b);
  }
}

TEST(CudaHostAllocTest, FreeThenAllocateAgain) {
  SPC_GPU_OR_SKIP(gpu);
  // A registration left behind by a free would make registering the same (recycled) range fail, and leaked
  // pins would show as growing Mlocked/Unevictable memory; 8 x 256 MiB per mode.
  for (HostPinMode mode : kModes) {
    if (!MustWork(mode)) continue;
    for (int r = 0; r < 8; ++r) {
      auto b = cuda::AllocMappedHost(0, size_t{256} << 20, mode);
      ASSERT_TRUE(b.ok()) << cuda::HostPinModeName(mode) << " round " << r << ": " << b.status();
      std::memset(b->ptr, r + 1, b->bytes);
      cuda::FreeMappedHost(*b);
    }
  }
  EXPECT_EQ(cuda::AllocMappedHost(0, 0, HostPinMode::kRegister4K).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CudaHostAllocTest, FallsBackWhenThePreferredModeIsUnavailable) {
  SPC_GPU_OR_SKIP(gpu);
  // More than the hugetlbfs pool holds: MAP_HUGETLB must fail, and the fallback hands out memory that works.
  const int64_t free_pages = std::max<int64_t>(0, MeminfoKb("HugePages_Free"));
  if (free_pages > 512) GTEST_SKIP() << "a large hugetlbfs pool: cannot ask for more than it holds cheaply";
  const size_t bytes = size_t(free_pages + 1) * (size_t{2} << 20);
  auto direct = cuda::AllocMappedHost(0, bytes, HostPinMode::kHugeTlb);
  EXPECT_EQ(direct.status().code(), absl::StatusCode::kUnavailable) << direct.status();
  auto b = cuda::AllocMappedHostOrFallback(0, bytes, HostPinMode::kHugeTlb);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_NE(b->mode, HostPinMode::kHugeTlb);
  EXPECT_EQ(b->mode, MustWork(HostPinMode::kTransparentHuge) ? HostPinMode::kTransparentHuge
                                                              : HostPinMode::kCudaHostAlloc);
  std::mt19937 rng(FreshSeed());
  std::vector<uint16_t> ref(bytes / 2);
  for (auto& x : ref) x = static_cast<uint16_t>(rng());
  std::memcpy(b->ptr, ref.data(), bytes);
  // A kernel-free round trip through the device (the copy engine reads the mapped pages).
  auto dev = gpu->Alloc(DType::kU8, {int64_t(bytes)}, MemoryKind::kWorkspace);
  ASSERT_TRUE(dev.ok());
  Tensor host(b->ptr, DType::kU8, {int64_t(bytes)}, DeviceKind::kCuda);
  ASSERT_TRUE(gpu->CopyDevice(host, &*dev).ok());
  Tensor back = Tensor::HostEmpty(DType::kU8, {int64_t(bytes)});
  ASSERT_TRUE(gpu->ToHost(*dev, &back).ok());
  EXPECT_EQ(std::memcmp(back.data(), ref.data(), bytes), 0);
  cuda::FreeMappedHost(*b);
  // The baseline never falls back.
  auto base = cuda::AllocMappedHostOrFallback(0, 4096, HostPinMode::kCudaHostAlloc);
  ASSERT_TRUE(base.ok());
  EXPECT_EQ(base->mode, HostPinMode::kCudaHostAlloc);
  cuda::FreeMappedHost(*base);
}

}  // namespace
}  // namespace specontext::testing
