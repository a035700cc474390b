// Flash-attention style causal GQA attention on tensor cores (mma.sync m16n8k16, bf16 in, f32
// accumulate), used for prefill tiles and for split-K decode.
//
// CTA = WARPS_M x WARPS_N warps. Rows: 16 per warp along M (query rows r = t * group + h of one
// KV head). Keys: each stage holds WARPS_N blocks of BLOCK_N keys, warp column wn takes block wn,
// so decode (one row tile) still keeps 4 warps busy. K/V stages are double-buffered in shared
// memory with cp.async (zero-filled past key_end: garbage V rows times p = 0 would give NaN).
// Each warp keeps its own online-softmax state (log2 domain); the warps' states are merged through
// shared memory at the end, which also gives coalesced output stores.
#include "core/cuda/kernels/attention.h"
#include "core/cuda/kernels/common.cuh"
#include "core/cuda/kernels/elementwise.h"

namespace specontext::cuda {
namespace {

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void LdMatrixX4(const void* smem, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}
__device__ __forceinline__ void LdMatrixX4Trans(const void* smem, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}

__device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <int HD, int WARPS_M, int WARPS_N, int BLOCK_N>
struct MmaConfig {
  static constexpr int kBlockM = 16 * WARPS_M;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kStride = HD + 8;  // smem row pitch in bf16: 16 B pad, conflict-free ldmatrix
  static constexpr int kKeys = BLOCK_N * WARPS_N;  // keys per stage
  static constexpr int kStageElems = kKeys * kStride;
  static constexpr size_t kKvBytes = size_t{2} * 2 * kStageElems * sizeof(bf16);  // 2 stages x (K, V)
  static constexpr size_t kOutBytes = size_t{WARPS_N} * kBlockM * HD * sizeof(float);
  static constexpr size_t kSmemBytes = kKvBytes > kOutBytes ? kKvBytes : kOutBytes;
};

template <int HD, int WARPS_M, int WARPS_N, int BLOCK_N>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
    AttentionMmaKernel(AttnParams p) {
  using Cfg = MmaConfig<HD, WARPS_M, WARPS_N, BLOCK_N>;
  constexpr int kBlockM = Cfg::kBlockM, kThreads = Cfg::kThreads, kStride = Cfg::kStride;
  constexpr int kKeys = Cfg::kKeys, NB = BLOCK_N / 8, DB = HD / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* s_k = reinterpret_cast<bf16*>(smem_raw);
  bf16* s_v = s_k + 2 * Cfg::kStageElems;
  __shared__ float s_m[WARPS_N][kBlockM];
  __shared__ float s_l[WARPS_N][kBlockM];
  // Launched with PDL (elementwise.h): the work item and the batch metadata (uploads by PrepareBatch and
  // PlanAttention, stream-ordered copies) are read before the wait; q, the caches (the new rows come from the
  // append before) and the partials after it.
  PdlTrigger();

  AttnWorkItem item;
  if (p.items != nullptr) {
    item = p.items[blockIdx.x];
  } else {
    // Decode-only batch: this CTA is split j of sequence s; the plan follows from the length alone.
    const int s = blockIdx.x / p.max_splits, j = blockIdx.x % p.max_splits;
    if (p.seqs[s].n_tokens != 1) return;  // a prefilling sequence of a mixed batch (batch-invariant mode)
    const int len = p.seqs[s].past_len + 1;
    int splits, per;
    DecodeSplitPlan(len, p.max_splits, &splits, &per);
    if (j >= splits) return;  // the whole CTA leaves before any barrier
    item = AttnWorkItem{s, 0, j * per, min(len, (j + 1) * per), splits > 1 ? s * p.max_splits + j : -1, {}};
  }
  const int kvh = blockIdx.y;
  const AttnSeq seq = p.seqs[item.seq];
  const int group = p.n_heads / p.n_kv;
  const size_t row_stride = RowStride(seq, HD);  // 2 * HD over an interleaved host K/V pair
  const bf16* k_base = static_cast<const bf16*>(p.k_ptrs[item.seq]) + size_t(kvh) * seq.capacity * row_stride;
  const bf16* v_base = static_cast<const bf16*>(p.v_ptrs[item.seq]) + size_t(kvh) * seq.capacity * row_stride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int g = lane >> 2, tig = lane & 3;
  PdlWait();

  // This thread's two rows (g and g + 8 of the warp's 16) and their causal limits (last key).
  int lim[2];
  const bf16* q_row[2];
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int r = item.row_begin + wm * 16 + g + hi * 8;
    const int t = r / group;
    const bool valid = t < seq.n_tokens;
    lim[hi] = valid ? min(seq.past_len + t, item.key_end - 1) : -1;
    q_row[hi] = valid ? static_cast<const bf16*>(p.q) +
                            (size_t(seq.token_begin + t) * p.n_heads + kvh * group + r % group) * HD
                      : nullptr;
  }
  // Q fragments for all HD/16 k-steps, straight from global memory (read once per CTA).
  uint32_t qf[HD / 16][4];
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bf16* row = q_row[j & 1];
      const int col = kk * 16 + tig * 2 + (j >> 1) * 8;
      qf[kk][j] = row ? *reinterpret_cast<const uint32_t*>(row + col) : 0u;
    }
  }
  // Smallest causal limit in the CTA: blocks entirely at or below it need no masking.
  const int first_t = item.row_begin / group;
  const int cta_min_lim = min(seq.past_len + first_t, item.key_end - 1);

  float o[DB][4];
