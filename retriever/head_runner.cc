#include "retriever/head_runner.h"

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace specontext::retriever {

absl::StatusOr<std::unique_ptr<HeadRunner>> HeadRunner::Create(const RetrievalHead& head,
                                                                std::unique_ptr<Backend> backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("head runner: no backend");
  std::unique_ptr<HeadRunner> r(new HeadRunner());
  absl::MutexLock lock(&r->mu_);
  ASSIGN_OR_RETURN(r->head_, DeviceRetrievalHead::Create(head, backend.get()));
  r->backend_name_ = backend->name();
  r->compute_dtype_ = backend->compute_dtype();
  r->backend_ = std::move(backend);
  return r;
}

HeadRunner::~HeadRunner() {
  absl::MutexLock lock(&mu_);
  head_.reset();  // its weights belong to the backend: freed first
  backend_.reset();
}

int64_t HeadRunner::element_bytes() const { return static_cast<int64_t>(DTypeSize(compute_dtype_)); }

absl::Status HeadRunner::Grow(Tensor* cache, int64_t rows) {
  if (!cache->empty() && cache->dim(1) >= rows) return absl::OkStatus();
  if (rows < 1 || rows > INT32_MAX) return absl::InvalidArgumentError(absl::StrCat("grow: ", rows, " rows"));
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Tensor grown, head_->AllocateCache(static_cast<int32_t>(rows)));
  // As the sparse decoder grows its caches (GrowHeadRows): the old storage goes with its last reference,
  // after the copy by stream order.
  if (!cache->empty()) RETURN_IF_ERROR(backend_->CopyHeadRows(*cache, &grown, cache->dim(1)));
  *cache = std::move(grown);
  return absl::OkStatus();
}

absl::Status HeadRunner::Observe(std::span<const ObserveSeq> batch) {
  if (batch.empty()) return absl::InvalidArgumentError("observe: no sequences");
  const int64_t fw = head_->fused_width();
  int64_t n = 0;
  for (const ObserveSeq& o : batch) {
    if (o.ids.empty()) return absl::InvalidArgumentError("observe: no token ids");
    if (fw > 0 && static_cast<int64_t>(o.fused.size()) != static_cast<int64_t>(o.ids.size()) * fw) {
      return absl::InvalidArgumentError(
          absl::StrCat("observe: fused features must hold ", o.ids.size(), " x ", fw, " floats"));
    }
    n += static_cast<int64_t>(o.ids.size());
  }
  // The batch's ids (and fused rows) in batch order, as DeviceRetrievalHead::Observe takes them.
  std::vector<int32_t> ids;
  ids.reserve(n);
  std::vector<DeviceRetrievalHead::Seq> seqs;
  seqs.reserve(batch.size());
  Tensor host_fused;
  if (fw > 0) host_fused = Tensor::HostEmpty(DType::kF32, {n, fw});
  for (const ObserveSeq& o : batch) {
    if (fw > 0) {
      std::memcpy(host_fused.as<float>() + static_cast<int64_t>(ids.size()) * fw, o.fused.data(),
                  o.fused.size() * sizeof(float));
    }
    ids.insert(ids.end(), o.ids.begin(), o.ids.end());
    seqs.push_back({o.cache, static_cast<int32_t>(o.ids.size()), o.pos});
  }
  absl::MutexLock lock(&mu_);
  Backend& b = *backend_;
  const DType dt = b.compute_dtype();
  const int64_t nh = head_->n_heads(), hd = head_->head_dim();
  Tensor fused_dev;
  if (fw > 0) {
    ASSIGN_OR_RETURN(fused_dev, b.ToDevice(host_fused, dt, MemoryKind::kWorkspace));
  }
  ASSIGN_OR_RETURN(Tensor q, b.Alloc(dt, {n, nh, hd}, MemoryKind::kWorkspace));
  RETURN_IF_ERROR(head_->Observe(ids, seqs, fw > 0 ? &fused_dev : nullptr, &q));
  int64_t end = 0;
  for (const ObserveSeq& o : batch) {
    end += static_cast<int64_t>(o.ids.size());
    if (o.last_q->empty()) {
      ASSIGN_OR_RETURN(*o.last_q, b.Alloc(dt, {nh, hd}, MemoryKind::kRetrieval));
    }
    ASSIGN_OR_RETURN(Tensor last_row, q.Rows(end - 1, end).Reshape({nh, hd}));
    RETURN_IF_ERROR(b.CopyDevice(last_row, o.last_q));
  }
  return absl::OkStatus();
}

absl::StatusOr<SelectionResult> HeadRunner::Select(std::span<const SelectionQuery> batch,
                                                   const SelectionOptions& options) {
  SelectionResult out;
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(backend_->SelectIndexSets(batch.data(), batch.size(), options, &out));
  return out;
}

void HeadRunner::Release(std::vector<Tensor> tensors) {
  absl::MutexLock lock(&mu_);
  tensors.clear();
}

}  // namespace specontext::retriever
