// The decoder-only transformer of every supported family (Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3),
// written once against the Backend interface.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/io/weight_source.h"
#include "core/parallel/communicator.h"
#include "core/rope/rope_frequencies.h"

namespace specontext {

// Projections that read the same input are fused at load time (one GEMM instead of three or two:
// decode reads each weight once and small GEMMs run far from their floor on the GPU).
struct LayerWeights {
  Tensor input_norm, post_attention_norm;   // [d]
  Tensor w_qkv;                              // [q_dim + 2 kv_dim, d]: q_proj, k_proj, v_proj rows
  Tensor b_qkv;                              // [q_dim + 2 kv_dim] or empty
  Tensor wo;                                 // [d, q_dim]
  Tensor b_o;                                // [d] or empty
  Tensor q_norm, k_norm;                     // [head_dim] or empty
  Tensor w_gate_up;                          // [2 I, d]: gate_proj, up_proj rows
  Tensor b_gate_up;                          // [2 I] or empty
  Tensor w_down;                             // [d, I]
  Tensor b_down;                             // [d] or empty
};

// Called while weights load: bytes done, bytes in all.
using LoadProgress = std::function<void(int64_t done, int64_t total)>;

struct CopyList;
struct ElasticCounters;

// The sparse decode part of a forward (SpeContext, DESIGN.md §4): every sequence decodes one token.
struct SparseForward {
  SparseDecodeDesc desc;                        // index sets (+ slots for offloaded layers)
  // [n_layers] copies to run into each offloaded layer's slot buffers before it (null: none / resident).
  std::vector<const CopyList*> layer_copies;
  ElasticCounters* counters = nullptr;          // rows/bytes loaded (may be null)
  // Exact dense attention instead of SparseAttention (every past <= its budget and no layer offloaded).
  bool dense_attention = false;
  // With dense_attention false: resident layers attend densely anyway (Attention over their full KV) and only
  // offloaded layers use SparseAttention over `desc` (split mode's fallback when the retriever is down or late:
  // dense over what is on the GPU plus the sink + recent window the slot buffers hold).
  bool dense_resident_layers = false;
  // Set when the step's positions are still on their way to the host (desc.positions_on_device): called once
  // the resident layers before the first offloaded one are enqueued, it completes desc (slots) and
  // layer_copies, which are then prepared and loaded, so the host's elastic plan runs while the GPU computes
  // the resident layers. Null: desc and layer_copies are complete before the forward.
  std::function<absl::Status()> before_offloaded;
  // Evaluation of selection sources (core/sparse/selection_source.h), both off (null) when serving. With
  // `layer_selection`, every layer that attends sparsely first replaces the prepared positions by its own
  // (Backend::SelectLayerIndexSets from its rotated q and KV: oracle, quest). With `recall_lse` (a backend
  // tensor f32 [n_layers, n_seqs, n_heads, 2]), every such layer writes its slice by Backend::AttentionRecall
  // before its attention; layers that attend densely leave theirs as it was. Either runs the step op by op
  // (no step graph).
  const LayerSelectionSpec* layer_selection = nullptr;
  Tensor* recall_lse = nullptr;
};

// Hidden states to capture for an EAGLE-3 retrieval head: the residual stream entering each of `layers`
// (HF hidden_states[l]) for every new token, concatenated: out [n_tokens, layers.size() * hidden], either
// f32 host (downloaded per fusion layer) or, when `on_device`, a backend tensor in the compute dtype filled
// with Backend::CopyToColumns in stream order (no host wait; kWorkspace, reused while its shape fits).
struct HiddenCapture {
  std::vector<int32_t> layers;
  bool on_device = false;
  Tensor out;  // filled by Forward
};

// One sequence's part of a forward pass.
struct ForwardSeq {
  std::span<const int32_t> tokens;  // new tokens
  int32_t past_len = 0;             // tokens already in kv
  SequenceKv* kv = nullptr;
};

// Megatron-style tensor parallelism (docs/tensor-parallel.md): rank `rank` of `size` holds the q/k/v rows
// of its attention and KV heads and the gate/up rows of its intermediate range (column-parallel), the matching
// o_proj and down_proj columns (row-parallel, one all-reduce over `comm` after each, before the residual add;
// their biases on rank 0 only), and replicated embeddings, norms and LM head: every rank computes the full
// logits. Needs size <= KV heads, size dividing the KV heads and the intermediate size. Sparse decoding works
// on each rank's shard (core/model/sparse_tensor_parallel.h).
struct TensorParallel {
  int rank = 0;
  int size = 1;
  Communicator* comm = nullptr;  // required when size > 1: comm->rank() == rank, comm->size() == size
};

// The configuration rank `tp.rank` computes with: attention heads, KV heads and intermediate size divided by
// tp.size (head_dim and everything else unchanged). InvalidArgument for a split the model does not allow.
absl::StatusOr<ModelConfig> ShardConfig(const ModelConfig& config, const TensorParallel& tp);

class Transformer {
 public:
  // Uploads the checkpoint's weights to `backend` (which must outlive the model): with tp.size > 1 only
  // the rank's shard (the model's config() is then the rank's, ShardConfig). The default is the whole model.
  static absl::StatusOr<std::unique_ptr<Transformer>> Load(const Checkpoint& checkpoint,
                                                           Backend* backend,
                                                           const LoadProgress& progress = {},
                                                           const TensorParallel& tp = {});