#pragma unroll
  for (int d = 0; d < DB; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float scale_log2 = p.scale * 1.4426950408889634f;

  auto load_stage = [&](int buf, int key0) {
    constexpr int kChunks = kKeys * (HD / 8);
    bf16* dk = s_k + buf * Cfg::kStageElems;
    bf16* dv = s_v + buf * Cfg::kStageElems;
    for (int c = threadIdx.x; c < kChunks; c += kThreads) {
      const int key = c / (HD / 8), col = (c % (HD / 8)) * 8;
      const bool valid = key0 + key < item.key_end;
      const size_t off = valid ? size_t(key0 + key) * row_stride + col : 0;
      CpAsync16(dk + key * kStride + col, k_base + off, valid);
      CpAsync16(dv + key * kStride + col, v_base + off, valid);
    }
    CpAsyncCommit();
  };

  const int n_stages = (item.key_end - item.key_begin + kKeys - 1) / kKeys;
  if (n_stages > 0) load_stage(0, item.key_begin);
  for (int it = 0; it < n_stages; ++it) {
    const int key0 = item.key_begin + it * kKeys;
    if (it + 1 < n_stages) {
      load_stage((it + 1) & 1, key0 + kKeys);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const bf16* sk = s_k + (it & 1) * Cfg::kStageElems + wn * BLOCK_N * kStride;
    const bf16* sv = s_v + (it & 1) * Cfg::kStageElems + wn * BLOCK_N * kStride;
    const int wkey0 = key0 + wn * BLOCK_N;
    {
      // S = Q K^T for this warp's BLOCK_N keys.
      float s[NB][4];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
          const int key = nb * 8 + (lane & 7) + ((lane >> 4) << 3);
          const int col = kk * 16 + (((lane >> 3) & 1) << 3);
          uint32_t b0, b1, b2, b3;
          LdMatrixX4(sk + key * kStride + col, b0, b1, b2, b3);
          Mma(s[nb], qf[kk], b0, b1);
          Mma(s[nb + 1], qf[kk], b2, b3);
        }
      }
      // Scale into the log2 domain and mask keys past each row's causal limit.
      const bool need_mask = wkey0 + BLOCK_N - 1 > cta_min_lim;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float v = s[nb][j] * scale_log2;
          if (need_mask) {
            const int key = wkey0 + nb * 8 + tig * 2 + (j & 1);
            if (key > lim[j >> 1]) v = -INFINITY;
          }
          s[nb][j] = v;
        }
      }
      // Online softmax per row; a quad of 4 lanes shares a row.
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * hi], s[nb][2 * hi + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[hi], mx);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2f(m[hi] - m_use);
        float sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          s[nb][2 * hi] = exp2f(s[nb][2 * hi] - m_use);
          s[nb][2 * hi + 1] = exp2f(s[nb][2 * hi + 1] - m_use);
          sum += s[nb][2 * hi] + s[nb][2 * hi + 1];
        }
        l[hi] = l[hi] * alpha + sum;
        m[hi] = m_new;
#pragma unroll
        for (int d = 0; d < DB; ++d) {
          o[d][2 * hi] *= alpha;
          o[d][2 * hi + 1] *= alpha;
        }
      }
      // O += P V: P (bf16) comes straight from the S accumulators (same fragment layout).
#pragma unroll
      for (int kb = 0; kb < BLOCK_N / 16; ++kb) {
        uint32_t a[4];
        a[0] = PackBf16(s[2 * kb][0], s[2 * kb][1]);
        a[1] = PackBf16(s[2 * kb][2], s[2 * kb][3]);
        a[2] = PackBf16(s[2 * kb + 1][0], s[2 * kb + 1][1]);
        a[3] = PackBf16(s[2 * kb + 1][2], s[2 * kb + 1][3]);
#pragma unroll
        for (int d = 0; d < DB; d += 2) {
          const int key = kb * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int col = d * 8 + ((lane >> 4) << 3);
          uint32_t b0, b1, b2, b3;
          LdMatrixX4Trans(sv + key * kStride + col, b0, b1, b2, b3);
          Mma(o[d], a, b0, b1);
          Mma(o[d + 1], a, b2, b3);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this buffer
  }

  // Merge the WARPS_N warps of each row through shared memory (the K/V stages are free now).
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    l[hi] += __shfl_xor_sync(0xffffffffu, l[hi], 1);
    l[hi] += __shfl_xor_sync(0xffffffffu, l[hi], 2);
    if (tig == 0) {
      s_m[wn][wm * 16 + g + hi * 8] = m[hi];
      s_l[wn][wm * 16 + g + hi * 8] = l[hi];
    }
  }
  __syncthreads();
  float* s_o = reinterpret_cast<float*>(smem_raw);  // [WARPS_N][kBlockM][HD]
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int row = wm * 16 + g + hi * 8;
    float m_tot = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) m_tot = fmaxf(m_tot, s_m[w][row]);
    const float f = m[hi] == -INFINITY ? 0.0f : exp2f(m[hi] - m_tot);
    float* dst = s_o + (size_t(wn) * kBlockM + row) * HD;
