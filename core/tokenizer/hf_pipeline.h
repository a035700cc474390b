// The text stages of a HF tokenizer.json around the model: normalizer, pre-tokenizer and decoder,
// built from their JSON objects. Unsupported "type"s are rejected with an error naming them.
//   normalizers:    NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Sequence
//   pre-tokenizers: Split, ByteLevel, Metaspace, Digits, Sequence
//   decoders:       ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace specontext {

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  /// Normalizes valid UTF-8 `text` in place.
  virtual absl::Status Apply(std::string* text) const = 0;
};

/// A piece of the input on its way to the model. `at_start`: it begins at offset 0 of the original
/// input (Metaspace's prepend_scheme "first" only prefixes such a piece).
struct PreToken {
  std::string text;
  bool at_start = false;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  /// Splits/transforms every piece; empty pieces are dropped (as HF does).
  virtual absl::Status Apply(std::vector<PreToken>* pieces) const = 0;
};

/// Decoders act token by token here (so streaming needs no look-back). Stages that in HF act on the
/// joined text (Strip, Metaspace's leading-space removal) only touch the first token (`first`).
class Decoder {
 public:
  virtual ~Decoder() = default;
  /// Turns one token string (vocabulary spelling) into the bytes it contributes to the text.
  virtual std::string DecodeToken(std::string_view token, bool first) const = 0;
};

/// A null JSON value gives nullptr (no stage).
absl::StatusOr<std::unique_ptr<Normalizer>> MakeNormalizer(const nlohmann::json& j);
absl::StatusOr<std::unique_ptr<PreTokenizer>> MakePreTokenizer(const nlohmann::json& j);
absl::StatusOr<std::unique_ptr<Decoder>> MakeDecoder(const nlohmann::json& j);

}  // namespace specontext
