// Fused score + top-B selection (see selection_kernels.h). Three launches:
// 1. Scores: one pass over each sequence's K cache [0, len) per KV head, all query heads of its group at
//    once (bf16 with head_dim 64/128 and group <= 8 on tensor cores, the other dtypes/shapes on CUDA
//    cores). Writes the logits and, per chunk of kScoreChunk keys, every head's (max, Σexp) partial; one CTA
//    per sequence also zeroes its digit-0 histograms for step 2.
// 2. Combined weights, many CTAs per set: the heads' softmax statistics from the partials, the combined
//    weight of every position (max over the set's heads of exp(logit - max) / Σ) to p.combined, and the
//    histogram of the first radix digit.
// 3. Top-B, one CTA per set: the combined weights into shared memory (read in place past the
//    shared-memory limit), a radix select of the B-th largest (softmax weights are non-negative floats, so
//    their bit patterns order like the values: 10 then 8, 8, 5 bits, most significant first, stopping as
//    soon as the threshold's bin is taken whole), an ordered compaction (every weight above the threshold,
//    and the lowest positions among those equal to it: the CPU reference's tie rule) in contiguous
//    per-thread segments, and the mass each head captured.
#include <atomic>

#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/selection_kernels.h"

namespace specontext::cuda {
namespace {

constexpr int kScoreChunk = 256;   // keys per score CTA (and per stats partial)
constexpr int kScoreWarps = 4;     // tensor-core score kernel
constexpr int kGenericWarps = 8;   // CUDA-core score kernel
constexpr int kTopKThreads = 1024;

__host__ __device__ __forceinline__ int NumChunks(int len) { return (len + kScoreChunk - 1) / kScoreChunk; }

constexpr int kDigit0Bins = 1024;
constexpr int kDigit0Shift = 21;

// The histogram of digit 0 per set: after the stats partials in p.stats (SelectionStatsFloats).
__device__ __forceinline__ int* Digit0Hist(const SelectionParams& p, int seq, int set) {
  int* base = reinterpret_cast<int*>(p.stats + size_t(p.n_seqs) * p.n_q * 2 * NumChunks(p.max_len));
  return base + (int64_t(seq) * p.sets_per_seq + set) * kDigit0Bins;
}

// The score kernels' block (0, 0, seq) zeroes the sequence's digit-0 histograms, which CombineKernel (the
// next launch) fills: one memset launch less on the step's serial path.
__device__ __forceinline__ void ZeroDigit0Hists(const SelectionParams& p) {
  if (blockIdx.x != 0 || blockIdx.y != 0) return;
  int* h = Digit0Hist(p, blockIdx.z, 0);
  for (int i = threadIdx.x; i < p.sets_per_seq * kDigit0Bins; i += blockDim.x) h[i] = 0;
}

// Merges softmax partials (max, Σexp(x - max)).
__device__ __forceinline__ void MergeStat(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  s = (m == -INFINITY ? 0.0f : s * expf(m - mn)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mn));
  m = mn;
}

__device__ __forceinline__ void WarpMergeStat(float& m, float& s, int width) {
  for (int o = 1; o < width; o <<= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    MergeStat(m, s, m2, s2);
  }
}

__device__ __forceinline__ void StoreStat(const SelectionParams& p, int seq, int h, int chunk, float m, float s) {
  float2* st = reinterpret_cast<float2*>(p.stats) + (int64_t(seq) * p.n_q + h) * NumChunks(p.max_len) + chunk;
  *st = make_float2(m, s);
}

// ---- Scores on tensor cores (bf16 q and K) -------------------------------------------------------------
// S = Q·Kᵀ with mma.sync m16n8k16: A = the group's queries (row r = lane / 4 = head r; rows 8-15 zero), B = K
// (n = key). Thread (r, c = lane % 4) loads 16 bytes of key row r (n-tile 0) and 8 + r (n-tile 1) at dims
// 32j + 8c; k-chunk 2j + h pairs dims 32j + 8c + 4h + {0..3}, a permutation of the head dimension that Q's
// fragment follows (same as the sparse attention kernel), so every dot product is unchanged. grid
// (chunks, n_kv, n_seqs); each warp takes every fourth 16-key tile of the CTA's chunk.
__device__ __forceinline__ void MmaBf16(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

template <int HD>
__global__ void __launch_bounds__(kScoreWarps * 32) ScoreMmaKernel(SelectionParams p) {
  constexpr int NJ = HD / 32;
  __shared__ float sm[kScoreWarps][8], ss[kScoreWarps][8];
  ZeroDigit0Hists(p);
  const SelSeq s = p.seqs[blockIdx.z];
  const int g = blockIdx.y, group = p.n_q / p.n_kv, chunk = blockIdx.x;
  const int t_begin = chunk * kScoreChunk;
  if (t_begin >= s.len) return;
  const int t_end = min(s.len, t_begin + kScoreChunk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, c = lane & 3;
  uint4 qf[NJ];
  const bf16* q = static_cast<const bf16*>(s.q) + int64_t(g * group + r) * HD + 8 * c;
#pragma unroll
  for (int j = 0; j < NJ; ++j) qf[j] = r < group ? *reinterpret_cast<const uint4*>(q + 32 * j) : make_uint4(0, 0, 0, 0);
  const bf16* k = static_cast<const bf16*>(s.k) + int64_t(g) * s.capacity * HD + 8 * c;
  float* logits = p.logits + (int64_t(blockIdx.z) * p.n_q + g * group + r) * p.max_len;
  float m = -INFINITY, sum = 0.0f;
  bool finite = true;
  for (int t = t_begin + warp * 16; t < t_end; t += kScoreWarps * 16) {
    uint4 kf[2][NJ];
#pragma unroll
    for (int tt = 0; tt < 2; ++tt) {
      const int key = t + 8 * tt + r;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        kf[tt][j] = key < t_end ? LoadStream16(k + int64_t(key) * HD + 32 * j) : make_uint4(0, 0, 0, 0);
      }
    }
    float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int tt = 0; tt < 2; ++tt) {
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          MmaBf16(sc[tt], Word(qf[j], 2 * h), Word(qf[j], 2 * h + 1), Word(kf[tt][j], 2 * h),
                  Word(kf[tt][j], 2 * h + 1));
        }
      }
    }
    // Head r's logits of keys t + 8tt + 2c + {0, 1}.
    float x[4], mx = -INFINITY;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = t + 8 * (e >> 1) + 2 * c + (e & 1);
      x[e] = key < t_end ? sc[e >> 1][e & 1] * p.scale : -INFINITY;
      if (key < t_end && r < group) {
        finite = finite && isfinite(x[e]);
        logits[key] = x[e];
      }
      mx = fmaxf(mx, x[e]);
    }
    if (mx > -INFINITY) {
      const float mn = fmaxf(m, mx);
      float add = 0.0f;
#pragma unroll
      for (int e = 0; e < 4; ++e) add += expf(x[e] - mn);
      sum = (m == -INFINITY ? 0.0f : sum * expf(m - mn)) + add;
      m = mn;
    }
  }
  if (!finite) atomicExch(p.error_flag, 1);
  // Quad, then the CTA's warps: one (max, Σ) per head for this chunk.
  WarpMergeStat(m, sum, 4);
  if (c == 0) {
    sm[warp][r] = m;
    ss[warp][r] = sum;
  }
  __syncthreads();
  if (threadIdx.x < group) {
    float M = -INFINITY, S = 0.0f;
    for (int w = 0; w < kScoreWarps; ++w) MergeStat(M, S, sm[w][threadIdx.x], ss[w][threadIdx.x]);
    StoreStat(p, blockIdx.z, g * group + threadIdx.x, chunk, M, S);
  }
}

