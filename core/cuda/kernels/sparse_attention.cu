// Sparse decode attention over index sets (one token per sequence), GQA-aware, split-K with a combine
// (sparse_combine.cu).
//
// Two kernels serve SparseAttnParams:
// - SparseAttentionMmaKernel (head_dim 64/128, group <= 8): tensor cores, one warp per 16-key tile with its
//   own online softmax, K/V rows loaded from global memory straight into mma fragments (no shared-memory
//   staging, no block barrier in the key loop), the warps of a CTA merged at the end. Layout notes below.
// - SparseAttentionKernel (generic: any head_dim multiple of 8 up to 256, group up to 16): one CTA per
//   (split, KV head, sequence) walks tiles of kSparseTile keys staged in shared memory, scores them against
//   the group's queries on CUDA cores, and updates an exact online softmax (f32).
// Both read every gathered K/V row once per GQA group; the row index comes from the set (a token position
// of the full cache or a slot of the slot buffer); the key after the set is the current token, read from
// k_cur/v_cur.
//
// PDL (elementwise.h): the kernels are launched with the attribute and may start while the kernel before
// them runs. Before PdlWait() they read only what no kernel writes: the sets' layout (indptr) and the
// per-sequence K/V tables, which CudaBackend uploads with stream-ordered copies before the step's first
// kernel (PrepareSparseDecode, EnsureTierTables). The set positions (p.rows; the selection kernels may
// write them on the device), q, k_cur/v_cur, the caches and the partials are read after it. That takes
// the layout loads off the step's critical path.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"
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
  PdlTrigger();
  extern __shared__ __align__(16) char smem[];
  const int seq = blockIdx.z, g = blockIdx.y, split = blockIdx.x;
  const int group = p.n_heads / p.n_kv, hd = p.head_dim;
  const SetKeys keys = KeysOf(p, seq, g);  // the layout: before the wait (see the top)
  const int n_set = keys.n_set, total = keys.total;
  const int k0 = split * p.chunk;
  if (k0 >= total) return;
  const int k1 = min(total, k0 + p.chunk);
  const SparseKvPtrs kv = p.kv[seq];
  PdlWait();

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
        src = (is_v ? v_head : k_head) + int64_t(RowOf(p, keys, key)) * hd;
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

// ---- Tensor-core kernel ------------------------------------------------------------------------------
// mma.sync m16n8k16 (bf16 in, f32 accumulate), thread (r = lane / 4, c = lane % 4):
//  S = Q·Kᵀ: A = the group's queries (row r = head r, rows 8-15 zero), B = K (n = key). The thread loads
//   16 bytes of key row r (n-tile 0) and 8 + r (n-tile 1) at dims 32j + 8c; k-chunk 2j + h of the mma
//   pairs dims 32j + 8c + 4h + {0..3}: a permutation of the head dimension that Q's fragment (loaded the
//   same way) follows, so every dot product is unchanged. No shuffles, no shared memory.
//  Oᵀ = Vᵀ·Pᵀ: A = Vᵀ (m = dim, k = key), B = Pᵀ, which is S's accumulator (head r, keys 2c, 2c+1 and
//   8+2c, 9+2c) as is. The thread loads dims [64q + 8r, +8) of key rows 2c, 2c+1, 2c+8, 2c+9; row m of
//   m-tile 4q + e is dim 64q + 8r + 2e (m = r) or that + 1 (m = r + 8), so Oᵀ's accumulator leaves the
//   thread holding 8 contiguous dims of heads 2c and 2c+1, and the V fragment is built with byte permutes.
// Every 16-byte access is one contiguous 64-byte (K) or 128-byte (V) piece of a row across its lanes.
constexpr int kMmaWarps = 4;
constexpr int kMmaTile = 16;  // keys per warp iteration
constexpr int kMmaMaxGroup = 8;

