// The dense decode step as a replayable graph (Backend::RunStepGraph; CUDA graphs on the GPU).
//
// Per batch size n the model keeps fixed device buffers: the step's token ids and positions (one
// upload before the replay) and its logits. Everything else the step reads that changes between steps
// (sequence lengths, KV pointers, the attention split plan) lives in backend buffers that PrepareBatch
// refreshes, and the decode attention's grid depends on n only, so one recording serves every step
// of that batch size however the sequences grow or which sequences make up the batch.
#include <atomic>
#include <cstring>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/transformer.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

// Graph keys: a model's id in the high bits, the batch size in the low 20 bits.
constexpr int kBatchBits = 20;
constexpr int64_t kMaxGraphBatch = (int64_t{1} << kBatchBits) - 1;

uint64_t NextModelId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}

}  // namespace

struct Transformer::DecodeGraphs {
  struct Bucket {
    Tensor io;      // [2, n] i32: token ids, then positions
    Tensor logits;  // [n, vocab] f32
  };
  uint64_t model_id = NextModelId();
  std::map<int64_t, Bucket> buckets;
};

Transformer::~Transformer() {
  if (graphs_ != nullptr) {
    const uint64_t base = graphs_->model_id << kBatchBits;
    backend_->DropStepGraphs(base, base + (uint64_t{1} << kBatchBits));
  }
}

absl::Status Transformer::DecodeBody(int64_t n, const Tensor& ids, const Tensor& positions, Tensor* logits) {
  const ModelConfig& c = config_;
  Backend& b = *backend_;
  const DType dt = b.compute_dtype();
  ASSIGN_OR_RETURN(Tensor residual, b.Alloc(dt, {n, c.hidden_size}, MemoryKind::kWorkspace));
  ASSIGN_OR_RETURN(Tensor h, b.Alloc(dt, {n, c.hidden_size}, MemoryKind::kWorkspace));
  RETURN_IF_ERROR(b.Embedding(embed_, ids, &residual));
  RETURN_IF_ERROR(b.RmsNorm(residual, layers_[0].input_norm, static_cast<float>(c.rms_norm_eps), &h));
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    RETURN_IF_ERROR(Layer(l, n, residual, h, positions, /*offloaded=*/false, /*sparse=*/nullptr));
  }
  // One token per sequence: the last rows are all rows, no gather.
  return b.Linear(h, lm_head_, nullptr, logits);
}

absl::StatusOr<Tensor> Transformer::DecodeStep(std::span<const int32_t> ids, std::span<const int32_t> positions) {
  Backend& b = *backend_;
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n == 0 || n > kMaxGraphBatch || positions.size() != ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat("decode step: ", n, " ids and ", positions.size(), " positions"));
  }
  if (graphs_ == nullptr) graphs_ = std::make_shared<DecodeGraphs>();
  DecodeGraphs::Bucket& bk = graphs_->buckets[n];
  if (bk.io.empty()) {
    ASSIGN_OR_RETURN(bk.io, b.Alloc(DType::kI32, {2, n}, MemoryKind::kGraphs));
    ASSIGN_OR_RETURN(bk.logits, b.Alloc(DType::kF32, {n, config_.vocab_size}, MemoryKind::kGraphs));
  }
  std::vector<int32_t> host(2 * n);
  std::memcpy(host.data(), ids.data(), sizeof(int32_t) * n);
  std::memcpy(host.data() + n, positions.data(), sizeof(int32_t) * n);
  RETURN_IF_ERROR(b.CopyToDevice(Tensor(host.data(), DType::kI32, {2, n}), &bk.io));
  const Tensor d_ids(bk.io.data(), DType::kI32, {n}, bk.io.device(), bk.io.storage());
  const Tensor d_pos(static_cast<int32_t*>(bk.io.data()) + n, DType::kI32, {n}, bk.io.device(), bk.io.storage());
  const uint64_t key = (graphs_->model_id << kBatchBits) | static_cast<uint64_t>(n);
  RETURN_IF_ERROR(b.RunStepGraph(key, [&] { return DecodeBody(n, d_ids, d_pos, &bk.logits); }));
  return bk.logits;
}

}  // namespace specontext