// ---- Scores on CUDA cores (any dtype mix, any head_dim, any group) --------------------------------------
// grid (chunks, n_kv, n_seqs): one warp per key, lanes over head_dim, every query head of the KV head's
// group (shared memory holds them as f32); then one warp per head folds the chunk's logits into the stats.
template <typename QT, typename KT>
__global__ void __launch_bounds__(kGenericWarps * 32) ScoreGenericKernel(SelectionParams p) {
  extern __shared__ float sq[];  // [group, head_dim]
  ZeroDigit0Hists(p);
  const SelSeq s = p.seqs[blockIdx.z];
  const int g = blockIdx.y, group = p.n_q / p.n_kv, hd = p.head_dim;
  const int t_begin = blockIdx.x * kScoreChunk;
  if (t_begin >= s.len) return;
  const int t_end = min(s.len, t_begin + kScoreChunk);
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
    sq[i] = ToF32<QT>(static_cast<const QT*>(s.q)[int64_t(g) * group * hd + i]);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* logits = p.logits + (int64_t(blockIdx.z) * p.n_q + g * group) * p.max_len;
  for (int t = t_begin + warp; t < t_end; t += kGenericWarps) {
    const KT* row = static_cast<const KT*>(s.k) + (int64_t(g) * s.capacity + t) * hd;
    for (int h = 0; h < group; ++h) {
      float dot = 0.0f;
      for (int e = lane; e < hd; e += 32) dot = fmaf(sq[h * hd + e], ToF32<KT>(row[e]), dot);
      dot = WarpSum(dot) * p.scale;
      if (lane == 0) {
        if (!isfinite(dot)) atomicExch(p.error_flag, 1);
        logits[int64_t(h) * p.max_len + t] = dot;
      }
    }
  }
  __syncthreads();  // the block's logits are visible to the block
  for (int h = warp; h < group; h += kGenericWarps) {
    float m = -INFINITY, sum = 0.0f;
    for (int t = t_begin + lane; t < t_end; t += 32) MergeStat(m, sum, logits[int64_t(h) * p.max_len + t], 1.0f);
    WarpMergeStat(m, sum, 32);
    if (lane == 0) StoreStat(p, blockIdx.z, g * group + h, blockIdx.x, m, sum);
  }
}

