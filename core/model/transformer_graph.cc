// The dense decode step as a replayable graph (Backend::RunStepGraph; CUDA graphs on the GPU).
//
// Per batch size n the model keeps fixed device buffers: the step's token ids and positions (one
// upload before the replay) and its logits. Everything else the step reads that changes between steps
// (sequence lengths, KV pointers, the attention split plan) lives in backend buffers that PrepareBatch
// refreshes, and the decode attention's grid depends on n only, so one recording serves every step
// of that batch size however the sequences grow or which sequences make up the batch.
//
// Sparse decode steps (SparseDecoder, every layer resident) are recorded too, one graph per (batch
// size, variant, recorded layers): the index sets of the step go up in PrepareSparseDecode before the replay, into a
// backend buffer the graph reads, and the sparse attention's plan depends on the set sizes only (fixed
// once every past exceeds its budget); keys carry Backend::kStepGraphSparse so that the backend re-records
// when that state moves. A step with an offloaded layer (host appends, elastic loads on the copy stream)
// is two recordings: the resident layers before them (the tiers offload from the last layer backward) as a
// prefix graph that leaves the residual stream in fixed buffers, then (after the host has planned and
// enqueued the step's elastic loads, SparseForward::before_offloaded) the offloaded layers and the LM head
// as a suffix graph whose loads' waits are external event nodes. An
// on-device hidden capture (EAGLE-3 heads) is recorded into the caller's buffer, whose
// address the bucket remembers: another buffer drops the graph.
#include <atomic>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/transformer.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

// Graph keys: Backend::kStepGraphSparse for sparse variants, a model's id above bit 40, the recorded
// layer count in bits 28..39, the variant in bits 20..27, the batch size in the low 20 bits.
constexpr int kBatchBits = 20;
constexpr int kVariantBits = 8;
constexpr int kLayerShift = kBatchBits + kVariantBits;
constexpr int kModelShift = kLayerShift + 12;
constexpr int64_t kMaxGraphBatch = (int64_t{1} << kBatchBits) - 1;

// Variant bits: what the recorded body does besides the dense decode step.
enum : uint32_t {
  kVariantSparse = 1,          // SparseForward given
  kVariantDenseAttention = 2,  // ... with dense_attention
  kVariantDenseResident = 4,   // ... with dense_resident_layers
  kVariantCapture = 8,         // on-device hidden capture
  kVariantSuffix = 16,         // the offloaded layers after a prefix recording, and the LM head
};

uint64_t NextModelId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}

uint32_t VariantOf(const SparseForward* sparse, const HiddenCapture* capture) {
  uint32_t v = 0;
  if (sparse != nullptr) {
    v |= kVariantSparse;
    if (sparse->dense_attention) v |= kVariantDenseAttention;
    if (sparse->dense_resident_layers) v |= kVariantDenseResident;
  }
  if (capture != nullptr) v |= kVariantCapture;
  return v;
}

}  // namespace

struct Transformer::DecodeGraphs {
  struct Bucket {
    Tensor io;      // [2, n] i32: token ids, then positions
    Tensor logits;  // [n, vocab] f32
    Tensor residual, h;  // prefix recordings: [n, hidden], the residual stream and the normed input
    // Capture variants: the capture the graph writes (layers, output address); another one re-records.
    std::vector<int32_t> capture_layers;
    const void* capture_out = nullptr;
  };
  uint64_t model_id = NextModelId();
  std::map<std::tuple<uint32_t, int, int64_t>, Bucket> buckets;  // (variant, recorded layers, batch size)
};

Transformer::~Transformer() {
  if (graphs_ != nullptr) {
    const uint64_t base = graphs_->model_id << kModelShift, end = base + (uint64_t{1} << kModelShift);
    backend_->DropStepGraphs(base, end);
    backend_->DropStepGraphs(base | Backend::kStepGraphSparse, end | Backend::kStepGraphSparse);
  }
}

