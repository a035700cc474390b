// Interleaved host K/V (SequenceKv "Host layout"): CopyKvPairRows puts K row (h, t) at pair[h, t, 0, :] and V
// at pair[h, t, 1, :], both ways; kv_tiers moves layers between device rows and interleaved host tiers and
// back (AllocateTieredKv, MoveLayerToHost, MoveLayerToDevice) and re-homes them into plain allocator blocks
// (AdoptHostTier) without changing a row. The CPU backend's kernels take plain tiers only, so a test backend
// that allows the layout stands in for the CUDA backend's kv_tiers calls here; the CUDA tests run the kernels.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "core/cpu/cpu_backend.h"
#include "core/model/kv_tiers.h"

namespace specontext {
namespace {

class PairCpuBackend : public CpuBackend {
 public:
  PairCpuBackend() : CpuBackend(0) { set_host_kv_interleaved(true); }
  bool SupportsInterleavedHostKv() const override { return true; }
};

Tensor Random(Backend& b, const Shape& shape, std::mt19937& rng) {
  auto t = b.Alloc(DType::kF32, shape, MemoryKind::kWorkspace);
  EXPECT_TRUE(t.ok());
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  for (int64_t i = 0; i < t->numel(); ++i) t->as<float>()[i] = u(rng);
  return *t;
}

float At(const Tensor& t, int64_t h, int64_t r, int64_t d) { return t.as<float>()[(h * t.dim(1) + r) * t.dim(2) + d]; }
float PairAt(const Tensor& p, int64_t h, int64_t r, int half, int64_t d) {
  return p.as<float>()[((h * p.dim(1) + r) * 2 + half) * p.dim(3) + d];
}

TEST(KvPair, CopyKvPairRowsInterleavesAndBack) {
  PairCpuBackend b;
  std::mt19937 rng(std::random_device{}());
  struct Case { int64_t heads, plain_rows, pair_rows, d, rows; };
  for (const Case& c : {Case{8, 40, 64, 16, 40}, Case{3, 17, 17, 12, 9}, Case{1, 5, 9, 4, 0}, Case{2, 70, 33, 8, 33}}) {
    Tensor k = Random(b, {c.heads, c.plain_rows, c.d}, rng), v = Random(b, {c.heads, c.plain_rows, c.d}, rng);
    Tensor pair = Random(b, {c.heads, c.pair_rows, 2, c.d}, rng);
    Tensor before = Tensor::HostEmpty(DType::kF32, pair.shape());
    std::memcpy(before.data(), pair.data(), pair.nbytes());
    ASSERT_TRUE(b.CopyKvPairRows(&k, &v, &pair, c.rows, /*to_pair=*/true).ok());
    for (int64_t h = 0; h < c.heads; ++h) {
      for (int64_t r = 0; r < c.pair_rows; ++r) {
        for (int64_t d = 0; d < c.d; ++d) {
          ASSERT_EQ(PairAt(pair, h, r, 0, d), r < c.rows ? At(k, h, r, d) : PairAt(before, h, r, 0, d));
          ASSERT_EQ(PairAt(pair, h, r, 1, d), r < c.rows ? At(v, h, r, d) : PairAt(before, h, r, 1, d));
        }
      }
    }
    Tensor k2 = Random(b, k.shape(), rng), v2 = Random(b, v.shape(), rng);
    ASSERT_TRUE(b.CopyKvPairRows(&k2, &v2, &pair, c.rows, /*to_pair=*/false).ok());
    for (int64_t h = 0; h < c.heads; ++h) {
      for (int64_t r = 0; r < c.rows; ++r) {
        for (int64_t d = 0; d < c.d; ++d) {
          ASSERT_EQ(At(k2, h, r, d), At(k, h, r, d));
          ASSERT_EQ(At(v2, h, r, d), At(v, h, r, d));
        }
      }
    }
  }
}

TEST(KvPair, CopyKvPairRowsRefusesShapesThatDoNotFit) {
  PairCpuBackend b;
  std::mt19937 rng(7);
  Tensor k = Random(b, {2, 8, 4}, rng), v = Random(b, {2, 8, 4}, rng), pair = Random(b, {2, 6, 2, 4}, rng);
  EXPECT_EQ(b.CopyKvPairRows(&k, &v, &pair, 7, true).code(), absl::StatusCode::kInvalidArgument);  // > pair rows
  Tensor plain = Random(b, {2, 6, 4}, rng);
  EXPECT_EQ(b.CopyKvPairRows(&k, &v, &plain, 2, true).code(), absl::StatusCode::kInvalidArgument);  // not a pair
  Tensor wide = Random(b, {2, 8, 5}, rng);
  EXPECT_EQ(b.CopyKvPairRows(&k, &wide, &pair, 2, true).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(b.CopyKvPairRows(&k, &v, &pair, -1, true).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(b.CopyKvPairRows(nullptr, &v, &pair, 1, true).code(), absl::StatusCode::kInvalidArgument);
}

ModelConfig Config() {
  ModelConfig c;
  c.num_hidden_layers = 3;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  return c;
}

// Plain allocator blocks (as the services' kvstore hands out).
class PlainAllocator : public HostKvAllocator {
 public:
  absl::StatusOr<Tensor> Alloc(Backend& b, DType dtype, const Shape& shape) override {
    return b.AllocPinnedHost(dtype, shape, MemoryKind::kKvCache);
  }
};

TEST(KvPair, LayerMovesAndAdoptionKeepEveryRow) {
  PairCpuBackend b;
  std::mt19937 rng(std::random_device{}());
  const ModelConfig c = Config();
  const int32_t capacity = 24, rows = 16;
  auto kv = AllocateTieredKv(b, c, capacity, /*gpu_layers=*/2, /*budget=*/4, nullptr, /*device_rows=*/rows);
  ASSERT_TRUE(kv.ok()) << kv.status();
  SequenceKv& s = **kv;
  ASSERT_TRUE(IsKvPair(s.host_k[2]));
  EXPECT_EQ(s.host_k[2].data(), s.host_v[2].data());
  EXPECT_EQ(s.k[2].data(), s.host_k[2].data());
  // Resident layer 1 gets random rows; it moves to host (interleaved), then back.
  Tensor k1 = Random(b, s.k[1].shape(), rng), v1 = Random(b, s.v[1].shape(), rng);
  std::memcpy(s.k[1].data(), k1.data(), k1.nbytes());
  std::memcpy(s.v[1].data(), v1.data(), v1.nbytes());
  ASSERT_TRUE(MoveLayerToHost(b, &s, 1, 4).ok());
  ASSERT_TRUE(s.offloaded(1));
  ASSERT_TRUE(IsKvPair(s.host_k[1]));
  EXPECT_EQ(s.host_k[1].dim(1), capacity);
  const KvRowsView hr = KvRowsOf(s.host_k[1], s.host_v[1]);
  EXPECT_EQ(hr.stride, 2 * c.head_dim);
  for (int64_t h = 0; h < 2; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < c.head_dim; ++d) {
        ASSERT_EQ(PairAt(s.host_k[1], h, r, 0, d), At(k1, h, r, d));
        ASSERT_EQ(static_cast<const float*>(hr.v)[(h * hr.rows + r) * hr.stride + d], At(v1, h, r, d));
      }
    }
  }
  // Adopting plain allocator blocks de-interleaves layer 1 (and layer 2) row for row.
  ASSERT_TRUE(AdoptHostTier(b, &s, std::make_shared<PlainAllocator>(), rows).ok());
  ASSERT_FALSE(IsKvPair(s.host_k[1]));
  ASSERT_EQ(s.host_k[1].ndim(), 3);
  EXPECT_NE(s.host_k[1].data(), s.host_v[1].data());
  for (int64_t h = 0; h < 2; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < c.head_dim; ++d) {
        ASSERT_EQ(At(s.host_k[1], h, r, d), At(k1, h, r, d));
        ASSERT_EQ(At(s.host_v[1], h, r, d), At(v1, h, r, d));
      }
    }
  }
  // A layer of a sequence without an allocator goes to an interleaved tier and comes back intact.
  auto kv2 = AllocateTieredKv(b, c, capacity, 3, 4, nullptr, rows);
  ASSERT_TRUE(kv2.ok());
  SequenceKv& s2 = **kv2;
  std::memcpy(s2.k[0].data(), k1.data(), k1.nbytes());
  std::memcpy(s2.v[0].data(), v1.data(), v1.nbytes());
  ASSERT_TRUE(MoveLayerToHost(b, &s2, 0, 4).ok());
  ASSERT_TRUE(IsKvPair(s2.k[0]));
  ASSERT_TRUE(MoveLayerToDevice(b, &s2, 0, rows).ok());
  ASSERT_FALSE(s2.offloaded(0));
  ASSERT_EQ(s2.k[0].shape(), k1.shape());
  EXPECT_EQ(std::memcmp(s2.k[0].data(), k1.data(), k1.nbytes()), 0);
  EXPECT_EQ(std::memcmp(s2.v[0].data(), v1.data(), v1.nbytes()), 0);
}

