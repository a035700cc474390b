// Fused score + top-B selection (see selection_kernels.h). Softmax weights are non-negative floats, so
// their bit patterns order like the values: the top-B threshold is found by a 4-pass radix select over
// the bits (8 bits a pass, histogram in shared memory), then one ordered pass over the positions keeps
// every weight above the threshold and the lowest positions among those equal to it (the CPU
// reference's tie rule), writing them ascending.
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/selection_kernels.h"

namespace specontext::cuda {
namespace {

constexpr int kScoreWarps = 8;
constexpr int kKeysPerWarp = 8;
constexpr int kTopKThreads = 512;

template <typename T>
__device__ __forceinline__ float Load(const void* p, int64_t i) {
  return ToF32<T>(static_cast<const T*>(p)[i]);
}

// grid (ceil(max_len / (kScoreWarps * kKeysPerWarp)), n_kv, n_seqs): one warp per key, lanes over
// head_dim, every query head of the KV head's group (shared memory holds them as f32).
template <typename QT, typename KT>
__global__ void __launch_bounds__(kScoreWarps * 32) ScoreKernel(SelectionParams p) {
  extern __shared__ float sq[];  // [group, head_dim]
  const SelSeq s = p.seqs[blockIdx.z];
  const int g = blockIdx.y, group = p.n_q / p.n_kv, hd = p.head_dim;
  const int t_begin = blockIdx.x * kScoreWarps * kKeysPerWarp;
  if (t_begin >= s.len) return;
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) sq[i] = Load<QT>(s.q, int64_t(g) * group * hd + i);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int j = 0; j < kKeysPerWarp; ++j) {
    const int t = t_begin + warp * kKeysPerWarp + j;
    if (t >= s.len) break;
    const int64_t row = (int64_t(g) * s.capacity + t) * hd;
    for (int h = 0; h < group; ++h) {
      float dot = 0.0f;
      for (int e = lane; e < hd; e += 32) dot = fmaf(sq[h * hd + e], Load<KT>(s.k, row + e), dot);
      dot = WarpSum(dot) * p.scale;
      if (lane == 0) {
        if (!isfinite(dot)) atomicExch(p.error_flag, 1);
        p.logits[(int64_t(blockIdx.z) * p.n_q + g * group + h) * p.max_len + t] = dot;
      }
    }
  }
}

// grid (n_q, n_seqs): max and 1/Σexp of one head's logits.
__global__ void StatsKernel(SelectionParams p) {
  __shared__ float scratch[32];
  const SelSeq s = p.seqs[blockIdx.y];
  const float* l = p.logits + (int64_t(blockIdx.y) * p.n_q + blockIdx.x) * p.max_len;
  float mx = -INFINITY;
  for (int t = threadIdx.x; t < s.len; t += blockDim.x) mx = fmaxf(mx, l[t]);
  mx = BlockMax(mx, scratch);
  float sum = 0.0f;
  for (int t = threadIdx.x; t < s.len; t += blockDim.x) sum += expf(l[t] - mx);
  sum = BlockSum(sum, scratch);
  if (threadIdx.x == 0) {
    float* st = p.stats + (int64_t(blockIdx.y) * p.n_q + blockIdx.x) * 2;
    st[0] = mx;
    st[1] = 1.0f / sum;
  }
}

__device__ __forceinline__ float Weight(const SelectionParams& p, int seq, int h, int t) {
  const float* st = p.stats + (int64_t(seq) * p.n_q + h) * 2;
  return expf(p.logits[(int64_t(seq) * p.n_q + h) * p.max_len + t] - st[0]) * st[1];
}

// grid (ceil(max_len / 256), sets_per_seq, n_seqs): element-wise max of the set's heads' weights.
__global__ void CombineKernel(SelectionParams p) {
  const int seq = blockIdx.z, set = blockIdx.y;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= p.seqs[seq].len) return;
  float m = 0.0f;
  for (int j = 0; j < p.heads_per_set; ++j) m = fmaxf(m, Weight(p, seq, set * p.heads_per_set + j, t));
  p.combined[(int64_t(seq) * p.sets_per_seq + set) * p.max_len + t] = m;
}

// Exclusive prefix sum over the block (blockDim.x == kTopKThreads); *total gets the block's sum.
__device__ int BlockExclusiveScan(int v, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();  // warp_sums may still be read by a previous scan
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kTopKThreads / 32 ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < kTopKThreads / 32) warp_sums[lane] = w;  // inclusive
  }
  __syncthreads();
  *total = warp_sums[kTopKThreads / 32 - 1];
  return x - v + (warp > 0 ? warp_sums[warp - 1] : 0);
}

