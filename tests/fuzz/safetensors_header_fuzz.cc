// Fuzzes the safetensors parser on whole in-memory files; every tensor it accepts must lie inside
// the buffer (ASan checks the first and last byte of each view).
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "core/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace specontext;
  absl::StatusOr<std::unique_ptr<WeightSource>> ws = SafetensorsFromBuffer(data, size, nullptr);
  if (!ws.ok()) return 0;
  volatile uint8_t sink = 0;
  for (const std::string& name : (*ws)->Names()) {
    absl::StatusOr<Tensor> t = (*ws)->Get(name);
    if (!t.ok()) std::abort();  // listed names must be gettable
    const size_t n = t->nbytes();
    if (n == 0) continue;
    const auto* p = static_cast<const uint8_t*>(t->data());
    if (p < data || p + n > data + size) std::abort();
    sink = static_cast<uint8_t>(sink ^ p[0]);
    sink = static_cast<uint8_t>(sink ^ p[n - 1]);
  }
  (void)sink;
  return 0;
}
