// Fuzzes the GGUF parser on whole in-memory files, then what is built on what parses: every
// metadata value is walked, a few rows of each tensor are dequantized (ASan checks that every read
// stays inside the buffer), and the config, vocabulary and HF-named weights are derived as
// OpenGgufCheckpoint does.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "core/io/ggml_dequantize.h"
#include "core/io/gguf.h"
#include "core/io/gguf_checkpoint.h"

namespace {

using namespace specontext;

volatile uint64_t sink = 0;

void Walk(const GgufValue& v) {
  sink = sink + v.u + static_cast<uint64_t>(v.i) + v.str.size();
  if (v.type != GgufType::kArray) return;
  for (std::string_view s : v.strings)
    sink = sink + s.size() + (s.empty() ? 0 : static_cast<uint8_t>(s.back()));
  for (const GgufValue& item : v.items) Walk(item);
  if (GgufScalarSize(v.elem_type) > 0 && v.count > 0) {
    sink = sink + v.Element(0).u + v.Element(v.count - 1).u;
  }
}

// Dequantizes the first and last row of `t` (rows of ne[0] elements).
void DequantizeRows(const GgufFile& f, const GgufTensorInfo& t) {
  if (!CanDequantizeGgml(t.type) || t.numel() == 0 || t.ne[0] > (1 << 20)) return;
  const uint64_t row_bytes = t.row_bytes();
  const int64_t rows = t.numel() / t.ne[0];
  std::vector<float> out(t.ne[0]);
  for (int64_t r : {int64_t{0}, rows - 1}) {
    const uint8_t* p = f.TensorData(t) + static_cast<uint64_t>(r) * row_bytes;
    if (p < f.data || p + row_bytes > f.data + f.size) std::abort();  // the parser promised this
    if (!DequantizeGgml(t.type, p, row_bytes, t.ne[0], out.data()).ok()) std::abort();
    sink = sink + static_cast<uint64_t>(out[0] == out[0]);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<GgufFile> parsed = ParseGguf(data, size);
  if (!parsed.ok()) return 0;
  auto file = std::make_shared<const GgufFile>(*std::move(parsed));
  for (const GgufKeyValue& kv : file->metadata) Walk(kv.value);
  for (const GgufTensorInfo& t : file->tensors) DequantizeRows(*file, t);
  (void)GgufVocabFromMetadata(*file);
  absl::StatusOr<ModelConfig> config = GgufModelConfig(*file);
  if (!config.ok()) return 0;
  absl::StatusOr<std::unique_ptr<WeightSource>> weights = GgufWeights(file, *config);
  if (!weights.ok()) std::abort();  // only fails on a config it was not built for
  for (const std::string& name : (*weights)->Names()) {
    absl::StatusOr<WeightInfo> info = (*weights)->Info(name);
    if (!info.ok()) continue;  // e.g. a type that cannot be dequantized
    absl::StatusOr<Tensor> t = (*weights)->Get(name);
    if (!t.ok()) continue;  // e.g. q/k rows that do not split into the heads
    if (t->shape() != info->shape || t->dtype() != info->dtype) std::abort();
    if (t->nbytes() > 0) sink = sink + static_cast<const uint8_t*>(t->data())[t->nbytes() - 1];
  }
  return 0;
}
