// The CPU backend (the reference of every other backend) against naive formulas.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/backend.h"

namespace specontext {
namespace {

Tensor Random(Shape s, std::mt19937& rng, float scale = 1.0f) {
  Tensor t = Tensor::HostEmpty(DType::kF32, s);
  std::normal_distribution<float> d(0, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = d(rng);
  return t;
}

TEST(CpuOps, LinearWithBiasMatchesLoops) {
  std::mt19937 rng(1);
  auto b = MakeCpuBackend();
  for (auto [n, k, m] : {std::tuple{1, 17, 97}, std::tuple{5, 64, 33}, std::tuple{13, 2049, 7}}) {
    Tensor x = Random({n, k}, rng), w = Random({m, k}, rng), bias = Random({m}, rng);
    Tensor out = Tensor::HostEmpty(DType::kF32, {n, m});
    ASSERT_TRUE(b->Linear(x, w, &bias, &out).ok());
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < m; ++j) {
        double acc = bias.as<float>()[j];
        for (int e = 0; e < k; ++e) acc += double(x.as<float>()[i * k + e]) * w.as<float>()[j * k + e];
        ASSERT_NEAR(out.as<float>()[i * m + j], acc, 1e-4 * (1 + std::fabs(acc)));
      }
    }
  }
}

TEST(CpuOps, Bf16WeightsMatchF32OfTheSameValues) {
  std::mt19937 rng(5);
  auto b = MakeCpuBackend();
  for (int n : {1, 3, 8, 9, 20}) {
    const int k = 97, m = 130;
    Tensor x = Random({n, k}, rng), w = Random({m, k}, rng);
    for (int64_t i = 0; i < w.numel(); ++i) w.as<float>()[i] = Bf16ToF32(F32ToBf16(w.as<float>()[i]));
    Tensor w16 = b->ToDevice(w, DType::kBF16, MemoryKind::kWeights).value();
    ASSERT_EQ(w16.dtype(), DType::kBF16);
    Tensor ref = Tensor::HostEmpty(DType::kF32, {n, m}), got = Tensor::HostEmpty(DType::kF32, {n, m});
    ASSERT_TRUE(b->Linear(x, w, nullptr, &ref).ok());
    ASSERT_TRUE(b->Linear(x, w16, nullptr, &got).ok());
    for (int64_t i = 0; i < ref.numel(); ++i) {
      ASSERT_NEAR(got.as<float>()[i], ref.as<float>()[i], 1e-4 * (1 + std::fabs(ref.as<float>()[i]))) << n;
    }
    std::vector<int32_t> ids = {5, 0, 129};
    Tensor ids_t(ids.data(), DType::kI32, {3});
    Tensor e32 = Tensor::HostEmpty(DType::kF32, {3, k}), e16 = Tensor::HostEmpty(DType::kF32, {3, k});
    ASSERT_TRUE(b->Embedding(w, ids_t, &e32).ok());
    ASSERT_TRUE(b->Embedding(w16, ids_t, &e16).ok());
    for (int64_t i = 0; i < e32.numel(); ++i) ASSERT_EQ(e32.as<float>()[i], e16.as<float>()[i]);
  }
}

TEST(CpuOps, RopeRotatesPairsByPosition) {
  std::mt19937 rng(2);
  auto b = MakeCpuBackend();
  const int n = 3, heads = 2, hd = 8;
  std::vector<float> inv = {1.0f, 0.5f, 0.25f, 0.125f};
  Tensor inv_t(inv.data(), DType::kF32, {4});
  std::vector<int32_t> pos = {0, 7, 300};
  Tensor pos_t(pos.data(), DType::kI32, {n});
  for (bool interleaved : {false, true}) {
    Tensor x = Random({n, heads, hd}, rng);
    Tensor orig = Tensor::HostEmpty(DType::kF32, x.shape());
    std::copy_n(x.as<float>(), x.numel(), orig.as<float>());
    ASSERT_TRUE(b->Rope(&x, pos_t, {&inv_t, interleaved, 1.0f}).ok());
    for (int i = 0; i < n; ++i) {
      for (int h = 0; h < heads; ++h) {
        for (int j = 0; j < hd / 2; ++j) {
          const int a = interleaved ? 2 * j : j, c = interleaved ? 2 * j + 1 : j + hd / 2;
          const float* o = orig.as<float>() + (i * heads + h) * hd;
          const float* r = x.as<float>() + (i * heads + h) * hd;
          const double ang = double(pos[i]) * inv[j];
          EXPECT_NEAR(r[a], o[a] * std::cos(ang) - o[c] * std::sin(ang), 1e-4);
          EXPECT_NEAR(r[c], o[c] * std::cos(ang) + o[a] * std::sin(ang), 1e-4);
        }
      }
    }
  }
}

TEST(CpuOps, RaggedGqaAttentionMatchesNaiveSoftmax) {
  std::mt19937 rng(3);
  auto b = MakeCpuBackend();
  const int n_heads = 8, n_kv = 2, hd = 16, cap = 40;
  // Two sequences: 3 new tokens after 5 cached ones, and 1 new token after 20.
  std::vector<SeqSlice> slices = {{0, 3, 5}, {3, 1, 20}};
  std::vector<SequenceKv> kv(2);
  for (auto& s : kv) {
    s.capacity = cap;
    s.k.push_back(Random({n_kv, cap, hd}, rng));
    s.v.push_back(Random({n_kv, cap, hd}, rng));
  }
  BatchDesc batch{slices, {&kv[0], &kv[1]}, 4};
  ASSERT_TRUE(b->PrepareBatch(batch).ok());
  Tensor q = Random({4, n_heads, hd}, rng), k = Random({4, n_kv, hd}, rng), v = Random({4, n_kv, hd}, rng);
  ASSERT_TRUE(b->KvAppend(0, k, v).ok());
  Tensor out = Tensor::HostEmpty(DType::kF32, {4, n_heads, hd});
  const float scale = 0.25f;
  ASSERT_TRUE(b->Attention(0, q, scale, &out).ok());
  for (size_t s = 0; s < slices.size(); ++s) {
    for (int t = 0; t < slices[s].n_tokens; ++t) {
      const int row = slices[s].token_begin + t, pos = slices[s].past_len + t;
      // The appended rows landed at their positions.
      for (int g = 0; g < n_kv; ++g) {
        for (int e = 0; e < hd; ++e) {
          ASSERT_EQ(kv[s].k[0].as<float>()[(g * cap + pos) * hd + e], k.as<float>()[(row * n_kv + g) * hd + e]);
        }
      }
      for (int h = 0; h < n_heads; ++h) {
        const int g = h / (n_heads / n_kv);
        std::vector<double> w(pos + 1);
        double mx = -1e30, sum = 0;
        for (int j = 0; j <= pos; ++j) {
          double dot = 0;
          for (int e = 0; e < hd; ++e) {
            dot += double(q.as<float>()[(row * n_heads + h) * hd + e]) * kv[s].k[0].as<float>()[(g * cap + j) * hd + e];
          }
          w[j] = dot * scale;
          mx = std::max(mx, w[j]);
        }
        for (double& x : w) sum += (x = std::exp(x - mx));
        for (int e = 0; e < hd; ++e) {
          double acc = 0;
          for (int j = 0; j <= pos; ++j) acc += w[j] / sum * kv[s].v[0].as<float>()[(g * cap + j) * hd + e];
          ASSERT_NEAR(out.as<float>()[(row * n_heads + h) * hd + e], acc, 1e-5);
        }
      }
    }
  }
  // A batch that overflows a sequence's capacity is refused.
  BatchDesc overflow{{{0, 4, cap - 2}}, {&kv[0]}, 4};
  ASSERT_TRUE(b->PrepareBatch(overflow).ok());
  EXPECT_EQ(b->KvAppend(0, k, v).code(), absl::StatusCode::kOutOfRange);
}

TEST(CpuOps, NormsAndSwiGlu) {
  std::mt19937 rng(4);
  auto b = MakeCpuBackend();
  Tensor x = Random({3, 33}, rng), w = Random({33}, rng), res = Random({3, 33}, rng);
  Tensor res0 = Tensor::HostEmpty(DType::kF32, {3, 33});
  std::copy_n(res.as<float>(), res.numel(), res0.as<float>());
  Tensor out = Tensor::HostEmpty(DType::kF32, {3, 33});
  ASSERT_TRUE(b->AddRmsNorm(&res, x, w, 1e-6f, &out).ok());
  for (int i = 0; i < 3; ++i) {
    double ss = 0;
    for (int j = 0; j < 33; ++j) {
      const double r = res0.as<float>()[i * 33 + j] + x.as<float>()[i * 33 + j];
      ASSERT_NEAR(res.as<float>()[i * 33 + j], r, 1e-6);
      ss += r * r;
    }
    const double inv = 1 / std::sqrt(ss / 33 + 1e-6);
    for (int j = 0; j < 33; ++j) {
      ASSERT_NEAR(out.as<float>()[i * 33 + j], res.as<float>()[i * 33 + j] * inv * w.as<float>()[j], 1e-5);
    }
  }
  Tensor g = Random({2, 9}, rng), u = Random({2, 9}, rng), o = Tensor::HostEmpty(DType::kF32, {2, 9});
  ASSERT_TRUE(b->SwiGlu(g, u, &o).ok());
  for (int i = 0; i < 18; ++i) {
    const double gv = g.as<float>()[i];
    ASSERT_NEAR(o.as<float>()[i], gv / (1 + std::exp(-gv)) * u.as<float>()[i], 1e-6);
  }
  Tensor bad = Random({3, 34}, rng);
  EXPECT_FALSE(b->RmsNorm(bad, w, 1e-6f, &bad).ok());
}

}  // namespace
}  // namespace specontext
