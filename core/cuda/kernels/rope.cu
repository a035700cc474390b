// Rotary position embedding, in place on bf16 [n, heads, head_dim].
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"

namespace specontext::cuda {
namespace {

// Blocks (token, part of its pairs). The angle is pos * inv_freq in f32 and cos/sin are the accurate functions (not
// __sinf): positions reach 10^5 radians and fast paths drift there; that makes them costly (the slow
// argument reduction), so each block computes the head_dim / 2 (cos, sin) pairs of its position once, into
// shared memory, and every head reuses them (a decode step rotates q and k of one token: 40 heads on the
// 1B model, 40x fewer sincosf than one per element).
__global__ void RopeKernel(RopeParams p) {
  PdlTrigger();
  PdlWait();  // launched with PDL (elementwise.h)
  extern __shared__ float2 cos_sin[];  // [head_dim / 2]: scaled (cos, sin)
  const int64_t i = blockIdx.x;
  const int half = p.head_dim / 2;
  const float pos = static_cast<float>(p.positions[i]);
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    float s, c;
    sincosf(pos * p.inv_freq[j], &s, &c);
    cos_sin[j] = make_float2(c * p.attention_scaling, s * p.attention_scaling);
  }
  __syncthreads();
  bf16* x = static_cast<bf16*>(p.x) + i * p.heads * p.head_dim;
  for (int idx = blockIdx.y * blockDim.x + threadIdx.x; idx < p.heads * half; idx += blockDim.x * gridDim.y) {
    const int h = idx / half, j = idx % half;
    const float c = cos_sin[j].x, s = cos_sin[j].y;
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
  // A token's pairs spread over several blocks (one pair per thread): at decode one token's rotation is a
  // chain of dependent loads and stores, so fewer iterations per thread is what shortens it.
  const int blocks_per_token = (pairs + threads - 1) / threads;
  const dim3 grid(static_cast<unsigned>(p.n), static_cast<unsigned>(blocks_per_token < 65535 ? blocks_per_token : 65535));
  return LaunchPdl(RopeKernel, grid, dim3(threads), sizeof(float2) * (p.head_dim / 2), stream, p);
}

}  // namespace specontext::cuda
