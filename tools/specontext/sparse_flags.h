// The SpeContext flags shared by the commands that decode (generate, score): --sparse, --budget, --sink,
// --retrieval-head, --selection, --selection-source, --fallback-mass.
#pragma once

#include <cstdint>
#include <optional>

#include "absl/status/statusor.h"
#include "core/cli/args.h"
#include "core/runtime/sparse_runtime.h"

namespace specontext {

void DefineSparseFlags(Args& args);

/// The sparse options when --sparse is given, nullopt for dense decoding. InvalidArgument naming the flag
/// for sparse flags without --sparse, a budget below 1, an unknown --selection-source or a missing
/// --retrieval-head (needed by the head source only).
absl::StatusOr<std::optional<SparseRuntimeOptions>> SparseOptionsFromArgs(const Args& args,
                                                                          int64_t gpu_memory_limit);

}  // namespace specontext