  // With tensor parallelism the rank's shard configuration (heads, KV heads, intermediate size per rank).
  const ModelConfig& config() const { return config_; }
  const TensorParallel& tensor_parallel() const { return tp_; }
  Backend* backend() const { return backend_; }
  // The token embedding table on the backend [vocab, hidden] (weight dtype); a retrieval head sharing the
  // target's embedding reads it instead of uploading a copy.
  const Tensor& embedding() const { return embed_; }

  // KV storage for one sequence of up to `capacity` tokens (MemoryKind::kKvCache).
  absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateKv(int32_t capacity) const;
  // Bytes of KV one token takes across all layers.
  int64_t KvBytesPerToken() const;

  // Runs the new tokens of every sequence and appends their KV. Writes f32 logits to `logits`
  // (host): [n_seqs, vocab] for the last token of each sequence, or [n_tokens, vocab] for every
  // token when `all_tokens` (tests, scoring).
  absl::Status Forward(std::span<const ForwardSeq> seqs, bool all_tokens, Tensor* logits);
  // The same with optional sparse decode (null: dense) and hidden-state capture (null: none). Layers a
  // sequence's SequenceKv marks offloaded append to the host copy (Backend::KvAppendHost).
  absl::Status Forward(std::span<const ForwardSeq> seqs, bool all_tokens, Tensor* logits,
                       const SparseForward* sparse, HiddenCapture* capture);
  // The same, leaving the logits on the backend: f32 [n_seqs or n_tokens, vocab], valid until the next
  // forward (the engine samples from it on the device). A dense step where every sequence decodes one
  // token runs through Backend::RunStepGraph (a CUDA graph per batch size; transformer_graph.cc).
  absl::StatusOr<Tensor> ForwardDevice(std::span<const ForwardSeq> seqs, bool all_tokens,
                                       const SparseForward* sparse = nullptr, HiddenCapture* capture = nullptr);
  // The most backend bytes (MemoryKind::kWorkspace, AllocationBoundBytes each) ForwardDevice holds at once
  // for `n_tokens` tokens and `n_out` logits rows, counting the logits it returns: the shapes Layer and
  // ForwardDevice allocate (the unfused gate/up path, the larger one) and, when `attention_buffers`, the
  // buffers the backend's attention keeps between steps, for any step of up to `n_out` sequences and
  // `n_tokens` tokens (Backend::AttentionWorkspaceBytes, dense attention). Other backend-internal scratch
  // is not included. Part of the memory planner's step bound (core/model/sparse_planner.cc, which counts the
  // attention buffers itself, with sparse decode's) and of dense mode's `--max-kv-bytes auto`.
  int64_t ForwardWorkspaceBytes(int64_t n_tokens, int64_t n_out, bool attention_buffers = true) const;
  // The shape of AttentionWorkspaceBytes for this model's attention: steps of up to `n_seqs` sequences and
  // `n_tokens` tokens, dense attention only (the caller adds the sparse fields).
  AttentionWorkspaceShape AttentionShape(int64_t n_tokens, int64_t n_seqs) const;
  ~Transformer();