__device__ __forceinline__ void MmaBf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two f32 as bf16x2 (lo in the low half); *sum gets the rounded values, so that the softmax denominator
// matches the weights the mma sees.
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi, float* sum) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  const float2 f = __bfloat1622float2(v);
  *sum += f.x + f.y;
  return *reinterpret_cast<const uint32_t*>(&v);
}

// At most 168 registers (3 CTAs per SM at head_dim 128): 2 CTAs per SM were not faster (H100, 2026-11-24).
template <int HD>
__global__ void __launch_bounds__(kMmaWarps * 32, 3) SparseAttentionMmaKernel(SparseAttnParams p) {
  constexpr int NJ = HD / 32;  // 16-byte K loads per key row and thread (two k-chunks each)
  constexpr int NQ = HD / 64;  // 16-byte V loads per key row and thread
  constexpr int NM = HD / 16;  // m-tiles of Oᵀ
  __shared__ __align__(16) float sO[kMmaWarps][kMmaMaxGroup][HD];
  __shared__ float sM[kMmaWarps][kMmaMaxGroup], sL[kMmaWarps][kMmaMaxGroup];
  PdlTrigger();  // the combine may be scheduled now; it waits for this grid in its PdlWait

  const int seq = blockIdx.z, g = blockIdx.y, split = blockIdx.x;
  const int group = p.n_heads / p.n_kv;
  const SetKeys keys = KeysOf(p, seq, g);  // the layout and the tables: before the wait (see the top)
  const int b = keys.b, n_set = keys.n_set, total = keys.total;
  const int k0 = split * p.chunk;
  if (k0 >= total) return;
  const int k1 = min(total, k0 + p.chunk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, c = lane & 3;

  const SparseKvPtrs kv = p.kv[seq];
  const bf16* k_head = static_cast<const bf16*>(kv.k) + int64_t(g) * kv.rows * HD;
  const bf16* v_head = static_cast<const bf16*>(kv.v) + int64_t(g) * kv.rows * HD;
  if (p.l2_prefetch) {
    // Still before the wait: L2 prefetches of the K (lanes 0-15) and V (16-31) rows of this warp's first tile,
    // so that their HBM latency overlaps the kernel before (at one sequence a warp has one tile: the whole
    // gather). The positions may be in writing (a selection kernel earlier in the step), so they are read
    // past L1 (ld.global.cg: no stale line stays for the reads after the wait) and clamped into the cache; a
    // prefetch is only a hint, so a stale position costs bandwidth, never a wrong result.
    const int key = k0 + warp * kMmaTile + (lane & 15);
    if (key < min(k1, n_set) && kv.rows > 0) {
      const int row = min(max(keys.dense ? key : __ldcg(p.rows + b + key), 0), static_cast<int>(kv.rows - 1));
      const char* src = reinterpret_cast<const char*>((lane < 16 ? k_head : v_head) + int64_t(row) * HD);
#pragma unroll
      for (int o = 0; o < HD * 2; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(src + o));
    }
  }
  PdlWait();
  const bf16* k_cur = static_cast<const bf16*>(p.k_cur) + (int64_t(seq) * p.n_kv + g) * HD;
  const bf16* v_cur = static_cast<const bf16*>(p.v_cur) + (int64_t(seq) * p.n_kv + g) * HD;
  const int32_t* rows = p.rows + b;

  uint4 qf[NJ];
  {
    const bf16* q = static_cast<const bf16*>(p.q) + (int64_t(seq) * p.n_heads + int64_t(g) * group + r) * HD;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      qf[j] = r < group ? *reinterpret_cast<const uint4*>(q + 32 * j + 8 * c) : make_uint4(0, 0, 0, 0);
    }
  }
  const float scale_log2 = p.scale * 1.4426950408889634f;  // scores in log2 units: exp2f below
  float m_r = -INFINITY, l_r = 0.0f;  // head r's running max (quad-uniform) and this thread's share of Σp
  float o[NM][4];
#pragma unroll
  for (int i = 0; i < NM; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

  // Lane l < 16 holds the row of key t + l (-1: the current token); the next tile's is loaded one
  // iteration ahead so that the gather does not wait on the index load.
  auto row_of = [&](int key) { return key < n_set ? (keys.dense ? key : __ldg(rows + key)) : -1; };
  int t = k0 + warp * kMmaTile;
  int my_row = lane < kMmaTile && t + lane < k1 ? row_of(t + lane) : 0;
  for (; t < k1; t += kMmaWarps * kMmaTile) {
    const int tn = t + kMmaWarps * kMmaTile;
    const int next_row = lane < kMmaTile && tn + lane < k1 ? row_of(tn + lane) : 0;
    uint4 kf[2][NJ];
#pragma unroll
    for (int tt = 0; tt < 2; ++tt) {
      const int key = 8 * tt + r;
      const int row = __shfl_sync(0xffffffffu, my_row, key);
      const bf16* src = (row >= 0 ? k_head + int64_t(row) * HD : k_cur) + 8 * c;
      const bool ok = t + key < k1;
#pragma unroll
      for (int j = 0; j < NJ; ++j) kf[tt][j] = ok ? LoadStream16(src + 32 * j) : make_uint4(0, 0, 0, 0);
    }
    uint4 vf[4][NQ];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int key = 2 * c + (kk & 1) + 8 * (kk >> 1);
      const int row = __shfl_sync(0xffffffffu, my_row, key);
      const bf16* src = (row >= 0 ? v_head + int64_t(row) * HD : v_cur) + 8 * r;
      const bool ok = t + key < k1;  // a missing row must be 0, not garbage: 0 * NaN is NaN
#pragma unroll
      for (int q = 0; q < NQ; ++q) vf[kk][q] = ok ? LoadStream16(src + 64 * q) : make_uint4(0, 0, 0, 0);
    }
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int tt = 0; tt < 2; ++tt) {
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          MmaBf16(s[tt], Word(qf[j], 2 * h), 0u, Word(qf[j], 2 * h + 1), 0u, Word(kf[tt][j], 2 * h),
                  Word(kf[tt][j], 2 * h + 1));
        }
      }
    }
    // Head r's scores of keys 2c, 2c+1, 8+2c, 9+2c; keys past the range are -inf.
    float x[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = 2 * c + (e & 1) + 8 * (e >> 1);
      x[e] = t + key < k1 ? s[e >> 1][e & 1] * scale_log2 : -INFINITY;
    }
    float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_r, mx);  // finite: key t is in range
    const float corr = exp2f(m_r - m_new);  // 0 on the first tile
    m_r = m_new;
    float psum = 0.0f;
    const uint32_t p01 = PackBf16(exp2f(x[0] - m_new), exp2f(x[1] - m_new), &psum);
    const uint32_t p23 = PackBf16(exp2f(x[2] - m_new), exp2f(x[3] - m_new), &psum);
    l_r = l_r * corr + psum;
    // This thread's Oᵀ columns are heads 2c and 2c+1: their correction lives in quads 2c and 2c+1.
    const float ca = __shfl_sync(0xffffffffu, corr, 8 * c), cb = __shfl_sync(0xffffffffu, corr, 8 * c + 4);
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float(&acc)[4] = o[4 * q + e];
        acc[0] *= ca;
        acc[1] *= cb;
        acc[2] *= ca;
        acc[3] *= cb;
        const uint32_t w0 = Word(vf[0][q], e), w1 = Word(vf[1][q], e);
        const uint32_t w8 = Word(vf[2][q], e), w9 = Word(vf[3][q], e);
        MmaBf16(acc, __byte_perm(w0, w1, 0x5410), __byte_perm(w0, w1, 0x7632), __byte_perm(w8, w9, 0x5410),
                __byte_perm(w8, w9, 0x7632), p01, p23);
      }
    }
    my_row = next_row;
  }

  // Merge the warps (each saw a quarter of the CTA's keys) through shared memory.
  l_r += __shfl_xor_sync(0xffffffffu, l_r, 1);
  l_r += __shfl_xor_sync(0xffffffffu, l_r, 2);
  if (c == 0) {
    sM[warp][r] = m_r;
    sL[warp][r] = l_r;
  }
