// libFuzzer target: HfTokenizerFromGguf must never crash, hang or throw on an arbitrary GgufVocab
// (what a hostile GGUF file can hold), and ParseHfTokenizer must accept every text it produces; the
// resulting tokenizer must encode and decode arbitrary text safely.
// Build with -fsanitize=fuzzer,address; seeds in tests/fuzz/corpus/gguf_vocab_fuzz/.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/io/gguf_vocab.h"
#include "core/tokenizer/tokenizer.h"

namespace {

constexpr const char* kModels[] = {"gpt2", "llama", "gpt2", "llama", "bert", ""};
constexpr const char* kPres[] = {
    "smollm", "llama-bpe",      "qwen2",          "gpt-2",       "",
    "tekken", "deepseek-coder", "deepseek-coder", "deepseek-v3", "deepseek-r1-qwen",
    "falcon"};

int64_t Id(FuzzedDataProvider& in, size_t n) {
  return in.ConsumeIntegralInRange<int64_t>(-2, static_cast<int64_t>(n) + 1);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  specontext::GgufVocab v;
  v.model = in.PickValueInArray(kModels);
  v.pre = in.PickValueInArray(kPres);
  const size_t n = in.ConsumeIntegralInRange<size_t>(0, 400);
  const bool with_types = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  const bool with_scores = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  for (size_t i = 0; i < n && in.remaining_bytes() > 0; ++i) {
    // Mostly single characters and byte tokens, so merges and byte fallback find their parts.
    switch (in.ConsumeIntegralInRange<int>(0, 3)) {
      case 0: {
        char name[8];
        std::snprintf(name, sizeof(name), "<0x%02X>", in.ConsumeIntegral<uint8_t>());
        v.tokens.push_back(name);
        break;
      }
      case 1:
        v.tokens.push_back(
            std::string(1, static_cast<char>(in.ConsumeIntegralInRange<int>(32, 126))));
        break;
      default:
        v.tokens.push_back(in.ConsumeRandomLengthString(12));
    }
    if (with_types)
      v.token_types.push_back(in.ConsumeIntegralInRange<int32_t>(0, 6) == 0
                                  ? in.ConsumeIntegralInRange<int32_t>(-1, 7)
                                  : 1);
    if (with_scores) v.scores.push_back(in.ConsumeFloatingPoint<float>());
  }
  // Merges: mostly two existing tokens (possibly no merged token), sometimes raw text.
  const size_t n_merges = in.ConsumeIntegralInRange<size_t>(0, 400);
  for (size_t i = 0; i < n_merges && in.remaining_bytes() > 0; ++i) {
    if (!v.tokens.empty() && in.ConsumeBool()) {
      const auto& a = v.tokens[in.ConsumeIntegralInRange<size_t>(0, v.tokens.size() - 1)];
      const auto& b = v.tokens[in.ConsumeIntegralInRange<size_t>(0, v.tokens.size() - 1)];
      v.merges.push_back(a + " " + b);
    } else {
      v.merges.push_back(in.ConsumeRandomLengthString(12));
    }
  }
  v.bos_id = Id(in, v.tokens.size());
  v.eos_id = Id(in, v.tokens.size());
  v.unk_id = Id(in, v.tokens.size());
  v.eot_id = Id(in, v.tokens.size());
  if (in.ConsumeBool()) v.add_bos = in.ConsumeBool();
  if (in.ConsumeBool()) v.add_space_prefix = in.ConsumeBool();
  v.chat_template = in.ConsumeRandomLengthString(64);
  const std::string text = in.ConsumeRemainingBytesAsString();

  auto texts = specontext::HfTokenizerFromGguf(v);
  if (!texts.ok()) return 0;
  auto tok = specontext::ParseHfTokenizer(texts->tokenizer_json, texts->tokenizer_config_json);
  if (!tok.ok()) {
    // Our own output must always parse: anything else is a converter bug.
    std::fprintf(stderr, "converted vocabulary rejected: %s\n", tok.status().ToString().c_str());
    std::abort();
  }
  const specontext::Tokenizer& t = **tok;
  for (const std::string_view s :
       {std::string_view(text), std::string_view("Hello 12 <s> héllo 😀\n")}) {
    auto ids = t.Encode(s, /*add_bos=*/true);
    if (!ids.ok()) continue;
    (void)t.Decode(*ids, false);
    specontext::StreamDecoder dec(t, true);
    for (const int32_t id : *ids) (void)dec.Push(id);
    (void)dec.Flush();
  }
  (void)t.eos_ids();
  return 0;
}