// ---- Combined weights and the first radix digit (many CTAs per set) --------------------------------------
// The radix select runs over the bits of the combined weights (non-negative floats: bit order = value
// order): digit 0 = bits 30..21 (exponent and 2 mantissa bits, 1024 bins, counted here in parallel), then
// bits 20..13, 12..5 and 4..0 in the per-set kernel.
constexpr int kCombineChunk = 256;  // positions per combine CTA: one sweep of its threads (2048: 16 CTAs at 2K, 11 us)
constexpr int kCombineThreads = 256;

// hist[bin] += 1 for the active lanes, one shared atomic per distinct bin of the warp (most weights share
// a handful of bins: plain atomics would serialise on them). Call from all 32 lanes.
__device__ __forceinline__ void HistAdd(int* hist, int bin, bool active) {
  const unsigned act = __ballot_sync(0xffffffffu, active);
  if (!active) return;
  const unsigned peers = __match_any_sync(act, bin);
  if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
}

// Max and 1/Σ of heads [h0, h0 + n) of sequence `seq` over [0, len) from the score chunks' partials,
// one warp per head (any block size that is a multiple of 32).
__device__ void HeadStats(const SelectionParams& p, int seq, int h0, int n, int len, float* s_max, float* s_inv) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int n_chunks = NumChunks(len), stride = NumChunks(p.max_len);
  for (int j = warp; j < n; j += n_warps) {
    const float2* st = reinterpret_cast<const float2*>(p.stats) + (int64_t(seq) * p.n_q + h0 + j) * stride;
    float m = -INFINITY, sum = 0.0f;
    for (int i = lane; i < n_chunks; i += 32) MergeStat(m, sum, st[i].x, st[i].y);
    WarpMergeStat(m, sum, 32);
    if (lane == 0) {
      s_max[j] = m;
      s_inv[j] = 1.0f / sum;
    }
  }
}

