// CudaBackend::RunStepGraph: CUDA graphs of a step (the dense decode step, one graph per batch-size key).
//
// Capture: the body's kernels are recorded from the compute stream (relaxed mode, so that a first
// cudaMalloc of the graph's pool is allowed); workspace the body allocates comes from a pool owned by
// the graph (CudaMemory::Pool, accounted as kGraphs), so its temporaries keep their addresses and are
// never handed to anything else. The batch metadata (sequence lengths, KV pointers) and the split
// partials live in backend buffers that PrepareBatch refreshes before each replay; when one of them
// moves (a bigger batch grew it) layout_epoch_ changes and the graphs are recaptured on next use.
// A body that cannot be recorded (an op that needs a host-built plan or an upload) runs directly and
// its key is remembered as such until the layout changes.
//
// Sparse steps (keys with Backend::kStepGraphSparse) also read the sparse decode state: the index sets
// buffer PrepareSparseDecode fills before each replay, the per-layer KV tables and the split-K partials;
// the sparse attention's grid follows the set sizes. Its signature (those addresses and the plan's inputs)
// is kept with the graph and a change re-records. A new signature first runs the body directly once
// (the ops size their own buffers, e.g. the partials, which must not happen under capture), and the
// tables of every layer are refreshed before a replay (a layer's table upload cannot be recorded). The
// per-layer events the copy stream uses (attn_done, append_done) are recorded as external event nodes and
// offloaded layers wait on their elastic load (enqueued by the host before the replay) through external
// wait nodes, so offloaded layers can be recorded too (cuda_sparse.cc WaitForElasticLoad).
#include <cuda_runtime.h>

#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/cuda_sparse_state.h"
#include "core/log.h"
#include "core/status_macros.h"

