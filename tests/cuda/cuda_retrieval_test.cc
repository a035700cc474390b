// The retrieval head on the CUDA backend: the ops it adds (CopyToColumns, CopyHeadRows, ScatterRows) against the CPU
// backend at several shapes and dtypes with sentinel-filled destinations, DeviceRetrievalHead against the f32
// host reference (bf16 bound), and the backend's selection op on the head's device outputs.
#include <algorithm>
#include <cstring>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/sparse/selection.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/sparse/head_backend_check.h"

namespace specontext::testing {
namespace {

// A host tensor of `dtype` with random values (bf16-representable), and its device copy.
Tensor RandomOf(DType dtype, const Shape& shape, std::mt19937& rng) {
  Tensor f = RandomHost(shape, rng, -4.0f, 4.0f);
  if (dtype == DType::kF32) return f;
  Tensor t = Tensor::HostEmpty(dtype, shape);
  ConvertFromF32(f.as<float>(), dtype, t.data(), f.numel());
  return t;
}

Tensor Upload(Backend& b, const Tensor& host) {
  auto t = b.ToDevice(host, host.dtype(), MemoryKind::kWorkspace);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : Tensor();
}

Tensor Download(Backend& b, const Tensor& dev) {
  Tensor h = Tensor::HostEmpty(dev.dtype(), dev.shape());
  EXPECT_TRUE(b.ToHost(dev, &h).ok());
  return h;
}

void ExpectBytesEqual(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.nbytes(), want.nbytes()) << what;
  const size_t es = DTypeSize(got.dtype());
  for (size_t i = 0; i < got.nbytes(); i += es) {
    if (std::memcmp(static_cast<const char*>(got.data()) + i, static_cast<const char*>(want.data()) + i, es) != 0) {
      FAIL() << what << ": element " << i / es << " differs";
    }
  }
}

TEST(CudaRetrievalOps, CopyToColumnsMatchesCpu) {
  SPC_GPU_OR_SKIP(gpu);
  auto cpu = MakeCpuBackend();
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  struct Case { int64_t n, c, m, col; DType dtype; };
  for (const Case& k : {Case{1, 48, 96, 48, DType::kBF16}, Case{17, 5, 23, 11, DType::kF32}, Case{97, 4096, 8192, 0, DType::kBF16},
                        Case{3, 7, 7, 0, DType::kBF16}, Case{2049, 33, 99, 66, DType::kF32}}) {
    const std::string what = absl::StrCat("n=", k.n, " c=", k.c, " m=", k.m, " col=", k.col, " seed=", seed);
    Tensor src = RandomOf(k.dtype, {k.n, k.c}, rng), dst = RandomOf(k.dtype, {k.n, k.m}, rng);
    Tensor g_src = Upload(*gpu, src), g_dst = Upload(*gpu, dst);
    Tensor c_src = Upload(*cpu, src), c_dst = Upload(*cpu, dst);
    ASSERT_TRUE(gpu->CopyToColumns(g_src, k.col, &g_dst).ok()) << what;
    ASSERT_TRUE(cpu->CopyToColumns(c_src, k.col, &c_dst).ok()) << what;
    ExpectBytesEqual(Download(*gpu, g_dst), c_dst, what);
  }
  Tensor a = Upload(*gpu, RandomOf(DType::kBF16, {2, 4}, rng)), b = Upload(*gpu, RandomOf(DType::kBF16, {2, 6}, rng));
  EXPECT_FALSE(gpu->CopyToColumns(a, 3, &b).ok());
  Tensor f = Upload(*gpu, RandomOf(DType::kF32, {2, 6}, rng));
  EXPECT_FALSE(gpu->CopyToColumns(a, 0, &f).ok()) << "dtypes differ";
}

TEST(CudaRetrievalOps, CopyHeadRowsMatchesCpuBetweenDeviceAndPinnedHost) {
  SPC_GPU_OR_SKIP(gpu);
  auto cpu = MakeCpuBackend();
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  // Growing device KV (fewer rows -> more) and moving a layer to host (device rows -> pinned capacity rows).
  struct Case { int64_t heads, rs, rd, d, rows; DType dtype; bool to_host; };
  for (const Case& k : {Case{8, 2048, 4096, 128, 2048, DType::kBF16, false}, Case{3, 17, 40, 12, 17, DType::kF32, false},
                        Case{8, 4096, 34832, 128, 3001, DType::kBF16, true}, Case{1, 5, 5, 64, 5, DType::kBF16, true},
                        Case{4, 9, 16, 8, 0, DType::kF32, false}}) {
    const std::string what = absl::StrCat("heads=", k.heads, " rs=", k.rs, " rd=", k.rd, " rows=", k.rows,
                                          " host=", k.to_host, " seed=", seed);
    Tensor src = RandomOf(k.dtype, {k.heads, k.rs, k.d}, rng), dst = RandomOf(k.dtype, {k.heads, k.rd, k.d}, rng);
    Tensor want = Tensor::HostEmpty(k.dtype, dst.shape());
    std::memcpy(want.data(), dst.data(), dst.nbytes());
    ASSERT_TRUE(cpu->CopyHeadRows(src, &want, k.rows).ok()) << what;
    Tensor dsrc = Upload(*gpu, src), ddst;
    if (k.to_host) {
      auto h = gpu->AllocPinnedHost(k.dtype, dst.shape(), MemoryKind::kKvCache);
      ASSERT_TRUE(h.ok()) << h.status();
      ddst = *h;
      std::memcpy(ddst.data(), dst.data(), dst.nbytes());
    } else {
      ddst = Upload(*gpu, dst);
    }
    ASSERT_TRUE(gpu->CopyHeadRows(dsrc, &ddst, k.rows).ok()) << what;
    ASSERT_TRUE(gpu->Synchronize().ok());
    Tensor got = k.to_host ? ddst : Download(*gpu, ddst);
    ExpectBytesEqual(got, want, what);
  }
  // Pinned host -> device (a layer moving back to the device).
  {
    Tensor src = RandomOf(DType::kBF16, {8, 5000, 128}, rng), dst = RandomOf(DType::kBF16, {8, 4096, 128}, rng);
    Tensor want = Tensor::HostEmpty(DType::kBF16, dst.shape());
    std::memcpy(want.data(), dst.data(), dst.nbytes());
    ASSERT_TRUE(cpu->CopyHeadRows(src, &want, 3333).ok());
    auto h = gpu->AllocPinnedHost(DType::kBF16, src.shape(), MemoryKind::kKvCache);
    ASSERT_TRUE(h.ok()) << h.status();
    std::memcpy(h->data(), src.data(), src.nbytes());
    Tensor ddst = Upload(*gpu, dst);
    ASSERT_TRUE(gpu->CopyHeadRows(*h, &ddst, 3333).ok());
    ExpectBytesEqual(Download(*gpu, ddst), want, absl::StrCat("host to device, seed=", seed));
  }
  // Shapes that do not fit are refused by both backends, before anything is written.
  Tensor a = RandomOf(DType::kF32, {2, 4, 8}, rng), b = RandomOf(DType::kF32, {2, 3, 8}, rng);
  Tensor da = Upload(*gpu, a), db = Upload(*gpu, b);
  EXPECT_EQ(cpu->CopyHeadRows(a, &b, 4).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gpu->CopyHeadRows(da, &db, 4).code(), absl::StatusCode::kInvalidArgument);
  Tensor c = RandomOf(DType::kF32, {3, 4, 8}, rng);
  EXPECT_EQ(cpu->CopyHeadRows(a, &c, 2).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CudaRetrievalOps, CopyKvPairRowsMatchesCpuBothWays) {
  SPC_GPU_OR_SKIP(gpu);
  auto cpu = MakeCpuBackend();
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  // Interleaved host tiers (SequenceKv "Host layout"): a layer moving to host (device rows -> pinned pair of
  // capacity rows), back to the device, and the prefill staging's direction, at several shapes.
  struct Case { int64_t heads, plain_rows, pair_rows, d, rows; DType dtype; bool to_pair; };
  for (const Case& k : {Case{8, 4096, 34832, 128, 4096, DType::kBF16, true}, Case{8, 6144, 5000, 128, 4999, DType::kBF16, false},
                        Case{3, 17, 40, 12, 17, DType::kF32, true}, Case{2, 33, 20, 64, 20, DType::kBF16, false},
                        Case{4, 9, 16, 8, 0, DType::kF32, true}}) {
    const std::string what = absl::StrCat("heads=", k.heads, " plain=", k.plain_rows, " pair=", k.pair_rows,
                                          " rows=", k.rows, " to_pair=", k.to_pair, " seed=", seed);
    Tensor kh = RandomOf(k.dtype, {k.heads, k.plain_rows, k.d}, rng), vh = RandomOf(k.dtype, kh.shape(), rng);
    Tensor ph = RandomOf(k.dtype, {k.heads, k.pair_rows, 2, k.d}, rng);
    // CPU reference on host copies.
    Tensor kw = Tensor::HostEmpty(k.dtype, kh.shape()), vw = Tensor::HostEmpty(k.dtype, vh.shape());
    Tensor pw = Tensor::HostEmpty(k.dtype, ph.shape());
    std::memcpy(kw.data(), kh.data(), kh.nbytes());
    std::memcpy(vw.data(), vh.data(), vh.nbytes());
    std::memcpy(pw.data(), ph.data(), ph.nbytes());
    ASSERT_TRUE(cpu->CopyKvPairRows(&kw, &vw, &pw, k.rows, k.to_pair).ok()) << what;
    Tensor kd = Upload(*gpu, kh), vd = Upload(*gpu, vh);
    auto pd = gpu->AllocPinnedHost(k.dtype, ph.shape(), MemoryKind::kKvCache);
    ASSERT_TRUE(pd.ok()) << pd.status();
    std::memcpy(pd->data(), ph.data(), ph.nbytes());
    ASSERT_TRUE(gpu->CopyKvPairRows(&kd, &vd, &*pd, k.rows, k.to_pair).ok()) << what;
    ASSERT_TRUE(gpu->Synchronize().ok());
    ExpectBytesEqual(*pd, pw, "pair " + what);
    ExpectBytesEqual(Download(*gpu, kd), kw, "k " + what);
    ExpectBytesEqual(Download(*gpu, vd), vw, "v " + what);
  }
  Tensor a = RandomOf(DType::kF32, {2, 4, 8}, rng), b = RandomOf(DType::kF32, {2, 4, 8}, rng);
  Tensor da = Upload(*gpu, a), db = Upload(*gpu, b), plain = Upload(*gpu, a);
  EXPECT_EQ(gpu->CopyKvPairRows(&da, &db, &plain, 2, true).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CudaRetrievalOps, ScatterRowsMatchesCpuAndLeavesOtherRowsAlone) {
  SPC_GPU_OR_SKIP(gpu);
  auto cpu = MakeCpuBackend();
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  struct Case { int64_t heads, d; DType dtype; std::vector<int32_t> rows, caps; };
  const std::vector<Case> cases = {
      {8, 128, DType::kBF16, {1, 1, 1, 1, 1}, {64, 17, 3, 2049, 1}},      // a decode batch (16-byte rows)
      {2, 8, DType::kF32, {5, 0, 9, 1}, {16, 4, 97, 12}},                 // prompt chunks, an empty segment
      {3, 3, DType::kBF16, {4, 2}, {9, 5}},                               // 6-byte rows (2-byte access)
      {1, 12288, DType::kBF16, {7, 1, 3}, {8, 2, 40}},                    // a pool of eagle3 feature rows
      {4, 5, DType::kF32, {33}, {33}}};                                   // 20-byte rows (4-byte access)
  for (const Case& k : cases) {
    const std::string what = absl::StrCat("heads=", k.heads, " d=", k.d, " segs=", k.rows.size(), " seed=", seed);
    int64_t n = 0;
    for (int32_t r : k.rows) n += r;
    Tensor src = RandomOf(k.dtype, {std::max<int64_t>(n, 1), k.heads, k.d}, rng);
    Tensor g_src = Upload(*gpu, src), c_src = Upload(*cpu, src);
    std::vector<Tensor> g_dst, c_dst;
    for (int32_t cap : k.caps) {
      Tensor init = RandomOf(k.dtype, {k.heads, cap, k.d}, rng);
      g_dst.push_back(Upload(*gpu, init));
      c_dst.push_back(Upload(*cpu, init));
    }
    std::vector<RowScatter> g_seg, c_seg;
    int32_t row = 0;
    for (size_t s = 0; s < k.rows.size(); ++s) {
      const int32_t pos = static_cast<int32_t>(rng() % (k.caps[s] - k.rows[s] + 1));
      g_seg.push_back({&g_dst[s], row, k.rows[s], pos});
      c_seg.push_back({&c_dst[s], row, k.rows[s], pos});
      row += k.rows[s];
    }
    ASSERT_TRUE(gpu->ScatterRows(g_src, g_seg).ok()) << what;
    ASSERT_TRUE(cpu->ScatterRows(c_src, c_seg).ok()) << what;
    for (size_t s = 0; s < g_dst.size(); ++s) ExpectBytesEqual(Download(*gpu, g_dst[s]), c_dst[s], absl::StrCat(what, " dst ", s));
  }
  // Out of range: refused before anything is written.
  Tensor src = Upload(*gpu, RandomOf(DType::kBF16, {2, 1, 8}, rng));
  Tensor init = RandomOf(DType::kBF16, {1, 4, 8}, rng);
  Tensor dst = Upload(*gpu, init);
  std::vector<RowScatter> ok = {{&dst, 0, 1, 0}}, bad = {{&dst, 0, 2, 3}};
  std::vector<RowScatter> both = {ok[0], bad[0]};
  EXPECT_EQ(gpu->ScatterRows(src, both).code(), absl::StatusCode::kOutOfRange);
  ExpectBytesEqual(Download(*gpu, dst), init, "after a refused scatter");
}

TEST(CudaRetrievalHead, MatchesTheHostReference) {
  SPC_GPU_OR_SKIP(gpu);
  using testing_sparse::HeadShape;
  std::vector<HeadShape> shapes;
  HeadShape s;
  shapes.push_back(s);
  s.bias = s.qk_norm = true;
  s.head_dim = 64;
  shapes.push_back(s);
  s = HeadShape();
  s.yarn = true;
  s.head_dim = 128;
  s.n_heads = 8;
  s.hidden = 256;
  shapes.push_back(s);
  s = HeadShape();
  s.kind = RetrievalHeadKind::kEagle3;
  shapes.push_back(s);
  s.hidden = 128;
  s.head_dim = 32;
  s.qk_norm = true;
  shapes.push_back(s);
  s = HeadShape();  // EAGLE-3.1 fc_norm with an fc bias; speculators norm_before_fc (weights folded into fc)
  s.kind = RetrievalHeadKind::kEagle3;
  s.fused_norm = FusedNorm::kPerLayer;
  s.fc_bias = true;
  shapes.push_back(s);
  s.fused_norm = FusedNorm::kWhole;
  s.fc_bias = false;
  s.hidden = 128;
  s.head_dim = 32;
  shapes.push_back(s);
  for (const HeadShape& h : shapes) {
    testing_sparse::CheckObserveAgainstReference(*gpu, h, {{5, 0, 16}, {1, 37, 64}, {9, 100, 128}}, 4e-2, 3e-2, FreshSeed());
    testing_sparse::CheckObserveAgainstReference(*gpu, h, {{1, 3, 8}, {1, 0, 4}, {1, 63, 64}, {1, 17, 31}}, 4e-2, 3e-2,
                                                 FreshSeed());
  }
}

// The selection op of the CUDA backend on the head's bf16 outputs against the CPU reference on the same
// values: equal sets where the budget covers the past, valid sets that mostly agree otherwise.
TEST(CudaRetrievalHead, BackendSelectionOnDeviceOutputs) {
  SPC_GPU_OR_SKIP(gpu);
  const uint32_t seed = FreshSeed();
  std::mt19937 rng(seed);
  testing_sparse::HeadShape shape;
  shape.head_dim = 64;
  shape.n_heads = 8;
  auto rh = testing_sparse::MakeRandomHead(shape, rng);
  ASSERT_TRUE(rh.ok()) << rh.status();
  auto dh = DeviceRetrievalHead::Create(*rh->head, gpu.get());
  ASSERT_TRUE(dh.ok()) << dh.status();
  const std::vector<int32_t> lens = {300, 40, 1000};
  std::vector<Tensor> caches;
  std::vector<DeviceRetrievalHead::Seq> seqs;
  std::vector<int32_t> ids;
  for (int32_t len : lens) {
    auto c = (*dh)->AllocateCache(len + 1);
    ASSERT_TRUE(c.ok());
    caches.push_back(*c);
  }
  int64_t n = 0;
  for (size_t i = 0; i < lens.size(); ++i) {
    seqs.push_back({&caches[i], lens[i] + 1, 0});
    n += lens[i] + 1;
    for (int32_t t = 0; t <= lens[i]; ++t) ids.push_back(static_cast<int32_t>(rng() % shape.vocab));
  }
  auto q = gpu->Alloc(DType::kBF16, {n, 8, 64}, MemoryKind::kWorkspace);
  ASSERT_TRUE(q.ok());
  ASSERT_TRUE((*dh)->Observe(ids, seqs, nullptr, &*q).ok());
  // Each sequence's last query against its past.
  std::vector<SelectionQuery> g(lens.size()), c(lens.size());
  const Tensor q_host = DeviceToF32(*gpu, *q);
  int64_t row = 0;
  for (size_t i = 0; i < lens.size(); ++i) {
    row += lens[i] + 1;
    g[i].q = Tensor(static_cast<char*>(q->data()) + (row - 1) * 8 * 64 * 2, DType::kBF16, {8, 64}, DeviceKind::kCuda,
                    q->storage());
    g[i].k_cache = caches[i];
    g[i].len = c[i].len = lens[i];
    c[i].q = Tensor::HostEmpty(DType::kF32, {8, 64});
    std::copy_n(q_host.as<float>() + (row - 1) * 8 * 64, 8 * 64, c[i].q.as<float>());
    c[i].k_cache = DeviceToF32(*gpu, caches[i]);
  }
  SelectionOptions so;
  so.budget = 64;
  so.sink = 2;
  SelectionResult got;
  ASSERT_TRUE(gpu->SelectIndexSets(g.data(), g.size(), so, &got).ok());
  auto want = SelectTopB(c, so);
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_TRUE(ValidateIndexSets(got.sets).ok());
  ASSERT_EQ(got.sets.indptr, want->sets.indptr);
  for (int32_t g2 = 0; g2 < 2; ++g2) {
    auto a = got.sets.Positions(1, g2), b = want->sets.Positions(1, g2);  // len 40 <= 64: every position
    EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << "seed " << seed;
  }
  for (int32_t s = 0; s < got.sets.n_sets(); ++s) {
    auto a = got.sets.SetPositions(s), b = want->sets.SetPositions(s);
    std::vector<int32_t> common;
    std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(common));
    EXPECT_GE(common.size(), a.size() * 9 / 10) << "set " << s << " seed " << seed;
  }
}

}  // namespace
}  // namespace specontext::testing
