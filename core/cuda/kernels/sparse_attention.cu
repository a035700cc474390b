// Sparse decode attention over index sets (one token per sequence), GQA-aware, split-K with a combine.
//
// One CTA per (split, KV head, sequence) serves all `group` query heads of the KV head, so every gathered
// K/V row is read once per group. The CTA walks its keys in tiles of kSparseTile: it gathers the rows
// (16-byte loads; the row index comes from the set, either a token position of the full cache or a slot
// of the slot buffer; the key after the set is the current token, read from k_cur/v_cur), scores them
// against the group's queries, and updates an exact online softmax (f32).
#include <cfloat>

#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/sparse_kernels.h"

namespace specontext::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxOutPerThread = kSparseMaxGroup * kSparseMaxHeadDim / kThreads;  // 32
constexpr int kPad = 2;  // bf16 elements of row padding: 4-byte reads of 32 rows hit 32 banks

struct SmemLayout {
  int q, k, v, p, stats;  // byte offsets
  int total;
};

__host__ __device__ inline SmemLayout Layout(int group, int hd) {
  SmemLayout l;
  l.q = 0;
  l.k = l.q + group * hd * 4;
  l.v = l.k + kSparseTile * (hd + kPad) * 2;
  l.p = l.v + kSparseTile * (hd + kPad) * 2;
  l.stats = l.p + group * kSparseTile * 4;
  l.total = l.stats + 3 * group * 4;
  return l;
}