#pragma unroll
  for (int q = 0; q < NQ; ++q) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int d = 64 * q + 8 * r + 2 * e;
      *reinterpret_cast<float2*>(&sO[warp][2 * c][d]) = make_float2(o[4 * q + e][0], o[4 * q + e][2]);
      *reinterpret_cast<float2*>(&sO[warp][2 * c + 1][d]) = make_float2(o[4 * q + e][1], o[4 * q + e][3]);
    }
  }
  __syncthreads();
  for (int it = threadIdx.x; it < group * (HD / 8); it += blockDim.x) {
    const int h = it / (HD / 8), d0 = (it % (HD / 8)) * 8;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) M = fmaxf(M, sM[w][h]);
    float f[kMmaWarps], L = 0.0f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) {
      f[w] = sM[w][h] == -INFINITY ? 0.0f : exp2f(sM[w][h] - M);  // a warp without keys adds nothing
      L += f[w] * sL[w][h];
    }
    const float inv = 1.0f / L;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float a = 0.0f;
#pragma unroll
      for (int w = 0; w < kMmaWarps; ++w) a = fmaf(f[w], sO[w][h][d0 + e], a);
      acc[e] = a * inv;
    }
    if (p.max_splits == 1) {
      Bf16x8 v;
#pragma unroll
      for (int e = 0; e < 4; ++e) v.v[e] = __floats2bfloat162_rn(acc[2 * e], acc[2 * e + 1]);
      *reinterpret_cast<Bf16x8*>(static_cast<bf16*>(p.out) + (int64_t(seq) * p.n_heads + int64_t(g) * group + h) * HD +
                                 d0) = v;
    } else {
      const int64_t slot = (int64_t(seq) * p.n_kv + g) * p.max_splits + split;
      float4* dst = reinterpret_cast<float4*>(p.partial_o + (slot * group + h) * HD + d0);
      dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      if (d0 == 0) p.partial_lse[slot * group + h] = (M + log2f(L)) * 0.6931471805599453f;  // natural log
    }
  }
}

