// Argmax and top-k / top-p sampling, one 1024-thread block per row.
//
// Thresholds are found by radix selection over order-preserving 32-bit keys of the logits: four
// 8-bit passes, each a shared-memory histogram (counts for top-k, probability mass for top-p) and
// a scan of its 256 bins, so the cost is a few reads of the row (from L2), no sort.
#include <climits>

#include <cooperative_groups.h>

#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"
#include "core/cuda/kernels/sampling_kernels.h"

namespace specontext::cuda {
namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ uint32_t OrderedKey(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in (0, 1), a pure function of (seed, step).
__device__ __forceinline__ float Uniform(uint64_t seed, uint64_t step) {
  const uint64_t r = SplitMix64(seed ^ SplitMix64(step + 0x632BE59BD9B4E019ull));
  return (static_cast<float>(r >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// Larger value wins; the lower index wins a tie. NaN never wins.
__device__ __forceinline__ void Better(float v, int i, float& bv, int& bi) {
  if (v > bv || (v == bv && i < bi)) {
    bv = v;
    bi = i;
  }
}

// The block's best (value, index) of x[begin, end) (indices absolute), in every thread's bv / bi (INT_MAX when
// every value is NaN or -inf). x + begin must be 16-byte aligned for the vector path (else scalar).
__device__ void BlockArgmaxRange(const float* x, int begin, int end, float& bv, int& bi) {
  __shared__ float s_v[32];
  __shared__ int s_i[32];
  bv = -INFINITY;
  bi = INT_MAX;
  x += begin;
  const int vocab = end - begin;
  // Better() is order-independent (larger value, then lower index; NaN never wins), so a thread may visit
  // its elements in any order: 16-byte loads, four in flight (one block reads a 128K-entry row: a scalar
  // loop is a chain of ~125 round trips to L2).
  int tail = 0;
  if ((reinterpret_cast<uintptr_t>(x) & 15u) == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const int n4 = vocab / 4, stride = blockDim.x;
    int i = threadIdx.x;
    for (; i + 3 * stride < n4; i += 4 * stride) {
      float4 a[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) a[u] = x4[i + u * stride];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int b = begin + 4 * (i + u * stride);
        Better(a[u].x, b, bv, bi);
        Better(a[u].y, b + 1, bv, bi);
        Better(a[u].z, b + 2, bv, bi);
        Better(a[u].w, b + 3, bv, bi);
      }
    }
    for (; i < n4; i += stride) {
      const float4 a = x4[i];
      const int b = begin + 4 * i;
      Better(a.x, b, bv, bi);
      Better(a.y, b + 1, bv, bi);
      Better(a.z, b + 2, bv, bi);
      Better(a.w, b + 3, bv, bi);
    }
    tail = 4 * n4;
  }
  for (int v = tail + threadIdx.x; v < vocab; v += blockDim.x) Better(x[v], begin + v, bv, bi);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    Better(ov, oi, bv, bi);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    s_v[warp] = bv;
    s_i[warp] = bi;
  }
  __syncthreads();
  bv = lane < (blockDim.x >> 5) ? s_v[lane] : -INFINITY;
  bi = lane < (blockDim.x >> 5) ? s_i[lane] : INT_MAX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    Better(ov, oi, bv, bi);
  }
}

__device__ int BlockArgmax(const float* x, int vocab) {
  float bv;
  int bi;
  BlockArgmaxRange(x, 0, vocab, bv, bi);
  return bi == INT_MAX ? 0 : bi;  // all NaN or -inf: token 0
}

// Argmax of a row by a cluster of kArgmaxCluster blocks (grid (kArgmaxCluster, batch)): each block takes a
// slice (a multiple of 4 long, so that every slice stays 16-byte aligned), block 0 merges the blocks'
// results from their shared memory. One block alone read a 128K-entry row in ~9 us (H100, ncu).
constexpr int kArgmaxCluster = 8;
__global__ void __cluster_dims__(kArgmaxCluster, 1, 1) __launch_bounds__(kThreads) ArgmaxKernel(SamplingParams p) {
  PdlWait();  // launched with PDL (elementwise.h): the logits are the previous kernel's
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ float c_v;
  __shared__ int c_i;
  const int rank = static_cast<int>(cluster.block_rank()), row = blockIdx.y;
  const int per = ((p.vocab + kArgmaxCluster - 1) / kArgmaxCluster + 3) / 4 * 4;
  const int begin = min(p.vocab, rank * per), end = min(p.vocab, begin + per);
  float bv;
  int bi;
  BlockArgmaxRange(p.logits + size_t(row) * p.vocab, begin, end, bv, bi);
  if (threadIdx.x == 0) {
    c_v = bv;
    c_i = bi;
  }
  cluster.sync();
  if (rank == 0 && threadIdx.x == 0) {
    for (int r = 1; r < kArgmaxCluster; ++r) Better(*cluster.map_shared_rank(&c_v, r), *cluster.map_shared_rank(&c_i, r), bv, bi);
    p.out[row] = bi == INT_MAX ? 0 : bi;  // all NaN or -inf: token 0
  }
  cluster.sync();  // the other blocks' shared memory stays alive until block 0 has read it
}

struct SelectShared {
  uint32_t count[256];
  float mass[256];
  uint32_t sel_bin;
  uint32_t sel_count;
  float sel_mass;
};

// Key of the k-th largest logit (1-based k).
__device__ uint32_t SelectKthKey(const float* x, int vocab, int k, SelectShared& sh) {
  uint32_t prefix = 0, mask = 0;
  uint32_t remaining = static_cast<uint32_t>(k);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.count[b] = 0;
    __syncthreads();
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
      const uint32_t key = OrderedKey(x[v]);
      if ((key & mask) == prefix) atomicAdd(&sh.count[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t cum = 0, bin = 0, rem = remaining;
      for (int b = 255; b >= 0; --b) {
        const uint32_t c = sh.count[b];
        if (c > 0) bin = b;  // lowest non-empty bin so far: fallback
        if (cum + c >= remaining && c > 0) {
          bin = b;
          rem = remaining - cum;
          break;
        }
        cum += c;
      }
      sh.sel_bin = bin;
      sh.sel_count = rem;
    }
    __syncthreads();
    prefix |= sh.sel_bin << shift;
    remaining = sh.sel_count;
    mask |= 0xffu << shift;
    __syncthreads();
  }
  return prefix;
}

// Largest key t >= floor_key such that the mass of {keys >= t, keys >= floor_key} reaches target.
__device__ uint32_t SelectMassKey(const float* x, int vocab, uint32_t floor_key, float target, float mx,
                                  float inv_t, SelectShared& sh) {
  uint32_t prefix = 0, mask = 0;
  float remaining = target;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.mass[b] = 0.0f;
    __syncthreads();
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
      const float xv = x[v];
      const uint32_t key = OrderedKey(xv);
      if (key >= floor_key && (key & mask) == prefix) {
        atomicAdd(&sh.mass[(key >> shift) & 255u], __expf((xv - mx) * inv_t));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float cum = 0.0f, rem = 0.0f;
      uint32_t bin = 0;
      for (int b = 255; b >= 0; --b) {
        const float m = sh.mass[b];
        if (m > 0.0f) {
          bin = b;
          rem = m;  // fallback (rounding left target unreached): take this whole bin
          if (cum + m >= remaining) {
            rem = remaining - cum;
            break;
          }
        }
        cum += m;
      }
      sh.sel_bin = bin;
      sh.sel_mass = rem;
    }
    __syncthreads();
    prefix |= sh.sel_bin << shift;
    remaining = sh.sel_mass;
    mask |= 0xffu << shift;
    __syncthreads();
  }
  return prefix;
}

__device__ float KeptMass(const float* x, int vocab, uint32_t floor_key, float mx, float inv_t, float* scratch) {
  float z = 0.0f;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float xv = x[v];
    if (OrderedKey(xv) >= floor_key) z += __expf((xv - mx) * inv_t);
  }
  return BlockSum(z, scratch);
}

