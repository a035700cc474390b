// Token selection on the GPU over f32 logits [batch, vocab]: greedy argmax and
// temperature / top-k / top-p sampling with a per-row seed. Runs on the backend's compute stream;
// results stay on the device (copy them with Backend::ToHost).
//
// Semantics per row: temperature <= 0 is greedy (argmax, lowest index on ties). Otherwise logits
// are divided by the temperature; top_k > 0 keeps the k largest (ties at the k-th value are all
// kept); top_p < 1 then keeps the smallest set of largest-probability tokens whose mass (within
// the top-k set) reaches top_p; one token is drawn from the kept set in proportion to
// exp(logit / T). The draw is a pure function of (seed, step, logits): replaying a step with the
// same seed and step gives the same token.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/cuda/row_sampling.h"

namespace specontext {


// out[b] = argmax_v logits[b, v].  logits [batch, vocab] f32, out [batch] i32, both on `backend`
// (a CUDA backend).
absl::Status CudaArgmax(Backend& backend, const Tensor& logits, Tensor* out);

// Samples with per-row parameters; owns a small device buffer for them (uploaded per call through
// pinned memory, so Sample does not allocate).
class CudaSampler {
 public:
  // `max_batch` rows at most per Sample call.
  static absl::StatusOr<std::unique_ptr<CudaSampler>> Create(Backend& backend, int max_batch);
  ~CudaSampler();
  CudaSampler(const CudaSampler&) = delete;
  CudaSampler& operator=(const CudaSampler&) = delete;

  // logits [batch, vocab] f32, rows.size() == batch, out [batch] i32 (device).
  absl::Status Sample(const Tensor& logits, std::span<const RowSampling> rows, Tensor* out);

 private:
  CudaSampler() = default;
  Backend* backend_ = nullptr;
  void* stream_ = nullptr;  // cudaStream_t
  int max_batch_ = 0;
  Tensor params_;                   // [max_batch] RowSampling on the device
  RowSampling* staging_ = nullptr;  // pinned [max_batch]
  void* staged_ = nullptr;          // cudaEvent_t: the last upload out of staging_ is done
};

}  // namespace specontext
