// KV append, the split-K combine, and the simple (any head_dim) attention kernel.
#include "core/cuda/kernels/attention.h"
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"

namespace specontext::cuda {
namespace {

// One block per token row; threads walk the row's n_kv * head_dim elements in VecT units.
template <typename VecT>
__global__ void KvAppendKernel(KvAppendParams p) {
  PdlTrigger();
  // Launched with PDL (elementwise.h): the batch metadata, which only PrepareBatch's upload writes, before
  // the wait; k/v (the projection's output) after it.
  const int row = blockIdx.x;
  const int s_idx = p.row_seq[row];
  const AttnSeq s = p.seqs[s_idx];
  const int pos = s.past_len + (row - s.token_begin);
  constexpr int kPer = sizeof(VecT) / sizeof(bf16);
  const int vec_per_head = p.head_dim / kPer;
  const size_t vec_per_row = RowStride(s, p.head_dim) / kPer;  // an interleaved K/V pair: 2 * vec_per_head
  const VecT* k = reinterpret_cast<const VecT*>(static_cast<const bf16*>(p.k) + size_t(row) * p.n_kv * p.head_dim);
  const VecT* v = reinterpret_cast<const VecT*>(static_cast<const bf16*>(p.v) + size_t(row) * p.n_kv * p.head_dim);
  VecT* kc = static_cast<VecT*>(p.k_ptrs[s_idx]);
  VecT* vc = static_cast<VecT*>(p.v_ptrs[s_idx]);
  PdlWait();
  for (int idx = threadIdx.x; idx < p.n_kv * vec_per_head; idx += blockDim.x) {
    const int h = idx / vec_per_head, j = idx % vec_per_head;
    const size_t dst = (size_t(h) * s.capacity + pos) * vec_per_row + j;
    kc[dst] = k[idx];
    vc[dst] = v[idx];
  }
}

__global__ void CombineKernel(AttnParams p) {
  PdlTrigger();
  PdlWait();
  const AttnCombineItem c = p.combine[blockIdx.x];
  const int kvh = blockIdx.y;
  const AttnSeq s = p.seqs[c.seq];
  const int group = p.n_heads / p.n_kv;
  for (int idx = threadIdx.x; idx < group * p.head_dim; idx += blockDim.x) {
    const int row = idx / p.head_dim, d = idx % p.head_dim;
    float mx = -INFINITY;
    for (int i = 0; i < c.n_splits; ++i) {
      mx = fmaxf(mx, p.partial_lse[(size_t(c.slot_begin + i) * p.n_kv + kvh) * kDecodeBlockM + row]);
    }
    float wsum = 0.0f, acc = 0.0f;
    for (int i = 0; i < c.n_splits; ++i) {
      const size_t base = (size_t(c.slot_begin + i) * p.n_kv + kvh) * kDecodeBlockM + row;
      const float lse = p.partial_lse[base];
      if (lse == -INFINITY) continue;
      const float w = exp2f(lse - mx);
      wsum += w;
      acc += w * p.partial_o[base * p.head_dim + d];
    }
    bf16* out = static_cast<bf16*>(p.out) + (size_t(s.token_begin) * p.n_heads + kvh * group + row) * p.head_dim + d;
    *out = __float2bfloat16(wsum > 0.0f ? acc / wsum : 0.0f);
  }
}

// Decode-only merge: one CTA per (sequence, KV head, query head of the group), one thread per
// output element. The split weights are computed once into shared memory; the loads of the
// splits' partials are independent, so they overlap instead of forming a dependent chain.
__global__ void DecodeCombineKernel(AttnParams p) {
  PdlTrigger();
  const int s_idx = blockIdx.x, kvh = blockIdx.y, row = blockIdx.z;
  const AttnSeq s = p.seqs[s_idx];  // batch metadata (PrepareBatch's upload): before the wait
  if (s.n_tokens != 1) return;     // not a decoding sequence (mixed batch, batch-invariant mode)
  int splits, per;
  DecodeSplitPlan(s.past_len + 1, p.max_splits, &splits, &per);
  if (splits <= 1) return;  // the decode kernel wrote the output itself
  PdlWait();  // the partials
  __shared__ float s_w[kMaxDecodeSplits];
  __shared__ float s_inv;
  const size_t slot_stride = size_t(p.n_kv) * kDecodeBlockM;
  const size_t base = (size_t(s_idx) * p.max_splits * p.n_kv + kvh) * kDecodeBlockM + row;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float mx = -INFINITY;
    for (int i = lane; i < splits; i += 32) mx = fmaxf(mx, p.partial_lse[base + i * slot_stride]);
    mx = WarpMax(mx);
    float sum = 0.0f;
    for (int i = lane; i < splits; i += 32) {
      const float lse = p.partial_lse[base + i * slot_stride];
      const float w = lse == -INFINITY ? 0.0f : exp2f(lse - mx);
      s_w[i] = w;
      sum += w;
    }
    sum = WarpSum(sum);
    if (lane == 0) s_inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  __syncthreads();
  const int group = p.n_heads / p.n_kv;
  bf16* out = static_cast<bf16*>(p.out) + (size_t(s.token_begin) * p.n_heads + kvh * group + row) * p.head_dim;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float acc = 0.0f;
#pragma unroll 4
    for (int i = 0; i < splits; ++i) acc += s_w[i] * p.partial_o[(base + i * slot_stride) * p.head_dim + d];
    out[d] = __float2bfloat16(acc * s_inv);
  }
}

constexpr int kSimpleMaxPerLane = 8;  // head_dim <= 256

// One warp per (token row, query head); f32 online softmax over the row's causal keys.
__global__ void SimpleAttentionKernel(AttnParams p) {
  PdlTrigger();
  PdlWait();
  const int warp_global = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (warp_global >= p.n_tokens * p.n_heads) return;
  const int row = warp_global / p.n_heads, head = warp_global % p.n_heads;
  const int s_idx = p.row_seq[row];
  const AttnSeq s = p.seqs[s_idx];
  const int group = p.n_heads / p.n_kv, kvh = head / group;
  const int len = s.past_len + (row - s.token_begin) + 1;
  const int hd = p.head_dim;
  const bf16* q = static_cast<const bf16*>(p.q) + (size_t(row) * p.n_heads + head) * hd;
  const size_t rs = RowStride(s, hd);
  const bf16* kb = static_cast<const bf16*>(p.k_ptrs[s_idx]) + size_t(kvh) * s.capacity * rs;
  const bf16* vb = static_cast<const bf16*>(p.v_ptrs[s_idx]) + size_t(kvh) * s.capacity * rs;
  float qv[kSimpleMaxPerLane], acc[kSimpleMaxPerLane];
#pragma unroll
  for (int j = 0; j < kSimpleMaxPerLane; ++j) {
    const int d = lane + 32 * j;
    qv[j] = d < hd ? __bfloat162float(q[d]) * p.scale : 0.0f;
    acc[j] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int key = 0; key < len; ++key) {
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < kSimpleMaxPerLane; ++j) {
      const int d = lane + 32 * j;
      if (d < hd) dot += qv[j] * __bfloat162float(kb[size_t(key) * rs + d]);
    }
    dot = WarpSum(dot);
    const float m_new = fmaxf(m, dot);
    const float corr = __expf(m - m_new);
    const float pr = __expf(dot - m_new);
    l = l * corr + pr;
#pragma unroll
    for (int j = 0; j < kSimpleMaxPerLane; ++j) {
      const int d = lane + 32 * j;
      const float v = d < hd ? __bfloat162float(vb[size_t(key) * rs + d]) : 0.0f;
      acc[j] = acc[j] * corr + pr * v;
    }
    m = m_new;
  }
  bf16* out = static_cast<bf16*>(p.out) + (size_t(row) * p.n_heads + head) * hd;
#pragma unroll
  for (int j = 0; j < kSimpleMaxPerLane; ++j) {
    const int d = lane + 32 * j;
    if (d < hd) out[d] = __float2bfloat16(acc[j] / l);
  }
}

}  // namespace

