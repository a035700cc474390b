// Finding and opening the weight files of a Hugging Face-style directory, whichever format its
// publisher shipped: safetensors (one file or shards with an index) or torch.save archives
// (pytorch_model.bin, or shards with pytorch_model.bin.index.json, as transformers'
// save_pretrained(safe_serialization=False) writes them and as SafeAILab's EAGLE-3 drafts ship).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/io/weight_source.h"

namespace specontext {

/// The files OpenWeightFiles looks for, in order.
inline constexpr const char* kWeightFileNames[] = {
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json"};

struct WeightFiles {
  std::unique_ptr<WeightSource> weights;
  std::string file;  // the name (of kWeightFileNames) that was opened
};

/// Opens the first of kWeightFileNames present in `dir`. NotFound naming every file looked for when
/// none is there; a file that is there but broken gives its own error (prefixed with its path).
absl::StatusOr<WeightFiles> OpenWeightFiles(const std::string& dir);

/// Opens one shard file.
using ShardOpener =
    std::function<absl::StatusOr<std::unique_ptr<WeightSource>>(const std::string& path)>;

/// A sharded checkpoint from its index json ("weight_map": tensor name -> shard file beside the
/// index). Each shard is opened once with `open_shard`; a name listed in the index but absent from
/// its shard is an error, as is a shard name that is not a plain file name. Names() is the index's
/// list.
absl::StatusOr<std::unique_ptr<WeightSource>> OpenShardedIndex(const std::string& index_path,
                                                               const ShardOpener& open_shard);

}  // namespace specontext
