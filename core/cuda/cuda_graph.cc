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
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_backend_impl.h"
#include "core/cuda/cuda_check.h"
#include "core/log.h"
#include "core/status_macros.h"

namespace specontext::cuda {

struct CudaBackend::StepGraph {
  cudaGraphExec_t exec = nullptr;
  uint64_t epoch = 0;
  bool unrecordable = false;  // the body failed under capture: run it directly
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
  auto it = graphs_.find(key);
  if (it != graphs_.end() && it->second->epoch == layout_epoch_) {
    StepGraph& g = *it->second;
    if (g.unrecordable) {
      ++graph_stats_.fallbacks;
      return body();
    }
    RETURN_IF_CUDA_ERROR(cudaGraphLaunch(g.exec, stream_));
    ++graph_stats_.replays;
    return absl::OkStatus();
  }
  if (it != graphs_.end()) {
    // Stale: its pool may only go once the device is done with the old graph.
    RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
    graphs_.erase(it);
  }
  auto g = std::make_shared<StepGraph>();
  g->epoch = layout_epoch_;
  g->pool = memory_->NewPool();
  memory_->SetActivePool(g->pool);
  capturing_ = true;
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
  RETURN_IF_CUDA_ERROR(cudaGraphLaunch(g->exec, stream_));
  return absl::OkStatus();
}

}  // namespace specontext::cuda
