// Standalone probe (not part of the build), run on the GPU machine 2026-11-24 for docs/benchmarks.md
// "Findings: the elastic gather and host KV layout".
// Build here: nvcc -O2 -std=c++20 -arch=sm_90 -o /tmp/probe <this file> -lcublas (cpu_gather_probe: add
// -Xcompiler -mavx2); carry the binary in an ignored build-* folder; gather_contention_probe takes the GiB to
// register (64) and PAIR=2 in the environment for K and V side by side.
// Probe: can the host CPUs gather the elastic rows (random 256 B rows) into pinned staging fast enough,
// and DMA them at full rate? Prints GB/s per configuration.
#include <cuda_runtime.h>
#include <emmintrin.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

static double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

struct Row { const char* src; };

static void CopyRow(char* dst, const char* src, int bytes, bool stream) {
  if (stream) {
    for (int i = 0; i < bytes; i += 16) {
      __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), v);
    }
  } else {
    std::memcpy(dst, src, bytes);
  }
}

int main(int argc, char** argv) {
  const int seqs = 32, heads = 8, cap = 34816, row = 256, layers = 20, mem_layers = 4;
  const int per = 307;  // new rows per (seq, head) at overlap 0.85, B 2048
  const size_t layer_bytes = size_t(seqs) * 2 * heads * cap * row;
  const size_t total = layer_bytes * mem_layers;
  double t0 = Now();
  char* host = static_cast<char*>(mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  madvise(host, total, MADV_HUGEPAGE);
  std::vector<std::thread> init;
  for (int t = 0; t < 16; ++t) init.emplace_back([&, t] { size_t a = total / 16 * t, b = t == 15 ? total : total / 16 * (t + 1); for (size_t i = a; i < b; i += 4096) host[i] = char(i); });
  for (auto& th : init) th.join();
  printf("host %zu GB touched in %.1f s\n", total >> 30, Now() - t0);
  // rows per layer: seqs*heads*2*per
  const size_t rows_per_layer = size_t(seqs) * heads * 2 * per;
  std::vector<std::vector<const char*>> src(layers);
  std::mt19937_64 rng(1);
  for (int l = 0; l < layers; ++l) {
    const char* base = host + layer_bytes * (l % mem_layers);
    src[l].reserve(rows_per_layer);
    for (int s = 0; s < seqs; ++s)
      for (int kv = 0; kv < 2; ++kv)
        for (int h = 0; h < heads; ++h) {
          std::vector<int> toks(per);
          for (auto& t : toks) t = rng() % cap;
          std::sort(toks.begin(), toks.end());
          for (int t : toks) src[l].push_back(base + ((size_t(s) * 2 + kv) * heads * cap + size_t(h) * cap + t) * row);
        }
  }
  const size_t layer_stage = rows_per_layer * row;
  char* staging = nullptr;
  cudaHostAlloc(&staging, layer_stage * layers, cudaHostAllocDefault);
  char* dev = nullptr;
  cudaMalloc(&dev, layer_stage * layers);
  cudaStream_t st; cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
  std::vector<cudaEvent_t> ev(layers);
  for (auto& e : ev) cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
  printf("per step: %zu rows, %.1f MB\n", rows_per_layer * layers, layer_stage * layers / 1e6);
  // DMA alone
  for (int rep = 0; rep < 2; ++rep) {
    double a = Now();
    cudaMemcpyAsync(dev, staging, layer_stage * layers, cudaMemcpyHostToDevice, st);
    cudaStreamSynchronize(st);
    printf("dma bulk: %.1f GB/s\n", layer_stage * layers / (Now() - a) / 1e9);
  }
  for (int threads : {4, 8, 12, 15}) {
    for (int stream_store : {0, 1}) {
      for (int pipe : {0, 1}) {
        // persistent workers with a barrier per layer
        std::atomic<int> layer_go{-1};
        std::barrier bar(threads + 1);
        std::vector<std::thread> ws;
        for (int t = 0; t < threads; ++t)
          ws.emplace_back([&, t] {
            for (int l = 0; l < layers; ++l) {
              bar.arrive_and_wait();
              const size_t n = src[l].size(), a = n * t / threads, b = n * (t + 1) / threads;
              char* dst = staging + layer_stage * l;
              for (size_t i = a; i < b; ++i) {
                if (i + 8 < b) { _mm_prefetch(src[l][i + 8], _MM_HINT_T0); _mm_prefetch(src[l][i + 8] + 128, _MM_HINT_T0); }
                CopyRow(dst + i * row, src[l][i], row, stream_store);
              }
              if (stream_store) _mm_sfence();
              bar.arrive_and_wait();
            }
          });
        double a = Now();
        for (int l = 0; l < layers; ++l) {
          bar.arrive_and_wait();
          bar.arrive_and_wait();
          if (pipe) cudaMemcpyAsync(dev + layer_stage * l, staging + layer_stage * l, layer_stage, cudaMemcpyHostToDevice, st);
        }
        double g = Now();
        cudaStreamSynchronize(st);
        double e = Now();
        for (auto& w : ws) w.join();
        printf("threads %2d stream %d pipe %d: gather %.1f ms (%.1f GB/s), total %.1f ms (%.1f GB/s)\n", threads,
               stream_store, pipe, (g - a) * 1e3, layer_stage * layers / (g - a) / 1e9, (e - a) * 1e3,
               layer_stage * layers / (e - a) / 1e9);
      }
    }
  }
  return 0;
}
