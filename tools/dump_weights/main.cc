// specontext-dump-weights: opens a checkpoint (HF directory, GGUF file or llama2.c file) and writes
// every tensor its WeightSource returns — HF names and shapes, dequantized GGUF tensors as f32,
// float tensors in their stored dtype — to one safetensors file. Holds all tensors at once: meant
// for small models.
//   specontext-dump-weights --model=model.gguf --out=/tmp/weights.safetensors
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "core/io/safetensors.h"
#include "core/io/weight_source.h"

ABSL_FLAG(std::string, model, "", "checkpoint: HF directory, .gguf or llama2.c .bin");
ABSL_FLAG(std::string, out, "", "output .safetensors file");

int main(int argc, char** argv) {
  using namespace specontext;
  absl::SetProgramUsageMessage(
      "Writes a checkpoint's tensors, as the engine loads them, to a safetensors file.");
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  const std::string model = absl::GetFlag(FLAGS_model), out = absl::GetFlag(FLAGS_out);
  if (rest.size() > 1 || model.empty() || out.empty()) {
    std::fprintf(stderr, "specontext-dump-weights: give --model and --out\n");
    return 2;
  }
  absl::StatusOr<Checkpoint> ckpt = OpenCheckpoint(model);
  if (!ckpt.ok()) {
    std::fprintf(stderr, "specontext-dump-weights: %s\n",
                 std::string(ckpt.status().message()).c_str());
    return 1;
  }
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const std::string& name : ckpt->weights->Names()) {
    absl::StatusOr<Tensor> t = ckpt->weights->Get(name);
    if (!t.ok()) {
      std::fprintf(stderr, "specontext-dump-weights: %s\n",
                   std::string(t.status().message()).c_str());
      return 1;
    }
    tensors.emplace_back(name, *std::move(t));
  }
  const absl::Status s = WriteSafetensors(out, tensors, {{"source", model}});
  if (!s.ok()) {
    std::fprintf(stderr, "specontext-dump-weights: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::fprintf(stderr, "specontext-dump-weights: %zu tensors -> %s\n", tensors.size(), out.c_str());
  return 0;
}