bool UseMma(const SparseAttnParams& p) {
  const int group = p.n_kv > 0 ? p.n_heads / p.n_kv : 0;
  return p.variant == 0 && group >= 1 && group <= kMmaMaxGroup && (p.head_dim == 64 || p.head_dim == 128);
}

constexpr int kMmaUnit = kMmaWarps * kMmaTile;  // the tensor-core plan's chunks are whole units

// CTAs of the tensor-core kernel one SM holds at once (queried once per head dim; 3 when the query fails).
int MmaBlocksPerSm(int head_dim) {
  static int per_sm[2] = {0, 0};  // head_dim 64, 128
  int& occ = per_sm[head_dim == 64 ? 0 : 1];
  if (occ == 0) {
    const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &occ, head_dim == 64 ? SparseAttentionMmaKernel<64> : SparseAttentionMmaKernel<128>, kMmaWarps * 32, 0);
    if (e != cudaSuccess || occ <= 0) occ = 3;
  }
  return occ;
}

// The tensor-core plan's candidate chunks, distinct, in the order it tries them (largest first): the list cut
// into 1..512 even pieces of whole units, then the smallest chunk.
template <typename F>
void ForEachMmaChunk(int64_t max_keys, F&& f) {
  int64_t prev = -1;
  for (int64_t split = 1;; ++split) {  // up to 512 even cuts, then the smallest chunk
    const int64_t chunk = split > 512 ? kMmaUnit
                                      : std::max<int64_t>(kMmaUnit, ((max_keys + split - 1) / split + kMmaUnit - 1) /
                                                                        kMmaUnit * kMmaUnit);
    if (chunk != prev) f(chunk);
    prev = chunk;
    if (chunk == kMmaUnit) break;
  }
}

}  // namespace

