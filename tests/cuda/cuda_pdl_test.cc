// Programmatic dependent launch (core/cuda/kernels/elementwise.h: LaunchPdl, PdlWait) of the decode kernels:
// GEMV (split and unsplit k, weights loaded before the wait, SwiGLU epilogue, f32 logits), RMSNorm (+ residual),
// RoPE, SwiGLU, bias add, argmax. A kernel launched with PDL (recorded into a graph) may start while the one before it
// still runs; reading anything before its PdlWait would see stale data. So a chain of dependent ops runs
// with a fresh input every round and its buffers zeroed (what a stale read would expose), back to back on
// the stream and as a replayed step graph, and must equal bitwise the same chain with a device sync after
// every op, and the CPU backend within bf16 bounds. Shapes: the 1B model's (split k, 2048 wide), odd ones (row
// tails) and a large m (many row blocks).
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/sampling.h"
#include "tests/cuda/cuda_test_util.h"

namespace specontext::testing {
namespace {

struct ChainShape {
  int64_t n;       // tokens (rows)
  int64_t d;       // hidden
  int64_t f;       // MLP width (gate/up [2 f, d], down [d, f])
  int64_t heads;   // RoPE heads of head_dim 64 over the first heads * 64 columns of q (heads * 64 <= d)
  int64_t vocab;   // logits [n, vocab] f32
};

// The weights of one chain, host f32 (bf16-representable) and on a backend.
struct ChainWeights {
  Tensor norm0, norm1, norm2, wq, bq, wgu, wd, wlm, inv_freq;
};

struct DeviceChain {
  Tensor norm0, norm1, norm2, wq, bq, wgu, wd, wlm, inv_freq;
};

DeviceChain Upload(Backend& b, const ChainWeights& w, DType wt) {
  DeviceChain d;
  const DType ct = b.compute_dtype();
  d.norm0 = *b.ToDevice(w.norm0, ct, MemoryKind::kWeights);
  d.norm1 = *b.ToDevice(w.norm1, ct, MemoryKind::kWeights);
  d.norm2 = *b.ToDevice(w.norm2, ct, MemoryKind::kWeights);
  d.wq = *b.ToDevice(w.wq, wt, MemoryKind::kWeights);
  d.bq = *b.ToDevice(w.bq, ct, MemoryKind::kWeights);
  d.wgu = *b.ToDevice(w.wgu, wt, MemoryKind::kWeights);
  d.wd = *b.ToDevice(w.wd, wt, MemoryKind::kWeights);
  d.wlm = *b.ToDevice(w.wlm, wt, MemoryKind::kWeights);
  d.inv_freq = *b.ToDevice(w.inv_freq, DType::kF32, MemoryKind::kWeights);
  return d;
}

// Buffers the chain reads and writes: x and positions are refilled every round.
struct ChainIo {
  Tensor x, pos, residual, h, q, act, o, logits, ids;
};

ChainIo AllocIo(Backend& b, const ChainShape& s) {
  const DType ct = b.compute_dtype();
  ChainIo io;
  io.x = *b.Alloc(ct, {s.n, s.d}, MemoryKind::kOther);
  io.pos = *b.Alloc(DType::kI32, {s.n}, MemoryKind::kOther);
  io.residual = *b.Alloc(ct, {s.n, s.d}, MemoryKind::kOther);
  io.h = *b.Alloc(ct, {s.n, s.d}, MemoryKind::kOther);
  io.q = *b.Alloc(ct, {s.n, s.d}, MemoryKind::kOther);
  io.act = *b.Alloc(ct, {s.n, s.f}, MemoryKind::kOther);
  io.o = *b.Alloc(ct, {s.n, s.d}, MemoryKind::kOther);
  io.logits = *b.Alloc(DType::kF32, {s.n, s.vocab}, MemoryKind::kOther);
  io.ids = *b.Alloc(DType::kI32, {s.n}, MemoryKind::kOther);
  return io;
}

// The chain: residual = x; h = norm(x); q = h·Wqᵀ + bq; RoPE on q's first heads; residual += q, h = norm;
// act = SwiGlu(h·Wguᵀ) (fused where the backend has it); o = act·Wdᵀ; residual += o, h = norm; logits =
// h·Wlmᵀ (f32). Every op reads the one before. `sync`: a device sync after every op (no overlap at all).
absl::Status RunChain(Backend& b, const ChainShape& s, const DeviceChain& w, ChainIo& io, bool sync) {
  auto step = [&](absl::Status st) -> absl::Status {
    if (!st.ok() || !sync) return st;
    return b.Synchronize();
  };
  const float eps = 1e-5f;
  if (absl::Status st = step(b.CopyDevice(io.x, &io.residual)); !st.ok()) return st;
  if (absl::Status st = step(b.RmsNorm(io.x, w.norm0, eps, &io.h)); !st.ok()) return st;
  if (absl::Status st = step(b.Linear(io.h, w.wq, &w.bq, &io.q)); !st.ok()) return st;
  // RoPE over the first heads * 64 columns of each row: rows of q are d wide, so rotate row by row views.
  for (int64_t i = 0; i < s.n; ++i) {
    Tensor row(static_cast<char*>(io.q.data()) + i * s.d * static_cast<int64_t>(DTypeSize(io.q.dtype())), io.q.dtype(), {1, s.heads, 64}, io.q.device(),
               io.q.storage());
    Tensor p(static_cast<int32_t*>(io.pos.data()) + i, DType::kI32, {1}, io.pos.device(), io.pos.storage());
    RopeArgs ra;
    ra.inv_freq = &w.inv_freq;
    if (absl::Status st = step(b.Rope(&row, p, ra)); !st.ok()) return st;
  }
  if (absl::Status st = step(b.AddRmsNorm(&io.residual, io.q, w.norm1, eps, &io.h)); !st.ok()) return st;
  absl::Status fused = b.LinearSwiGlu(io.h, w.wgu, &io.act);
  if (absl::IsUnimplemented(fused)) {
    Tensor gu = *b.Alloc(b.compute_dtype(), {s.n, 2 * s.f}, MemoryKind::kWorkspace);
    if (absl::Status st = step(b.Linear(io.h, w.wgu, nullptr, &gu)); !st.ok()) return st;
    Tensor gate = *b.Alloc(b.compute_dtype(), {s.n, s.f}, MemoryKind::kWorkspace);
    Tensor up = *b.Alloc(b.compute_dtype(), {s.n, s.f}, MemoryKind::kWorkspace);
    if (absl::Status st = step(b.CopyColumns(gu, 0, &gate)); !st.ok()) return st;
    if (absl::Status st = step(b.CopyColumns(gu, s.f, &up)); !st.ok()) return st;
    if (absl::Status st = step(b.SwiGlu(gate, up, &io.act)); !st.ok()) return st;
  } else if (absl::Status st = step(fused); !st.ok()) {
    return st;
  }
  if (absl::Status st = step(b.Linear(io.act, w.wd, nullptr, &io.o)); !st.ok()) return st;
  if (absl::Status st = step(b.AddRmsNorm(&io.residual, io.o, w.norm2, eps, &io.h)); !st.ok()) return st;
  return step(b.Linear(io.h, w.wlm, nullptr, &io.logits));
}

ChainWeights RandomWeights(const ChainShape& s, std::mt19937& rng) {
  ChainWeights w;
  w.norm0 = RandomHost({s.d}, rng, 0.5f, 1.5f);
  w.norm1 = RandomHost({s.d}, rng, 0.5f, 1.5f);
  w.norm2 = RandomHost({s.d}, rng, 0.5f, 1.5f);
  const float sd = 1.0f / std::sqrt(static_cast<float>(s.d)), sf = 1.0f / std::sqrt(static_cast<float>(s.f));
  w.wq = RandomHost({s.d, s.d}, rng, -sd, sd);
  w.bq = RandomHost({s.d}, rng, -0.2f, 0.2f);
  w.wgu = RandomHost({2 * s.f, s.d}, rng, -2 * sd, 2 * sd);
  w.wd = RandomHost({s.d, s.f}, rng, -sf, sf);
  w.wlm = RandomHost({s.vocab, s.d}, rng, -sd, sd);
  w.inv_freq = Tensor::HostEmpty(DType::kF32, {32});
  for (int j = 0; j < 32; ++j) w.inv_freq.as<float>()[j] = std::pow(10000.0f, -j / 32.0f);
  return w;
}

void CheckChain(const ChainShape& s, int gemv_max_n, std::mt19937& rng) {
  CudaBackendOptions opt;
  opt.gemv_max_n = gemv_max_n;
  SPC_GPU_OR_SKIP(gpu, opt);
  auto cpu = MakeCpuBackend();
  const std::string what = "chain n=" + std::to_string(s.n) + " d=" + std::to_string(s.d) + " f=" +
                           std::to_string(s.f) + " vocab=" + std::to_string(s.vocab);
  const ChainWeights hw = RandomWeights(s, rng);
  const DeviceChain gw = Upload(*gpu, hw, DType::kBF16), cw = Upload(*cpu, hw, DType::kF32);
  ChainIo gio = AllocIo(*gpu, s), cio = AllocIo(*cpu, s);
  gpu->set_step_graphs(true);
  constexpr int kRounds = 6;
  std::vector<int32_t> pos(s.n);
  for (int round = 0; round < kRounds; ++round) {
    const std::string r = what + " round " + std::to_string(round);
    Tensor x = RandomHost({s.n, s.d}, rng, -2.0f, 2.0f);
    for (int64_t i = 0; i < s.n; ++i) pos[i] = static_cast<int32_t>(rng() % 40000);
    const Tensor hpos(pos.data(), DType::kI32, {s.n});
    // Reference with a sync after every op, then the same chain back to back (stream; graph from round 1 on:
    // round 0 records, the others replay it).
    Tensor ref = Tensor::HostEmpty(DType::kF32, {s.n, s.vocab}), got = Tensor::HostEmpty(DType::kF32, {s.n, s.vocab});
    Tensor ref_ids = Tensor::HostEmpty(DType::kI32, {s.n}), got_ids = Tensor::HostEmpty(DType::kI32, {s.n});
    for (int mode = 0; mode < 3; ++mode) {
      Tensor xb = *gpu->ToDevice(x, gpu->compute_dtype(), MemoryKind::kOther);
      ASSERT_TRUE(gpu->CopyDevice(xb, &gio.x).ok());
      ASSERT_TRUE(gpu->CopyToDevice(hpos, &gio.pos).ok());
      // Stale data everywhere the chain writes: a read before the writer finished would see it.
      ASSERT_TRUE(gpu->Zero(&gio.h).ok());
      ASSERT_TRUE(gpu->Zero(&gio.q).ok());
      ASSERT_TRUE(gpu->Zero(&gio.act).ok());
      ASSERT_TRUE(gpu->Zero(&gio.o).ok());
      absl::Status st;
      // The chain, then the argmax of its logits (in the graph too).
      auto chain = [&]() -> absl::Status {
        if (absl::Status c = RunChain(*gpu, s, gw, gio, /*sync=*/mode == 0); !c.ok()) return c;
        return CudaArgmax(*gpu, gio.logits, &gio.ids);
      };
      if (mode == 2) {
        st = gpu->RunStepGraph(0x4844350000ull + static_cast<uint64_t>(s.n), chain);
      } else {
        st = chain();
      }
      ASSERT_TRUE(st.ok()) << r << " mode " << mode << ": " << st;
      ASSERT_TRUE(gpu->ToHost(gio.logits, mode == 0 ? &ref : &got).ok());
      ASSERT_TRUE(gpu->ToHost(gio.ids, mode == 0 ? &ref_ids : &got_ids).ok());
      if (mode > 0) {
        ASSERT_EQ(std::memcmp(ref.data(), got.data(), ref.nbytes()), 0)
            << r << (mode == 1 ? ": back to back" : ": step graph") << " differs from the synced chain";
        ASSERT_EQ(std::memcmp(ref_ids.data(), got_ids.data(), ref_ids.nbytes()), 0) << r << " mode " << mode << ": ids";
      }
    }
    for (int64_t i = 0; i < s.n; ++i) {  // host argmax of the downloaded logits (first maximum)
      const float* row = ref.as<float>() + i * s.vocab;
      int64_t best = 0;
      for (int64_t v = 1; v < s.vocab; ++v) best = row[v] > row[best] ? v : best;
      EXPECT_EQ(ref_ids.as<int32_t>()[i], best) << r << " argmax row " << i;
    }
    ASSERT_TRUE(cpu->CopyToDevice(x, &cio.x).ok());
    ASSERT_TRUE(cpu->CopyToDevice(hpos, &cio.pos).ok());
    ASSERT_TRUE(RunChain(*cpu, s, cw, cio, false).ok());
    // bf16 activations through three GEMVs and three norms against f32: a loose bound, but a stale input
    // (zeros, or the previous round's x) is far outside it.
    ExpectClose(ref, cio.logits, Tolerance{8e-2, 8e-2, 4e-2}, r + " vs CPU");
  }
}

TEST(CudaPdlChain, OneBShapes) {
  std::mt19937 rng(FreshSeed());
  CheckChain({1, 2048, 8192, 32, 4096}, 1, rng);
}

TEST(CudaPdlChain, OddShapesAndRowGrid) {
  std::mt19937 rng(FreshSeed());
  CheckChain({1, 520, 1000, 8, 70000}, 1, rng);  // m = 70000 logits: many row blocks; 520: partial warps
  CheckChain({3, 264, 4096, 4, 999}, 8, rng);    // n = 3 on the GEMV; gate/up m 4096
}

TEST(CudaPdlChain, CublasPathStillChains) {
  std::mt19937 rng(FreshSeed());
  CheckChain({5, 256, 384, 4, 1000}, 1, rng);  // n = 5 > gemv_max_n: cuBLAS + SwiGlu + bias kernels
}

// Argmax after a PDL GEMV into f32 logits, back to back: the ids equal the host argmax of the downloaded
// logits.
TEST(CudaPdlChain, ArgmaxAfterGemv) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  for (int64_t vocab : {1000, 128256}) {
    const int64_t n = 1, d = 2048;
    const float sd = 1.0f / std::sqrt(static_cast<float>(d));
    Tensor w = RandomHost({vocab, d}, rng, -sd, sd);
    Tensor gw = *gpu->ToDevice(w, DType::kBF16, MemoryKind::kWeights);
    Tensor logits = *gpu->Alloc(DType::kF32, {n, vocab}, MemoryKind::kOther);
    Tensor ids = *gpu->Alloc(DType::kI32, {n}, MemoryKind::kOther);
    for (int round = 0; round < 4; ++round) {
      Tensor x = *gpu->ToDevice(RandomHost({n, d}, rng, -2.0f, 2.0f), DType::kBF16, MemoryKind::kOther);
      ASSERT_TRUE(gpu->Linear(x, gw, nullptr, &logits).ok());
      ASSERT_TRUE(CudaArgmax(*gpu, logits, &ids).ok());
      Tensor hl = Tensor::HostEmpty(DType::kF32, {n, vocab});
      Tensor hi = Tensor::HostEmpty(DType::kI32, {n});
      ASSERT_TRUE(gpu->ToHost(logits, &hl).ok());
      ASSERT_TRUE(gpu->ToHost(ids, &hi).ok());
      int64_t best = 0;
      for (int64_t v = 1; v < vocab; ++v) {
        if (hl.as<float>()[v] > hl.as<float>()[best]) best = v;
      }
      EXPECT_EQ(hi.as<int32_t>()[0], best) << "vocab " << vocab << " round " << round;
    }
  }
}

// The argmax's blocks split a row (a cluster per row): ties across slices go to the lower index, NaN never
// wins, a row of -inf gives 0; rows of odd lengths (slices not 16-byte aligned) and several rows at once.
TEST(CudaPdlChain, ArgmaxSlicesTiesAndSpecials) {
  SPC_GPU_OR_SKIP(gpu);
  std::mt19937 rng(FreshSeed());
  for (int64_t vocab : {1, 7, 33, 1001, 128256, 151939}) {
    const int64_t rows = 5;
    Tensor h = RandomHost({rows, vocab}, rng, -5.0f, 5.0f);
    float* x = h.as<float>();
    std::vector<int32_t> want(rows, 0);
    // row 0: random; row 1: one maximum repeated at 3 places (a late one first); row 2: NaNs around the
    // maximum; row 3: all -inf; row 4: the maximum at the last index.
    for (int64_t r = 0; r < rows; ++r) {
      float* row = x + r * vocab;
      if (r == 1) {
        const int64_t a = static_cast<int64_t>(rng() % vocab), b = static_cast<int64_t>(rng() % vocab);
        row[vocab - 1] = row[a] = row[b] = 9.0f;
      } else if (r == 2) {
        for (int64_t v = 0; v < vocab; v += 3) row[v] = std::nanf("");
      } else if (r == 3) {
        for (int64_t v = 0; v < vocab; ++v) row[v] = -INFINITY;
      } else if (r == 4) {
        row[vocab - 1] = 11.0f;
      }
      int64_t best = -1;
      for (int64_t v = 0; v < vocab; ++v) {
        if (std::isnan(row[v]) || row[v] == -INFINITY) continue;
        if (best < 0 || row[v] > row[best]) best = v;
      }
      want[r] = best < 0 ? 0 : static_cast<int32_t>(best);
    }
    Tensor logits = *gpu->ToDevice(h, DType::kF32, MemoryKind::kOther);
    Tensor ids = *gpu->Alloc(DType::kI32, {rows}, MemoryKind::kOther);
    ASSERT_TRUE(CudaArgmax(*gpu, logits, &ids).ok());
    Tensor got = Tensor::HostEmpty(DType::kI32, {rows});
    ASSERT_TRUE(gpu->ToHost(ids, &got).ok());
    for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(got.as<int32_t>()[r], want[r]) << "vocab " << vocab << " row " << r;
  }
}

}  // namespace
}  // namespace specontext::testing
