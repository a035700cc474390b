// Normalizers of tokenizer.json. Unicode normalization forms come from utf8proc.
#include <utf8proc.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/tokenizer/hf_common.h"
#include "core/tokenizer/hf_pipeline.h"
#include "core/tokenizer/utf8.h"

namespace specontext {
namespace {

using nlohmann::json;

class UnicodeForm final : public Normalizer {
 public:
  explicit UnicodeForm(int options) : options_(options) {}
  absl::Status Apply(std::string* text) const override {
    if (text->empty()) return absl::OkStatus();
    utf8proc_uint8_t* out = nullptr;
    // An explicit length (no NULLTERM) keeps embedded NUL characters.
    const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text->data()),
                                            static_cast<utf8proc_ssize_t>(text->size()), &out,
                                            static_cast<utf8proc_option_t>(options_));
    if (n < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("unicode normalization failed: ", utf8proc_errmsg(n)));
    }
    text->assign(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
    std::free(out);
    return absl::OkStatus();
  }

 private:
  int options_;
};

class Lowercase final : public Normalizer {
 public:
  absl::Status Apply(std::string* text) const override {
    std::string out;
    out.reserve(text->size());
    for (size_t i = 0; i < text->size();) {
      const size_t n = utf8::ValidSequenceLength(*text, i);
      if (n == 0) return absl::InvalidArgumentError("Lowercase: invalid UTF-8");
      utf8::Append(static_cast<char32_t>(utf8proc_tolower(utf8::DecodeAt(*text, i, n))), &out);
      i += n;
    }
    *text = std::move(out);
    return absl::OkStatus();
  }
};

class Prepend final : public Normalizer {
 public:
  explicit Prepend(std::string s) : prepend_(std::move(s)) {}
  absl::Status Apply(std::string* text) const override {
    if (!text->empty()) text->insert(0, prepend_);
    return absl::OkStatus();
  }

 private:
  std::string prepend_;
};

class Replace final : public Normalizer {
 public:
  Replace(std::unique_ptr<Pattern> pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status Apply(std::string* text) const override {
    std::vector<std::pair<size_t, size_t>> matches;
    RETURN_IF_ERROR(pattern_->FindAll(*text, &matches));
    std::string out;
    size_t prev = 0;
    for (const auto& [s, e] : matches) {
      if (s == e) continue;
      out.append(*text, prev, s - prev);
      out += content_;
      prev = e;
    }
    out.append(*text, prev, std::string::npos);
    *text = std::move(out);
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Pattern> pattern_;
  std::string content_;
};

class Strip final : public Normalizer {
 public:
  Strip(bool left, bool right) : left_(left), right_(right) {}
  absl::Status Apply(std::string* text) const override {
    size_t b = 0, e = text->size();
    if (left_) b = SkipWhiteSpace(*text, 0);
    if (right_) e = std::max(b, WhiteSpaceSuffixStart(*text));
    *text = text->substr(b, e - b);
    return absl::OkStatus();
  }

 private:
  bool left_, right_;
};

class Sequence final : public Normalizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<Normalizer>> steps) : steps_(std::move(steps)) {}
  absl::Status Apply(std::string* text) const override {
    for (const auto& s : steps_) RETURN_IF_ERROR(s->Apply(text));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Normalizer>> MakeNormalizer(const json& j) {
  if (j.is_null()) return nullptr;
  ASSIGN_OR_RETURN(const std::string type, ComponentType(j, "normalizer"));
  if (type == "NFC") return std::make_unique<UnicodeForm>(UTF8PROC_STABLE | UTF8PROC_COMPOSE);
  if (type == "NFD") return std::make_unique<UnicodeForm>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
  if (type == "NFKC") {
    return std::make_unique<UnicodeForm>(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
  }
  if (type == "NFKD") {
    return std::make_unique<UnicodeForm>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
  }
  if (type == "Lowercase") return std::make_unique<Lowercase>();
  if (type == "Prepend") {
    ASSIGN_OR_RETURN(std::string s, GetString(j, "prepend", "Prepend normalizer"));
    return std::make_unique<Prepend>(std::move(s));
  }
  if (type == "Replace") {
    ASSIGN_OR_RETURN(auto pattern, MakePattern(j, "Replace normalizer"));
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", "Replace normalizer"));
    return std::make_unique<Replace>(std::move(pattern), std::move(content));
  }
  if (type == "Strip") {
    ASSIGN_OR_RETURN(bool left, GetBool(j, "strip_left", true, "Strip normalizer"));
    ASSIGN_OR_RETURN(bool right, GetBool(j, "strip_right", true, "Strip normalizer"));
    return std::make_unique<Strip>(left, right);
  }
  if (type == "Sequence") {
    const auto it = j.find("normalizers");
    if (it == j.end() || !it->is_array()) {
      return absl::InvalidArgumentError("Sequence normalizer: 'normalizers' must be an array");
    }
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (const auto& sub : *it) {
      ASSIGN_OR_RETURN(auto step, MakeNormalizer(sub));
      if (step) steps.push_back(std::move(step));
    }
    return std::make_unique<Sequence>(std::move(steps));
  }
  return absl::UnimplementedError(absl::StrCat("unsupported normalizer type '", type, "'"));
}

}  // namespace specontext
