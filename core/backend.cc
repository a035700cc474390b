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

}  // namespace specontext
