// Rotary position embedding, in place on bf16 [n, heads, head_dim].
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"

namespace specontext::cuda {
namespace {

// One block per token; threads walk (head, pair). The angle is pos * inv_freq in f32 and cos/sin
// are the accurate functions (not __sinf): positions reach 10^5 radians and fast paths drift there.
__global__ void RopeKernel(RopeParams p) {
  const int64_t i = blockIdx.x;
  const int half = p.head_dim / 2;
  const float pos = static_cast<float>(p.positions[i]);
  bf16* x = static_cast<bf16*>(p.x) + i * p.heads * p.head_dim;
  for (int idx = threadIdx.x; idx < p.heads * half; idx += blockDim.x) {
    const int h = idx / half, j = idx % half;
    float s, c;
    sincosf(pos * p.inv_freq[j], &s, &c);
    c *= p.attention_scaling;
    s *= p.attention_scaling;
    bf16* v = x + h * p.head_dim;
    const int ia = p.interleaved ? 2 * j : j;
    const int ib = p.interleaved ? 2 * j + 1 : j + half;
    const float x0 = __bfloat162float(v[ia]), x1 = __bfloat162float(v[ib]);
    v[ia] = __float2bfloat16(x0 * c - x1 * s);
    v[ib] = __float2bfloat16(x1 * c + x0 * s);
  }
}

}  // namespace

cudaError_t LaunchRope(const RopeParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.heads == 0) return cudaSuccess;
  const int pairs = p.heads * (p.head_dim / 2);
  const int threads = pairs >= 256 ? 256 : ((pairs + 31) / 32) * 32;
  RopeKernel<<<p.n, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace specontext::cuda