namespace specontext::cuda {

namespace {

// What a sparse step's recording depends on besides the batch layout (see the file comment).
struct SparseSignature {
  const void* sets = nullptr;
  const void* tables = nullptr;
  const void* partials = nullptr;
  int n_seqs = 0, sets_per_seq = 0, max_keys = 0;
  int64_t sum_keys = 0;
  size_t off_pos = 0, off_slots = 0;
  bool has_slots = false;
  // Per-sequence dense resident layers (SparseDecodeDesc::dense_resident): whether the resident layers read
  // dense_len, and their plan's inputs (rounded, so the same for many steps of one set of weak sequences).
  bool has_dense = false;
  size_t off_dense = 0;
  int dense_max_keys = 0;
  int64_t dense_sum_keys = 0;
  bool operator==(const SparseSignature& o) const {
    return std::tie(sets, tables, partials, n_seqs, sets_per_seq, max_keys, sum_keys, off_pos, off_slots,
                    has_slots, has_dense, off_dense, dense_max_keys, dense_sum_keys) ==
           std::tie(o.sets, o.tables, o.partials, o.n_seqs, o.sets_per_seq, o.max_keys, o.sum_keys, o.off_pos,
                    o.off_slots, o.has_slots, o.has_dense, o.off_dense, o.dense_max_keys, o.dense_sum_keys);
  }
};

SparseSignature SignatureOf(const CudaBackend::SparseState& sp) {
  SparseSignature s;
  s.sets = sp.sets_buf.data();
  s.tables = sp.tables.data();
  s.partials = sp.partials.data();
  s.n_seqs = sp.n_seqs;
  s.sets_per_seq = sp.sets_per_seq;
  s.max_keys = sp.max_keys;
  s.sum_keys = sp.sum_keys;
  s.off_pos = sp.off_pos;
  s.off_slots = sp.off_slots;
  s.has_slots = sp.has_slots;
  s.has_dense = sp.has_dense;
  if (sp.has_dense) {
    s.off_dense = sp.off_dense;
    s.dense_max_keys = sp.dense_max_keys;
    s.dense_sum_keys = sp.dense_sum_keys;
  }
  return s;
}

}  // namespace

struct CudaBackend::StepGraph {
  cudaGraphExec_t exec = nullptr;
  uint64_t epoch = 0;
  SparseSignature sparse;     // sparse keys: the state recorded against
  bool unrecordable = false;  // the body failed under capture: run it directly
  bool warm = false;          // sparse keys: ran directly once with this state, record on the next call
  std::vector<int> waited_layers;  // offloaded layers whose elastic load the graph waits on (external nodes)
  std::shared_ptr<CudaMemory::Pool> pool;
  ~StepGraph() {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
  }
};

void CudaBackend::DestroyGraphs() {
  if (graphs_.empty()) return;
  cudaStreamSynchronize(stream_);  // a replay may still be running
  graphs_.clear();
}

void CudaBackend::DropStepGraphs(uint64_t key_begin, uint64_t key_end) {
  auto first = graphs_.lower_bound(key_begin), last = graphs_.lower_bound(key_end);
  if (first == last) return;
  cudaStreamSynchronize(stream_);
  graphs_.erase(first, last);
}

absl::Status CudaBackend::RunStepGraph(uint64_t key, const std::function<absl::Status()>& body) {
  if (!graphs_enabled_ || capturing_) return body();
  const bool sparse = (key & kStepGraphSparse) != 0;
  SparseSignature sig;
  if (sparse) {
    // Without a prepared sparse batch the body's own checks report the error.
    if (!batch_valid_ || sparse_ == nullptr || !sparse_->sets_valid) return body();
    for (int l = 0; l < n_layers_; ++l) RETURN_IF_ERROR(EnsureTierTables(l));
    sig = SignatureOf(*sparse_);
  }
  auto it = graphs_.find(key);
  const bool current = it != graphs_.end() && it->second->epoch == layout_epoch_ && it->second->sparse == sig;
  if (current && !it->second->warm) {
    StepGraph& g = *it->second;
    if (g.unrecordable) {
      ++graph_stats_.fallbacks;
      return body();
    }
    RETURN_IF_CUDA_ERROR(cudaGraphLaunch(g.exec, stream_));
    for (int l : g.waited_layers) MarkWaitTimed(sparse_.get(), l);
    ++graph_stats_.replays;
    return absl::OkStatus();
  }
  if (it != graphs_.end()) {
    // Stale: its pool may only go once the device is done with the old graph.
    if (it->second->exec != nullptr) RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
    graphs_.erase(it);
  }
  if (sparse && !current) {
    auto w = std::make_shared<StepGraph>();
    w->epoch = layout_epoch_;
    w->sparse = sig;
    w->warm = true;
    graphs_[key] = w;
    return body();
  }
  auto g = std::make_shared<StepGraph>();
  g->epoch = layout_epoch_;
  g->sparse = sig;
  g->pool = memory_->NewPool();
  memory_->SetActivePool(g->pool);
  capturing_ = true;
  if (sparse) sparse_->capture_waits.clear();
  cudaError_t err = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed);
  absl::Status st = err == cudaSuccess ? body() : absl::OkStatus();
  cudaGraph_t graph = nullptr;
  if (err == cudaSuccess) err = cudaStreamEndCapture(stream_, &graph);
  capturing_ = false;
  memory_->SetActivePool(nullptr);
  if (err == cudaSuccess && st.ok()) {
    err = cudaGraphInstantiate(&g->exec, graph, 0);
  }
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (err != cudaSuccess) {
    cudaGetLastError();
    st = absl::InternalError(absl::StrCat("CUDA graph capture: ", cudaGetErrorString(err)));
  }
  if (!st.ok()) {
    // Nothing the body enqueued ran; remember the key as unrecordable and run the body directly.
    SPC_LOG(WARNING) << "step not recordable as a CUDA graph, running it directly" << Kv("key", key)
                     << Kv("reason", st.ToString());
    g->exec = nullptr;
    g->pool.reset();
    g->unrecordable = true;
    graphs_[key] = g;
    ++graph_stats_.fallbacks;
    return body();
  }
  graphs_[key] = g;
  ++graph_stats_.captures;
  if (sparse) g->waited_layers = std::move(sparse_->capture_waits);
  RETURN_IF_CUDA_ERROR(cudaGraphLaunch(g->exec, stream_));
  for (int l : g->waited_layers) MarkWaitTimed(sparse_.get(), l);
  return absl::OkStatus();
}

}  // namespace specontext::cuda
