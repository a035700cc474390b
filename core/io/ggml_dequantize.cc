// ggml block dequantizers. Block layouts (byte offsets inside one block) and formulas follow the
// gguf Python package's quants.py (gguf 0.19, *.dequantize_blocks) and ggml's block_* structs; the
// arithmetic keeps their f32 operation order, so results are bit-identical.
#include "core/io/ggml_dequantize.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"

namespace specontext {
namespace {

constexpr int kQK = 32;     // elements per legacy block
constexpr int kQK_K = 256;  // elements per K-quant super-block

float Half(const uint8_t* p) { return F16ToF32(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

// Q4_0 (18 bytes): d f16 | qs[16]. Element j < 16 is the low nibble of qs[j], j + 16 the high one.
void Q4_0(const uint8_t* b, float* y) {
  const float d = Half(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>((b[2 + j] & 0xf) - 8);
    y[j + 16] = d * static_cast<float>((b[2 + j] >> 4) - 8);
  }
}

// Q4_1 (20 bytes): d f16 | m f16 | qs[16]; y = d q + m.
void Q4_1(const uint8_t* b, float* y) {
  const float d = Half(b), m = Half(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(b[4 + j] & 0xf) + m;
    y[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
  }
}

// Q5_0 (22 bytes): d f16 | qh u32 (bit j = 5th bit of element j) | qs[16] (low 4 bits as Q4_0).
void Q5_0(const uint8_t* b, float* y) {
  const float d = Half(b);
  const uint32_t qh = b[2] | (b[3] << 8) | (b[4] << 16) | (static_cast<uint32_t>(b[5]) << 24);
  for (int j = 0; j < 16; ++j) {
    const int lo = (b[6 + j] & 0xf) | (((qh >> j) & 1) << 4);
    const int hi = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * static_cast<float>(lo - 16);
    y[j + 16] = d * static_cast<float>(hi - 16);
  }
}

// Q5_1 (24 bytes): d f16 | m f16 | qh u32 | qs[16]; y = d q + m.
void Q5_1(const uint8_t* b, float* y) {
  const float d = Half(b), m = Half(b + 2);
  const uint32_t qh = b[4] | (b[5] << 8) | (b[6] << 16) | (static_cast<uint32_t>(b[7]) << 24);
  for (int j = 0; j < 16; ++j) {
    const int lo = (b[8 + j] & 0xf) | (((qh >> j) & 1) << 4);
    const int hi = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * static_cast<float>(lo) + m;
    y[j + 16] = d * static_cast<float>(hi) + m;
  }
}

// Q8_0 (34 bytes): d f16 | qs int8[32].
void Q8_0(const uint8_t* b, float* y) {
  const float d = Half(b);
  for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}

// Q2_K (84 bytes): scales[16] (low nibble: scale, high: min, per 16 elements) | qs[64] | d f16 |
// dmin f16. Element e: 2 bits at shift 2 * ((e % 128) / 32) of qs[(e / 128) * 32 + e % 32].
void Q2_K(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* qs = b + 16;
  const float d = Half(b + 80), dmin = Half(b + 82);
  for (int e = 0; e < kQK_K; ++e) {
    const int s = e / 16;
    const float dl = d * static_cast<float>(scales[s] & 0xf),
                ml = dmin * static_cast<float>(scales[s] >> 4);
    const int q = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
    y[e] = dl * static_cast<float>(q) - ml;
  }
}

// Q3_K (110 bytes): hmask[32] | qs[64] | scales[12] (16 six-bit scales, offset 32) | d f16.
// Element e: low 2 bits as Q2_K; its high bit is bit e / 32 of hmask[e % 32], and a clear bit
// subtracts 4.
void Q3_K(const uint8_t* b, float* y) {
  const uint8_t* hmask = b;
  const uint8_t* qs = b + 32;
  const uint8_t* sc = b + 96;
  const float d = Half(b + 108);
  for (int e = 0; e < kQK_K; ++e) {
    const int k = e / 16;
    const int low =
        k < 8 ? (sc[k] & 0xf) : (sc[k - 8] >> 4);  // scales 0-7: low nibbles, 8-15: high
    const int high = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
    const float dl = d * static_cast<float>((low | (high << 4)) - 32);
    const int q2 = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
    const int hbit = (hmask[e % 32] >> (e / 32)) & 1;
    y[e] = dl * static_cast<float>(q2 - (hbit ? 0 : 4));
  }
}

// The 8 six-bit scales and mins of Q4_K / Q5_K, packed in 12 bytes (ggml's get_scale_min_k4).
void ScaleMinK4(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K (144 bytes): d f16 | dmin f16 | scales[12] | qs[128]. Sub-block j (32 elements) is the low
// (even j) or high (odd j) nibbles of qs[(j / 2) * 32, +32); y = d sc_j q - dmin m_j.
void Q4_K(const uint8_t* b, float* y) {
  const float d = Half(b), dmin = Half(b + 2);
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    ScaleMinK4(b + 4, j, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    const uint8_t* q = qs + (j / 2) * 32;
    const int shift = (j % 2) * 4;
    for (int l = 0; l < 32; ++l)
      y[j * 32 + l] = d1 * static_cast<float>((q[l] >> shift) & 0xf) - m1;
  }
}

// Q5_K (176 bytes): d f16 | dmin f16 | scales[12] | qh[32] | qs[128]; low 4 bits as Q4_K, the 5th
// bit of element l of sub-block j is bit j of qh[l].
void Q5_K(const uint8_t* b, float* y) {
  const float d = Half(b), dmin = Half(b + 2);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    ScaleMinK4(b + 4, j, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    const uint8_t* q = qs + (j / 2) * 32;
    const int shift = (j % 2) * 4;
    for (int l = 0; l < 32; ++l) {
      const int v = ((q[l] >> shift) & 0xf) | (((qh[l] >> j) & 1) << 4);
      y[j * 32 + l] = d1 * static_cast<float>(v) - m1;
    }
  }
}

// Q6_K (210 bytes): ql[128] | qh[64] | scales int8[16] | d f16. In each half h of 128 elements, r <
// 64 takes the low nibble of ql[64 h + r], r >= 64 the high nibble of ql[64 h + r - 64]; the top 2
// bits are at shift 2 (r / 32) of qh[32 h + r % 32]; q - 32 is scaled by d * scales[e / 16].
void Q6_K(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const uint8_t* sc = b + 192;
  const float d = Half(b + 208);
  for (int e = 0; e < kQK_K; ++e) {
    const int h = e / 128, r = e % 128;
    const int low = r < 64 ? (ql[64 * h + r] & 0xf) : (ql[64 * h + r - 64] >> 4);
    const int high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
    const float ds = d * static_cast<float>(static_cast<int8_t>(sc[e / 16]));
    y[e] = ds * static_cast<float>((low | (high << 4)) - 32);
  }
}

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn BlockFnOf(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0:
      return Q4_0;
    case GgmlType::kQ4_1:
      return Q4_1;
    case GgmlType::kQ5_0:
      return Q5_0;
    case GgmlType::kQ5_1:
      return Q5_1;
    case GgmlType::kQ8_0:
      return Q8_0;
    case GgmlType::kQ2_K:
      return Q2_K;
    case GgmlType::kQ3_K:
      return Q3_K;
    case GgmlType::kQ4_K:
      return Q4_K;
    case GgmlType::kQ5_K:
      return Q5_K;
    case GgmlType::kQ6_K:
      return Q6_K;
    default:
      return nullptr;
  }
}

}  // namespace

bool CanDequantizeGgml(GgmlType type) {
  return type == GgmlType::kF32 || type == GgmlType::kF16 || type == GgmlType::kBF16 ||
         BlockFnOf(type) != nullptr;
}

absl::Status DequantizeGgml(GgmlType type, const uint8_t* src, size_t src_bytes, int64_t n,
                            float* dst) {
  if (!CanDequantizeGgml(type)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ggml type ", GgmlTypeName(type),
                     " cannot be dequantized (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
                     "Q8_0, Q2_K, Q3_K, "
                     "Q4_K, Q5_K, Q6_K)"));
  }
  const GgmlTypeTraits t = *GgmlTypeTraitsOf(type);
  if (n < 0 || n % t.block_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(n, " elements are not a whole number of ",
                                                   t.name, " blocks of ", t.block_size));
  }
  const uint64_t blocks = static_cast<uint64_t>(n) / t.block_size;
  if (src_bytes / t.type_size != blocks || src_bytes % t.type_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(src_bytes, " bytes are not ", blocks, " ", t.name, " blocks"));
  }
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(dst, src, src_bytes);
      return absl::OkStatus();
    case GgmlType::kF16:  // bytes assembled one by one: `src` may be odd-aligned (general.alignment
                          // 1)
      for (int64_t k = 0; k < n; ++k) dst[k] = Half(src + 2 * k);
      return absl::OkStatus();
    case GgmlType::kBF16:
      for (int64_t k = 0; k < n; ++k)
        dst[k] = Bf16ToF32(static_cast<uint16_t>(src[2 * k] | (src[2 * k + 1] << 8)));
      return absl::OkStatus();
    default:
      break;
  }
  const BlockFn fn = BlockFnOf(type);
  for (uint64_t k = 0; k < blocks; ++k) fn(src + k * t.type_size, dst + k * t.block_size);
  return absl::OkStatus();
}

}  // namespace specontext