// grid (sets_per_seq, n_seqs), kTopKThreads threads.
__global__ void __launch_bounds__(kTopKThreads) TopKKernel(SelectionParams p) {
  __shared__ int hist[256];
  __shared__ int warp_sums[32];
  __shared__ unsigned s_prefix;
  __shared__ int s_want;
  const int seq = blockIdx.y, set = blockIdx.x;
  const SelSeq s = p.seqs[seq];
  const uint32_t* bits =
      reinterpret_cast<const uint32_t*>(p.combined + (int64_t(seq) * p.sets_per_seq + set) * p.max_len);
  int32_t* out = p.indices + s.out_begin + int64_t(set) * s.k_sel;
  for (int t = threadIdx.x; t < s.keep; t += blockDim.x) out[t] = t;
  const int rest = s.k_sel - s.keep, n_cand = s.len - s.keep;
  if (rest <= 0) return;
  unsigned prefix = 0, mask = 0;
  int want = rest;
  if (rest < n_cand) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      for (int t = s.keep + threadIdx.x; t < s.len; t += blockDim.x) {
        const unsigned b = bits[t];
        if ((b & mask) == prefix) atomicAdd(&hist[(b >> shift) & 0xff], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int above = 0, d = 255;
        for (; d > 0; --d) {
          if (above + hist[d] >= want) break;
          above += hist[d];
        }
        s_prefix = prefix | (unsigned(d) << shift);
        s_want = want - above;
      }
      __syncthreads();
      prefix = s_prefix;
      want = s_want;
      mask |= 0xffu << shift;
    }
  } else {
    prefix = 0;  // every candidate: all weights >= 0 are "above or equal"; take all equal ones
    want = n_cand;
  }
  // Ordered pass: keep b > T, and the first `want` positions with b == T (T = prefix).
  const bool take_all = rest >= n_cand;
  int eq_seen = 0, written = 0;
  for (int base = s.keep; base < s.len; base += blockDim.x) {
    const int t = base + threadIdx.x;
    const unsigned b = t < s.len ? bits[t] : 0u;
    const bool valid = t < s.len;
    const bool gt = valid && (take_all || b > prefix);
    const bool eq = valid && !take_all && b == prefix;
    int eq_total = 0;
    const int eq_rank = eq_seen + BlockExclusiveScan(eq ? 1 : 0, warp_sums, &eq_total);
    const bool sel = gt || (eq && eq_rank < want);
    int sel_total = 0;
    const int pos = written + BlockExclusiveScan(sel ? 1 : 0, warp_sums, &sel_total);
    if (sel) out[s.keep + pos] = t;
    eq_seen += eq_total;
    written += sel_total;
  }
}

// grid (n_q, n_seqs): Σ of the head's weights over the positions of its set.
__global__ void MassKernel(SelectionParams p) {
  __shared__ float scratch[32];
  const int seq = blockIdx.y, h = blockIdx.x;
  const SelSeq s = p.seqs[seq];
  const int set = h / p.heads_per_set;
  const int32_t* idx = p.indices + s.out_begin + int64_t(set) * s.k_sel;
  float sum = 0.0f;
  for (int j = threadIdx.x; j < s.k_sel; j += blockDim.x) sum += Weight(p, seq, h, idx[j]);
  sum = BlockSum(sum, scratch);
  if (threadIdx.x == 0) p.mass[int64_t(seq) * p.n_q + h] = sum;
}

template <typename QT, typename KT>
cudaError_t LaunchScores(const SelectionParams& p, cudaStream_t stream) {
  const int group = p.n_q / p.n_kv;
  const size_t smem = size_t(group) * p.head_dim * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(ScoreKernel<QT, KT>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(CeilDiv(p.max_len, kScoreWarps * kKeysPerWarp), p.n_kv, p.n_seqs);
  ScoreKernel<QT, KT><<<grid, kScoreWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchSelection(const SelectionParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0) return cudaSuccess;
  if (p.n_kv <= 0 || p.n_q % p.n_kv != 0 || p.head_dim <= 0) return cudaErrorInvalidValue;
  if (p.max_len > 0) {
    cudaError_t e;
    if (p.q_bf16) {
      e = p.k_bf16 ? LaunchScores<bf16, bf16>(p, stream) : LaunchScores<bf16, float>(p, stream);
    } else {
      e = p.k_bf16 ? LaunchScores<float, bf16>(p, stream) : LaunchScores<float, float>(p, stream);
    }
    if (e != cudaSuccess) return e;
    StatsKernel<<<dim3(p.n_q, p.n_seqs), 256, 0, stream>>>(p);
    CombineKernel<<<dim3(CeilDiv(p.max_len, 256), p.sets_per_seq, p.n_seqs), 256, 0, stream>>>(p);
  }
  TopKKernel<<<dim3(p.sets_per_seq, p.n_seqs), kTopKThreads, 0, stream>>>(p);
  MassKernel<<<dim3(p.n_q, p.n_seqs), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace specontext::cuda