TEST(KvPair, LayerGroupsCountFromTheLastLayer) {
  struct Case { int32_t n_layers, group, layer, first, layers; };
  for (const Case& c : {Case{32, 4, 31, 28, 4}, Case{32, 4, 28, 28, 4}, Case{32, 4, 27, 24, 4}, Case{32, 4, 0, 0, 4},
                        Case{30, 4, 1, 0, 2}, Case{30, 4, 2, 2, 4}, Case{16, 1, 5, 5, 1}, Case{3, 8, 1, 0, 3},
                        Case{5, 0, 4, 4, 1}}) {
    const HostLayerGroup g = HostLayerGroupOf(c.n_layers, c.group, c.layer);
    EXPECT_EQ(g.first, c.first) << c.n_layers << " " << c.group << " " << c.layer;
    EXPECT_EQ(g.layers, c.layers) << c.n_layers << " " << c.group << " " << c.layer;
  }
}

TEST(KvPair, HostAllocationBytesFollowTheLayout) {
  PairCpuBackend b;
  ModelConfig c = Config();
  c.num_hidden_layers = 6;
  const int64_t tensor = 2 * 10 * 8 * 4;  // K or V of one layer: heads x capacity x head_dim x f32
  b.set_host_kv_layer_group(4);           // groups {0, 1}, {2..5}
  EXPECT_EQ(HostAllocationBytes(b, c, 10, 1), (std::vector<int64_t>{2 * tensor * 2, 2 * tensor * 4}));
  EXPECT_EQ(HostAllocationBytes(b, c, 10, 3), (std::vector<int64_t>{2 * tensor * 4}));
  EXPECT_EQ(HostAllocationBytes(b, c, 10, 6), (std::vector<int64_t>{}));
  b.set_host_kv_layer_group(1);
  EXPECT_EQ(HostAllocationBytes(b, c, 10, 4), (std::vector<int64_t>{2 * tensor, 2 * tensor}));
  b.set_host_kv_interleaved(false);
  EXPECT_EQ(HostAllocationBytes(b, c, 10, 5), (std::vector<int64_t>{tensor, tensor}));
}

