#include "core/backend.h"

namespace specontext {

std::string_view MemoryKindName(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kWeights: return "weights";
    case MemoryKind::kKvCache: return "kv_cache";
    case MemoryKind::kWorkspace: return "workspace";
    case MemoryKind::kGraphs: return "graphs";
    case MemoryKind::kRetrieval: return "retrieval";
    case MemoryKind::kPrefetch: return "prefetch";
    case MemoryKind::kOther: return "other";
    case MemoryKind::kCount: break;
  }
  return "?";
}

absl::Status Backend::RopeQk(Tensor* q, Tensor* k, const Tensor& positions, const RopeArgs& rope) {
  const bool adjacent = q->ndim() == 3 && k->ndim() == 3 && q->dim(0) == 1 && k->dim(0) == 1 &&
                        q->dim(2) == k->dim(2) && q->dtype() == k->dtype() && q->device() == k->device() &&
                        static_cast<const char*>(q->data()) + q->nbytes() == static_cast<const char*>(k->data());
  if (adjacent) {
    Tensor qk(q->data(), q->dtype(), {1, q->dim(1) + k->dim(1), q->dim(2)}, q->device(), q->storage());
    return Rope(&qk, positions, rope);
  }
  if (absl::Status st = Rope(q, positions, rope); !st.ok()) return st;
  return Rope(k, positions, rope);
}

}  // namespace specontext