// grid (chunks of kCombineChunk, sets_per_seq, n_seqs): combined weight of every position (max over the
// set's heads of exp(logit - max) / Σ) to p.combined, and digit 0's histogram of the candidates.
__global__ void __launch_bounds__(kCombineThreads) CombineKernel(SelectionParams p) {
  extern __shared__ float s_stat[];  // [2, heads_per_set]
  __shared__ int hist[kDigit0Bins];
  const int seq = blockIdx.z, set = blockIdx.y;
  const SelSeq s = p.seqs[seq];
  const int t0 = blockIdx.x * kCombineChunk;
  if (t0 >= s.len) return;
  const int t1 = min(s.len, t0 + kCombineChunk), hps = p.heads_per_set, h0 = set * hps;
  float *s_max = s_stat, *s_inv = s_stat + hps;
  HeadStats(p, seq, h0, hps, s.len, s_max, s_inv);
  for (int i = threadIdx.x; i < kDigit0Bins; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  const int keep = s.keep, rest = s.k_sel - keep, n_cand = s.len - keep;
  const bool count = rest > 0 && rest < n_cand;
  float* comb = p.combined + (int64_t(seq) * p.sets_per_seq + set) * p.max_len;
  const float* logits = p.logits + (int64_t(seq) * p.n_q + h0) * p.max_len;
  for (int base = t0; base < t1; base += blockDim.x) {  // uniform trip count: HistAdd syncs the warp
    const int t = base + threadIdx.x;
    uint32_t b = 0;
    if (t < t1) {
      float w = 0.0f;
      for (int j = 0; j < hps; ++j) w = fmaxf(w, expf(logits[int64_t(j) * p.max_len + t] - s_max[j]) * s_inv[j]);
      comb[t] = w;
      b = __float_as_uint(w);
    }
    HistAdd(hist, (b >> kDigit0Shift) & (kDigit0Bins - 1), count && t < t1 && t >= keep);
  }
  __syncthreads();
  if (count) {
    int* g = Digit0Hist(p, seq, set);
    for (int i = threadIdx.x; i < kDigit0Bins; i += blockDim.x) {
      if (hist[i] != 0) atomicAdd(&g[i], hist[i]);
    }
  }
}

// ---- Top-B, one CTA per set ------------------------------------------------------------------------------
// In shared memory, element t of the combined weights lives at t ^ ((t >> 5) & 31): contiguous per-thread
// segments (compaction) and block-strided sweeps (radix passes) both hit 32 distinct banks. The swizzle
// stays inside an aligned group of 32, so the array is padded to a multiple of 32.
__device__ __forceinline__ int Slot(int t, bool swizzle) { return swizzle ? t ^ ((t >> 5) & 31) : t; }

// Warp 0 finds the bin holding the want-th largest candidate, counting from the top bin down: *bin and
// *above (candidates in higher bins). NB bins, NB / 32 per lane.
template <int NB>
__device__ void FindBin(const int* hist, int want, int* bin, int* above) {
  constexpr int kPer = NB / 32;
  const int lane = threadIdx.x & 31;
  int local = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) local += hist[NB - 1 - kPer * lane - i];
  int incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  const unsigned hit = __ballot_sync(0xffffffffu, incl >= want);
  if (hit == 0 && lane == 0) {  // unreachable with finite weights; keeps indices in range
    *bin = 0;
    *above = 0;
  }
  if (lane == __ffs(hit) - 1) {
    int a = incl - local, d = NB - 1 - kPer * lane;
    while (a + hist[d] < want) a += hist[d--];
    *bin = d;
    *above = a;
  }
}

// Inclusive scan of a 64-bit value over the block (blockDim.x == kTopKThreads); returns the exclusive prefix.
__device__ unsigned long long BlockExclusiveScan64(unsigned long long v, unsigned long long* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    unsigned long long w = warp_sums[lane];  // kTopKThreads / 32 == 32 warps
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  return x - v + (warp > 0 ? warp_sums[warp - 1] : 0ull);
}

