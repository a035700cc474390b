// What the two sparse decoders (SparseDecoder, in process; generator/RemoteSparseDecoder, split mode) share
// to run one engine step as two forwards, prompt chunks then decode tokens (each forward keeps its attention
// kernel uniform): the assembly of both passes' logits rows in the engine's order, on the host
// (SparseDecodeHooks::Forward) or left on the backend (ForwardDevice), and the on-device hidden capture of
// EAGLE-3 heads, whose buffer outlives the forward so that a step graph can record it.
// Engine thread only.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "core/backend.h"
#include "core/model/transformer.h"

namespace specontext {

/// A decode row: one token with a past (the sparse pass). Prompt chunks and first tokens run dense.
inline bool IsDecodeRow(const ForwardSeq& f) { return f.tokens.size() == 1 && f.past_len > 0; }

/// The logits of a step whose rows run as several forwards, f32 [n_all, vocab] in the step's row order.
/// Per pass: Target() says where the pass's forward writes, Place() puts its rows where they belong.
/// Scratch is kept across steps: once grown, a step allocates nothing here.
class PassLogits {
 public:
  /// Where a pass of `n_part` of the step's `n_all` rows writes its logits. Host (`device` false): the step's
  /// `logits` itself (host f32 [n_all, vocab]) when the pass holds every row, else a host scratch
  /// [n_part, vocab]. Device: an empty tensor, which the pass's ForwardDevice result replaces.
  Tensor Target(const Tensor& logits, int64_t n_part, int64_t n_all, int64_t vocab, bool device);
  /// After the pass: `out` (what Target gave, filled; or the pass's device logits [n_part, vocab]) into rows
  /// rows[j] of `*logits`. Host: copies unless the pass held every row. Device: a pass holding every row
  /// makes `*logits` its `out`; otherwise its rows are copied (ordered on the compute stream) into one backend
  /// buffer [n_all, vocab] that `*logits` views, valid until the next step that has two passes.
  absl::Status Place(Backend& b, const Tensor& out, std::span<const size_t> rows, int64_t n_all, bool device,
                     Tensor* logits);

 private:
  Tensor host_;    // one pass's host rows [>= n_part, vocab] when a host step has two passes
  Tensor device_;  // a device step of two passes: both passes' rows [>= n_all, vocab] f32
};

/// Sets `capture` up for a forward of `n_tokens` rows of `width` features: on the device, `capture->out` a
/// view [n_tokens, width] (the backend's compute dtype) of `*buffer`, grown here when too small (a
/// MemoryKind::kWorkspace tensor), so the forward allocates nothing for it and a step graph can record it
/// (Transformer::ForwardDevice; the graph remembers the address). `capture->layers` is left to the caller.
absl::Status PrepareDeviceCapture(Backend& b, int64_t n_tokens, int64_t width, Tensor* buffer,
                                  HiddenCapture* capture);

/// One sparse forward of `part`: `device` true sets `*out` to the device logits (Transformer::ForwardDevice),
/// false fills the host `*out` (Transformer::Forward). `sf.layer_copies` goes back into `*copies_scratch`
/// whatever the outcome, so the decoder's per-layer copy list is reused by the next step.
absl::Status SparseForwardInto(Transformer& model, std::span<const ForwardSeq> part, bool device, SparseForward& sf,
                               HiddenCapture* capture, Tensor* out,
                               std::vector<const CopyList*>* copies_scratch);

}  // namespace specontext
