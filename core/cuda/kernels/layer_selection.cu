// Per-layer selection sources on the GPU (see layer_selection_kernels.h): the oracle's per-sequence
// table for the selection kernels, and Quest's two launches:
// 1. page scores: one warp per (page, KV head, sequence), lanes over head_dim; each lane takes the
// min and max
//    of its dimensions over the page's rows (the past and the current token's, as Quest's page
//    table holds it) and adds max(q_d·min_d, q_d·max_d) for every query head of the group (q in
//    shared memory), then a warp sum per head;
// 2. top pages, one CTA per set: the set's page scores (max over its heads, NaN as -inf) in shared
// memory,
//    every page's rank (forced sink pages first, then by score with ties to the lower page: a count
//    over all pages, O(pages^2 / threads), fine for evaluation), the tokens each page contributes
//    (the rank fixes the tokens taken before it: all pages hold page_size tokens but the last),
//    then an ordered write through a block scan over pages.
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/layer_selection_kernels.h"

namespace specontext::cuda {
namespace {

__global__ void BuildLayerSelSeqsKernel(LayerSelSeqsParams p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n_seqs) return;
  const AttnSeq a = p.seqs[i];
  const int b = p.indptr[i * p.sets_per_seq];
  const int k_sel = p.indptr[i * p.sets_per_seq + 1] - b;
  p.out[i] = SelSeq{static_cast<const bf16*>(p.q) + int64_t(i) * p.n_q * p.head_dim,
                    p.k_ptrs[i],
                    int64_t(a.capacity),
                    a.past_len,
                    k_sel,
                    min(p.sink, k_sel),
                    b};
}

constexpr int kQuestWarps = 8;
constexpr int kTopPagesThreads = 1024;

// grid (ceil(max_pages / kQuestWarps), n_kv, n_seqs); dynamic shared memory: the group's q [group,
// head_dim] f32.
__global__ void __launch_bounds__(kQuestWarps * 32) QuestPageScoreKernel(QuestParams p) {
  extern __shared__ float sq[];
  const int seq = blockIdx.z, g = blockIdx.y, group = p.n_q / p.n_kv, hd = p.head_dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bf16* q = static_cast<const bf16*>(p.q) + (int64_t(seq) * p.n_q + g * group) * hd;
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) sq[i] = ToF32<bf16>(q[i]);
  __syncthreads();
  const AttnSeq s = p.seqs[seq];
  // Pages over the past rows and the current token's (row past_len, appended before the selection).
  const int rows = s.past_len > 0 ? s.past_len + 1 : 0;
  const int page = blockIdx.x * kQuestWarps + warp, t0 = page * p.page_size;
  if (t0 >= rows) return;
  const int t1 = min(rows, t0 + p.page_size);
  const int64_t stride = RowStride(s, hd);
  const bf16* k = static_cast<const bf16*>(p.k_ptrs[seq]) + int64_t(g) * s.capacity * stride;
  float acc[kQuestMaxGroup];
#pragma unroll
  for (int j = 0; j < kQuestMaxGroup; ++j) acc[j] = 0.0f;
  for (int e = lane; e < hd; e += 32) {
    float mn = INFINITY, mx = -INFINITY;
    for (int t = t0; t < t1; ++t) {
      const float v = ToF32<bf16>(k[int64_t(t) * stride + e]);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
    }
#pragma unroll
    for (int j = 0; j < kQuestMaxGroup; ++j) {
      if (j < group) acc[j] += fmaxf(sq[j * hd + e] * mn, sq[j * hd + e] * mx);
    }
  }
#pragma unroll
  for (int j = 0; j < kQuestMaxGroup; ++j) {
    if (j >= group) break;
    const float u = WarpSum(acc[j]);
    if (lane == 0) p.page_scores[(int64_t(seq) * p.n_q + g * group + j) * p.max_pages + page] = u;
  }
}

// Exclusive prefix of `v` over the block (blockDim.x a multiple of 32, at most 1024); `warp_sums`
// >= 32 ints.
__device__ int BlockExclusiveScan(int v, int* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < n_warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  return x - v + (warp > 0 ? warp_sums[warp - 1] : 0);
}