// Layers of a group share one allocation: each layer's rows land at its own place in it, moves of one
// layer leave the others' rows alone, and the allocation lives until the group's last layer leaves.
TEST(KvPair, LayerGroupSharesOneAllocationAndKeepsEveryRow) {
  PairCpuBackend b;
  b.set_host_kv_layer_group(4);
  std::mt19937 rng(std::random_device{}());
  ModelConfig c = Config();
  c.num_hidden_layers = 6;  // groups {0, 1} and {2, 3, 4, 5}
  const int32_t capacity = 20, rows = 13, budget = 4;
  auto kv = AllocateTieredKv(b, c, capacity, /*gpu_layers=*/6, budget, nullptr, rows);
  ASSERT_TRUE(kv.ok()) << kv.status();
  SequenceKv& s = **kv;
  std::vector<Tensor> k0(6), v0(6);
  for (int l = 0; l < 6; ++l) {
    k0[l] = Random(b, s.k[l].shape(), rng);
    v0[l] = Random(b, s.v[l].shape(), rng);
    std::memcpy(s.k[l].data(), k0[l].data(), k0[l].nbytes());
    std::memcpy(s.v[l].data(), v0[l].data(), v0[l].nbytes());
  }
  const auto host_rows_match = [&](int l) {
    const KvRowsView hr = KvRowsOf(s.host_k[l], s.host_v[l]);
    for (int64_t h = 0; h < hr.heads; ++h) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t d = 0; d < hr.head_dim; ++d) {
          const int64_t at = (h * hr.rows + r) * hr.stride + d;
          if (static_cast<const float*>(hr.k)[at] != At(k0[l], h, r, d)) return false;
          if (static_cast<const float*>(hr.v)[at] != At(v0[l], h, r, d)) return false;
        }
      }
    }
    return true;
  };
  for (int l = 5; l >= 1; --l) ASSERT_TRUE(MoveLayerToHost(b, &s, l, budget).ok()) << l;
  // heads x layers x capacity x (K, V) x head_dim x f32; the first group holds 2 layers
  const int64_t group_bytes = 2 * 4 * int64_t{capacity} * 2 * c.head_dim * 4, layer_bytes = group_bytes / 4;
  EXPECT_EQ(b.host_memory_report().total, group_bytes + 2 * layer_bytes);
  for (int l = 2; l <= 5; ++l) {
    ASSERT_EQ(s.host_k[l].shape(), (Shape{2, capacity, 4, 2, c.head_dim}));
    EXPECT_EQ(s.host_k[l].storage(), s.host_k[2].storage());
    EXPECT_EQ(static_cast<char*>(s.host_k[l].data()) - static_cast<char*>(s.host_k[2].data()),
              (l - 2) * 2 * c.head_dim * 4);
    EXPECT_EQ(KvRowsOf(s.host_k[l], s.host_v[l]).stride, 4 * 2 * c.head_dim);
    EXPECT_TRUE(host_rows_match(l)) << l;
  }
  ASSERT_EQ(s.host_k[1].shape(), (Shape{2, capacity, 2, 2, c.head_dim}));  // the shorter first group
  EXPECT_TRUE(host_rows_match(1));
  // Layer 3 back to the device and out again: its rows survive, its neighbours' too.
  ASSERT_TRUE(MoveLayerToDevice(b, &s, 3, rows).ok());
  EXPECT_EQ(std::memcmp(s.k[3].data(), k0[3].data(), k0[3].nbytes()), 0);
  EXPECT_EQ(std::memcmp(s.v[3].data(), v0[3].data(), v0[3].nbytes()), 0);
  for (int l : {2, 4, 5}) EXPECT_TRUE(host_rows_match(l)) << l;
  k0[3] = Random(b, s.k[3].shape(), rng);
  std::memcpy(s.k[3].data(), k0[3].data(), k0[3].nbytes());
  ASSERT_TRUE(MoveLayerToHost(b, &s, 3, budget).ok());
  EXPECT_EQ(s.host_k[3].storage(), s.host_k[2].storage());
  for (int l = 1; l <= 5; ++l) EXPECT_TRUE(host_rows_match(l)) << l;
  // Plain allocator blocks take every layer of the groups row for row.
  ASSERT_TRUE(AdoptHostTier(b, &s, std::make_shared<PlainAllocator>(), rows).ok());
  for (int l = 1; l <= 5; ++l) {
    ASSERT_EQ(s.host_k[l].ndim(), 3);
    EXPECT_TRUE(host_rows_match(l)) << l;
  }
  EXPECT_EQ(b.host_memory_report().total, 5 * layer_bytes);  // plain K and V of 5 layers; the groups are gone
}

