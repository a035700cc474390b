#include "core/model/kv_tiers.h"

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

absl::Status AllocSlots(Backend& b, SequenceKv* kv, int layer, int64_t n_kv, int64_t hd, int32_t budget) {
  const Shape shape{n_kv, budget, hd};
  ASSIGN_OR_RETURN(kv->slot_k[layer], b.Alloc(b.compute_dtype(), shape, MemoryKind::kPrefetch));
  ASSIGN_OR_RETURN(kv->slot_v[layer], b.Alloc(b.compute_dtype(), shape, MemoryKind::kPrefetch));
  return absl::OkStatus();
}

void EnsureTierVectors(SequenceKv* kv) {
  const size_t n = kv->k.size();
  kv->host_k.resize(n);
  kv->host_v.resize(n);
  kv->slot_k.resize(n);
  kv->slot_v.resize(n);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateTieredKv(Backend& b, const ModelConfig& c, int32_t capacity,
                                                             int32_t gpu_layers, int32_t budget) {
  if (capacity <= 0) return absl::InvalidArgumentError("KV capacity must be positive");
  if (budget <= 0) return absl::InvalidArgumentError(absl::StrCat("slot budget must be positive, got ", budget));
  const int n_layers = static_cast<int>(c.num_hidden_layers);
  if (gpu_layers < 0 || gpu_layers > n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("gpu layers ", gpu_layers, " outside [0, ", n_layers, "]"));
  }
  auto kv = std::make_unique<SequenceKv>();
  kv->capacity = capacity;
  kv->slot_budget = budget;
  kv->k.resize(n_layers);
  kv->v.resize(n_layers);
  EnsureTierVectors(kv.get());
  const Shape shape{c.num_key_value_heads, capacity, c.head_dim};
  for (int l = 0; l < n_layers; ++l) {
    if (l < gpu_layers) {
      ASSIGN_OR_RETURN(kv->k[l], b.Alloc(b.compute_dtype(), shape, MemoryKind::kKvCache));
      ASSIGN_OR_RETURN(kv->v[l], b.Alloc(b.compute_dtype(), shape, MemoryKind::kKvCache));
    } else {
      ASSIGN_OR_RETURN(kv->host_k[l], b.AllocPinnedHost(b.compute_dtype(), shape, MemoryKind::kKvCache));
      ASSIGN_OR_RETURN(kv->host_v[l], b.AllocPinnedHost(b.compute_dtype(), shape, MemoryKind::kKvCache));
      kv->k[l] = kv->host_k[l];
      kv->v[l] = kv->host_v[l];
      RETURN_IF_ERROR(AllocSlots(b, kv.get(), l, c.num_key_value_heads, c.head_dim, budget));
    }
  }
  return kv;
}

absl::Status MoveLayerToHost(Backend& b, SequenceKv* kv, int layer, int32_t budget) {
  if (layer < 0 || layer >= static_cast<int>(kv->k.size())) {
    return absl::InvalidArgumentError(absl::StrCat("move to host: no layer ", layer));
  }
  if (kv->offloaded(layer)) return absl::OkStatus();
  EnsureTierVectors(kv);
  const Tensor& dk = kv->k[layer];
  // Allocate everything first so a failure leaves the layer resident and intact.
  ASSIGN_OR_RETURN(Tensor hk, b.AllocPinnedHost(dk.dtype(), dk.shape(), MemoryKind::kKvCache));
  ASSIGN_OR_RETURN(Tensor hv, b.AllocPinnedHost(dk.dtype(), dk.shape(), MemoryKind::kKvCache));
  RETURN_IF_ERROR(b.CopyToPinnedHost(kv->k[layer], &hk));
  RETURN_IF_ERROR(b.CopyToPinnedHost(kv->v[layer], &hv));
  const Shape shape{dk.dim(0), budget, dk.dim(2)};
  ASSIGN_OR_RETURN(Tensor sk, b.Alloc(dk.dtype(), shape, MemoryKind::kPrefetch));
  ASSIGN_OR_RETURN(Tensor sv, b.Alloc(dk.dtype(), shape, MemoryKind::kPrefetch));
  kv->host_k[layer] = hk;
  kv->host_v[layer] = hv;
  kv->slot_k[layer] = std::move(sk);
  kv->slot_v[layer] = std::move(sv);
  kv->slot_budget = budget;
  kv->k[layer] = std::move(hk);  // drops the last reference to the device KV: its memory is freed
  kv->v[layer] = std::move(hv);
  return absl::OkStatus();
}

int32_t GpuLayersOf(const SequenceKv& kv) {
  for (size_t l = 0; l < kv.k.size(); ++l) {
    if (kv.offloaded(static_cast<int>(l))) return static_cast<int32_t>(l);
  }
  return static_cast<int32_t>(kv.k.size());
}

}  // namespace specontext
