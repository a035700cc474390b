// Weight files of a directory and sharded indexes (weight_files.h).
#include "core/io/weight_files.h"

#include <filesystem>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/io/file_util.h"
#include "core/io/safetensors.h"
#include "core/io/torch_zip.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace specontext {
namespace {

using json = nlohmann::json;

// Names routed to the shard that holds them.
class ShardedWeights final : public WeightSource {
 public:
  ShardedWeights(std::vector<std::unique_ptr<WeightSource>> shards,
                 std::vector<std::pair<std::string, size_t>> names)
      : shards_(std::move(shards)), order_(std::move(names)) {
    for (const auto& [name, shard] : order_) route_.emplace(name, shard);
  }
  bool Has(std::string_view name) const override { return route_.count(std::string(name)) > 0; }
  absl::StatusOr<Tensor> Get(std::string_view name) const override {
    auto it = route_.find(std::string(name));
    if (it == route_.end())
      return absl::NotFoundError(absl::StrCat("tensor \"", std::string(name), "\" not found"));
    return shards_[it->second]->Get(name);
  }
  std::vector<std::string> Names() const override {
    std::vector<std::string> names;
    names.reserve(order_.size());
    for (const auto& p : order_) names.push_back(p.first);
    return names;
  }

 private:
  std::vector<std::unique_ptr<WeightSource>> shards_;
  std::vector<std::pair<std::string, size_t>> order_;
  std::unordered_map<std::string, size_t> route_;
};

bool Exists(const std::filesystem::path& p) {
  std::error_code ec;
  return std::filesystem::exists(p, ec);
}

}  // namespace

absl::StatusOr<std::unique_ptr<WeightSource>> OpenShardedIndex(const std::string& index_path,
                                                               const ShardOpener& open_shard) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(index_path, 64u << 20));
  json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": ", msg));
  };
  if (root.is_discarded() || !root.is_object()) return bad("not a JSON object");
  if (!root.contains("weight_map") || !root["weight_map"].is_object())
    return bad("missing object \"weight_map\"");
  const std::filesystem::path dir = std::filesystem::path(index_path).parent_path();
  std::vector<std::unique_ptr<WeightSource>> shards;
  std::unordered_map<std::string, size_t> shard_of_file;
  std::vector<std::pair<std::string, size_t>> names;
  for (auto it = root["weight_map"].begin(); it != root["weight_map"].end(); ++it) {
    if (!it.value().is_string())
      return bad(absl::StrCat("weight_map[\"", it.key(), "\"] is not a string"));
    const std::string file = it.value().get<std::string>();
    // Shards live beside the index: refuse paths that would escape the directory.
    if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..") {
      return bad(absl::StrCat("shard file name \"", file, "\" for \"", it.key(),
                              "\" is not a plain file name"));
    }
    auto found = shard_of_file.find(file);
    if (found == shard_of_file.end()) {
      ASSIGN_OR_RETURN(std::unique_ptr<WeightSource> shard, open_shard((dir / file).string()));
      found = shard_of_file.emplace(file, shards.size()).first;
      shards.push_back(std::move(shard));
    }
    if (!shards[found->second]->Has(it.key())) {
      return bad(absl::StrCat("tensor \"", it.key(),
                              "\" is listed in the index but missing from shard ", file));
    }
    names.emplace_back(it.key(), found->second);
  }
  if (names.empty()) return bad("weight_map is empty");
  return std::unique_ptr<WeightSource>(new ShardedWeights(std::move(shards), std::move(names)));
}

absl::StatusOr<WeightFiles> OpenWeightFiles(const std::string& dir) {
  const std::filesystem::path d(dir);
  for (const char* name : kWeightFileNames) {
    const std::string path = (d / name).string();
    if (!Exists(path)) continue;
    WeightFiles out;
    out.file = name;
    const std::string n(name);
    if (n == "model.safetensors") {
      ASSIGN_OR_RETURN(out.weights, OpenSafetensors(path));
    } else if (n == "model.safetensors.index.json") {
      ASSIGN_OR_RETURN(out.weights, OpenSafetensorsIndex(path));
    } else if (n == "pytorch_model.bin") {
      ASSIGN_OR_RETURN(out.weights, OpenTorchCheckpoint(path));
    } else {
      ASSIGN_OR_RETURN(out.weights, OpenShardedIndex(path, OpenTorchCheckpoint));
    }
    return out;
  }
  return absl::NotFoundError(
      absl::StrCat(dir, " holds no weights: looked for ", absl::StrJoin(kWeightFileNames, ", ")));
}

}  // namespace specontext
