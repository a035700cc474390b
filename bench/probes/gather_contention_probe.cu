// Standalone probe (not part of the build), run on the GPU machine 2026-11-24 for docs/benchmarks.md
// "Findings: the elastic gather and host KV layout".
// Build here: nvcc -O2 -std=c++20 -arch=sm_90 -o /tmp/probe <this file> -lcublas (cpu_gather_probe: add
// -Xcompiler -mavx2); carry the binary in an ignored build-* folder; gather_contention_probe takes the GiB to
// register (64) and PAIR=2 in the environment for K and V side by side.
// Probe 3: gather rate vs GEMM slowdown with a realistic host footprint (tens of GB registered), per-layer
// launches (40 MB each), register-held loads vs cp.async into shared memory.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); return 1; } } while (0)

template <int U>
__global__ void GatherReg(const uint4* const* src, uint4* dst, long n_items, int chunks) {
  const long step = long(gridDim.x) * blockDim.x;
  for (long base = long(blockIdx.x) * blockDim.x * U + threadIdx.x; base < n_items; base += step * U) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) { long it = base + long(u) * blockDim.x; if (it < n_items) v[u] = src[it / chunks][it % chunks]; }
#pragma unroll
    for (int u = 0; u < U; ++u) { long it = base + long(u) * blockDim.x; if (it < n_items) dst[it] = v[u]; }
  }
}

// cp.async: each thread keeps U 16-byte copies in flight in shared memory.
template <int U>
__global__ void GatherAsync(const uint4* const* src, uint4* dst, long n_items, int chunks) {
  extern __shared__ uint4 buf[];
  const long step = long(gridDim.x) * blockDim.x;
  for (long base = long(blockIdx.x) * blockDim.x * U + threadIdx.x; base < n_items; base += step * U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      long it = base + long(u) * blockDim.x;
      if (it < n_items) __pipeline_memcpy_async(&buf[u * blockDim.x + threadIdx.x], &src[it / chunks][it % chunks], 16);
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
#pragma unroll
    for (int u = 0; u < U; ++u) { long it = base + long(u) * blockDim.x; if (it < n_items) dst[it] = buf[u * blockDim.x + threadIdx.x]; }
  }
}

