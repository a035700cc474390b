#include "retriever/head_runner.h"

#include <cstring>

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

absl::Status HeadRunner::Observe(std::span<const int32_t> ids, std::span<const float> fused, Tensor* cache,
                                 int32_t pos, Tensor* last_q) {
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n == 0) return absl::InvalidArgumentError("observe: no token ids");
  absl::MutexLock lock(&mu_);
  Backend& b = *backend_;
  const DType dt = b.compute_dtype();
  const int64_t nh = head_->n_heads(), hd = head_->head_dim(), fw = head_->fused_width();
  Tensor fused_dev;
  if (fw > 0) {
    if (static_cast<int64_t>(fused.size()) != n * fw) {
      return absl::InvalidArgumentError(absl::StrCat("observe: fused features must hold ", n, " x ", fw, " floats"));
    }
    Tensor host = Tensor::HostEmpty(DType::kF32, {n, fw});
    std::memcpy(host.as<float>(), fused.data(), fused.size() * sizeof(float));
    ASSIGN_OR_RETURN(fused_dev, b.ToDevice(host, dt, MemoryKind::kWorkspace));
  }
  ASSIGN_OR_RETURN(Tensor q, b.Alloc(dt, {n, nh, hd}, MemoryKind::kWorkspace));
  const DeviceRetrievalHead::Seq seq{cache, static_cast<int32_t>(n), pos};
  RETURN_IF_ERROR(head_->Observe(ids, std::span<const DeviceRetrievalHead::Seq>(&seq, 1),
                                 fw > 0 ? &fused_dev : nullptr, &q));
  if (last_q->empty()) {
    ASSIGN_OR_RETURN(*last_q, b.Alloc(dt, {nh, hd}, MemoryKind::kRetrieval));
  }
  ASSIGN_OR_RETURN(Tensor last_row, q.Rows(n - 1, n).Reshape({nh, hd}));
  return b.CopyDevice(last_row, last_q);
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