int Transformer::GraphableLayers(std::span<const ForwardSeq> seqs, int64_t n_tokens, const SparseForward* sparse,
                                 const HiddenCapture* capture) const {
  const int n_layers = config_.num_hidden_layers;
  // Tensor-parallel steps run op by op (no collective inside a recorded graph yet).
  if (tp_.size > 1 || !backend_->step_graphs() || n_tokens != static_cast<int64_t>(seqs.size()) || n_tokens > kMaxGraphBatch) {
    return 0;
  }
  // Offloaded layers wait for elastic loads the host enqueues between the two recordings (DecodeStep's
  // suffix). The tiers move layers to host from the last one backward, so the resident ones form a prefix.
  int resident = n_layers;
  while (resident > 0 && seqs.front().kv->offloaded(resident - 1)) --resident;
  for (const ForwardSeq& s : seqs) {
    for (int l = 0; l < n_layers; ++l) {
      if (s.kv->offloaded(l) != (l >= resident)) return 0;
    }
  }
  if (resident < n_layers && sparse == nullptr) return 0;  // dense steps: whole graphs only
  // The evaluation hooks (per-layer selection, recall probe) run op by op.
  if (sparse != nullptr && (sparse->layer_selection != nullptr || sparse->recall_lse != nullptr)) return 0;
  if (sparse != nullptr) {
    for (size_t l = 0; l < sparse->layer_copies.size(); ++l) {
      if (sparse->layer_copies[l] != nullptr && static_cast<int>(l) < resident) return 0;
    }
  }
  if (capture != nullptr) {
    // The graph writes a capture buffer the caller owns and keeps (it must not be allocated inside).
    const int64_t width = static_cast<int64_t>(capture->layers.size()) * config_.hidden_size;
    if (!capture->on_device || capture->out.shape() != Shape{n_tokens, width} ||
        capture->out.dtype() != backend_->compute_dtype()) {
      return 0;
    }
  }
  return resident;
}

absl::Status Transformer::DecodeBody(int64_t n, const Tensor& ids, const Tensor& positions, int n_layers,
                                     Tensor& residual, Tensor& h, Tensor* logits, const SparseForward* sparse,
                                     HiddenCapture* capture) {
  const ModelConfig& c = config_;
  Backend& b = *backend_;
  RETURN_IF_ERROR(b.Embedding(embed_, ids, &residual));
  RETURN_IF_ERROR(b.RmsNorm(residual, layers_[0].input_norm, static_cast<float>(c.rms_norm_eps), &h));
  for (int l = 0; l < n_layers; ++l) {
    if (capture != nullptr) RETURN_IF_ERROR(Capture(l, n, residual, capture));
    RETURN_IF_ERROR(Layer(l, n, residual, h, positions, /*offloaded=*/false, sparse));
  }
  if (logits == nullptr) return absl::OkStatus();
  if (capture != nullptr) RETURN_IF_ERROR(Capture(c.num_hidden_layers, n, residual, capture));
  // One token per sequence: the last rows are all rows, no gather.
  return b.Linear(h, lm_head_, nullptr, logits);
}