int main(int argc, char** argv) {
  const size_t gib = argc > 1 ? atol(argv[1]) : 64;
  const int cap = 34816, row = 256, pair = getenv("PAIR") ? atoi(getenv("PAIR")) : 1;
  const size_t host_bytes = gib << 30;
  auto t0 = std::chrono::steady_clock::now();
  char* host = static_cast<char*>(mmap(nullptr, host_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  madvise(host, host_bytes, MADV_HUGEPAGE);
  { std::vector<std::thread> th; for (int t = 0; t < 16; ++t) th.emplace_back([=] { for (size_t i = host_bytes / 16 * t; i < host_bytes / 16 * (t + 1); i += 4096) host[i] = 1; }); for (auto& x : th) x.join(); }
  CK(cudaHostRegister(host, host_bytes, cudaHostRegisterMapped));
  printf("registered %zu GiB in %.1f s\n", gib, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  const long layer_rows = 307L * 32 * 8 * 2;  // one layer's elastic rows at R 32 (40 MB)
  const int layers = 8;
  const long region = long(cap) * row * pair;
  const long n_regions = host_bytes / region;
  std::mt19937_64 rng(5);
  std::vector<const uint4*> srcs(layer_rows * layers);
  for (long i = 0; i < long(srcs.size()); i += pair) {
    const long reg = (i / pair / 307 * 7919) % n_regions;  // regions spread over the whole footprint
    const long tok = rng() % cap;
    for (int p = 0; p < pair; ++p) srcs[i + p] = reinterpret_cast<const uint4*>(host + reg * region + (tok * pair + p) * row);
  }
  const uint4** d_src; CK(cudaMalloc(&d_src, srcs.size() * sizeof(void*)));
  CK(cudaMemcpy(d_src, srcs.data(), srcs.size() * sizeof(void*), cudaMemcpyHostToDevice));
  uint4* dst; CK(cudaMalloc(&dst, srcs.size() * row));
  const int M = 32, N = 14336, K = 4096;
  __nv_bfloat16 *A, *W, *C;
  CK(cudaMalloc(&A, size_t(M) * K * 2)); CK(cudaMalloc(&W, size_t(N) * K * 2 * 8)); CK(cudaMalloc(&C, size_t(M) * N * 2));
  CK(cudaMemset(W, 0, size_t(N) * K * 2 * 8)); CK(cudaMemset(A, 0, size_t(M) * K * 2));
  cublasHandle_t h; cublasCreate(&h);
  cudaStream_t cs, gs;
  CK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking)); CK(cudaStreamCreateWithFlags(&gs, cudaStreamNonBlocking));
  cublasSetStream(h, cs);
  float one = 1, zero = 0;
  cudaEvent_t a0, a1, g0, g1; cudaEventCreate(&a0); cudaEventCreate(&a1); cudaEventCreate(&g0); cudaEventCreate(&g1);
  auto gemms = [&](int reps) { for (int r = 0; r < reps; ++r) cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, W + size_t(N) * K * (r % 8), CUDA_R_16BF, K, A, CUDA_R_16BF, K, &zero, C, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT); };
  gemms(20); cudaDeviceSynchronize();
  const int reps = 300;
  cudaEventRecord(a0, cs); gemms(reps); cudaEventRecord(a1, cs); cudaDeviceSynchronize();
  float base_ms; cudaEventElapsedTime(&base_ms, a0, a1);
  printf("gemm alone: %.2f ms\n", base_ms);
  const int chunks = row / 16;
  struct Cfg { const char* kind; int blocks, threads, u; } cfgs[] = {
      {"reg", 32, 256, 8}, {"reg", 16, 256, 16}, {"reg", 8, 256, 16}, {"reg", 12, 256, 16}, {"reg", 4, 256, 16},
      {"reg", 16, 512, 8}, {"async", 8, 256, 32}, {"async", 8, 512, 16}, {"async", 4, 256, 32}, {"async", 12, 256, 32}, {"async", 8, 512, 24},
      {"async", 16, 256, 32}, {"async", 16, 512, 16}};
  for (auto c : cfgs) {
    auto launch = [&](int l) {
      const uint4* const* s = d_src + layer_rows * l; uint4* d = dst + layer_rows * l * chunks; long n = layer_rows * chunks;
      const size_t smem = size_t(c.threads) * c.u * 16;
      if (c.kind[0] == 'r') {
        if (c.u == 8) GatherReg<8><<<c.blocks, c.threads, 0, gs>>>(s, d, n, chunks); else GatherReg<16><<<c.blocks, c.threads, 0, gs>>>(s, d, n, chunks);
      } else {
        if (c.u == 16) { cudaFuncSetAttribute(GatherAsync<16>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)); GatherAsync<16><<<c.blocks, c.threads, smem, gs>>>(s, d, n, chunks); }
        else if (c.u == 24) { cudaFuncSetAttribute(GatherAsync<24>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)); GatherAsync<24><<<c.blocks, c.threads, smem, gs>>>(s, d, n, chunks); }
        else { cudaFuncSetAttribute(GatherAsync<32>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)); GatherAsync<32><<<c.blocks, c.threads, smem, gs>>>(s, d, n, chunks); }
      }
    };
    launch(0); cudaDeviceSynchronize();
    cudaError_t le = cudaGetLastError();
    cudaEventRecord(g0, gs); for (int l = 0; l < layers; ++l) launch(l); cudaEventRecord(g1, gs);
    cudaError_t e = cudaDeviceSynchronize();
    float g_ms = -1; cudaError_t te = cudaEventElapsedTime(&g_ms, g0, g1);
    if (le != cudaSuccess || te != cudaSuccess) printf("launch %s timing %s\n", cudaGetErrorString(le), cudaGetErrorString(te));
    cudaEventRecord(g0, gs); for (int l = 0; l < layers; ++l) launch(l); cudaEventRecord(g1, gs);
    cudaEventRecord(a0, cs); gemms(reps); cudaEventRecord(a1, cs);
    cudaDeviceSynchronize();
    float both_ms = -1, g2_ms = -1; cudaEventElapsedTime(&both_ms, a0, a1); cudaEventElapsedTime(&g2_ms, g0, g1);
    const double mb = layer_rows * layers * double(row) / 1e6;
    printf("%-5s %3dx%4d u%2d (%4zu KiB in flight): %s alone %.1f GB/s; beside gemm %.1f GB/s, gemm x%.2f\n", c.kind,
           c.blocks, c.threads, c.u, size_t(c.blocks) * c.threads * c.u * 16 / 1024, cudaGetErrorString(e), mb / g_ms,
           mb / g2_ms, both_ms / base_ms);
  }
  return 0;
}