// grid (sets_per_seq, n_seqs), kTopPagesThreads threads; dynamic shared memory: max_pages floats
// (scores) then max_pages ints (ranks).
__global__ void __launch_bounds__(kTopPagesThreads) QuestTopPagesKernel(QuestParams p) {
  extern __shared__ float smem[];
  __shared__ int warp_sums[32];
  float* sc = smem;
  int* rank = reinterpret_cast<int*>(smem + p.max_pages);
  const int seq = blockIdx.y, set = blockIdx.x, tid = threadIdx.x;
  const int len = p.seqs[seq].past_len, P = p.page_size;
  const int set_idx = seq * p.sets_per_seq + set, b = p.indptr[set_idx],
            k = p.indptr[set_idx + 1] - b;
  int32_t* out = p.positions + b;
  if (k <= 0) return;
  if (k >= len) {  // the whole past
    for (int t = tid; t < len; t += blockDim.x) out[t] = t;
    return;
  }
  // Pages over rows [0, len]: the last one (holding the current token) may hold no past position.
  const int n_pages = (len + 1 + P - 1) / P, keep = min(p.sink, k), forced = (keep + P - 1) / P;
  const int h0 = set * p.heads_per_set;
  for (int pg = tid; pg < n_pages; pg += blockDim.x) {
    float v = -INFINITY;
    for (int j = 0; j < p.heads_per_set; ++j) {
      const float u = p.page_scores[(int64_t(seq) * p.n_q + h0 + j) * p.max_pages + pg];
      if (!isnan(u)) v = fmaxf(v, u);
    }
    sc[pg] = v;
  }
  __syncthreads();
  for (int pg = tid; pg < n_pages; pg += blockDim.x) {
    int r = pg;
    if (pg >= forced) {
      const float mine = sc[pg];
      int better = 0;
      for (int o = forced; o < n_pages; ++o) better += sc[o] > mine || (sc[o] == mine && o < pg);
      r = forced + better;
    }
    rank[pg] = r;
  }
  __syncthreads();
  const int last = n_pages - 1, last_size = len - last * P, r_last = rank[last];
  // Past positions of page pg: its rank r says which pages come before it; each holds P but the
  // last page.
  auto take = [&](int pg) {
    const int r = rank[pg];
    const int before = P * r - (r_last < r ? P - last_size : 0);
    const int size = pg == last ? last_size : P;
    return max(0, min(size, k - before));
  };
  const int seg = (n_pages + blockDim.x - 1) / blockDim.x;
  const int a = min(n_pages, tid * seg), e = min(n_pages, a + seg);
  int mine = 0;
  for (int pg = a; pg < e; ++pg) mine += take(pg);
  int pos = BlockExclusiveScan(mine, warp_sums);
  for (int pg = a; pg < e; ++pg) {
    const int n = take(pg);
    for (int j = 0; j < n; ++j) out[pos++] = pg * P + j;
  }
}

}  // namespace

cudaError_t LaunchBuildLayerSelSeqs(const LayerSelSeqsParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0) return cudaSuccess;
  BuildLayerSelSeqsKernel<<<CeilDiv(p.n_seqs, 128), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchQuestSelection(const QuestParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0 || p.max_pages == 0) return cudaSuccess;
  const int group = p.n_kv > 0 ? p.n_q / p.n_kv : 0;
  if (p.n_kv <= 0 || p.n_q % p.n_kv != 0 || group > kQuestMaxGroup || p.page_size < 1 ||
      p.head_dim <= 0 || p.sets_per_seq * p.heads_per_set != p.n_q) {
    return cudaErrorInvalidValue;
  }
  const size_t q_smem = size_t(group) * p.head_dim * sizeof(float);
  if (q_smem > 48 * 1024) return cudaErrorInvalidValue;
  const dim3 grid(CeilDiv(p.max_pages, kQuestWarps), p.n_kv, p.n_seqs);
  QuestPageScoreKernel<<<grid, kQuestWarps * 32, q_smem, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const size_t smem = size_t(p.max_pages) * (sizeof(float) + sizeof(int));
  if (smem > 48 * 1024) {
    int dev = 0, optin = 0;
    e = cudaGetDevice(&dev);
    if (e == cudaSuccess)
      e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) return e;
    if (smem + 32 * sizeof(int) > size_t(optin)) return cudaErrorInvalidValue;
    e = cudaFuncSetAttribute(QuestTopPagesKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  QuestTopPagesKernel<<<dim3(p.sets_per_seq, p.n_seqs), kTopPagesThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace specontext::cuda
