// Kernel micro-benchmarks of the CUDA backend on the GPU machine, each figure beside its floor:
//   copy      device-to-device copy bandwidth (the roofline used for every floor below)
//   linear    cuBLAS vs the custom GEMV for n = 1..32 on Llama-3.1-8B projection shapes
//   invariant cuBLAS vs the batch-invariant GEMM (kernels/gemm_invariant.h) for n = 1..2048, same shapes
//   decode    split-K decode attention, batch x context, Llama-3.1-8B heads (8 KV x 4, hd 128)
//   prefill   causal prefill attention of one prompt (TFLOP/s)
// Usage: cuda_kernel_bench [--out results.jsonl] [--quick]. Prints a table; writes JSON lines.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/cuda/cuda_backend.h"

namespace specontext {
namespace {

#define CHECK_OK(expr)                                                              \
  do {                                                                              \
    absl::Status s_ = (expr);                                                       \
    if (!s_.ok()) {                                                                 \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, s_.ToString().c_str()); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

Tensor Must(absl::StatusOr<Tensor> t) {
  CHECK_OK(t.status());
  return *t;
}

// Fills a device bf16 tensor from a pool of random values (never zeros: zeros run faster than real
// data), tiling the pool over large tensors so tens of GB of KV fill in seconds.
void FillRandom(Backend& b, Tensor* t, std::mt19937& rng, float scale = 1.0f) {
  constexpr int64_t kPool = int64_t{1} << 24;  // 16 Mi values
  static std::vector<uint16_t> pool;
  static float pool_scale = 0.0f;
  if (pool.empty() || pool_scale != scale) {
    pool.resize(kPool);
    std::uniform_real_distribution<float> d(-scale, scale);
    for (auto& v : pool) v = F32ToBf16(d(rng));
    pool_scale = scale;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(*CudaComputeStream(b));
  for (int64_t off = 0; off < t->numel(); off += kPool) {
    const int64_t n = std::min(kPool, t->numel() - off);
    cudaMemcpyAsync(static_cast<uint16_t*>(t->data()) + off, pool.data(), n * 2, cudaMemcpyHostToDevice, stream);
  }
  CHECK_OK(b.Synchronize());
}

// Median milliseconds of `fn` over `reps` runs after `warmup`, timed with events on the stream.
double TimeMs(Backend& b, const std::function<void()>& fn, int warmup = 3, int reps = 20) {
  cudaStream_t stream = static_cast<cudaStream_t>(*CudaComputeStream(b));
  for (int i = 0; i < warmup; ++i) fn();
  CHECK_OK(b.Synchronize());
  std::vector<double> ms;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(e0, stream);
    fn();
    cudaEventRecord(e1, stream);
    cudaEventSynchronize(e1);
    float t = 0;
    cudaEventElapsedTime(&t, e0, e1);
    ms.push_back(t);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Out {
  std::ofstream file;
  void Line(const std::string& json) {
    if (file.is_open()) file << json << "\n";
  }
};

double CopyBandwidth(Backend& b, Out& out) {
  const int64_t bytes = int64_t{1} << 30;
  Tensor src = Must(b.Alloc(DType::kU8, {bytes}, MemoryKind::kOther));
  Tensor dst = Must(b.Alloc(DType::kU8, {bytes}, MemoryKind::kOther));
  cudaStream_t stream = static_cast<cudaStream_t>(*CudaComputeStream(b));
  cudaMemsetAsync(src.data(), 1, bytes, stream);
  const double ms = TimeMs(b, [&] { cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, stream); });
  const double gbs = 2.0 * bytes / (ms * 1e-3) / 1e9;  // read + write
  std::printf("copy      1 GiB d2d: %.3f ms  %.0f GB/s (read+write)\n", ms, gbs);
  out.Line("{\"bench\":\"copy\",\"ms\":" + std::to_string(ms) + ",\"gbs\":" + std::to_string(gbs) + "}");
  return gbs;
}

void Linear(Backend& cublas, Backend& gemv, double bw, bool quick, Out& out, std::mt19937& rng) {
  struct Mk {
    const char* name;
    int64_t m, k;
  };
  const std::vector<Mk> shapes = {{"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096},
                                  {"down", 4096, 14336}, {"lm_head", 128256, 4096}};
  std::printf("\nlinear (bf16; floor = bytes / copy bandwidth)\n%-8s %4s %10s %10s %10s %8s %8s\n", "shape", "n",
              "floor_us", "cublas_us", "gemv_us", "cub_x", "gemv_x");
  for (const Mk& s : shapes) {
    Tensor w = Must(cublas.Alloc(DType::kBF16, {s.m, s.k}, MemoryKind::kWeights));
    FillRandom(cublas, &w, rng, 0.02f);
    Tensor w2 = Must(gemv.Alloc(DType::kBF16, {s.m, s.k}, MemoryKind::kWeights));
    FillRandom(gemv, &w2, rng, 0.02f);
    for (int64_t n : {1, 2, 4, 8, 16, 32}) {
      if (quick && n != 1 && n != 8 && n != 32) continue;
      Tensor x = Must(cublas.Alloc(DType::kBF16, {n, s.k}, MemoryKind::kOther));
      FillRandom(cublas, &x, rng);
      Tensor o = Must(cublas.Alloc(DType::kBF16, {n, s.m}, MemoryKind::kOther));
      Tensor x2 = Must(gemv.Alloc(DType::kBF16, {n, s.k}, MemoryKind::kOther));
      FillRandom(gemv, &x2, rng);
      Tensor o2 = Must(gemv.Alloc(DType::kBF16, {n, s.m}, MemoryKind::kOther));
      const double bytes = 2.0 * (s.m * s.k + n * s.k + n * s.m);
      const double floor_us = bytes / (bw * 1e9) * 1e6;
      const double cub = TimeMs(cublas, [&] { CHECK_OK(cublas.Linear(x, w, nullptr, &o)); }) * 1e3;
      const double gv = n <= 8 ? TimeMs(gemv, [&] { CHECK_OK(gemv.Linear(x2, w2, nullptr, &o2)); }) * 1e3 : 0.0;
      // Ten back-to-back calls per rep: device time per call without one launch's latency (a graph's view).
      const double gv10 = n <= 8 ? TimeMs(gemv, [&] {
                                     for (int i = 0; i < 10; ++i) CHECK_OK(gemv.Linear(x2, w2, nullptr, &o2));
                                   }) * 1e2
                                 : 0.0;
      std::printf("%-8s %4ld %10.1f %10.1f %10.1f %8.2f %8.2f  back-to-back gemv %.1f us\n", s.name,
                  static_cast<long>(n), floor_us, cub, gv, cub / floor_us, gv > 0 ? gv / floor_us : 0.0, gv10);
      out.Line(std::string("{\"bench\":\"linear\",\"shape\":\"") + s.name + "\",\"m\":" + std::to_string(s.m) +
               ",\"k\":" + std::to_string(s.k) + ",\"n\":" + std::to_string(n) + ",\"floor_us\":" +
               std::to_string(floor_us) + ",\"cublas_us\":" + std::to_string(cub) + ",\"gemv_us\":" +
               std::to_string(gv) + "}");
    }
  }
}

// The batch-invariant mode's Linear against cuBLAS, decode row counts and prefill-sized ones.
void LinearInvariant(Backend& cublas, Backend& inv, double bw, bool quick, Out& out, std::mt19937& rng) {
  struct Mk {
    const char* name;
    int64_t m, k;
  };
  const std::vector<Mk> shapes = {{"qkv", 6144, 4096}, {"gate_up", 28672, 4096}, {"down", 4096, 14336},
                                  {"lm_head", 128256, 4096}};
  std::printf("\nlinear, batch-invariant GEMM vs cuBLAS (bf16)\n%-8s %5s %10s %10s %10s %8s %10s %10s\n", "shape",
              "n", "floor_us", "cublas_us", "invar_us", "invar_x", "cub_tflops", "inv_tflops");
  for (const Mk& s : shapes) {
    Tensor w = Must(cublas.Alloc(DType::kBF16, {s.m, s.k}, MemoryKind::kWeights));
    FillRandom(cublas, &w, rng, 0.02f);
    Tensor w2 = Must(inv.Alloc(DType::kBF16, {s.m, s.k}, MemoryKind::kWeights));
    FillRandom(inv, &w2, rng, 0.02f);
    for (int64_t n : {1, 8, 16, 17, 32, 64, 512, 2048}) {
      if (quick && n != 1 && n != 32 && n != 2048) continue;
      if (s.m * n > (int64_t{1} << 28)) continue;  // lm_head at prefill sizes: not a shape the model runs
      Tensor x = Must(cublas.Alloc(DType::kBF16, {n, s.k}, MemoryKind::kOther));
      FillRandom(cublas, &x, rng);
      Tensor o = Must(cublas.Alloc(DType::kBF16, {n, s.m}, MemoryKind::kOther));
      Tensor x2 = Must(inv.Alloc(DType::kBF16, {n, s.k}, MemoryKind::kOther));
      FillRandom(inv, &x2, rng);
      Tensor o2 = Must(inv.Alloc(DType::kBF16, {n, s.m}, MemoryKind::kOther));
      const double bytes = 2.0 * (s.m * s.k + n * s.k + n * s.m);
      const double floor_us = bytes / (bw * 1e9) * 1e6;
      const double cub = TimeMs(cublas, [&] { CHECK_OK(cublas.Linear(x, w, nullptr, &o)); }) * 1e3;
      const double iv = TimeMs(inv, [&] { CHECK_OK(inv.Linear(x2, w2, nullptr, &o2)); }) * 1e3;
      const double flop = 2.0 * s.m * s.k * n;
      std::printf("%-8s %5ld %10.1f %10.1f %10.1f %8.2f %10.1f %10.1f\n", s.name, static_cast<long>(n), floor_us, cub,
                  iv, iv / floor_us, flop / (cub * 1e-6) / 1e12, flop / (iv * 1e-6) / 1e12);
      out.Line(std::string("{\"bench\":\"linear_invariant\",\"shape\":\"") + s.name + "\",\"m\":" +
               std::to_string(s.m) + ",\"k\":" + std::to_string(s.k) + ",\"n\":" + std::to_string(n) +
               ",\"floor_us\":" + std::to_string(floor_us) + ",\"cublas_us\":" + std::to_string(cub) +
               ",\"invariant_us\":" + std::to_string(iv) + "}");
    }
  }
}

// One layer's attention for `batch` sequences of `past` cached tokens plus `n_new` new ones each.
double AttentionMs(Backend& b, int batch, int past, int n_new, int n_kv, int group, int hd, std::mt19937& rng,
                   double* single_ms = nullptr) {
  std::vector<SequenceKv> kvs(batch);
  BatchDesc desc;
  for (int i = 0; i < batch; ++i) {
    kvs[i].capacity = past + n_new;
    Tensor k = Must(b.Alloc(DType::kBF16, {n_kv, past + n_new, hd}, MemoryKind::kKvCache));
    Tensor v = Must(b.Alloc(DType::kBF16, {n_kv, past + n_new, hd}, MemoryKind::kKvCache));
    FillRandom(b, &k, rng);
    FillRandom(b, &v, rng);
    kvs[i].k = {k};
    kvs[i].v = {v};
    desc.seqs.push_back({i * n_new, n_new, past});
  }
  for (int i = 0; i < batch; ++i) desc.kv.push_back(&kvs[i]);
  desc.n_tokens = batch * n_new;
  Tensor q = Must(b.Alloc(DType::kBF16, {desc.n_tokens, n_kv * group, hd}, MemoryKind::kWorkspace));
  FillRandom(b, &q, rng);
  Tensor o = Must(b.Alloc(DType::kBF16, {desc.n_tokens, n_kv * group, hd}, MemoryKind::kWorkspace));
  CHECK_OK(b.PrepareBatch(desc));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  if (n_new > 1) return TimeMs(b, [&] { CHECK_OK(b.Attention(0, q, scale, &o)); }, 3, 5);
  if (single_ms != nullptr) *single_ms = TimeMs(b, [&] { CHECK_OK(b.Attention(0, q, scale, &o)); }, 3, 20);
  // Decode: ten back-to-back calls per timed rep, as the layers of a step (or its graph) issue them, so
  // the figure is the device time per call rather than one call's launch latency.
  return TimeMs(b, [&] { for (int i = 0; i < 10; ++i) CHECK_OK(b.Attention(0, q, scale, &o)); }, 3, 20) / 10;
}

void Decode(Backend& b, double bw, bool quick, Out& out, std::mt19937& rng) {
  std::printf("\ndecode attention, one layer (8 KV heads x 4, hd 128; floor = KV bytes / copy bw)\n");
  std::printf("%5s %7s %10s %10s %8s %8s\n", "batch", "ctx", "floor_us", "us", "x_floor", "GB/s");
  for (int ctx : {2048, 8192, 32768}) {
    for (int batch : {1, 4, 16, 32}) {
      if (quick && batch == 4) continue;
      const double kv_bytes = double(batch) * ctx * 8 * 128 * 2 * 2;
      if (kv_bytes > 40e9) continue;
      double single_ms = 0;
      const double us = AttentionMs(b, batch, ctx - 1, 1, 8, 4, 128, rng, &single_ms) * 1e3;
      const double floor_us = kv_bytes / (bw * 1e9) * 1e6;
      std::printf("%5d %7d %10.1f %10.1f %8.2f %8.0f  (one call alone: %.1f us)\n", batch, ctx, floor_us, us,
                  us / floor_us, kv_bytes / us / 1e3, single_ms * 1e3);
      out.Line("{\"bench\":\"decode_attention\",\"batch\":" + std::to_string(batch) + ",\"context\":" +
               std::to_string(ctx) + ",\"us\":" + std::to_string(us) + ",\"floor_us\":" + std::to_string(floor_us) + "}");
    }
  }
}

void Prefill(Backend& b, Out& out, std::mt19937& rng) {
  std::printf("\nprefill attention, one layer, one prompt (causal)\n%6s %4s %10s %10s\n", "tokens", "hd", "ms", "TFLOP/s");
  for (int hd : {128, 64}) {
    for (int n : {2048, 8192}) {
      const int n_kv = 8, group = 4;
      const double ms = AttentionMs(b, 1, 0, n, n_kv, group, hd, rng);
      // Causal: half of the 2 * 2 * n^2 * hd per head flops.
      const double flops = 2.0 * n * double(n) * hd * n_kv * group;
      std::printf("%6d %4d %10.3f %10.1f\n", n, hd, ms, flops / (ms * 1e-3) / 1e12);
      out.Line("{\"bench\":\"prefill_attention\",\"tokens\":" + std::to_string(n) + ",\"head_dim\":" +
               std::to_string(hd) + ",\"ms\":" + std::to_string(ms) + "}");
    }
  }
}

}  // namespace
}  // namespace specontext

int main(int argc, char** argv) {
  using namespace specontext;
  std::string out_path;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
      out_path = argv[++i];
    } else if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: %s [--out results.jsonl] [--quick]\n", argv[0]);
      return 2;
    }
  }
  if (CudaDeviceCount() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  CudaBackendOptions a, g, iv;
  g.gemv_max_n = 8;
  iv.batch_invariant = true;
  auto cublas = MakeCudaBackend(a);
  auto gemv = MakeCudaBackend(g);
  auto inv = MakeCudaBackend(iv);
  if (!cublas.ok() || !gemv.ok() || !inv.ok()) {
    std::fprintf(stderr, "backend: %s\n",
                 (!cublas.ok() ? cublas.status() : !gemv.ok() ? gemv.status() : inv.status()).ToString().c_str());
    return 1;
  }
  Out out;
  if (!out_path.empty()) out.file.open(out_path, std::ios::app);
  std::mt19937 rng(1234);
  const double bw = CopyBandwidth(**cublas, out);
  Linear(**cublas, **gemv, bw, quick, out, rng);
  LinearInvariant(**cublas, **inv, bw, quick, out, rng);
  Decode(**cublas, bw, quick, out, rng);
  Prefill(**cublas, out, rng);
  return 0;
}