// grid (sets_per_seq, n_seqs), kTopKThreads threads; dynamic shared memory: the combined weights when
// p.max_len fits (smem_len > 0; else they are read from p.combined), then 2 * heads_per_set floats.
__global__ void __launch_bounds__(kTopKThreads) TopKKernel(SelectionParams p, int smem_len) {
  extern __shared__ __align__(16) uint32_t dyn[];
  __shared__ int hist[256];
  __shared__ unsigned long long warp_sums[32];
  __shared__ float s_mass[32];
  __shared__ int s_bin, s_above;
  const int seq = blockIdx.y, set = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const SelSeq s = p.seqs[seq];
  const int hps = p.heads_per_set, h0 = set * hps;
  const bool in_smem = smem_len > 0;
  const uint32_t* comb =
      reinterpret_cast<const uint32_t*>(p.combined) + (int64_t(seq) * p.sets_per_seq + set) * p.max_len;
  const uint32_t* vals = in_smem ? dyn : comb;
  float* s_max = reinterpret_cast<float*>(dyn) + (in_smem ? smem_len : 0);
  float* s_inv = s_max + hps;
  int32_t* out = p.indices + s.out_begin + int64_t(set) * s.k_sel;
  float* mass = p.mass + int64_t(seq) * p.n_q + h0;
  if (s.len == 0) {
    for (int j = tid; j < hps; j += blockDim.x) mass[j] = 0.0f;
    return;
  }
  HeadStats(p, seq, h0, hps, s.len, s_max, s_inv);  // for the mass
  if (in_smem) {
    for (int t = tid; t < s.len; t += blockDim.x) dyn[Slot(t, true)] = comb[t];
  }
  for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  // 1. Radix select: afterwards a candidate is taken when (b & mask) > prefix, or when it is among the
  // first `want` (by position) with (b & mask) == prefix.
  const int keep = s.keep, rest = s.k_sel - keep, n_cand = s.len - keep;
  const bool take_all = rest >= n_cand;
  uint32_t prefix = 0, mask = 0;
  int want = rest;
  if (rest > 0 && !take_all) {
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = pass == 0 ? kDigit0Shift : pass == 1 ? 13 : pass == 2 ? 5 : 0;
      const uint32_t digit_mask = pass == 0 ? kDigit0Bins - 1 : pass < 3 ? 0xffu : 0x1fu;
      const int* h = hist;
      if (pass == 0) {
        h = Digit0Hist(p, seq, set);  // counted by CombineKernel
      } else {
        for (int base = keep; base < s.len; base += blockDim.x) {  // uniform trip count
          const int t = base + tid;
          const uint32_t b = t < s.len ? vals[Slot(t, in_smem)] : 0u;
          HistAdd(hist, (b >> shift) & digit_mask, t < s.len && (b & mask) == prefix);
        }
        __syncthreads();
      }
      if (warp == 0) {
        if (pass == 0) {
          FindBin<kDigit0Bins>(h, want, &s_bin, &s_above);
        } else {
          FindBin<256>(h, want, &s_bin, &s_above);
        }
      }
      __syncthreads();
      const int d = s_bin, bin_count = h[d];
      prefix |= uint32_t(d) << shift;
      mask |= digit_mask << shift;
      want -= s_above;
      __syncthreads();  // everyone read hist before it is cleared
      if (bin_count == want) break;  // the whole bin is taken: no finer digit needed
      for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
    }
  }
  // 2. Ordered compaction over contiguous segments of the candidates (a multiple of 32 long).
  const int seg = max(32, (n_cand + kTopKThreads - 1) / kTopKThreads + 31) / 32 * 32;
  const int a = keep + min(n_cand, tid * seg), e = keep + min(n_cand, (tid + 1) * seg);
  int n_gt = 0, n_eq = 0;
  if (rest > 0) {
    for (int t = a; t < e; ++t) {
      const uint32_t b = vals[Slot(t, in_smem)] & mask;
      n_gt += take_all || b > prefix;
      n_eq += !take_all && b == prefix;
    }
  }
  const unsigned long long before = BlockExclusiveScan64((unsigned long long)n_gt << 32 | unsigned(n_eq), warp_sums);
  if (rest > 0) {
    int eq_seen = int(before & 0xffffffffu);
    int pos = keep + int(before >> 32) + min(eq_seen, want);
    for (int t = a; t < e; ++t) {
      const uint32_t b = vals[Slot(t, in_smem)] & mask;
      if (take_all || b > prefix) {
        out[pos++] = t;
      } else if (b == prefix && eq_seen++ < want) {
        out[pos++] = t;
      }
    }
  }
  for (int t = tid; t < keep; t += blockDim.x) out[t] = t;
  __syncthreads();  // the block's writes to `out` are visible to the block
  // 3. Mass each head captured: Σ of its weights over the set (heads in rounds of 32, warp sums, then
  // one shared atomic per warp and head).
  const float* logits = p.logits + (int64_t(seq) * p.n_q + h0) * p.max_len;
  for (int j0 = 0; j0 < hps; j0 += 32) {
    const int nj = min(32, hps - j0);
    if (tid < 32) s_mass[tid] = 0.0f;
    __syncthreads();
    for (int j = 0; j < nj; ++j) {
      float sum = 0.0f;
      for (int i = tid; i < s.k_sel; i += blockDim.x) {
        sum += expf(logits[int64_t(j0 + j) * p.max_len + out[i]] - s_max[j0 + j]) * s_inv[j0 + j];
      }
      sum = WarpSum(sum);
      if (lane == 0) atomicAdd(&s_mass[j], sum);
    }
    __syncthreads();
    if (tid < nj) mass[j0 + tid] = s_mass[tid];
    __syncthreads();
  }
}