__global__ void __launch_bounds__(kThreads) SparseAttentionKernel(SparseAttnParams p) {
  extern __shared__ __align__(16) char smem[];
  const int seq = blockIdx.z, g = blockIdx.y, split = blockIdx.x;
  const int group = p.n_heads / p.n_kv, hd = p.head_dim;
  const int set = seq * p.sets_per_seq + (p.sets_per_seq == 1 ? 0 : g);
  const int b = p.indptr[set];
  const int n_set = p.indptr[set + 1] - b;
  const int total = n_set + 1;  // the set, then the current token
  const int k0 = split * p.chunk;
  if (k0 >= total) return;
  const int k1 = min(total, k0 + p.chunk);

  const SmemLayout L = Layout(group, hd);
  float* sQ = reinterpret_cast<float*>(smem + L.q);
  bf16* sK = reinterpret_cast<bf16*>(smem + L.k);
  bf16* sV = reinterpret_cast<bf16*>(smem + L.v);
  float* sP = reinterpret_cast<float*>(smem + L.p);
  float* sM = reinterpret_cast<float*>(smem + L.stats);
  float* sL = sM + group;
  float* sCorr = sL + group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;

  const bf16* q = static_cast<const bf16*>(p.q) + (int64_t(seq) * p.n_heads + int64_t(g) * group) * hd;
  for (int i = tid; i < group * hd; i += blockDim.x) sQ[i] = __bfloat162float(q[i]) * p.scale;
  if (tid < group) {
    sM[tid] = -INFINITY;
    sL[tid] = 0.0f;
  }
  float acc[kMaxOutPerThread];
#pragma unroll
  for (int i = 0; i < kMaxOutPerThread; ++i) acc[i] = 0.0f;

  const SparseKvPtrs kv = p.kv[seq];
  const bf16* k_head = static_cast<const bf16*>(kv.k) + int64_t(g) * kv.rows * hd;
  const bf16* v_head = static_cast<const bf16*>(kv.v) + int64_t(g) * kv.rows * hd;
  const bf16* k_cur = static_cast<const bf16*>(p.k_cur) + (int64_t(seq) * p.n_kv + g) * hd;
  const bf16* v_cur = static_cast<const bf16*>(p.v_cur) + (int64_t(seq) * p.n_kv + g) * hd;
  const int vpr = hd / 8;  // 16-byte vectors per row
  const int stride = hd + kPad;

  for (int t0 = k0; t0 < k1; t0 += kSparseTile) {
    const int cnt = min(kSparseTile, k1 - t0);
    __syncthreads();  // the previous tile's K/V/P are consumed (and sQ/sM are written on the first pass)
    for (int it = tid; it < 2 * cnt * vpr; it += blockDim.x) {
      const int is_v = it >= cnt * vpr;
      const int r = is_v ? it - cnt * vpr : it;
      const int j = r / vpr, c = r % vpr;
      const int key = t0 + j;
      const bf16* src;
      if (key < n_set) {
        src = (is_v ? v_head : k_head) + int64_t(p.rows[b + key]) * hd;
      } else {
        src = is_v ? v_cur : k_cur;
      }
      const uint4 val = reinterpret_cast<const uint4*>(src)[c];
      uint32_t* dst = reinterpret_cast<uint32_t*>((is_v ? sV : sK) + j * stride + c * 8);
      dst[0] = val.x;
      dst[1] = val.y;
      dst[2] = val.z;
      dst[3] = val.w;
    }
    __syncthreads();
    // Scores: pair (h, j); a warp shares h (kSparseTile == 32), so sQ reads broadcast.
    for (int pr = tid; pr < group * kSparseTile; pr += blockDim.x) {
      const int h = pr / kSparseTile, j = pr % kSparseTile;
      float s = -INFINITY;
      if (j < cnt) {
        const float* qh = sQ + h * hd;
        const __nv_bfloat162* kr = reinterpret_cast<const __nv_bfloat162*>(sK + j * stride);
        float dot = 0.0f;
        for (int e = 0; e < hd / 2; ++e) {
          const float2 kf = __bfloat1622float2(kr[e]);
          dot = fmaf(qh[2 * e], kf.x, dot);
          dot = fmaf(qh[2 * e + 1], kf.y, dot);
        }
        s = dot;
      }
      sP[h * kSparseTile + j] = s;
    }
    __syncthreads();
    // Online softmax update, one warp per head, lane j = key j of the tile.
    for (int h = warp; h < group; h += n_warps) {
      const float s = sP[h * kSparseTile + lane];
      const float m_old = sM[h];
      const float m_new = fmaxf(m_old, WarpMax(s));  // finite: cnt >= 1
      const float e = lane < cnt ? expf(s - m_new) : 0.0f;
      const float sum = WarpSum(e);
      sP[h * kSparseTile + lane] = e;
      if (lane == 0) {
        const float corr = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
        sM[h] = m_new;
        sL[h] = sL[h] * corr + sum;
        sCorr[h] = corr;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxOutPerThread; ++i) {
      const int o = tid + i * kThreads;
      if (o < group * hd) {
        const int h = o / hd, d = o % hd;
        const float* ph = sP + h * kSparseTile;
        float a = acc[i] * sCorr[h];
        for (int j = 0; j < cnt; ++j) a = fmaf(ph[j], __bfloat162float(sV[j * stride + d]), a);
        acc[i] = a;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kMaxOutPerThread; ++i) {
    const int o = tid + i * kThreads;
    if (o < group * hd) {
      const int h = o / hd, d = o % hd;
      const float val = acc[i] / sL[h];
      if (p.max_splits == 1) {
        static_cast<bf16*>(p.out)[(int64_t(seq) * p.n_heads + int64_t(g) * group + h) * hd + d] =
            __float2bfloat16(val);
      } else {
        const int64_t slot = (int64_t(seq) * p.n_kv + g) * p.max_splits + split;
        p.partial_o[(slot * group + h) * hd + d] = val;
      }
    }
  }
  if (p.max_splits > 1 && tid < group) {
    const int64_t slot = (int64_t(seq) * p.n_kv + g) * p.max_splits + split;
    p.partial_lse[slot * group + tid] = sM[tid] + logf(sL[tid]);
  }
}

// Merges the splits of one (sequence, query head): softmax-weighted by each split's log-sum-exp.
__global__ void SparseCombineKernel(SparseAttnParams p) {
  const int seq = blockIdx.x / p.n_heads, h = blockIdx.x % p.n_heads;
  const int group = p.n_heads / p.n_kv, g = h / group, hh = h % group;
  const int set = seq * p.sets_per_seq + (p.sets_per_seq == 1 ? 0 : g);
  const int total = p.indptr[set + 1] - p.indptr[set] + 1;
  const int n_splits = (total + p.chunk - 1) / p.chunk;
  const int64_t base = (int64_t(seq) * p.n_kv + g) * p.max_splits;
  float mx = -INFINITY;
  for (int s = 0; s < n_splits; ++s) mx = fmaxf(mx, p.partial_lse[(base + s) * group + hh]);
  float wsum = 0.0f;
  for (int s = 0; s < n_splits; ++s) wsum += expf(p.partial_lse[(base + s) * group + hh] - mx);
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
      const float w = expf(p.partial_lse[(base + s) * group + hh] - mx);
      a += w * p.partial_o[((base + s) * group + hh) * p.head_dim + d];
    }
    static_cast<bf16*>(p.out)[(int64_t(seq) * p.n_heads + h) * p.head_dim + d] = __float2bfloat16(a / wsum);
  }
}

}  // namespace

size_t SparseAttnSmemBytes(int group, int head_dim) { return static_cast<size_t>(Layout(group, head_dim).total); }

cudaError_t LaunchSparseAttention(const SparseAttnParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0) return cudaSuccess;
  const int group = p.n_heads / p.n_kv;
  if (group < 1 || group > kSparseMaxGroup || p.head_dim > kSparseMaxHeadDim || p.head_dim % 8 != 0 ||
      p.chunk <= 0 || p.chunk % kSparseTile != 0 || p.max_splits < 1) {
    return cudaErrorInvalidValue;
  }
  static const cudaError_t attr = cudaFuncSetAttribute(
      SparseAttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(SparseAttnSmemBytes(kSparseMaxGroup, kSparseMaxHeadDim)));
  if (attr != cudaSuccess) return attr;
  const dim3 grid(p.max_splits, p.n_kv, p.n_seqs);
  SparseAttentionKernel<<<grid, kThreads, SparseAttnSmemBytes(group, p.head_dim), stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.max_splits == 1) return err;
  SparseCombineKernel<<<p.n_seqs * p.n_heads, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace specontext::cuda
