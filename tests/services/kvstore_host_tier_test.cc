// The kvstore-backed host KV tier in process (CPU backend): KvStoreTierAllocator tensors are views of runs
// of the request's blocks; AllocateTieredKv (explicit or through ScopedHostKvAllocator), MoveLayerToHost
// and AdoptHostTier put offloaded layers there with their rows intact; a request's blocks outlive End()
// while tensors still view them and go with the last one; a full segment falls back to pinned memory.
#include <unistd.h>

#include <cstring>
#include <random>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "core/model/kv_tiers.h"
#include "generator/kvstore_host_tier.h"

namespace specontext::generator {
namespace {

ModelConfig Config() {
  ModelConfig c;
  c.num_hidden_layers = 3;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  return c;
}

struct Fixture {
  std::string name = absl::StrCat("spc_tier_unit_", getpid(), "_", std::random_device{}());
  metrics::Registry registry;
  std::unique_ptr<KvStoreTracker> tracker;
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  ~Fixture() {
    tracker.reset();
    kvstore::KvStore::Remove(name).IgnoreError();
  }
  bool Open(uint64_t blocks, uint64_t block_bytes) {
    KvStoreTrackerOptions o;
    o.name = name;
    o.blocks = blocks;
    o.block_bytes = block_bytes;
    auto t = KvStoreTracker::Create(o, &registry);
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return false;
    tracker = *std::move(t);
    return tracker->RegisterWith(backend.get()).ok();
  }
  bool InSegment(const Tensor& t) {
    const uint8_t* p = static_cast<const uint8_t*>(t.data());
    kvstore::KvStore& s = tracker->store();
    return p >= s.data_base() && p + t.nbytes() <= s.data_base() + s.data_bytes();
  }
  uint64_t Used() { return tracker->store().Stats()->used_blocks; }
};

void FillRandom(Tensor& t, std::mt19937& rng) {
  std::uniform_real_distribution<float> d(-1, 1);
  for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = d(rng);
}

TEST(KvstoreHostTier, OffloadedLayersLiveInTheRequestsBlocks) {
  Fixture f;
  ASSERT_TRUE(f.Open(256, 1024));
  std::mt19937 rng(std::random_device{}());
  const ModelConfig c = Config();
  const int32_t cap = 20 + static_cast<int32_t>(rng() % 40);  // 2 x cap x 8 f32: 2 to 5 blocks per tensor
  const uint64_t per_tensor = (2 * cap * 8 * 4 + 1023) / 1024;
  auto host = std::make_shared<KvStoreTierAllocator>(f.tracker.get(), 7);
  f.tracker->Begin(7, 0);
  auto kv = AllocateTieredKv(*f.backend, c, cap, /*gpu_layers=*/2, /*budget=*/4, host);
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ((*kv)->host_allocator, host);
  EXPECT_TRUE(f.InSegment((*kv)->host_k[2]) && f.InSegment((*kv)->host_v[2]));
  EXPECT_EQ((*kv)->k[2].data(), (*kv)->host_k[2].data());  // k/v alias the host copy
  EXPECT_EQ(f.Used(), 2 * per_tensor);
  EXPECT_EQ(f.tracker->tier_bytes(), static_cast<int64_t>(2 * per_tensor * 1024));
  // A layer moved later goes to the same request's blocks with its rows.
  FillRandom((*kv)->k[1], rng);
  FillRandom((*kv)->v[1], rng);
  Tensor k1 = Tensor::HostEmpty(DType::kF32, (*kv)->k[1].shape());
  std::memcpy(k1.data(), (*kv)->k[1].data(), k1.nbytes());
  ASSERT_TRUE(MoveLayerToHost(*f.backend, kv->get(), 1, 4).ok());
  EXPECT_TRUE(f.InSegment((*kv)->host_k[1]));
  EXPECT_EQ(std::memcmp((*kv)->host_k[1].data(), k1.data(), k1.nbytes()), 0);
  EXPECT_EQ(f.Used(), 4 * per_tensor);
  auto seq = f.tracker->store().GetSequence((uint64_t{static_cast<uint32_t>(getpid())} << 32) | 7);
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_EQ(seq->blocks.size(), 4 * per_tensor);
  // The request ends while its KV is still alive: the blocks stay until the tensors go.
  f.tracker->End(7);
  EXPECT_EQ(f.Used(), 4 * per_tensor);
  kv->reset();
  EXPECT_EQ(f.Used(), 0u);
  EXPECT_EQ(f.tracker->store().Stats()->sequences, 0u);
  EXPECT_EQ(f.tracker->tier_bytes(), 0);
  EXPECT_TRUE(f.tracker->store().CheckConsistency().ok());
}

TEST(KvstoreHostTier, ScopeAndAdoption) {
  Fixture f;
  ASSERT_TRUE(f.Open(256, 1024));
  std::mt19937 rng(std::random_device{}());
  const ModelConfig c = Config();
  auto host = std::make_shared<KvStoreTierAllocator>(f.tracker.get(), 3);
  {
    ScopedHostKvAllocator scope(host);
    auto kv = AllocateTieredKv(*f.backend, c, 16, 1, 4);
    ASSERT_TRUE(kv.ok());
    EXPECT_EQ((*kv)->host_allocator, host);
    EXPECT_TRUE(f.InSegment((*kv)->host_k[1]) && f.InSegment((*kv)->host_v[2]));
  }
  EXPECT_EQ(ScopedHostKvAllocator::Current(), nullptr);
  // Outside any scope: pinned memory; adopting moves the first rows of every head into the segment.
  auto kv = AllocateTieredKv(*f.backend, c, 16, 1, 4);
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ((*kv)->host_allocator, nullptr);
  EXPECT_FALSE(f.InSegment((*kv)->host_k[1]));
  FillRandom((*kv)->host_v[2], rng);
  Tensor before = Tensor::HostEmpty(DType::kF32, (*kv)->host_v[2].shape());
  std::memcpy(before.data(), (*kv)->host_v[2].data(), before.nbytes());
  const int32_t rows = 5;
  ASSERT_TRUE(AdoptHostTier(*f.backend, kv->get(), host, rows).ok());
  EXPECT_EQ((*kv)->host_allocator, host);
  EXPECT_TRUE(f.InSegment((*kv)->host_v[2]));
  EXPECT_EQ((*kv)->v[2].data(), (*kv)->host_v[2].data());
  for (int h = 0; h < 2; ++h) {
    EXPECT_EQ(std::memcmp((*kv)->host_v[2].as<float>() + h * 16 * 8, before.as<float>() + h * 16 * 8, rows * 8 * 4), 0)
        << "head " << h;
  }
  EXPECT_EQ(AdoptHostTier(*f.backend, kv->get(), host, 17).code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvstoreHostTier, FullSegmentFallsBackToPinned) {
  Fixture f;
  ASSERT_TRUE(f.Open(3, 1024));  // a layer's K needs 2 x 64 x 8 x 4 = 4 KiB: 4 blocks
  auto host = std::make_shared<KvStoreTierAllocator>(f.tracker.get(), 9);
  auto kv = AllocateTieredKv(*f.backend, Config(), 64, 2, 4, host);
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_FALSE(f.InSegment((*kv)->host_k[2]));
  EXPECT_FALSE((*kv)->host_k[2].empty());
  EXPECT_EQ(f.Used(), 0u);
  auto body = f.registry.Serialize();
  EXPECT_NE(body.find("spc_kvstore_host_tier_fallbacks_total 2"), std::string::npos) << body;
}

}  // namespace
}  // namespace specontext::generator
