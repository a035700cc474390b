// libFuzzer target: ParseHfTokenizer must never crash, hang or throw on arbitrary tokenizer.json
// text, and a tokenizer it accepts must encode and decode arbitrary text safely.
// Build with -fsanitize=fuzzer,address; seeds in tests/fuzz/corpus/tokenizer_json_fuzz/.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  // An optional "\n#config\n" separates tokenizer.json from tokenizer_config.json text.
  const size_t sep = input.find("\n#config\n");
  const std::string_view json = input.substr(0, sep);
  const std::string_view config = sep == std::string_view::npos ? "" : input.substr(sep + 9);
  auto tok = specontext::ParseHfTokenizer(json, config);
  if (!tok.ok()) return 0;
  const specontext::Tokenizer& t = **tok;
  // Encode some of the input itself (arbitrary bytes, often invalid UTF-8) and fixed samples.
  for (const std::string_view text :
       {input.substr(0, 256), std::string_view("Hello world <|im_end|> 123 héllo 😀\n\t ")}) {
    auto ids = t.Encode(text, /*add_bos=*/true);
    if (!ids.ok()) continue;
    (void)t.Decode(*ids, false);
    specontext::StreamDecoder dec(t, true);
    for (const int32_t id : *ids) (void)dec.Push(id);
    (void)dec.Flush();
  }
  // Ids from the input bytes, in and out of range.
  for (size_t i = 0; i + 4 <= size && i < 64; i += 4) {
    int32_t id;
    __builtin_memcpy(&id, data + i, 4);
    (void)t.TokenBytes(id);
    (void)t.IsSpecial(id);
  }
  (void)t.TokenToId(input.substr(0, 16));
  (void)t.eos_ids();
  return 0;
}
