// Fuzzes the torch.save reader (zip directory, restricted unpickler, storage checks) on whole
// in-memory files, and the unpickler alone on the same bytes. Every tensor it accepts must lie
// inside the buffer (a view) or be a copy it owns; ASan checks the first and last byte of each.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "core/io/pickle.h"
#include "core/io/torch_zip.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace specontext;
  (void)UnpickleTorchStateDict(data, size);
  absl::StatusOr<std::unique_ptr<WeightSource>> ws = TorchZipFromBuffer(data, size, nullptr);
  if (!ws.ok()) return 0;
  volatile uint8_t sink = 0;
  for (const std::string& name : (*ws)->Names()) {
    absl::StatusOr<Tensor> t = (*ws)->Get(name);
    if (!t.ok()) std::abort();  // listed names must be gettable
    const size_t n = t->nbytes();
    if (n == 0) continue;
    const auto* p = static_cast<const uint8_t*>(t->data());
    const bool view = p >= data && p < data + size;
    if (view && p + n > data + size) std::abort();
    if (!view && t->storage() == nullptr) std::abort();  // a copy owns its memory
    sink = static_cast<uint8_t>(sink ^ p[0]);
    sink = static_cast<uint8_t>(sink ^ p[n - 1]);
  }
  (void)sink;
  return 0;
}