#pragma unroll
    for (int d = 0; d < DB; ++d) {
      dst[d * 8 + tig * 2] = o[d][2 * hi] * f;
      dst[d * 8 + tig * 2 + 1] = o[d][2 * hi + 1] * f;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBlockM * HD / 2; idx += kThreads) {
    const int row = idx / (HD / 2), col = (idx % (HD / 2)) * 2;
    float m_tot = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) m_tot = fmaxf(m_tot, s_m[w][row]);
    float l_tot = 0.0f, o0 = 0.0f, o1 = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) {
      const float mw = s_m[w][row];
      if (mw != -INFINITY) l_tot += s_l[w][row] * exp2f(mw - m_tot);
      o0 += s_o[(size_t(w) * kBlockM + row) * HD + col];
      o1 += s_o[(size_t(w) * kBlockM + row) * HD + col + 1];
    }
    const float inv = l_tot > 0.0f ? 1.0f / l_tot : 0.0f;
    const int r = item.row_begin + row;
    const int t = r / group;
    if (t >= seq.n_tokens) continue;
    if (item.out_slot < 0) {
      bf16* out = static_cast<bf16*>(p.out) +
                  (size_t(seq.token_begin + t) * p.n_heads + kvh * group + r % group) * HD + col;
      *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(o0 * inv, o1 * inv);
    } else {
      const size_t base = (size_t(item.out_slot) * p.n_kv + kvh) * kBlockM + row;
      p.partial_o[base * HD + col] = o0 * inv;
      p.partial_o[base * HD + col + 1] = o1 * inv;
      if (col == 0) p.partial_lse[base] = l_tot > 0.0f ? m_tot + log2f(l_tot) : -INFINITY;
    }
  }
}

template <int HD, int WARPS_M, int WARPS_N, int BLOCK_N>
cudaError_t Launch(const AttnParams& p, cudaStream_t stream, int grid_x) {
  using Cfg = MmaConfig<HD, WARPS_M, WARPS_N, BLOCK_N>;
  auto kernel = AttentionMmaKernel<HD, WARPS_M, WARPS_N, BLOCK_N>;
  // Raising the dynamic shared-memory limit is per kernel and idempotent; done on every launch
  // (cheap) so no static state is needed.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Cfg::kSmemBytes));
  if (err != cudaSuccess) return err;
  return LaunchPdl(kernel, dim3(grid_x, p.n_kv), dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p);
}

}  // namespace

cudaError_t LaunchAttentionMma(const AttnParams& p, AttnKernel kind, cudaStream_t stream) {
  if (p.n_items == 0) return cudaSuccess;
  // Decode: 16 keys per warp keep the stages at 70 KB (hd 128), so three CTAs share an SM and hide
  // each other's prologue and merge; prefill: 64 x 64 tiles.
  static_assert(kPrefillBlockM == 16 * 4 && kDecodeBlockM == 16 && kDecodeKeysPerStage == 4 * 16);
  if (kind == AttnKernel::kPrefill) {
    if (p.head_dim == 128) return Launch<128, 4, 1, 64>(p, stream, p.n_items);
    if (p.head_dim == 64) return Launch<64, 4, 1, 64>(p, stream, p.n_items);
  } else {
    if (p.head_dim == 128) return Launch<128, 1, 4, 16>(p, stream, p.n_items);
    if (p.head_dim == 64) return Launch<64, 1, 4, 16>(p, stream, p.n_items);
  }
  return cudaErrorInvalidValue;
}

cudaError_t LaunchAttentionDecode(const AttnParams& p, cudaStream_t stream) {
  if (p.n_seqs == 0) return cudaSuccess;
  if (p.items != nullptr || p.max_splits < 1 || p.max_splits > kMaxDecodeSplits ||
      p.n_heads / p.n_kv > kDecodeBlockM) {
    return cudaErrorInvalidValue;
  }
  if (p.max_splits > 1 && (p.partial_o == nullptr || p.partial_lse == nullptr)) return cudaErrorInvalidValue;
  const int grid_x = p.n_seqs * p.max_splits;
  cudaError_t err = cudaErrorInvalidValue;
  if (p.head_dim == 128) err = Launch<128, 1, 4, 16>(p, stream, grid_x);
  if (p.head_dim == 64) err = Launch<64, 1, 4, 16>(p, stream, grid_x);
  if (err != cudaSuccess || p.max_splits == 1) return err;
  return LaunchAttentionDecodeCombine(p, stream);
}

}  // namespace specontext::cuda
