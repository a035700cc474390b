#include "core/model/kv_tiers.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

thread_local ScopedHostKvAllocator* current_scope = nullptr;

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

absl::StatusOr<Tensor> AllocHost(Backend& b, HostKvAllocator* host, DType dtype, const Shape& shape) {
  if (host != nullptr) return host->Alloc(b, dtype, shape);
  return b.AllocPinnedHost(dtype, shape, MemoryKind::kKvCache);
}

// The host K and V of one offloaded layer, [n_kv, capacity, d] each or one interleaved pair (SequenceKv
// "Host layout": AllocPinnedHost memory, directly or from an allocator with interleaved_ok).
struct HostTier {
  Tensor k, v;
};

bool Interleaved(const Backend& b, const HostKvAllocator* host) {
  return b.host_kv_interleaved() && (host == nullptr || host->interleaved_ok());
}

// The host tier of `layer` of `kv`: plain, one interleaved pair, or the layer's view of its group's
// allocation (SequenceKv "Host layout"), made by the first layer of the group to leave the device and kept
// alive by the views of those still on the host.
absl::StatusOr<HostTier> AllocHostTier(Backend& b, const SequenceKv& kv, int layer, DType dtype, int64_t n_kv,
                                       int64_t head_dim) {
  HostKvAllocator* host = kv.host_allocator.get();
  const int64_t capacity = kv.capacity;
  HostTier t;
  if (!Interleaved(b, host)) {
    ASSIGN_OR_RETURN(t.k, AllocHost(b, host, dtype, {n_kv, capacity, head_dim}));
    ASSIGN_OR_RETURN(t.v, AllocHost(b, host, dtype, {n_kv, capacity, head_dim}));
    return t;
  }
  const HostLayerGroup g =
      HostLayerGroupOf(static_cast<int32_t>(kv.k.size()), b.host_kv_layer_group(), static_cast<int32_t>(layer));
  if (g.layers == 1) {
    ASSIGN_OR_RETURN(t.k, AllocHost(b, host, dtype, {n_kv, capacity, 2, head_dim}));
    t.v = t.k;
    return t;
  }
  const Shape shape{n_kv, capacity, g.layers, 2, head_dim};
  const int64_t layer_bytes = 2 * head_dim * static_cast<int64_t>(DTypeSize(dtype));  // a layer's K and V row
  for (int l = g.first; l < g.first + g.layers && size_t(l) < kv.host_k.size(); ++l) {
    const Tensor& other = kv.host_k[l];
    if (l == layer || other.empty() || other.shape() != shape || other.dtype() != dtype) continue;
    char* base = static_cast<char*>(other.data()) - (l - g.first) * layer_bytes;
    t.k = Tensor(base + (layer - g.first) * layer_bytes, dtype, shape, other.device(), other.storage());
    t.v = t.k;
    return t;
  }
  ASSIGN_OR_RETURN(Tensor whole, AllocHost(b, host, dtype, shape));
  char* base = static_cast<char*>(whole.data());
  const DeviceKind device = whole.device();
  // The views share one owner of the allocation (its own storage, whatever frees it, inside).
  auto owner = std::make_shared<Tensor>(std::move(whole));
  t.k = Tensor(base + (layer - g.first) * layer_bytes, dtype, shape, device, owner);
  t.v = t.k;
  return t;
}

// Rows [0, rows) of plain k/v into (to_host) or out of a host tier, either layout.
absl::Status CopyTierRows(Backend& b, Tensor* k, Tensor* v, HostTier* tier, int64_t rows, bool to_host) {
  if (IsKvPair(tier->k)) return b.CopyKvPairRows(k, v, &tier->k, rows, to_host);
  if (to_host) {
    RETURN_IF_ERROR(b.CopyHeadRows(*k, &tier->k, rows));
    return b.CopyHeadRows(*v, &tier->v, rows);
  }
  RETURN_IF_ERROR(b.CopyHeadRows(tier->k, k, rows));
  return b.CopyHeadRows(tier->v, v, rows);
}

}  // namespace