void PlanSparseAttention(int64_t sum_keys, int max_keys, int sm_count, SparseAttnParams* p) {
  max_keys = std::max(max_keys, 1);
  if (UseMma(*p)) {
    // CTAs of one chunk each run in waves of `resident` (as many as fit on the SMs at once): pick the
    // chunk (the list cut into s even pieces of whole warp tiles) that minimises waves x (chunk + a
    // per-CTA overhead of half a tile round), i.e. the busiest SM's work. A short batch gets one partial
    // wave of the smallest chunks (latency); a long one few splits in full waves (no tail).
    const double resident = double(sm_count) * MmaBlocksPerSm(p->head_dim), lists = double(sum_keys) / max_keys;
    int64_t best_chunk = 0;
    double best = 0;
    ForEachMmaChunk(max_keys, [&](int64_t chunk) {
      const int64_t splits = (max_keys + chunk - 1) / chunk;
      const double cost = std::ceil(std::ceil(lists * splits - 1e-9) / resident) * double(chunk + kMmaUnit / 2);
      if (best_chunk == 0 || cost < best) {
        best = cost;
        best_chunk = chunk;
      }
    });
    p->chunk = static_cast<int>(best_chunk);
    p->max_splits = static_cast<int>((max_keys + best_chunk - 1) / best_chunk);
    return;
  }
  // Generic kernel: chunks sized for about two CTAs per SM over all lists, at least four tiles each so
  // that the per-CTA prologue and the combine stay small.
  const int64_t target = 2 * int64_t{sm_count};
  int64_t chunk = (sum_keys + target - 1) / target;
  chunk = std::max<int64_t>(4 * kSparseTile, (chunk + kSparseTile - 1) / kSparseTile * kSparseTile);
  p->chunk = static_cast<int>(chunk);
  p->max_splits = static_cast<int>((max_keys + chunk - 1) / chunk);
}

void PlanSparseAttentionInvariant(int max_keys, SparseAttnParams* p) {
  static_assert(kBatchInvariantSparseChunk % (kMmaWarps * kMmaTile) == 0 && kBatchInvariantSparseChunk % kSparseTile == 0);
  p->chunk = kBatchInvariantSparseChunk;
  p->max_splits = std::max(2, (std::max(max_keys, 1) + kBatchInvariantSparseChunk - 1) / kBatchInvariantSparseChunk);
}

int SparseAttentionSplitsCeiling(int64_t max_keys, bool batch_invariant) {
  max_keys = std::max<int64_t>(max_keys, 1);
  if (batch_invariant) {
    const int64_t chunks = (max_keys + kBatchInvariantSparseChunk - 1) / kBatchInvariantSparseChunk;
    return static_cast<int>(std::max<int64_t>(2, chunks));
  }
  // The tensor-core plan's chunks are whole units of kMmaWarps x kMmaTile keys; the generic plan's at least
  // four tiles.
  constexpr int kMinChunk = std::min(kMmaUnit, 4 * kSparseTile);
  return static_cast<int>((max_keys + kMinChunk - 1) / kMinChunk);
}

