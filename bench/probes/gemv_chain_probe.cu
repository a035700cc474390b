// Standalone probe (not part of the build), run on the GPU machine 2026-11-24 for docs/benchmarks.md
// "Findings: launches and kernels".
// Build here: nvcc -O3 -std=c++17 -arch=sm_90 -I. --expt-relaxed-constexpr -o build-probe/gemv_chain_probe
// bench/probes/gemv_chain_probe.cu core/cuda/kernels/gemv.cu core/cuda/kernels/norm.cu (add -DOLD_GEMV=<file> and
// that file to compare another GEMV whose LaunchGemv lives in namespace specontext::cuda::old).
// Probe: the decode GEMVs of the Llama-3.2-1B and -3.1-8B shapes at n = 1 inside a CUDA graph with PDL, as the
// step graphs run them: (1) each projection alone, back to back over distinct weights, per split; (2) the
// projections and norms of 16 (1B) or 32 (8B) layers and the LM head. Prints µs and the fraction of the
// measured copy bandwidth (read + write of a device copy; reads alone run faster, so GEMVs pass 100%).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "core/cuda/kernels/elementwise.h"
#include "core/cuda/kernels/gemv.h"
#ifdef OLD_GEMV
#include OLD_GEMV
#endif

using namespace specontext::cuda;

#define CK(x)                                                                     \
  do {                                                                            \
    cudaError_t e = (x);                                                          \
    if (e != cudaSuccess) {                                                       \
      std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));      \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)

namespace {

cudaStream_t g_stream;

void* RandomBf16(size_t count, std::mt19937& rng, float scale) {
  std::vector<__nv_bfloat16> h(std::min<size_t>(count, size_t{1} << 22));
  std::uniform_real_distribution<float> d(-scale, scale);
  for (auto& v : h) v = __float2bfloat16(d(rng));
  void* p = nullptr;
  CK(cudaMalloc(&p, count * 2));
  for (size_t off = 0; off < count; off += h.size()) {
    CK(cudaMemcpy(static_cast<__nv_bfloat16*>(p) + off, h.data(), std::min(h.size(), count - off) * 2,
                  cudaMemcpyHostToDevice));
  }
  return p;
}

// Median µs of one replay of a graph recording `body`, divided by `per`.
double GraphUs(const std::function<void()>& body, int per) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal));
  body();
  CK(cudaStreamEndCapture(g_stream, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < 25; ++i) {
    CK(cudaEventRecord(a, g_stream));
    CK(cudaGraphLaunch(exec, g_stream));
    CK(cudaEventRecord(b, g_stream));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    if (i >= 5) t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  return 1000.0 * t[t.size() / 2] / per;
}

double CopyGBs() {
  const size_t bytes = size_t{1} << 30;
  void *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  const double us = GraphUs([&] { for (int i = 0; i < 4; ++i) CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, g_stream)); }, 4);
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * bytes / us / 1e3;  // read + write
}

// Params of this tree's GEMV or of the one compared with (same fields).
template <typename P>
P Gemv(const void* x, const void* w, void* out, int m, int k, bool swiglu, bool f32 = false) {
  P p;
  p.x = x;
  p.w = w;
  p.out = out;
  p.n = 1;
  p.m = m;
  p.k = k;
  p.swiglu = swiglu;
  if (f32) p.out_type = ElemType::kF32;
  return p;
}

// Launches one GEMV: x, w, out, m, k, swiglu, f32 out.
using Launcher = std::function<void(const void*, const void*, void*, int, int, bool, bool)>;

struct Shape {
  const char* name;
  int m, k;
  bool swiglu;
};

struct Model {
  const char* name;
  int layers, hidden, qkv, inter, vocab;
};

}  // namespace

