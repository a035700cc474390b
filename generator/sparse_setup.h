// Builds the generator's sparse decoding from its flags: `--retriever inproc --retrieval-head DIR` runs
// the engine's SparseDecoder (retrieval head in process); `--retriever HOST:PORT` runs RemoteSparseDecoder,
// whose index sets come from a specontext-retriever over Retriever.Session; `--retriever none` (or inproc
// without a head) keeps the engine dense.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/cli/args.h"
#include "core/model/sparse_hooks.h"
#include "core/runtime/runtime.h"
#include "core/runtime/sparse_runtime.h"
#include "generator/generator_metrics.h"
#include "generator/sparse_metrics.h"

namespace specontext::generator {

struct SparseSetup {
  SparseRuntime inproc;                                // inproc: the head (outlives the decoder) and decoder
  std::shared_ptr<SparseDecodeHooks> hooks;            // into EngineOptions::sparse; null = dense
  std::function<RetrievalPathStats()> path_stats;      // split mode: thread-safe counters; empty otherwise
};

/// Reads --retriever, --retrieval-head, --budget, --sink, --selection, --selection-source, --fallback-mass,
/// --gpu-memory-limit, --retriever-deadline-ms (the source and the fallback only in process). Errors name the flag. `metrics` gets the retrieval
/// latency of split mode (may be null).
absl::StatusOr<SparseSetup> SetUpSparse(const Args& args, const Runtime& rt, const std::string& retriever,
                                        GeneratorMetrics* metrics);

}  // namespace specontext::generator