cudaError_t LaunchKvAppend(const KvAppendParams& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  const int threads = 128;
  if (p.head_dim % 8 == 0 && Aligned16(p.k) && Aligned16(p.v)) {
    return LaunchPdl(KvAppendKernel<uint4>, dim3(p.n_tokens), dim3(threads), 0, stream, p);
  }
  if (p.head_dim % 2 == 0) return LaunchPdl(KvAppendKernel<uint32_t>, dim3(p.n_tokens), dim3(threads), 0, stream, p);
  return LaunchPdl(KvAppendKernel<uint16_t>, dim3(p.n_tokens), dim3(threads), 0, stream, p);
}

cudaError_t LaunchAttentionCombine(const AttnParams& p, cudaStream_t stream) {
  if (p.n_combine == 0) return cudaSuccess;
  return LaunchPdl(CombineKernel, dim3(p.n_combine, p.n_kv), dim3(128), 0, stream, p);
}

cudaError_t LaunchAttentionDecodeCombine(const AttnParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0 || p.max_splits <= 1) return cudaSuccess;
  const int group = p.n_heads / p.n_kv;
  return LaunchPdl(DecodeCombineKernel, dim3(p.n_seqs, p.n_kv, group), dim3(p.head_dim <= 64 ? 64 : 128), 0, stream,
                   p);
}

cudaError_t LaunchAttentionSimple(const AttnParams& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  if (p.head_dim > 32 * kSimpleMaxPerLane) return cudaErrorInvalidValue;
  const int warps = 4;
  const int64_t total = int64_t{p.n_tokens} * p.n_heads;
  return LaunchPdl(SimpleAttentionKernel, dim3(static_cast<unsigned>((total + warps - 1) / warps)), dim3(warps * 32), 0,
                   stream, p);
}

}  // namespace specontext::cuda
