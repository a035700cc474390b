// Attention recall probe (see layer_selection_kernels.h): one CTA per (query head, sequence), 8
// warps. The query row goes to shared memory as f32; each warp takes every eighth key (lanes over
// head_dim, a warp sum per key) and keeps a running (max, Σ exp) pair; the warps' pairs are merged
// at the end. Two passes: every past row, then the rows of the head's set. Evaluation only: it
// reads the layer's whole K per query head.
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/layer_selection_kernels.h"

namespace specontext::cuda {
namespace {

constexpr int kRecallWarps = 8;

__device__ __forceinline__ void Merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  s = (m == -INFINITY ? 0.0f : s * expf(m - mn)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mn));
  m = mn;
}

// grid (n_heads, n_seqs), kRecallWarps * 32 threads; dynamic shared memory: head_dim floats.
__global__ void __launch_bounds__(kRecallWarps * 32) AttentionRecallKernel(RecallParams p) {
  extern __shared__ float sq[];
  __shared__ float wm[kRecallWarps], ws[kRecallWarps];
  const int h = blockIdx.x, seq = blockIdx.y, hd = p.head_dim, group = p.n_heads / p.n_kv,
            g = h / group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bf16* q = static_cast<const bf16*>(p.q) + (int64_t(seq) * p.n_heads + h) * hd;
  for (int e = threadIdx.x; e < hd; e += blockDim.x) sq[e] = ToF32<bf16>(q[e]);
  __syncthreads();
  const AttnSeq s = p.seqs[seq];
  const int64_t stride = RowStride(s, hd);
  const bf16* k = static_cast<const bf16*>(p.k_ptrs[seq]) + int64_t(g) * s.capacity * stride;
  const int set = seq * p.sets_per_seq + (p.sets_per_seq == 1 ? 0 : g);
  const int b = p.indptr[set], n_set = p.indptr[set + 1] - b;
  float* out = p.out + (int64_t(seq) * p.n_heads + h) * 2;
  if (s.past_len == 0) {  // no past: recall 1 by convention (as the CPU reference)
    if (threadIdx.x < 2) out[threadIdx.x] = 0.0f;
    return;
  }
  for (int pass = 0; pass < 2; ++pass) {
    const int n = pass == 0 ? s.past_len : n_set;
    float m = -INFINITY, sum = 0.0f;  // the same in every lane (the dot products are warp sums)
    for (int i = warp; i < n; i += kRecallWarps) {
      const int t = pass == 0 ? i : p.positions[b + i];
      const bf16* row = k + int64_t(t) * stride;
      float dot = 0.0f;
      for (int e = lane; e < hd; e += 32) dot = fmaf(sq[e], ToF32<bf16>(row[e]), dot);
      Merge(m, sum, WarpSum(dot) * p.scale, 1.0f);
    }
    if (lane == 0) {
      wm[warp] = m;
      ws[warp] = sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float M = -INFINITY, S = 0.0f;
      for (int w = 0; w < kRecallWarps; ++w) Merge(M, S, wm[w], ws[w]);
      out[pass] = S > 0.0f ? M + logf(S) : -INFINITY;
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t LaunchAttentionRecall(const RecallParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0) return cudaSuccess;
  if (p.n_kv <= 0 || p.n_heads % p.n_kv != 0 || p.head_dim <= 0 ||
      p.head_dim * sizeof(float) > 48 * 1024) {
    return cudaErrorInvalidValue;
  }
  AttentionRecallKernel<<<dim3(p.n_heads, p.n_seqs), kRecallWarps * 32, p.head_dim * sizeof(float),
                          stream>>>(p);
  return cudaGetLastError();
}

}  // namespace specontext::cuda
