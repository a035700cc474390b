#include "core/runtime/sparse_runtime.h"

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/model/sparse_tensor_parallel.h"
#include "core/sparse/index_sets.h"
#include "core/sparse/selection_source.h"
#include "core/status_macros.h"

namespace specontext {

absl::StatusOr<SparseRuntime> MakeSparseRuntime(const Runtime& rt, const SparseRuntimeOptions& o) {
  if (rt.model == nullptr) return absl::FailedPreconditionError("sparse mode: no model loaded");
  const int64_t context = rt.model->config().max_position_embeddings;
  if (o.budget < 1 || o.budget > context) {
    return absl::InvalidArgumentError(absl::StrCat("--budget must be in [1, ", context,
                                                   "] (the model's context), got ", o.budget));
  }
  if (o.sink < 0 || o.sink > o.budget) {
    return absl::InvalidArgumentError(absl::StrCat("--sink must be in [0, --budget=", o.budget, "], got ", o.sink));
  }
  SparseOptions so;
  so.budget = static_cast<int32_t>(o.budget);
  so.sink = static_cast<int32_t>(o.sink);
  if (o.selection == "head") {
    so.mode = SelectionMode::kHeadLevel;
  } else if (o.selection == "batch") {
    so.mode = SelectionMode::kBatchLevel;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--selection must be head or batch, got \"", o.selection, "\""));
  }
  so.gpu_memory_limit = o.gpu_memory_limit;
  if (absl::Status st = ValidateMaxContext(o.max_context, o.budget, context); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--max-context: ", st.message()));
  }
  so.max_context = static_cast<int32_t>(o.max_context);
  so.step = o.step;
  if (!(o.synthetic_overlap >= 0.0 && o.synthetic_overlap <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("--synthetic-overlap must be in [0, 1], got ", o.synthetic_overlap));
  }
  so.synthetic_overlap = o.synthetic_overlap;
  {
    auto source = ParseSelectionSource(o.selection_source);
    if (!source.ok()) return absl::InvalidArgumentError(absl::StrCat("--selection-source: ", source.status().message()));
    so.source = *source;
  }
  if (o.fallback_mass != 0 && (so.source != SelectionSource::kHead || !(o.fallback_mass > 0 && o.fallback_mass <= 1))) {
    return absl::InvalidArgumentError(absl::StrCat("--fallback-mass must be in (0, 1] and needs --selection-source head, ",
                                                   "got ", o.fallback_mass, " with ", SelectionSourceName(so.source)));
  }
  so.fallback_mass = o.fallback_mass;
  so.recall_observer = o.recall_observer;
  SparseRuntime out;
  // One decoder per tensor-parallel rank, each over its own shard (the head, when there is one, is shared:
  // every decoder uploads its own copy to its rank's backend).
  auto make_decoders = [&]() -> absl::Status {
    std::vector<Transformer*> models = {rt.model.get()};
    for (const auto& m : rt.tp_models) models.push_back(m.get());
    for (Transformer* model : models) {
      RETURN_IF_ERROR(model->backend()->MakeCurrent());  // a rank's decoder works on its rank's GPU
      auto dec = SparseDecoder::Create(model, out.head.get(), so);
      if (!dec.ok()) return absl::Status(dec.status().code(), absl::StrCat("--sparse: ", dec.status().message()));
      std::shared_ptr<SparseDecoder> d(std::move(*dec));
      if (out.decoder == nullptr) {
        out.decoder = std::move(d);
      } else {
        out.tp_decoders.push_back(std::move(d));
      }
    }
    return rt.backend->MakeCurrent();
  };
  if (so.source != SelectionSource::kHead) {
    if (!o.retrieval_head.empty()) {
      SPC_LOG(WARNING) << "--retrieval-head is not used by --selection-source " << SelectionSourceName(so.source);
    }
    RETURN_IF_ERROR(make_decoders());
    return out;
  }
  if (o.retrieval_head.empty()) {
    return absl::InvalidArgumentError("--sparse needs --retrieval-head DIR (write one with `specontext prune`)");
  }
  // The head fits the whole model (under tensor parallelism rt.model's config is rank 0's shard).
  auto head = RetrievalHead::Load(o.retrieval_head, UnshardedConfig(rt.model->config(), rt.model->tensor_parallel()),
                                  rt.checkpoint.weights.get());
  if (!head.ok()) {
    return absl::Status(head.status().code(), absl::StrCat("--retrieval-head: ", head.status().message()));
  }
  out.head = *std::move(head);
  RETURN_IF_ERROR(make_decoders());
  return out;
}

}  // namespace specontext
