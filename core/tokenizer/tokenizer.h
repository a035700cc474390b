// The tokenizer interface the engine uses, with two implementations:
//  - HF tokenizer.json (byte-level BPE as in Llama 3 / Qwen2-3, and SentencePiece-style BPE with
//    byte fallback as in Llama 2), matching the HF `tokenizers` library id for id;
//  - the llama2.c tokenizer.bin format (stories260K's tok512.bin).
//
// Text contract: Encode accepts arbitrary bytes. Input that is not valid UTF-8 is first decoded
// like Python's bytes.decode('utf-8', errors='replace') — every maximal ill-formed subpart becomes
// one U+FFFD — so the ids equal those of HF `tokenizers` on the Python-decoded string. Decode
// returns valid UTF-8: byte sequences that do not form UTF-8 become U+FFFD the same way (as HF does
// with String::from_utf8_lossy). All methods are const and thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace specontext {

/// A part of the text given to Tokenizer::EncodeParts.
struct TextPart {
  std::string_view text;
  /// Whether special tokens spelled in `text` become their ids. Off for text the server does not
  /// control (chat message contents), so that a "<|eot_id|>" typed in a message cannot end its
  /// turn.
  bool special_tokens = true;
};

class Tokenizer {
 public:
  virtual ~Tokenizer();

  /// Encodes `text` to ids [n_tokens]. Added/special tokens written in the text ("<|im_end|>") are
  /// recognised and become their ids. `add_bos` prepends bos_id() when the tokenizer has one
  /// (no-op when bos_id() == -1). Never adds EOS.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool add_bos) const = 0;

  /// Encodes the concatenation of `parts` as Encode does, except that a special token is recognised
  /// only where it lies wholly inside a part with `special_tokens` set; elsewhere its text is
  /// ordinary text. Added tokens that are not special (Qwen3's <think>) are recognised everywhere,
  /// as HF does with split_special_tokens. Each part is made valid UTF-8 on its own; parts that all
  /// allow special tokens give Encode(concatenation).
  virtual absl::StatusOr<std::vector<int32_t>> EncodeParts(std::span<const TextPart> parts,
                                                           bool add_bos) const;

  /// Raw bytes of one token as they appear in decoded text (may be a partial UTF-8 sequence, e.g.
  /// one byte of an emoji). Empty for out-of-range ids.
  virtual std::string TokenBytes(int32_t id) const = 0;

  /// Like TokenBytes, knowing the previously emitted token (-1 at the start of a sequence):
  /// decoders that strip the SentencePiece dummy-prefix space do so only at the start (or after BOS
  /// for llama2.c). Decode(ids) == lossy-UTF-8 of the concatenation of TokenBytesAfter over the
  /// kept ids.
  virtual std::string TokenBytesAfter(int32_t prev_id, int32_t id) const { return TokenBytes(id); }

  /// Decodes ids to text. `skip_special` drops special tokens (BOS, <|im_end|>, ...); added tokens
  /// that are not special (e.g. Qwen's <think>) are kept, as in HF. Ill-formed UTF-8 -> U+FFFD.
  virtual std::string Decode(std::span<const int32_t> ids, bool skip_special) const;

  /// The most bytes of input text one token can stand for, so that a text of n bytes encodes to at
  /// least ceil(n / MaxBytesPerToken()) tokens: lets a server refuse a text too long for the
  /// context without tokenizing it. nullopt when no bound holds (e.g. a normalizer that deletes
  /// text, or an added token that swallows the white space around it).
  virtual std::optional<int64_t> MaxBytesPerToken() const { return std::nullopt; }

  /// Number of ids, including added tokens (max id + 1).
  virtual int32_t vocab_size() const = 0;
  /// Beginning-of-sequence id, -1 if none.
  virtual int32_t bos_id() const = 0;
  /// Whether the model expects BOS by default (tokenizer_config.json's add_bos_token; llama2.c:
  /// true).
  virtual bool default_add_bos() const = 0;
  /// Ids that end generation: the configured eos token plus end-of-turn tokens the vocabulary has
  /// (<|eot_id|>, <|eom_id|>, <|im_end|>, <|endoftext|>, ...). Sorted, unique.
  virtual std::vector<int32_t> eos_ids() const = 0;
  /// Id of an exact token string (special tokens like "<|im_end|>", or a vocabulary entry).
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  /// True for special tokens (skipped by Decode(..., skip_special=true)).
  virtual bool IsSpecial(int32_t id) const = 0;
};

/// Loads a HF tokenizer.json; reads tokenizer_config.json from the same folder when present
/// (bos_token, eos_token, add_bos_token).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& tokenizer_json_path);

/// Parses tokenizer.json text (and tokenizer_config.json text, may be empty). Never crashes on bad
/// input: unsupported component types are rejected with an error naming the type.
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseHfTokenizer(std::string_view json,
                                                            std::string_view config_json);

/// Loads a llama2.c tokenizer.bin (int32 max_token_length, then per token: float32 score,
/// int32 length, bytes). BOS = 1, EOS = 2, byte tokens <0xXX> = byte + 3.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadLlama2cTokenizer(const std::string& path);
/// Same from the file's bytes.
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseLlama2cTokenizer(std::string_view data);

/// Incremental, UTF-8-safe detokenizer for streaming generation. Push(id) returns the text that
/// became complete; bytes of a character split over several tokens are held back until it is whole.
/// Flush() returns what is left (U+FFFD for a dangling partial sequence). The concatenation of all
/// Push results and Flush equals tokenizer.Decode(all ids, skip_special).
/// Holds a reference to `tokenizer`, which must outlive it. Not thread-safe (one per sequence).
class StreamDecoder {
 public:
  StreamDecoder(const Tokenizer& tokenizer, bool skip_special)
      : tokenizer_(tokenizer), skip_special_(skip_special) {}
  std::string Push(int32_t id);
  std::string Flush();
  /// Forgets everything (start of a new sequence).
  void Reset();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  int32_t prev_id_ = -1;
  std::string pending_;  // bytes of an incomplete UTF-8 sequence (<= 3 bytes)
};

}  // namespace specontext