int main() {
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  std::mt19937 rng(7);
  const double gbs = CopyGBs();
  std::printf("copy %.0f GB/s\n", gbs);
  const Model models[] = {{"1B", 16, 2048, 3072, 8192, 128256}, {"8B", 32, 4096, 6144, 14336, 128256}};
  for (const Model& md : models) {
    const Shape shapes[] = {{"qkv", md.qkv, md.hidden, false},
                            {"o", md.hidden, md.hidden, false},
                            {"gate_up", md.inter, md.hidden, true},
                            {"down", md.hidden, md.inter, false}};
    // Distinct weights per layer: the chain streams them from HBM as a step does.
    std::vector<std::vector<void*>> w(4);
    for (int s = 0; s < 4; ++s) {
      const size_t rows = shapes[s].swiglu ? 2 * size_t(shapes[s].m) : size_t(shapes[s].m);
      for (int l = 0; l < md.layers; ++l) w[s].push_back(RandomBf16(rows * shapes[s].k, rng, 0.05f));
    }
    void* lm = RandomBf16(size_t(md.vocab) * md.hidden, rng, 0.05f);
    void* norm_w = RandomBf16(md.hidden, rng, 1.0f);
    void* residual = RandomBf16(md.hidden, rng, 1.0f);
    void* h = RandomBf16(md.hidden, rng, 1.0f);
    void* qkv = RandomBf16(md.qkv, rng, 1.0f);
    void* act = RandomBf16(md.inter, rng, 1.0f);
    void* o = RandomBf16(md.hidden, rng, 1.0f);
    float* logits = nullptr;
    CK(cudaMalloc(&logits, size_t(md.vocab) * 4));
    const void* in[4] = {h, qkv, h, act};
    void* out[4] = {qkv, o, act, o};

    // (1) each projection alone, over the layers' distinct weights.
    for (int s = 0; s < 4; ++s) {
      const Shape& sh = shapes[s];
      const double bytes = (sh.swiglu ? 2.0 : 1.0) * sh.m * double(sh.k) * 2;
      const double floor_us = bytes / gbs / 1e3;
      for (int split : {0, 1, 2, 4, 8}) {
        GemvParams p = Gemv<GemvParams>(in[s], nullptr, out[s], sh.m, sh.k, sh.swiglu);
        p.split = split;
        if (!GemvSupported(p)) continue;
        const double us = GraphUs([&] {
          for (int l = 0; l < md.layers; ++l) {
            p.w = w[s][l];
            CK(LaunchGemv(p, g_stream));
          }
        }, md.layers);
        std::printf("%s %-8s split %d%s: %7.2f us  floor %6.2f  %.0f%%\n", md.name, sh.name, GemvSplit(p),
                    split == 0 ? " (auto)" : "", us, floor_us, 100.0 * floor_us / us);
      }
#ifdef OLD_GEMV
      old::GemvParams q = Gemv<old::GemvParams>(in[s], nullptr, out[s], sh.m, sh.k, sh.swiglu);
      const double us = GraphUs([&] {
        for (int l = 0; l < md.layers; ++l) {
          q.w = w[s][l];
          CK(old::LaunchGemv(q, g_stream));
        }
      }, md.layers);
      std::printf("%s %-8s old      : %7.2f us  floor %6.2f  %.0f%%\n", md.name, sh.name, us, floor_us, 100.0 * floor_us / us);
#endif
    }

    // (2) the layers' projections and norms, then the final norm and the LM head.
    double bytes = double(md.vocab) * md.hidden * 2;
    for (int s = 0; s < 4; ++s) bytes += md.layers * (shapes[s].swiglu ? 2.0 : 1.0) * shapes[s].m * double(shapes[s].k) * 2;
    const double floor_us = bytes / gbs / 1e3;
    auto norm = [&](void* res, const void* x, void* y) {
      RmsNormParams p;
      p.x = x;
      p.residual = res;
      p.w = norm_w;
      p.out = y;
      p.n = 1;
      p.d = md.hidden;
      CK(LaunchRmsNorm(p, g_stream));
    };
    // The decode step's projections and norms of every layer, then the LM head, with `gemv`.
    auto chain = [&](const Launcher& gemv) {
      return GraphUs([&] {
        norm(nullptr, residual, h);
        for (int l = 0; l < md.layers; ++l) {
          gemv(h, w[0][l], qkv, md.qkv, md.hidden, false, false);
          gemv(qkv, w[1][l], o, md.hidden, md.hidden, false, false);
          norm(residual, o, h);
          gemv(h, w[2][l], act, md.inter, md.hidden, true, false);
          gemv(act, w[3][l], o, md.hidden, md.inter, false, false);
          norm(residual, o, h);
        }
        gemv(h, lm, logits, md.vocab, md.hidden, false, true);
      }, 1);
    };
    const double separate = chain([&](const void* x, const void* wt, void* y, int m, int k, bool sw, bool f32) {
      CK(LaunchGemv(Gemv<GemvParams>(x, wt, y, m, k, sw, f32), g_stream));
    });
    for (int split : {0, 1, 2, 4, 8}) {
      GemvParams p = Gemv<GemvParams>(h, lm, logits, md.vocab, md.hidden, false, true);
      p.split = split;
      if (!GemvSupported(p)) continue;
      const double us = GraphUs([&] { for (int i = 0; i < 4; ++i) CK(LaunchGemv(p, g_stream)); }, 4);
      const double fl = double(md.vocab) * md.hidden * 2 / gbs / 1e3;
      std::printf("%s lm_head split %d: %.1f us floor %.1f %.0f%%\n", md.name, GemvSplit(p), us, fl, 100.0 * fl / us);
    }
    std::printf("%s chain (norms, projections, LM head): floor %.1f us; %.1f us (%.2fx)\n", md.name, floor_us, separate,
                separate / floor_us);
#ifdef OLD_GEMV
    const double old_chain = chain([&](const void* x, const void* wt, void* y, int m, int k, bool sw, bool f32) {
      CK(old::LaunchGemv(Gemv<old::GemvParams>(x, wt, y, m, k, sw, f32), g_stream));
    });
    std::printf("%s chain old: %.1f us (%.2fx)\n", md.name, old_chain, old_chain / floor_us);
#endif
    for (auto& v : w) {
      for (void* p : v) CK(cudaFree(p));
    }
    for (void* p : {lm, norm_w, residual, h, qkv, act, o}) CK(cudaFree(p));
    CK(cudaFree(logits));
  }
  return 0;
}
