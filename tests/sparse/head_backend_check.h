// The check shared by the CPU (tests/sparse) and CUDA (tests/cuda) tests of DeviceRetrievalHead: a ragged
// batch observed on a backend against the f32 host reference RetrievalHead::Forward, sequence by sequence:
// every query row, every cache row written, and every other cache row untouched (sentinel values).
#pragma once

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/sparse/retrieval_head_device.h"
#include "gtest/gtest.h"
#include "tests/sparse/head_fixture.h"

namespace specontext::testing_sparse {

struct ObserveSeq {
  int32_t n_tokens, pos, capacity;
};

inline Tensor ToHostF32(Backend& b, const Tensor& t) {
  Tensor raw = Tensor::HostEmpty(t.dtype(), t.shape());
  EXPECT_TRUE(b.ToHost(t, &raw).ok());
  Tensor f = Tensor::HostEmpty(DType::kF32, t.shape());
  ConvertToF32(raw.data(), raw.dtype(), f.as<float>(), raw.numel());
  return f;
}

// |got - want| <= atol + rtol·|want| per element and finite; returns the largest error seen.
inline double ExpectNearAll(const float* got, const float* want, int64_t n, double atol, double rtol,
                            const std::string& what) {
  double worst = 0;
  int reported = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double err = std::fabs(double(got[i]) - want[i]);
    worst = std::max(worst, err);
    if ((!std::isfinite(got[i]) || err > atol + rtol * std::fabs(want[i])) && reported++ < 5) {
      ADD_FAILURE() << what << " element " << i << ": got " << got[i] << " want " << want[i];
    }
  }
  return worst;
}

inline void CheckObserveAgainstReference(Backend& b, const HeadShape& shape, const std::vector<ObserveSeq>& seqs,
                                         double atol, double rtol, uint32_t seed) {
  std::mt19937 rng(seed);
  const std::string what = absl::StrCat(shape.kind == RetrievalHeadKind::kEagle3 ? "eagle3" : "layer", " hd=",
                                        shape.head_dim, shape.bias ? " bias" : "", shape.qk_norm ? " qk_norm" : "",
                                        shape.yarn ? " yarn" : "",
                                        shape.fused_norm == FusedNorm::kPerLayer ? " fc_norm"
                                        : shape.fused_norm == FusedNorm::kWhole  ? " norm_before_fc"
                                                                                 : "",
                                        shape.fc_bias ? " fc_bias" : "", " seed=", seed);
  SCOPED_TRACE(what);
  auto rh = MakeRandomHead(shape, rng);
  ASSERT_TRUE(rh.ok()) << rh.status();
  const RetrievalHead& head = *rh->head;
  auto dh = DeviceRetrievalHead::Create(head, &b);
  ASSERT_TRUE(dh.ok()) << dh.status();
  const int64_t nq = head.n_heads(), nkv = head.n_kv_heads(), hd = head.head_dim(), fw = head.fused_width();
  int64_t n = 0;
  for (const ObserveSeq& s : seqs) n += s.n_tokens;
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % shape.vocab);
  Tensor fused_host = Bf16Exact(rng, {n, fw}, 2.0f);
  Tensor fused;
  if (fw > 0) {
    auto f = b.ToDevice(fused_host, b.compute_dtype(), MemoryKind::kWorkspace);
    ASSERT_TRUE(f.ok()) << f.status();
    fused = *f;
  }
  // Caches filled with sentinels, so that rows the batch must not touch can be checked.
  std::vector<Tensor> caches, sentinels;
  std::vector<DeviceRetrievalHead::Seq> batch;
  for (const ObserveSeq& s : seqs) {
    auto c = (*dh)->AllocateCache(s.capacity);
    ASSERT_TRUE(c.ok()) << c.status();
    Tensor sent = Bf16Exact(rng, c->shape(), 100.0f);
    Tensor conv = Tensor::HostEmpty(c->dtype(), c->shape());
    ConvertFromF32(sent.as<float>(), c->dtype(), conv.data(), sent.numel());
    ASSERT_TRUE(b.CopyToDevice(conv, &*c).ok());
    caches.push_back(*c);
    sentinels.push_back(sent);
  }
  int32_t row = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    batch.push_back({&caches[i], seqs[i].n_tokens, seqs[i].pos});
    row += seqs[i].n_tokens;
  }
  auto q = b.Alloc(b.compute_dtype(), {n, nq, hd}, MemoryKind::kWorkspace);
  ASSERT_TRUE(q.ok());
  absl::Status st = (*dh)->Observe(ids, batch, fw > 0 ? &fused : nullptr, &*q);
  ASSERT_TRUE(st.ok()) << st;
  const Tensor q_got = ToHostF32(b, *q);
  row = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const ObserveSeq& s = seqs[i];
    std::vector<int32_t> sid(ids.begin() + row, ids.begin() + row + s.n_tokens), pos(s.n_tokens);
    for (int32_t j = 0; j < s.n_tokens; ++j) pos[j] = s.pos + j;
    Tensor f = Tensor::HostEmpty(DType::kF32, {s.n_tokens, fw});
    if (fw > 0) std::copy_n(fused_host.as<float>() + row * fw, s.n_tokens * fw, f.as<float>());
    Tensor q_ref = Tensor::HostEmpty(DType::kF32, {s.n_tokens, nq, hd});
    Tensor k_ref = Tensor::HostEmpty(DType::kF32, {s.n_tokens, nkv, hd});
    ASSERT_TRUE(head.Forward(sid, pos, f, &q_ref, &k_ref).ok());
    ExpectNearAll(q_got.as<float>() + row * nq * hd, q_ref.as<float>(), s.n_tokens * nq * hd, atol, rtol,
                  absl::StrCat("seq ", i, " q"));
    const Tensor k_got = ToHostF32(b, caches[i]);
    for (int64_t g = 0; g < nkv; ++g) {
      for (int32_t p = 0; p < s.capacity; ++p) {
        const float* got = k_got.as<float>() + (g * s.capacity + p) * hd;
        if (p >= s.pos && p < s.pos + s.n_tokens) {
          ExpectNearAll(got, k_ref.as<float>() + ((p - s.pos) * nkv + g) * hd, hd, atol, rtol,
                        absl::StrCat("seq ", i, " k head ", g, " position ", p));
        } else {
          const float* sent = sentinels[i].as<float>() + (g * s.capacity + p) * hd;
          for (int64_t e = 0; e < hd; ++e) {
            ASSERT_EQ(got[e], sent[e]) << "seq " << i << " head " << g << " row " << p << " was overwritten";
          }
        }
      }
    }
    row += s.n_tokens;
  }
}

}  // namespace specontext::testing_sparse
