// PinnedHostCache: blocks come back to the cache when their tensors go, are reused by size class, can be
// pinned ahead (Reserve), and are unpinned by Trim or when the cache is gone first.
#include <gtest/gtest.h>

#include <random>

#include "core/cpu/cpu_backend.h"
#include "core/model/pinned_host_cache.h"

namespace specontext {
namespace {

int64_t HostBytes(Backend& b) { return b.host_memory_report().total; }

TEST(PinnedHostCache, SizeClassesWasteAtMostAnEighth) {
  EXPECT_EQ(PinnedHostCache::SizeClass(1), int64_t{2} << 20);
  EXPECT_EQ(PinnedHostCache::SizeClass(int64_t{2} << 20), int64_t{2} << 20);
  std::mt19937_64 rng(std::random_device{}());
  for (int i = 0; i < 1000; ++i) {
    const int64_t bytes = 1 + static_cast<int64_t>(rng() % (int64_t{64} << 30));
    const int64_t cls = PinnedHostCache::SizeClass(bytes);
    ASSERT_GE(cls, bytes);
    ASSERT_EQ(cls % (int64_t{2} << 20), 0);
    if (bytes > (int64_t{16} << 20)) ASSERT_LE(cls - bytes, bytes / 8) << bytes;
    ASSERT_EQ(PinnedHostCache::SizeClass(cls), cls) << "a class is its own class";
  }
}

TEST(PinnedHostCache, ReleasedBlocksAreReusedNotUnpinned) {
  auto b = MakeCpuBackend();
  auto cache = PinnedHostCache::Create();
  const Shape shape{8, 3000, 64};
  void* first = nullptr;
  {
    auto t = cache->Alloc(*b, DType::kF32, shape);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->shape(), shape);
    EXPECT_EQ(t->dtype(), DType::kF32);
    first = t->data();
    std::fill(t->as<float>(), t->as<float>() + t->numel(), 1.5f);  // the whole tensor is writable
    EXPECT_EQ(cache->free_bytes(), 0);
  }
  const int64_t pinned = HostBytes(*b);
  EXPECT_GE(pinned, 8 * 3000 * 64 * 4);
  EXPECT_EQ(cache->free_bytes(), PinnedHostCache::SizeClass(8 * 3000 * 64 * 4)) << "back in the cache";
  // A tensor of a nearby size (same class) takes the same block; nothing new is pinned.
  auto again = cache->Alloc(*b, DType::kBF16, {8, 5990, 64});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->data(), first);
  EXPECT_EQ(HostBytes(*b), pinned);
  // A second live tensor needs a second block.
  auto other = cache->Alloc(*b, DType::kF32, shape);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->data(), first);
  EXPECT_EQ(HostBytes(*b), 2 * pinned);
  *again = Tensor();
  *other = Tensor();
  EXPECT_EQ(HostBytes(*b), 2 * pinned) << "cached, still pinned";
  cache->Trim();
  EXPECT_EQ(cache->free_bytes(), 0);
  EXPECT_EQ(HostBytes(*b), 0) << "Trim unpins the free blocks";
}

TEST(PinnedHostCache, ReserveThenAllocPinsNothingAndTensorsOutliveTheCache) {
  auto b = MakeCpuBackend();
  auto cache = PinnedHostCache::Create();
  const int64_t bytes = int64_t{4} << 20;
  ASSERT_TRUE(cache->Reserve(*b, bytes, 3).ok());
  const int64_t pinned = HostBytes(*b);
  EXPECT_EQ(pinned, 3 * PinnedHostCache::SizeClass(bytes));
  std::vector<Tensor> live;
  for (int i = 0; i < 3; ++i) {
    auto t = cache->Alloc(*b, DType::kU8, {bytes});
    ASSERT_TRUE(t.ok());
    live.push_back(*t);
  }
  EXPECT_EQ(HostBytes(*b), pinned) << "the reserved blocks served the allocations";
  EXPECT_EQ(cache->free_bytes(), 0);
  cache.reset();  // the tensors keep their blocks; dropping them now unpins (no cache to return to)
  live[0].as<uint8_t>()[bytes - 1] = 7;
  live.clear();
  EXPECT_EQ(HostBytes(*b), 0);
  auto c2 = PinnedHostCache::Create();
  EXPECT_EQ(c2->Reserve(*b, 0, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c2->Reserve(*b, 1, -1).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace specontext