absl::StatusOr<Tensor> Transformer::DecodeStep(std::span<const int32_t> ids, std::span<const int32_t> positions,
                                               const SparseForward* sparse, HiddenCapture* capture,
                                               int graph_layers) {
  Backend& b = *backend_;
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n == 0 || n > kMaxGraphBatch || positions.size() != ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat("decode step: ", n, " ids and ", positions.size(), " positions"));
  }
  const int n_layers = c.num_hidden_layers;
  if (graph_layers < 0 || graph_layers > n_layers) graph_layers = n_layers;
  if (graph_layers == 0) return absl::InvalidArgumentError("decode step: no layer to record");
  const bool whole = graph_layers == n_layers;
  if (graphs_ == nullptr) graphs_ = std::make_shared<DecodeGraphs>();
  const uint32_t variant = VariantOf(sparse, capture);
  // A prefix recording is its own graph: the layer count goes into the key (whole: n_layers, never reused
  // by a prefix since a prefix is shorter).
  uint64_t key = (graphs_->model_id << kModelShift) | (uint64_t(graph_layers) << kLayerShift) |
                 (uint64_t{variant} << kBatchBits) | static_cast<uint64_t>(n);
  // Sparse attention reads the backend's prepared sparse state (dense attention variants do not).
  if (sparse != nullptr && !(sparse->dense_attention)) key |= Backend::kStepGraphSparse;
  DecodeGraphs::Bucket& bk = graphs_->buckets[{variant, graph_layers, n}];
  if (bk.io.empty()) {
    ASSIGN_OR_RETURN(bk.io, b.Alloc(DType::kI32, {2, n}, MemoryKind::kGraphs));
    ASSIGN_OR_RETURN(bk.logits, b.Alloc(DType::kF32, {n, c.vocab_size}, MemoryKind::kGraphs));
    if (!whole) {
      // The residual stream goes from the prefix recording to the suffix: fixed buffers outside both pools.
      ASSIGN_OR_RETURN(bk.residual, b.Alloc(b.compute_dtype(), {n, c.hidden_size}, MemoryKind::kGraphs));
      ASSIGN_OR_RETURN(bk.h, b.Alloc(b.compute_dtype(), {n, c.hidden_size}, MemoryKind::kGraphs));
    }
  }
  if (capture != nullptr && (bk.capture_layers != capture->layers || bk.capture_out != capture->out.data())) {
    // The recording wrote another buffer (or other layers): forget it (and its suffix), the next run
    // records again.
    b.DropStepGraphs(key, key + 1);
    const uint64_t suffix = key | (uint64_t{kVariantSuffix} << kBatchBits);
    b.DropStepGraphs(suffix, suffix + 1);
    bk.capture_layers = capture->layers;
    bk.capture_out = capture->out.data();
  }
  std::vector<int32_t> host(2 * n);
  std::memcpy(host.data(), ids.data(), sizeof(int32_t) * n);
  std::memcpy(host.data() + n, positions.data(), sizeof(int32_t) * n);
  RETURN_IF_ERROR(b.CopyToDevice(Tensor(host.data(), DType::kI32, {2, n}), &bk.io));
  const Tensor d_ids(bk.io.data(), DType::kI32, {n}, bk.io.device(), bk.io.storage());
  const Tensor d_pos(static_cast<int32_t*>(bk.io.data()) + n, DType::kI32, {n}, bk.io.device(), bk.io.storage());
  if (whole) {
    RETURN_IF_ERROR(b.RunStepGraph(key, [&]() -> absl::Status {
      const DType dt = b.compute_dtype();
      ASSIGN_OR_RETURN(Tensor residual, b.Alloc(dt, {n, c.hidden_size}, MemoryKind::kWorkspace));
      ASSIGN_OR_RETURN(Tensor h, b.Alloc(dt, {n, c.hidden_size}, MemoryKind::kWorkspace));
      return DecodeBody(n, d_ids, d_pos, n_layers, residual, h, &bk.logits, sparse, capture);
    }));
    return bk.logits;
  }
  RETURN_IF_ERROR(b.RunStepGraph(key, [&] {
    return DecodeBody(n, d_ids, d_pos, graph_layers, bk.residual, bk.h, nullptr, sparse, capture);
  }));
  RETURN_IF_ERROR(BeginOffloadedLayers(sparse));  // the host plans while the recorded layers run
  // The offloaded layers and the LM head: a second recording (its own key), whose loads' waits are external
  // event nodes on the loads just enqueued.
  RETURN_IF_ERROR(DecodeSuffix(key | (uint64_t{kVariantSuffix} << kBatchBits), n, graph_layers, d_pos, bk.residual,
                               bk.h, &bk.logits, sparse, capture));
  return bk.logits;
}

absl::Status Transformer::DecodeSuffix(uint64_t key, int64_t n, int first_layer, const Tensor& positions,
                                       Tensor& residual, Tensor& h, Tensor* logits, const SparseForward* sparse,
                                       HiddenCapture* capture) {
  Backend& b = *backend_;
  const int n_layers = config_.num_hidden_layers;
  return b.RunStepGraph(key, [&]() -> absl::Status {
    for (int l = first_layer; l < n_layers; ++l) {
      if (capture != nullptr) RETURN_IF_ERROR(Capture(l, n, residual, capture));
      RETURN_IF_ERROR(Layer(l, n, residual, h, positions, /*offloaded=*/true, sparse));
    }
    if (capture != nullptr) RETURN_IF_ERROR(Capture(n_layers, n, residual, capture));
    return b.Linear(h, lm_head_, nullptr, logits);
  });
}

}  // namespace specontext