ScopedHostKvAllocator::ScopedHostKvAllocator(std::shared_ptr<HostKvAllocator> host)
    : host_(std::move(host)), outer_(current_scope) {
  current_scope = this;
}

ScopedHostKvAllocator::~ScopedHostKvAllocator() { current_scope = outer_; }

std::shared_ptr<HostKvAllocator> ScopedHostKvAllocator::Current() {
  return current_scope != nullptr ? current_scope->host_ : nullptr;
}

absl::StatusOr<std::unique_ptr<SequenceKv>> AllocateTieredKv(Backend& b, const ModelConfig& c, int32_t capacity,
                                                             int32_t gpu_layers, int32_t budget,
                                                             std::shared_ptr<HostKvAllocator> host,
                                                             int32_t device_rows) {
  if (capacity <= 0) return absl::InvalidArgumentError("KV capacity must be positive");
  if (budget <= 0) return absl::InvalidArgumentError(absl::StrCat("slot budget must be positive, got ", budget));
  const int n_layers = static_cast<int>(c.num_hidden_layers);
  if (gpu_layers < 0 || gpu_layers > n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("gpu layers ", gpu_layers, " outside [0, ", n_layers, "]"));
  }
  if (host == nullptr) host = ScopedHostKvAllocator::Current();
  auto kv = std::make_unique<SequenceKv>();
  kv->capacity = capacity;
  kv->slot_budget = budget;
  kv->host_allocator = host;
  kv->k.resize(n_layers);
  kv->v.resize(n_layers);
  EnsureTierVectors(kv.get());
  if (device_rows < 0) return absl::InvalidArgumentError(absl::StrCat("device rows must be >= 0, got ", device_rows));
  const int32_t rows = device_rows == 0 ? capacity : std::min(device_rows, capacity);
  const Shape device_shape{c.num_key_value_heads, rows, c.head_dim};
  for (int l = 0; l < n_layers; ++l) {
    if (l < gpu_layers) {
      ASSIGN_OR_RETURN(kv->k[l], b.Alloc(b.compute_dtype(), device_shape, MemoryKind::kKvCache));
      ASSIGN_OR_RETURN(kv->v[l], b.Alloc(b.compute_dtype(), device_shape, MemoryKind::kKvCache));
    } else {
      ASSIGN_OR_RETURN(HostTier t, AllocHostTier(b, *kv, l, b.compute_dtype(), c.num_key_value_heads, c.head_dim));
      kv->host_k[l] = std::move(t.k);
      kv->host_v[l] = std::move(t.v);
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
  ASSIGN_OR_RETURN(HostTier t, AllocHostTier(b, *kv, layer, dk.dtype(), dk.dim(0), dk.dim(2)));
  RETURN_IF_ERROR(CopyTierRows(b, &kv->k[layer], &kv->v[layer], &t, dk.dim(1), /*to_host=*/true));
  RETURN_IF_ERROR(b.Synchronize());  // the host copies are complete before the device KV is dropped
  const Shape shape{dk.dim(0), budget, dk.dim(2)};
  ASSIGN_OR_RETURN(Tensor sk, b.Alloc(dk.dtype(), shape, MemoryKind::kPrefetch));
  ASSIGN_OR_RETURN(Tensor sv, b.Alloc(dk.dtype(), shape, MemoryKind::kPrefetch));
  kv->host_k[layer] = t.k;
  kv->host_v[layer] = t.v;
  kv->slot_k[layer] = std::move(sk);
  kv->slot_v[layer] = std::move(sv);
  kv->slot_budget = budget;
  kv->k[layer] = std::move(t.k);  // drops the last reference to the device KV: its memory is freed
  kv->v[layer] = std::move(t.v);
  return absl::OkStatus();
}

absl::Status MoveLayerToDevice(Backend& b, SequenceKv* kv, int layer, int32_t rows) {
  if (layer < 0 || layer >= static_cast<int>(kv->k.size())) {
    return absl::InvalidArgumentError(absl::StrCat("move to device: no layer ", layer));
  }
  if (!kv->offloaded(layer)) return absl::OkStatus();
  if (rows <= 0 || rows > kv->capacity) {
    return absl::InvalidArgumentError(absl::StrCat("move to device: ", rows, " rows outside [1, ", kv->capacity, "]"));
  }
  HostTier t{kv->host_k[layer], kv->host_v[layer]};
  const KvRowsView hr = KvRowsOf(t.k, t.v);
  const Shape shape{hr.heads, rows, hr.head_dim};
  ASSIGN_OR_RETURN(Tensor dk, b.Alloc(t.k.dtype(), shape, MemoryKind::kKvCache));
  ASSIGN_OR_RETURN(Tensor dv, b.Alloc(t.k.dtype(), shape, MemoryKind::kKvCache));
  RETURN_IF_ERROR(CopyTierRows(b, &dk, &dv, &t, rows, /*to_host=*/false));
  // The host blocks may be reused as soon as they are dropped (PinnedHostCache): the copies finish first.
  RETURN_IF_ERROR(b.Synchronize());
  kv->k[layer] = std::move(dk);
  kv->v[layer] = std::move(dv);
  kv->host_k[layer] = Tensor();
  kv->host_v[layer] = Tensor();
  kv->slot_k[layer] = Tensor();
  kv->slot_v[layer] = Tensor();
  return absl::OkStatus();
}

absl::Status AdoptHostTier(Backend& b, SequenceKv* kv, std::shared_ptr<HostKvAllocator> host, int32_t rows) {
  if (host == nullptr) return absl::InvalidArgumentError("adopt host tier: no allocator");
  if (rows < 0 || rows > kv->capacity) {
    return absl::InvalidArgumentError(absl::StrCat("adopt host tier: ", rows, " rows outside [0, ", kv->capacity, "]"));
  }
  // New tensors for every offloaded layer first, so a failure leaves `kv` as it was.
  std::vector<std::pair<Tensor, Tensor>> fresh(kv->host_k.size());
  for (size_t l = 0; l < kv->host_k.size(); ++l) {
    if (!kv->offloaded(static_cast<int>(l))) continue;
    const KvRowsView old = KvRowsOf(kv->host_k[l], kv->host_v[l]);
    const Shape shape{old.heads, old.rows, old.head_dim};
    ASSIGN_OR_RETURN(fresh[l].first, host->Alloc(b, kv->host_k[l].dtype(), shape));
    ASSIGN_OR_RETURN(fresh[l].second, host->Alloc(b, kv->host_k[l].dtype(), shape));
  }
  // Earlier appends (CUDA: kernels writing the mapped rows) must be done before the host reads them.
  if (rows > 0) RETURN_IF_ERROR(b.Synchronize());
  for (size_t l = 0; l < kv->host_k.size(); ++l) {
    if (fresh[l].first.empty()) continue;
    const KvRowsView from = KvRowsOf(kv->host_k[l], kv->host_v[l]);
    const int64_t es = static_cast<int64_t>(DTypeSize(kv->host_k[l].dtype())), row_bytes = from.head_dim * es;
    for (int pass = 0; pass < 2; ++pass) {
      const char* src = static_cast<const char*>(pass == 0 ? from.k : from.v);
      char* to = static_cast<char*>((pass == 0 ? fresh[l].first : fresh[l].second).data());
      for (int64_t h = 0; h < from.heads && rows > 0; ++h) {
        for (int64_t r = 0; r < rows; ++r) {
          std::memcpy(to + (h * from.rows + r) * row_bytes, src + (h * from.rows + r) * from.stride * es, row_bytes);
        }
      }
    }
    kv->host_k[l] = fresh[l].first;
    kv->host_v[l] = fresh[l].second;
    kv->k[l] = std::move(fresh[l].first);  // the old host copies are freed with their last reference
    kv->v[l] = std::move(fresh[l].second);
  }
  kv->host_allocator = std::move(host);
  return absl::OkStatus();
}

HostLayerGroup HostLayerGroupOf(int32_t n_layers, int32_t group, int32_t layer) {
  if (group <= 1 || layer < 0 || layer >= n_layers) return {layer, 1};
  const int32_t from_end = (n_layers - 1 - layer) / group;  // 0 for the group holding the last layer
  const int32_t end = n_layers - from_end * group;
  const int32_t first = std::max(0, end - group);
  return {first, end - first};
}

std::vector<int64_t> HostAllocationBytes(const Backend& b, const ModelConfig& c, int32_t capacity,
                                         int32_t gpu_layers) {
  const int32_t n_layers = static_cast<int32_t>(c.num_hidden_layers);
  const int64_t row_bytes = c.head_dim * static_cast<int64_t>(DTypeSize(b.compute_dtype()));
  const int64_t tensor = c.num_key_value_heads * int64_t{capacity} * row_bytes;  // K or V of one layer
  std::vector<int64_t> out;
  for (int32_t l = std::max(gpu_layers, 0); l < n_layers;) {
    if (!b.host_kv_interleaved()) {
      out.insert(out.end(), {tensor, tensor});
      ++l;
      continue;
    }
    const HostLayerGroup g = HostLayerGroupOf(n_layers, b.host_kv_layer_group(), l);
    out.push_back(2 * tensor * g.layers);
    l = g.first + g.layers;
  }
  return out;
}

int32_t DeviceRowsFor(int32_t needed, int32_t capacity, int32_t grow_rows) {
  if (grow_rows <= 0 || needed >= capacity) return capacity;
  const int64_t rounded = (std::max<int64_t>(needed, 1) + grow_rows - 1) / grow_rows * int64_t{grow_rows};
  return static_cast<int32_t>(std::min<int64_t>(rounded, capacity));
}

int32_t DeviceRowsOf(const SequenceKv& kv) {
  for (size_t l = 0; l < kv.k.size(); ++l) {
    if (!kv.offloaded(static_cast<int>(l)) && kv.k[l].ndim() == 3) return static_cast<int32_t>(kv.k[l].dim(1));
  }
  return 0;
}

absl::Status GrowHeadRows(Backend& b, Tensor* t, int64_t rows, MemoryKind kind) {
  if (t == nullptr || t->ndim() != 3) return absl::InvalidArgumentError("grow rows: not a [heads, rows, d] tensor");
  if (t->dim(1) >= rows) return absl::OkStatus();
  ASSIGN_OR_RETURN(Tensor grown, b.Alloc(t->dtype(), {t->dim(0), rows, t->dim(2)}, kind));
  RETURN_IF_ERROR(b.CopyHeadRows(*t, &grown, t->dim(1)));
  *t = std::move(grown);  // the old storage is freed with its last reference (after the copy, by stream order)
  return absl::OkStatus();
}

absl::Status GrowDeviceKv(Backend& b, SequenceKv* kv, int32_t rows) {
  if (rows < 0 || rows > kv->capacity) {
    return absl::InvalidArgumentError(absl::StrCat("grow KV: ", rows, " rows outside [0, ", kv->capacity, "]"));
  }
  for (size_t l = 0; l < kv->k.size(); ++l) {
    if (kv->offloaded(static_cast<int>(l))) continue;
    RETURN_IF_ERROR(GrowHeadRows(b, &kv->k[l], rows, MemoryKind::kKvCache));
    RETURN_IF_ERROR(GrowHeadRows(b, &kv->v[l], rows, MemoryKind::kKvCache));
  }
  return absl::OkStatus();
}

int32_t GpuLayersOf(const SequenceKv& kv) {
  for (size_t l = 0; l < kv.k.size(); ++l) {
    if (kv.offloaded(static_cast<int>(l))) return static_cast<int32_t>(l);
  }
  return static_cast<int32_t>(kv.k.size());
}

}  // namespace specontext