// Inclusive prefix sum over the block (blockDim.x == kThreads); also returns the block total.
__device__ float BlockInclusiveScan(float v, float* warp_sums, float* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = warp_sums[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float n = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += n;
    }
    warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  if (warp > 0) v += warp_sums[warp - 1];
  *total = warp_sums[31];
  return v;
}

__global__ void __launch_bounds__(kThreads) SampleKernel(SamplingParams p) {
  PdlWait();
  __shared__ SelectShared sh;
  __shared__ float scratch[32];
  __shared__ int s_found;
  const float* x = p.logits + size_t(blockIdx.x) * p.vocab;
  const RowSampling r = p.rows[blockIdx.x];
  if (!(r.temperature > 0.0f) || r.top_k == 1) {
    const int id = BlockArgmax(x, p.vocab);
    if (threadIdx.x == 0) p.out[blockIdx.x] = id;
    return;
  }
  const float inv_t = 1.0f / r.temperature;
  float mx = -INFINITY;
  for (int v = threadIdx.x; v < p.vocab; v += blockDim.x) mx = fmaxf(mx, x[v]);
  mx = BlockMax(mx, scratch);
  uint32_t floor_key = 0;
  if (r.top_k > 0 && r.top_k < p.vocab) floor_key = SelectKthKey(x, p.vocab, r.top_k, sh);
  float z = KeptMass(x, p.vocab, floor_key, mx, inv_t, scratch);
  if (r.top_p < 1.0f && r.top_p > 0.0f) {
    floor_key = SelectMassKey(x, p.vocab, floor_key, r.top_p * z, mx, inv_t, sh);
    z = KeptMass(x, p.vocab, floor_key, mx, inv_t, scratch);
  }
  const float u = (r.uniform >= 0.0f ? r.uniform : Uniform(r.seed, r.step)) * z;
  if (threadIdx.x == 0) s_found = INT_MAX;
  float carry = 0.0f;
  int last_kept = -1;
  for (int base = 0; base < p.vocab; base += blockDim.x) {
    const int v = base + threadIdx.x;
    float e = 0.0f;
    if (v < p.vocab) {
      const float xv = x[v];
      if (OrderedKey(xv) >= floor_key) {
        e = __expf((xv - mx) * inv_t);
        last_kept = v;
      }
    }
    float total;
    const float incl = BlockInclusiveScan(e, scratch, &total) + carry;
    if (e > 0.0f && incl >= u) atomicMin(&s_found, v);
    carry += total;
    __syncthreads();
    if (s_found != INT_MAX) break;
  }
  // Rounding can leave u just above the final sum: then the last kept token is the draw.
  if (s_found == INT_MAX) {
    __syncthreads();
    if (last_kept >= 0) atomicMin(&s_found, -last_kept - 1);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int f = s_found;
    p.out[blockIdx.x] = f >= 0 && f != INT_MAX ? f : (f == INT_MAX ? 0 : -f - 1);
  }
}

}  // namespace

cudaError_t LaunchArgmax(const SamplingParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  return LaunchPdl(ArgmaxKernel, dim3(kArgmaxCluster, p.batch), dim3(kThreads), 0, stream, p);
}

cudaError_t LaunchSample(const SamplingParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  return LaunchPdl(SampleKernel, dim3(p.batch), dim3(kThreads), 0, stream, p);
}

}  // namespace specontext::cuda