TEST(KvPair, LayerGroupAllocationLivesUntilItsLastLayerLeaves) {
  PairCpuBackend b;
  b.set_host_kv_layer_group(3);
  ModelConfig c = Config();
  c.num_hidden_layers = 3;
  auto kv = AllocateTieredKv(b, c, 8, /*gpu_layers=*/0, 2, nullptr, 8);
  ASSERT_TRUE(kv.ok()) << kv.status();
  SequenceKv& s = **kv;
  const int64_t group_bytes = 2 * 8 * 3 * 2 * c.head_dim * 4;
  EXPECT_EQ(b.host_memory_report().total, group_bytes);
  for (int l : {0, 2}) {
    ASSERT_TRUE(MoveLayerToDevice(b, &s, l, 8).ok());
    EXPECT_EQ(b.host_memory_report().total, group_bytes);
  }
  ASSERT_TRUE(MoveLayerToDevice(b, &s, 1, 8).ok());
  EXPECT_EQ(b.host_memory_report().total, 0);
}

TEST(KvPair, BackendsWithoutSupportStayPlain) {
  CpuBackend b(0);
  b.set_host_kv_interleaved(true);
  EXPECT_FALSE(b.host_kv_interleaved());
  auto kv = AllocateTieredKv(b, Config(), 8, 1, 4);
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ((*kv)->host_k[2].ndim(), 3);
  EXPECT_NE((*kv)->host_k[2].data(), (*kv)->host_v[2].data());
}

}  // namespace
}  // namespace specontext