template <typename QT, typename KT>
cudaError_t LaunchGenericScores(const SelectionParams& p, cudaStream_t stream) {
  const int group = p.n_q / p.n_kv;
  const size_t smem = size_t(group) * p.head_dim * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(ScoreGenericKernel<QT, KT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(CeilDiv(p.max_len, kScoreChunk), p.n_kv, p.n_seqs);
  ScoreGenericKernel<QT, KT><<<grid, kGenericWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchScores(const SelectionParams& p, cudaStream_t stream) {
  const int group = p.n_q / p.n_kv;
  if (p.q_bf16 && p.k_bf16 && group <= 8 && (p.head_dim == 64 || p.head_dim == 128)) {
    const dim3 grid(CeilDiv(p.max_len, kScoreChunk), p.n_kv, p.n_seqs);
    if (p.head_dim == 64) {
      ScoreMmaKernel<64><<<grid, kScoreWarps * 32, 0, stream>>>(p);
    } else {
      ScoreMmaKernel<128><<<grid, kScoreWarps * 32, 0, stream>>>(p);
    }
    return cudaGetLastError();
  }
  if (p.q_bf16) return p.k_bf16 ? LaunchGenericScores<bf16, bf16>(p, stream) : LaunchGenericScores<bf16, float>(p, stream);
  return p.k_bf16 ? LaunchGenericScores<float, bf16>(p, stream) : LaunchGenericScores<float, float>(p, stream);
}

}  // namespace

size_t SelectionStatsFloats(int n_seqs, int n_q, int max_len) {
  // Score partials, then digit 0's histogram of every set (at most n_q sets per sequence).
  return size_t(n_seqs) * n_q * 2 * std::max(1, CeilDiv(max_len, kScoreChunk)) + size_t(n_seqs) * n_q * kDigit0Bins;
}

cudaError_t LaunchSelection(const SelectionParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0) return cudaSuccess;
  if (p.n_kv <= 0 || p.n_q % p.n_kv != 0 || p.head_dim <= 0 || p.heads_per_set <= 0 || p.combined == nullptr ||
      p.sets_per_seq * p.heads_per_set != p.n_q) {
    return cudaErrorInvalidValue;
  }
  const size_t stats_bytes = size_t(2) * p.heads_per_set * sizeof(float);
  if (p.max_len > 0) {
    cudaError_t e = LaunchScores(p, stream);  // also zeroes the digit-0 histograms
    if (e != cudaSuccess) return e;
    const dim3 grid(CeilDiv(p.max_len, kCombineChunk), p.sets_per_seq, p.n_seqs);
    CombineKernel<<<grid, kCombineThreads, stats_bytes, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  // The combined weights are copied to shared memory when they fit beside the head statistics.
  // Per device (0 = not yet set): the attribute is the current device's, and tensor-parallel ranks launch the
  // kernel on several GPUs from their own threads.
  constexpr int kMaxDevices = 64;
  static std::atomic<int> smem_optin_of[kMaxDevices] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  int smem_optin = dev < kMaxDevices ? smem_optin_of[dev].load(std::memory_order_relaxed) : 0;
  if (smem_optin <= 0) {
    int v = 0;
    e = cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) return e;
    e = cudaFuncSetAttribute(TopKKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, v - 4 * 1024);
    if (e != cudaSuccess) return e;
    smem_optin = v - 4 * 1024;  // room for the static arrays
    if (dev < kMaxDevices) smem_optin_of[dev].store(smem_optin, std::memory_order_relaxed);
  }
  const int padded = (p.max_len + 31) / 32 * 32;
  const bool fits = padded > 0 && size_t(padded) * 4 + stats_bytes <= size_t(smem_optin);
  if (stats_bytes > size_t(smem_optin)) return cudaErrorInvalidValue;
  const size_t smem = (fits ? size_t(padded) * 4 : 0) + stats_bytes;
  TopKKernel<<<dim3(p.sets_per_seq, p.n_seqs), kTopKThreads, smem, stream>>>(p, fits ? padded : 0);
  return cudaGetLastError();
}

}  // namespace specontext::cuda
