// The split-K combine of the sparse decode attention (sparse_attention.cu): merges each (sequence, query head)'s
// split partials into the bf16 output.
#include <cmath>

#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"
#include "core/cuda/kernels/sparse_kernels.h"

namespace specontext::cuda {
namespace {

// Merges the splits of one (sequence, query head) per CTA, softmax-weighted by each split's log-sum-exp.
// At one sequence the splits are many and short (33 of 64 keys at 2K on the 1B model), so the merge is a
// latency problem: thread (group sg, vector v) owns the float4 v of the row and splits sg, sg + G, ... and
// merges them online (its own max, sum and accumulator), so that every partial load of the CTA is
// independent and in flight at once; the G groups are merged through shared memory at the end. (The
// previous form, one thread per dimension walking all splits twice: 6.6 us at 2K on the H100 under ncu,
// this one 4.2 us; the step 0.08 ms faster.)
constexpr int kCombineThreads = 128;
__global__ void __launch_bounds__(kCombineThreads) SparseCombineKernel(SparseAttnParams p) {
  PdlTrigger();
  __shared__ __align__(16) float4 sAcc[kCombineThreads];
  __shared__ float sMax[kCombineThreads], sSum[kCombineThreads];
  const int seq = blockIdx.x / p.n_heads, h = blockIdx.x % p.n_heads;
  const int group = p.n_heads / p.n_kv, g = h / group, hh = h % group;
  const int n_vec = p.head_dim / 4;  // head_dim is a multiple of 8
  const int n_groups = kCombineThreads / n_vec;
  const int v = threadIdx.x % n_vec, sg = threadIdx.x / n_vec;
  // The sets' layout before the wait: only PrepareSparseDecode's upload writes it (sparse_attention.cu, PDL).
  const int total = KeysOf(p, seq, g).total;
  const int n_splits = (total + p.chunk - 1) / p.chunk;
  PdlWait();  // the partials are the attention kernel's
  const int64_t base = (int64_t(seq) * p.n_kv + g) * p.max_splits;
  float m = -INFINITY, l = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (sg < n_groups) {
#pragma unroll 4
    for (int s = sg; s < n_splits; s += n_groups) {
      const int64_t row = (base + s) * group + hh;
      const float lse = p.partial_lse[row];  // finite: every split has at least one key
      const float4 o = reinterpret_cast<const float4*>(p.partial_o + row * p.head_dim)[v];
      const float m_new = fmaxf(m, lse);
      const float corr = expf(m - m_new);  // 0 on the first split (m = -inf)
      const float w = expf(lse - m_new);
      l = l * corr + w;
      acc.x = acc.x * corr + w * o.x;
      acc.y = acc.y * corr + w * o.y;
      acc.z = acc.z * corr + w * o.z;
      acc.w = acc.w * corr + w * o.w;
      m = m_new;
    }
  }
  sAcc[threadIdx.x] = acc;
  sMax[threadIdx.x] = m;
  sSum[threadIdx.x] = l;
  __syncthreads();
  if (sg != 0) return;
  float M = -INFINITY;
  for (int j = 0; j < n_groups; ++j) M = fmaxf(M, sMax[j * n_vec + v]);
  float L = 0.0f;
  float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int j = 0; j < n_groups; ++j) {
    const int t = j * n_vec + v;
    const float f = sMax[t] == -INFINITY ? 0.0f : expf(sMax[t] - M);  // a group without splits adds nothing
    L += f * sSum[t];
    a.x += f * sAcc[t].x;
    a.y += f * sAcc[t].y;
    a.z += f * sAcc[t].z;
    a.w += f * sAcc[t].w;
  }
  const float inv = 1.0f / L;
  __nv_bfloat162* out =
      reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(p.out) + (int64_t(seq) * p.n_heads + h) * p.head_dim) + 2 * v;
  out[0] = __floats2bfloat162_rn(a.x * inv, a.y * inv);
  out[1] = __floats2bfloat162_rn(a.z * inv, a.w * inv);
}

}  // namespace

cudaError_t LaunchSparseCombine(const SparseAttnParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0 || p.max_splits <= 1) return cudaSuccess;
  if (p.head_dim % 8 != 0 || p.head_dim > kSparseMaxHeadDim || p.chunk <= 0) return cudaErrorInvalidValue;
  return LaunchPdl(SparseCombineKernel, dim3(p.n_seqs * p.n_heads), dim3(kCombineThreads), 0, stream, p);
}

}  // namespace specontext::cuda