int SparseMmaMaxSplits(int64_t max_keys, int64_t min_lists, int64_t max_lists, int64_t resident) {
  max_keys = std::max<int64_t>(max_keys, 1);
  min_lists = std::max<int64_t>(min_lists, 1);
  max_lists = std::max(max_lists, min_lists);
  resident = std::max<int64_t>(resident, 1);
  std::vector<std::pair<int64_t, int64_t>> cand;  // {chunk + kMmaUnit / 2 (the cost's factor), splits}
  ForEachMmaChunk(max_keys, [&](int64_t chunk) {
    cand.push_back({chunk + kMmaUnit / 2, (max_keys + chunk - 1) / chunk});
  });
  std::vector<size_t> order(cand.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cand[a].second > cand[b].second; });
  // With lists = sum_keys / max_keys the plan's cost of candidate i is ceil(lists x splits_i / resident) x
  // factor_i: a step function of lists, non-decreasing. Candidate j is the plan's pick at some lists in
  // [min_lists, max_lists] iff it is at the end of one of its own steps (its cost stays, the others' only
  // grow), lists = k x resident / splits_j (or max_lists): the first of the smallest costs there, as the
  // plan takes it. The first such j of the most splits is the answer. Exact integer arithmetic: at lists =
  // k x resident / splits_j, candidate i's waves are ceil(k x splits_i / splits_j).
  for (size_t j : order) {
    const int64_t fj = cand[j].first, nj = cand[j].second;
    const int64_t k0 = std::max<int64_t>(1, (min_lists * nj + resident - 1) / resident);
    const int64_t k1 = (max_lists * nj + resident - 1) / resident;
    for (int64_t k = k0; k <= k1; ++k) {
      const bool at_end = k * resident <= max_lists * nj;  // else the range ends inside this step
      auto waves = [&](int64_t n) {
        return at_end ? (k * n + nj - 1) / nj : (max_lists * n + resident - 1) / resident;
      };
      const int64_t cost_j = waves(nj) * fj;
      bool wins = true;
      for (size_t i = 0; i < cand.size() && wins; ++i) {
        if (i == j) continue;
        const int64_t cost_i = waves(cand[i].second) * cand[i].first;
        wins = i < j ? cost_i > cost_j : cost_i >= cost_j;
      }
      if (wins) return static_cast<int>(nj);
    }
  }
  return 1;
}

int SparseAttentionMaxSplits(int64_t max_keys, int64_t min_lists, int64_t max_lists, int sm_count,
                             bool batch_invariant, const SparseAttnParams& shape) {
  max_keys = std::max<int64_t>(max_keys, 1);
  if (batch_invariant) return SparseAttentionSplitsCeiling(max_keys, true);
  if (UseMma(shape)) {
    return SparseMmaMaxSplits(max_keys, min_lists, max_lists, int64_t{sm_count} * MmaBlocksPerSm(shape.head_dim));
  }
  // The generic plan's chunk grows with the keys of the batch: the fewest give the most splits.
  SparseAttnParams p = shape;
  PlanSparseAttention(std::max<int64_t>(min_lists, 1) * max_keys, static_cast<int>(max_keys), sm_count, &p);
  return p.max_splits;
}

size_t SparseAttnSmemBytes(int group, int head_dim) { return static_cast<size_t>(Layout(group, head_dim).total); }

cudaError_t LaunchSparseAttention(const SparseAttnParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0) return cudaSuccess;
  const int group = p.n_heads / p.n_kv;
  if (group < 1 || group > kSparseMaxGroup || p.head_dim > kSparseMaxHeadDim || p.head_dim % 8 != 0 ||
      p.chunk <= 0 || p.chunk % kSparseTile != 0 || p.max_splits < 1) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(p.max_splits, p.n_kv, p.n_seqs);
  static const bool prefetch = [] {
    const char* e = std::getenv("SPC_SPARSE_PREFETCH");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  SparseAttnParams q = p;
  q.l2_prefetch = p.l2_prefetch && prefetch;
  cudaError_t err;
  if (UseMma(p)) {
    err = LaunchPdl(p.head_dim == 64 ? SparseAttentionMmaKernel<64> : SparseAttentionMmaKernel<128>, grid,
                    dim3(kMmaWarps * 32), 0, stream, q);
  } else {
    // The limit is the current device's: set on every launch (cheap, idempotent, like attention_mma.cu), not
    // once per process, since tensor-parallel ranks launch this kernel on several GPUs.
    const cudaError_t attr = cudaFuncSetAttribute(
        SparseAttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(SparseAttnSmemBytes(kSparseMaxGroup, kSparseMaxHeadDim)));
    if (attr != cudaSuccess) return attr;
    err = LaunchPdl(SparseAttentionKernel, grid, dim3(kThreads), SparseAttnSmemBytes(group, p.head_dim), stream, p);
  }
  if (err != cudaSuccess || p.max_splits == 1) return err;
  return LaunchSparseCombine(p, stream);
}

}  // namespace specontext::cuda
