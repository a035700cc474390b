#include "core/model/sparse_tensor_parallel.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/sparse_decoder.h"
#include "core/status_macros.h"

namespace specontext {

ModelConfig UnshardedConfig(const ModelConfig& shard, const TensorParallel& tp) {
  ModelConfig c = shard;
  c.num_attention_heads *= tp.size;
  c.num_key_value_heads *= tp.size;
  c.intermediate_size *= tp.size;
  return c;
}

absl::Status ValidateSparseTensorParallel(const SparseOptions& o, const TensorParallel& tp) {
  if (tp.size <= 1) return absl::OkStatus();
  auto refuse = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism (", tp.size, " ranks) does not support ", what,
                                                   " in sparse mode yet"));
  };
  if (o.recall_observer) return refuse("the attention recall probe");
  if (o.synthetic_overlap != 0) return refuse("a synthetic overlap (--synthetic-overlap)");
  if (IsPerLayerSource(o.source) && o.mode == SelectionMode::kBatchLevel) {
    return refuse(absl::StrCat("batch-level selection (--selection batch) with --selection-source ",
                               SelectionSourceName(o.source), " (each layer would take its max over one rank's "
                               "query heads only)"));
  }
  return absl::OkStatus();
}

Tensor RankPart(const Tensor& t, const TensorParallel& tp) {
  if (tp.size <= 1) return t;
  Shape shape = t.shape();
  const int64_t part = shape[0] / tp.size;
  const int64_t inner = shape[0] > 0 ? t.numel() / shape[0] : 0;
  shape[0] = part;
  return Tensor(static_cast<char*>(t.data()) + tp.rank * part * inner * DTypeSize(t.dtype()), t.dtype(),
                std::move(shape), t.device(), t.storage());
}

absl::StatusOr<int32_t> AgreeOnGpuLayers(Communicator& comm, Backend& backend, const absl::StatusOr<int32_t>& mine,
                                         Tensor* scratch) {
  const int size = comm.size();
  // Each rank writes its target (or -1 for an error) at its own index, zeros elsewhere: the sum holds every
  // rank's value exactly (small integers in f32) and in the same bits on every rank.
  std::vector<float> values(size, 0.0f);
  values[comm.rank()] = mine.ok() ? static_cast<float>(*mine) : -1.0f;
  Tensor host(values.data(), DType::kF32, {size});
  if (scratch->empty()) {
    ASSIGN_OR_RETURN(*scratch, backend.Alloc(DType::kF32, {size}, MemoryKind::kWorkspace));
  }
  RETURN_IF_ERROR(backend.CopyToDevice(host, scratch));
  RETURN_IF_ERROR(comm.AllReduceSum(scratch));
  RETURN_IF_ERROR(backend.ToHost(*scratch, &host));
  if (!mine.ok()) return mine.status();
  int32_t agreed = *mine;
  for (int r = 0; r < size; ++r) {
    if (values[r] < 0) {
      return absl::ResourceExhaustedError(absl::StrCat("tensor-parallel rank ", r, " found no layer plan that fits "
                                                       "its device memory"));
    }
    agreed = std::min(agreed, static_cast<int32_t>(values[r]));
  }
  return agreed;
}

}  // namespace specontext
