#include "core/model/pass_outputs.h"

#include <cstring>

#include "core/status_macros.h"

namespace specontext {
namespace {

// A view of `t`'s storage from element `offset` with `shape` (no copy).
Tensor View(const Tensor& t, int64_t offset, Shape shape) {
  return Tensor(static_cast<char*>(t.data()) + offset * DTypeSize(t.dtype()), t.dtype(), std::move(shape), t.device(),
                t.storage());
}

}  // namespace

Tensor PassLogits::Target(const Tensor& logits, int64_t n_part, int64_t n_all, int64_t vocab, bool device) {
  if (device) return Tensor();
  if (n_part == n_all) return logits;
  if (host_.empty() || host_.dim(0) < n_part || host_.dim(1) != vocab) {
    host_ = Tensor::HostEmpty(DType::kF32, {n_all, vocab});
  }
  return Tensor(host_.data(), DType::kF32, {n_part, vocab});
}

absl::Status PassLogits::Place(Backend& b, const Tensor& out, std::span<const size_t> rows, int64_t n_all,
                               bool device, Tensor* logits) {
  const int64_t n_part = static_cast<int64_t>(rows.size());
  if (n_part == n_all) {
    if (device) *logits = out;  // host: the pass wrote the step's logits directly
    return absl::OkStatus();
  }
  const int64_t vocab = out.dim(1);
  if (!device) {
    for (int64_t j = 0; j < n_part; ++j) {
      std::memcpy(logits->as<float>() + static_cast<int64_t>(rows[j]) * vocab, out.as<float>() + j * vocab,
                  vocab * sizeof(float));
    }
    return absl::OkStatus();
  }
  // The pass's device logits live until the next forward: its rows go to their place in one buffer.
  if (device_.empty() || device_.dim(0) < n_all || device_.dim(1) != vocab) {
    ASSIGN_OR_RETURN(device_, b.Alloc(DType::kF32, {n_all, vocab}, MemoryKind::kWorkspace));
  }
  for (int64_t j = 0; j < n_part; ++j) {
    Tensor dst = View(device_, static_cast<int64_t>(rows[j]) * vocab, {1, vocab});
    RETURN_IF_ERROR(b.CopyDevice(View(out, j * vocab, {1, vocab}), &dst));
  }
  *logits = View(device_, 0, {n_all, vocab});
  return absl::OkStatus();
}

absl::Status PrepareDeviceCapture(Backend& b, int64_t n_tokens, int64_t width, Tensor* buffer,
                                  HiddenCapture* capture) {
  capture->on_device = true;
  if (buffer->empty() || buffer->dim(0) < n_tokens || buffer->dim(1) != width) {
    ASSIGN_OR_RETURN(*buffer, b.Alloc(b.compute_dtype(), {n_tokens, width}, MemoryKind::kWorkspace));
  }
  capture->out = View(*buffer, 0, {n_tokens, width});
  return absl::OkStatus();
}

absl::Status SparseForwardInto(Transformer& model, std::span<const ForwardSeq> part, bool device, SparseForward& sf,
                               HiddenCapture* capture, Tensor* out,
                               std::vector<const CopyList*>* copies_scratch) {
  absl::Status st;
  if (device) {
    absl::StatusOr<Tensor> d = model.ForwardDevice(part, /*all_tokens=*/false, &sf, capture);
    st = d.status();
    if (d.ok()) *out = *std::move(d);
  } else {
    st = model.Forward(part, /*all_tokens=*/false, out, &sf, capture);
  }
  if (!sf.layer_copies.empty()) *copies_scratch = std::move(sf.layer_copies);
  return st;
}

}  // namespace specontext