 private:
  Transformer(const ModelConfig& config, Backend* backend) : config_(config), backend_(backend) {}
  // Splits the rows of a fused projection's output into column ranges of `widths` (views when there
  // is one row, copies otherwise).
  absl::Status SplitColumns(const Tensor& fused, std::initializer_list<int64_t> widths,
                            std::initializer_list<Tensor*> parts) const;
  absl::Status LoadWeights(const WeightSource& weights, const LoadProgress& progress);
  absl::Status Layer(int l, int64_t n, Tensor& residual, Tensor& h, const Tensor& positions, bool offloaded,
                     const SparseForward* sparse);
  absl::Status Capture(int l, int64_t n, const Tensor& residual, HiddenCapture* capture) const;
  // Enqueues the elastic loads of every offloaded layer (consecutive layers with one list together).
  absl::Status IssueElasticLoads(const SparseForward& sparse);
  // Before the first offloaded layer: with sparse->before_offloaded, completes the sparse step (the
  // callback, the slots' upload, the loads); nothing otherwise (the loads went first).
  absl::Status BeginOffloadedLayers(const SparseForward* sparse);
  // Decode step of `ids` (one token per sequence, batch already prepared, every layer resident) through
  // the step graph of its batch size and variant (transformer_graph.cc): dense (sparse null) or sparse
  // (PrepareSparseDecode done by the caller), with an optional on-device hidden capture. Returns the
  // bucket's device logits [n, vocab].
  // `graph_layers` < n_layers: only layers [0, graph_layers) are recorded, the offloaded ones after them
  // and the LM head run op by op on the bucket's residual stream.
  absl::StatusOr<Tensor> DecodeStep(std::span<const int32_t> ids, std::span<const int32_t> positions,
                                    const SparseForward* sparse = nullptr, HiddenCapture* capture = nullptr,
                                    int graph_layers = -1);
  // DecodeStep's offloaded layers [first_layer, n_layers) and LM head on its fixed residual stream
  // (residual, h [n, hidden]) into its fixed `logits`, as the step graph `key` (transformer_graph.cc).
  absl::Status DecodeSuffix(uint64_t key, int64_t n, int first_layer, const Tensor& positions, Tensor& residual,
                            Tensor& h, Tensor* logits, const SparseForward* sparse, HiddenCapture* capture);
  // The recorded part of DecodeStep: embedding and layers [0, n_layers) from fixed input buffers into
  // residual and h [n, hidden], then (logits non-null) the LM head.
  absl::Status DecodeBody(int64_t n, const Tensor& ids, const Tensor& positions, int n_layers, Tensor& residual,
                          Tensor& h, Tensor* logits, const SparseForward* sparse, HiddenCapture* capture);
  // How many leading layers of this forward DecodeStep may record (0: none, run op by op): all of them,
  // or for a sparse step whose last layers are offloaded, the resident layers before them.
  int GraphableLayers(std::span<const ForwardSeq> seqs, int64_t n_tokens, const SparseForward* sparse,
                      const HiddenCapture* capture) const;
  struct DecodeGraphs;  // per batch size: fixed input and logits buffers

  ModelConfig config_;
  Backend* backend_;
  TensorParallel tp_;
  Tensor embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  Tensor inv_freq_;
  RopeArgs rope_;
  std::shared_ptr<DecodeGraphs> graphs_;  // shared: the type is complete only in transformer_graph.cc
};

}  // namespace specontext
