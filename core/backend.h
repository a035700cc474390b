// The backend interface: memory, copies and the ops the model code is written against.
// Model code never includes CUDA headers; the CPU backend is the reference every other backend is
// tested against (tests/backend_ops_test.cc style).
//
// Threading: a backend instance is used by one thread at a time. Ops are enqueued in order on the
// backend's compute stream; results are visible to the host after Synchronize() or ToHost().
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace specontext {

// Where device memory goes; every allocation is tagged and accounted (see MemoryReport).
enum class MemoryKind : uint8_t {
  kWeights,
  kKvCache,
  kWorkspace,
  kGraphs,
  kRetrieval,
  kPrefetch,
  kOther,
  kCount
};
std::string_view MemoryKindName(MemoryKind kind);

struct MemoryReport {
  std::array<int64_t, static_cast<size_t>(MemoryKind::kCount)> bytes{};  // live bytes per kind
  int64_t total = 0;                                                      // sum of bytes
  int64_t peak = 0;                                                       // highest total seen
  int64_t limit = 0;                                                      // 0 = no limit
};

// One sequence's part of a ragged batch. The new tokens of all sequences are concatenated, in
// order, into the rows of the step's activations.
struct SeqSlice {
  int32_t token_begin = 0;  // first activation row of this sequence
  int32_t n_tokens = 0;     // new tokens this step (a prompt chunk, or 1 when decoding)
  int32_t past_len = 0;     // tokens already in the KV cache before this step
};

// KV storage of one sequence, allocated by the backend with kind kKvCache.
// k[layer] and v[layer] are [n_kv_heads, capacity, head_dim] in the backend's compute dtype.
struct SequenceKv {
  std::vector<Tensor> k;
  std::vector<Tensor> v;
  int32_t capacity = 0;
};

// A ragged batch: its slices and, per slice, the sequence's KV storage.
struct BatchDesc {
  std::vector<SeqSlice> seqs;
  std::vector<const SequenceKv*> kv;  // kv[i] belongs to seqs[i]
  int32_t n_tokens = 0;               // sum of seqs[i].n_tokens
};

// Parameters of rotary position embeddings, resolved by the model from config.json.
struct RopeArgs {
  const Tensor* inv_freq = nullptr;  // [head_dim / 2] f32, already scaled (llama3, linear, ...)
  bool interleaved = false;          // pairs (x[2i], x[2i+1]) as in llama2.c; else halves as in HF
  float attention_scaling = 1.0f;    // multiplies cos/sin (YaRN mscale); 1 otherwise
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual DeviceKind device() const = 0;
  virtual std::string name() const = 0;
  // Dtype of activations and KV on this backend (f32 on CPU, bf16 on CUDA).
  virtual DType compute_dtype() const = 0;
  // Dtype a weight matrix stored as `stored` is kept in (Linear and Embedding accept it).
  virtual DType weight_dtype(DType stored) const { return compute_dtype(); }

  // ---- memory -----------------------------------------------------------------------------
  // Allocates an uninitialised device tensor. Fails with ResourceExhausted past the memory limit.
  virtual absl::StatusOr<Tensor> Alloc(DType dtype, Shape shape, MemoryKind kind) = 0;
  // Allocates and fills a device tensor from host memory, converting floating dtypes to `dtype`.
  virtual absl::StatusOr<Tensor> ToDevice(const Tensor& host, DType dtype, MemoryKind kind) = 0;
  // Copies host -> existing device tensor (same dtype and element count).
  virtual absl::Status CopyToDevice(const Tensor& host, Tensor* device) = 0;
  // Copies device -> existing host tensor (same dtype and element count); waits for the copy.
  virtual absl::Status ToHost(const Tensor& device, Tensor* host) = 0;
  // Copies device -> device (same dtype and element count), ordered on the compute stream.
  virtual absl::Status CopyDevice(const Tensor& src, Tensor* dst) {
    return absl::UnimplementedError("CopyDevice is not implemented by this backend");
  }
  // Fills a device tensor with zeros, ordered on the compute stream.
  virtual absl::Status Zero(Tensor* t) { return absl::UnimplementedError("Zero is not implemented by this backend"); }
  virtual absl::Status Synchronize() = 0;
  virtual MemoryReport memory_report() const = 0;
  // Bytes the backend may still allocate (limit or free device memory).
  virtual int64_t available_bytes() const = 0;

  // ---- ops (every tensor on this backend; shapes in comments) -------------------------------
  // out[i, :] = table[ids[i], :].  table [rows, d], ids [n] i32, out [n, d].
  // Also used to gather activation rows (logits of the last token of each sequence).
  virtual absl::Status Embedding(const Tensor& table, const Tensor& ids, Tensor* out) = 0;
  // out = x / rms(x) * w over the last dim.  x, out [n, d], w [d].  Also QK-norm ([n*heads, hd]).
  virtual absl::Status RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor* out) = 0;
  // residual += x; out = RmsNorm(residual, w).  residual, x, out [n, d].
  virtual absl::Status AddRmsNorm(Tensor* residual, const Tensor& x, const Tensor& w, float eps,
                                  Tensor* out) = 0;
  // out = x · wᵀ (+ bias).  x [n, k], w [m, k] (HF layout, weight_dtype()), bias [m] or null,
  // out [n, m]. out may be f32 while x is the compute dtype (logits).
  virtual absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor* out) = 0;
  // Rotates x in place.  x [n, heads, head_dim], positions [n] i32.
  virtual absl::Status Rope(Tensor* x, const Tensor& positions, const RopeArgs& rope) = 0;
  // out = silu(gate) * up.  gate, up, out [n, f].
  virtual absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor* out) = 0;

  // Sets the ragged batch used by KvAppend and Attention until the next call. The SequenceKv
  // objects must outlive that use.
  virtual absl::Status PrepareBatch(const BatchDesc& batch) = 0;
  // Writes the new tokens' K and V of `layer` into each sequence's cache at past_len + i.
  // k, v [n_tokens, n_kv_heads, head_dim].
  virtual absl::Status KvAppend(int layer, const Tensor& k, const Tensor& v) = 0;
  // Causal attention of the new tokens over each sequence's cache (past and new tokens), GQA.
  // q, out [n_tokens, n_heads, head_dim].
  virtual absl::Status Attention(int layer, const Tensor& q, float scale, Tensor* out) = 0;
};

// The CPU backend (always built). `memory_limit` 0 means no limit.
std::unique_ptr<Backend> MakeCpuBackend(int64_t memory_limit = 0);

}  // namespace specontext
