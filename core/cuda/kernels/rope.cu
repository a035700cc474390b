// Rotary position embedding, in place on bf16 [n, heads, head_dim]; and RoPE fused with the KV append.
#include "core/cuda/kernels/attention.h"
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"

namespace specontext::cuda {
namespace {

// The (cos, sin) of position `pos` at frequency j, scaled. The accurate sincosf (not __sinf): positions
// reach 10^5 radians and fast paths drift there.
__device__ __forceinline__ float2 CosSin(float pos, const float* inv_freq, int j, float scaling) {
  float s, c;
  sincosf(pos * inv_freq[j], &s, &c);
  return make_float2(c * scaling, s * scaling);
}

// Rotates pair j of the head at v; returns the rotated values (a, b) at offsets (ia, ib). Both kernels use
// this, with explicit FMAs, so that the fused path gives the bits of the plain one.
__device__ __forceinline__ void RotatePair(bf16* v, int j, int half, bool interleaved, float2 cs, int* ia, int* ib,
                                           bf16* a, bf16* b) {
  *ia = interleaved ? 2 * j : j;
  *ib = interleaved ? 2 * j + 1 : j + half;
  const float x0 = __bfloat162float(v[*ia]), x1 = __bfloat162float(v[*ib]);
  *a = __float2bfloat16(fmaf(x0, cs.x, -(x1 * cs.y)));
  *b = __float2bfloat16(fmaf(x1, cs.x, x0 * cs.y));
  v[*ia] = *a;
  v[*ib] = *b;
}

// Blocks (token, part of its pairs). sincosf is costly for large arguments (the slow argument reduction), so
// each block computes the head_dim / 2 (cos, sin) pairs of its position once, into shared memory, and every
// head reuses them.
__global__ void RopeKernel(RopeParams p) {
  PdlTrigger();
  PdlWait();  // launched with PDL (elementwise.h)
  extern __shared__ float2 cos_sin[];  // [head_dim / 2]: scaled (cos, sin)
  const int64_t i = blockIdx.x;
  const int half = p.head_dim / 2;
  const float pos = static_cast<float>(p.positions[i]);
  for (int j = threadIdx.x; j < half; j += blockDim.x) cos_sin[j] = CosSin(pos, p.inv_freq, j, p.attention_scaling);
  __syncthreads();
  bf16* x = static_cast<bf16*>(p.x) + i * p.heads * p.head_dim;
  for (int idx = blockIdx.y * blockDim.x + threadIdx.x; idx < p.heads * half; idx += blockDim.x * gridDim.y) {
    const int h = idx / half, j = idx % half;
    int ia, ib;
    bf16 a, b;
    RotatePair(x + h * p.head_dim, j, half, p.interleaved, cos_sin[j], &ia, &ib, &a, &b);
  }
}

// Blocks (token, part of its work items): the q pairs (n_heads x half), the k pairs (n_kv x half: rotated in
// place and written to the cache row) and the 16-byte pieces of the v row (n_kv x head_dim / 8), one item per
// thread. At decode the whole op is one short chain per thread (position, sincosf, load, store), so each
// thread computes the (cos, sin) of its own pair rather than sharing a table through a barrier. Launched with
// PDL: before PdlWait() the append items read the batch metadata (row -> sequence, its cache row and cache
// pointers), which only PrepareBatch's stream-ordered upload writes, so that chain of dependent loads
// overlaps the kernel before; positions, q, k, v are read after it.
__global__ void RopeKvAppendKernel(RopeKvAppendParams p) {
  PdlTrigger();
  const int row = blockIdx.x;
  const int hd = p.kv.head_dim, half = hd / 2;
  const int n_q = p.n_heads * half, n_k = p.kv.n_kv * half, n_v = p.kv.n_kv * (hd / 8);
  const int idx = blockIdx.y * blockDim.x + threadIdx.x;
  if (idx >= n_q + n_k + n_v) return;
  const bool is_q = idx < n_q, is_k = !is_q && idx < n_q + n_k;
  const int it = is_q ? idx : is_k ? idx - n_q : idx - n_q - n_k;
  bf16* cache = nullptr;  // the sequence's K or V row of this token, head 0
  int64_t head_stride = 0;
  if (!is_q) {
    const int s_idx = p.kv.row_seq[row];
    const AttnSeq s = p.kv.seqs[s_idx];
    const int64_t stride = RowStride(s, hd);
    cache = static_cast<bf16*>(is_k ? p.kv.k_ptrs[s_idx] : p.kv.v_ptrs[s_idx]) +
            int64_t(s.past_len + (row - s.token_begin)) * stride;
    head_stride = int64_t(s.capacity) * stride;
  }
  PdlWait();
  if (is_q || is_k) {
    const int h = it / half, j = it % half;
    const float2 cs = CosSin(static_cast<float>(p.positions[row]), p.inv_freq, j, p.attention_scaling);
    bf16* x = is_k ? static_cast<bf16*>(p.k) + (int64_t(row) * p.kv.n_kv + h) * hd
                   : static_cast<bf16*>(p.q) + (int64_t(row) * p.n_heads + h) * hd;
    int ia, ib;
    bf16 a, b;
    RotatePair(x, j, half, p.interleaved, cs, &ia, &ib, &a, &b);
    if (is_k) {
      bf16* kc = cache + h * head_stride;
      kc[ia] = a;
      kc[ib] = b;
    }
    return;
  }
  const int h = it / (hd / 8), c = it % (hd / 8);
  const uint4* src = reinterpret_cast<const uint4*>(static_cast<const bf16*>(p.kv.v) + (int64_t(row) * p.kv.n_kv + h) * hd);
  reinterpret_cast<uint4*>(cache + h * head_stride)[c] = src[c];
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

cudaError_t LaunchRopeKvAppend(const RopeKvAppendParams& p, cudaStream_t stream) {
  if (p.kv.n_tokens == 0) return cudaSuccess;
  const int hd = p.kv.head_dim;
  if (hd % 8 != 0 || p.kv.k != p.k || !Aligned16(p.k) || !Aligned16(p.kv.v)) return cudaErrorInvalidValue;
  const int64_t items = int64_t(p.n_heads + p.kv.n_kv) * (hd / 2) + int64_t(p.kv.n_kv) * (hd / 8);
  constexpr int kThreads = 128;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > 65535 || p.kv.n_tokens > 0x7fffffff) return cudaErrorInvalidValue;
  return LaunchPdl(RopeKvAppendKernel, dim3(static_cast<unsigned>(p.kv.n_tokens), static_cast<unsigned>(blocks)),
                   dim3(kThreads), 0, stream, p);
}

}  // namespace specontext::cuda
