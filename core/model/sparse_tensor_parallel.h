// SpeContext sparse decoding under tensor parallelism (docs/tensor-parallel.md "Sparse decoding"): what a
// rank's SparseDecoder needs beyond its model shard. The retrieval head is replicated on every rank (it is
// small: one layer); with head-level selection each rank scores only the query heads and K-cache heads of
// its own KV heads, so it emits exactly the sets the unsharded decoder emits for those KV heads. Layer moves
// are agreed on by all ranks (AgreeOnGpuLayers) so that their forwards keep the same layers offloaded, and the
// weak-retrieval fallback decides from the ranks' captured mass summed over the group (SparseDecoder::
// SumMassOverRanks), so that every rank falls back for the same sequences.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/model/transformer.h"
#include "core/parallel/communicator.h"
#include "core/sparse/selection.h"
#include "core/sparse/selection_source.h"

namespace specontext {

struct SparseOptions;  // core/model/sparse_decoder.h

/// The whole model's configuration from rank tp.rank's shard configuration (ShardConfig's inverse: attention
/// heads, KV heads and intermediate size times tp.size). The retrieval head is validated against it.
ModelConfig UnshardedConfig(const ModelConfig& shard, const TensorParallel& tp);

/// InvalidArgument naming the option for what sparse decoding does not support under tensor parallelism
/// (tp.size > 1): options whose result would depend on the heads a rank does not hold (the recall probe
/// reports every layer's recall of every query head; oracle/quest batch-level selection takes a max over all
/// query heads inside each layer) or that rewrite sets per rank (synthetic overlap). OK for tp.size 1. The
/// weak-retrieval fallback is supported: the ranks sum their heads' captured mass with one all-reduce per step.
absl::Status ValidateSparseTensorParallel(const SparseOptions& options, const TensorParallel& tp);

/// Rank tp.rank's part of `t` along its first dimension: a view (no copy) of rows
/// [rank * d0 / size, (rank + 1) * d0 / size) of a contiguous [d0, ...] tensor, d0 divisible by size. Used on
/// the head's query [n_q_heads, head_dim] and K cache [n_kv_heads, rows, head_dim]: the GQA groups stay
/// whole because both split into the same number of equal parts.
Tensor RankPart(const Tensor& t, const TensorParallel& tp);

/// The resident layer count every rank of `comm`'s group takes: the smallest of the ranks' `mine` (each
/// rank's own planner target: the most conservative plan fits every rank's memory). An error on any rank
/// (no plan fits) becomes an error on every rank: the failing rank's own status there, ResourceExhausted
/// naming that rank elsewhere. One AllReduceSum of f32 [size] in `scratch` on `backend` (allocated there,
/// MemoryKind::kWorkspace, when empty; reused after). Every rank must call it at the same point: the tiers plan
/// at the same steps on every rank because the ranks run the same requests.
absl::StatusOr<int32_t> AgreeOnGpuLayers(Communicator& comm, Backend& backend, const absl::StatusOr<int32_t>& mine,
                                         Tensor* scratch);

}  // namespace specontext
