#include "core/tokenizer/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/tokenizer/utf8.h"

namespace specontext {
namespace {

// tokenizer.json files are tens of MB; anything far above is not one.
constexpr size_t kMaxTokenizerFileBytes = size_t{1} << 30;

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  // Opening a FIFO for reading blocks until a writer appears: refuse anything but a regular file first.
  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  if (!ec && std::filesystem::exists(st) && !std::filesystem::is_regular_file(st)) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) return absl::InvalidArgumentError(absl::StrCat("cannot size ", path));
  if (static_cast<size_t>(size) > kMaxTokenizerFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is too large (", size, " bytes)"));
  }
  in.seekg(0);
  std::string data(static_cast<size_t>(size), '\0');
  if (!in.read(data.data(), size)) return absl::DataLossError(absl::StrCat("cannot read ", path));
  return data;
}

}  // namespace

Tokenizer::~Tokenizer() = default;

// Right as it stands for tokenizers that recognise no special tokens in text (llama2.c).
absl::StatusOr<std::vector<int32_t>> Tokenizer::EncodeParts(std::span<const TextPart> parts,
                                                            bool add_bos) const {
  std::string text;
  for (const TextPart& p : parts) text += p.text;
  return Encode(text, add_bos);
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  int32_t prev = -1;
  for (const int32_t id : ids) {
    if (skip_special && IsSpecial(id)) continue;
    bytes += TokenBytesAfter(prev, id);
    prev = id;
  }
  return utf8::Sanitize(bytes);
}

std::string StreamDecoder::Push(int32_t id) {
  if (skip_special_ && tokenizer_.IsSpecial(id)) return "";
  pending_ += tokenizer_.TokenBytesAfter(prev_id_, id);
  prev_id_ = id;
  const size_t n = utf8::CompletePrefixLength(pending_);
  std::string out = utf8::Sanitize(std::string_view(pending_).substr(0, n));
  pending_.erase(0, n);
  return out;
}

std::string StreamDecoder::Flush() {
  std::string out = utf8::Sanitize(pending_);
  pending_.clear();
  return out;
}

void StreamDecoder::Reset() {
  pending_.clear();
  prev_id_ = -1;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& tokenizer_json_path) {
  ASSIGN_OR_RETURN(std::string json, ReadSmallFile(tokenizer_json_path));
  std::string config;
  const size_t slash = tokenizer_json_path.find_last_of('/');
  const std::string dir =
      slash == std::string::npos ? std::string(".") : tokenizer_json_path.substr(0, slash);
  auto config_or = ReadSmallFile(dir + "/tokenizer_config.json");
  if (config_or.ok()) {
    config = std::move(config_or).value();
  } else if (!absl::IsNotFound(config_or.status())) {
    return config_or.status();
  }
  auto tok = ParseHfTokenizer(json, config);
  if (!tok.ok()) {
    return absl::Status(tok.status().code(),
                        absl::StrCat(tokenizer_json_path, ": ", tok.status().message()));
  }
  return tok;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadLlama2cTokenizer(const std::string& path) {
  ASSIGN_OR_RETURN(std::string data, ReadSmallFile(path));
  auto tok = ParseLlama2cTokenizer(data);
  if (!tok.ok()) {
    return absl::Status(tok.status().code(), absl::StrCat(path, ": ", tok.status().message()));
  }
  return tok;
}

}  // namespace specontext
