// Decoders of tokenizer.json, applied token by token (see Decoder in hf_pipeline.h).
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/tokenizer/byte_level.h"
#include "core/tokenizer/hf_common.h"
#include "core/tokenizer/hf_pipeline.h"

namespace specontext {
namespace {

using nlohmann::json;

class ByteLevelDecoder final : public Decoder {
 public:
  std::string DecodeToken(std::string_view token, bool first) const override {
    std::string out;
    // Tokens with characters outside the byte map (e.g. added tokens) pass through as they are.
    if (!byte_level::Decode(token, &out)) out.assign(token);
    return out;
  }
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(std::unique_ptr<Pattern> p, std::string content)
      : pattern_(std::move(p)), content_(std::move(content)) {}
  std::string DecodeToken(std::string_view token, bool first) const override {
    std::vector<std::pair<size_t, size_t>> matches;
    if (!pattern_->FindAll(token, &matches).ok()) return std::string(token);
    std::string out;
    size_t prev = 0;
    for (const auto& [s, e] : matches) {
      if (s == e) continue;
      out.append(token.substr(prev, s - prev));
      out += content_;
      prev = e;
    }
    out.append(token.substr(prev));
    return out;
  }

 private:
  std::unique_ptr<Pattern> pattern_;
  std::string content_;
};

// "<0x41>" -> "A". HF turns byte tokens that do not form UTF-8 into one U+FFFD per byte; here the
// bytes go through and the final lossy UTF-8 pass replaces each maximal subpart instead.
class ByteFallbackDecoder final : public Decoder {
 public:
  std::string DecodeToken(std::string_view t, bool first) const override {
    if (t.size() == 6 && t.substr(0, 3) == "<0x" && t[5] == '>') {
      int v = 0;
      for (size_t k = 3; k < 5; ++k) {
        const char c = t[k];
        const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return std::string(t);
        v = v * 16 + d;
      }
      return std::string(1, static_cast<char>(v));
    }
    return std::string(t);
  }
};

class FuseDecoder final : public Decoder {
 public:
  std::string DecodeToken(std::string_view token, bool first) const override {
    return std::string(token);
  }
};

// Removes up to `start` leading copies of `content` from the text (its first token).
class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, int64_t start) : content_(std::move(content)), start_(start) {}
  std::string DecodeToken(std::string_view token, bool first) const override {
    if (first && !content_.empty()) {
      for (int64_t k = 0; k < start_ && token.substr(0, content_.size()) == content_; ++k) {
        token.remove_prefix(content_.size());
      }
    }
    return std::string(token);
  }

 private:
  std::string content_;
  int64_t start_;
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool strip_first)
      : replacement_(std::move(replacement)), strip_first_(strip_first) {}
  std::string DecodeToken(std::string_view token, bool first) const override {
    std::string out;
    for (size_t i = 0; i < token.size();) {
      if (token.substr(i, replacement_.size()) == replacement_) {
        out.push_back(' ');
        i += replacement_.size();
      } else {
        out.push_back(token[i++]);
      }
    }
    if (first && strip_first_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
    return out;
  }

 private:
  std::string replacement_;
  bool strip_first_;
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> s) : steps_(std::move(s)) {}
  std::string DecodeToken(std::string_view token, bool first) const override {
    std::string cur(token);
    for (const auto& s : steps_) cur = s->DecodeToken(cur, first);
    return cur;
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Decoder>> MakeDecoder(const json& j) {
  if (j.is_null()) return nullptr;
  ASSIGN_OR_RETURN(const std::string type, ComponentType(j, "decoder"));
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Replace") {
    ASSIGN_OR_RETURN(auto pattern, MakePattern(j, "Replace decoder"));
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", "Replace decoder"));
    return std::make_unique<ReplaceDecoder>(std::move(pattern), std::move(content));
  }
  if (type == "Strip") {
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", "Strip decoder"));
    ASSIGN_OR_RETURN(const int64_t start, GetInt(j, "start", 0, 0, 1 << 20, "Strip decoder"));
    ASSIGN_OR_RETURN(const int64_t stop, GetInt(j, "stop", 0, 0, 1 << 20, "Strip decoder"));
    if (stop != 0) return absl::UnimplementedError("Strip decoder with stop > 0 is not supported");
    return std::make_unique<StripDecoder>(std::move(content), start);
  }
  if (type == "Metaspace") {
    ASSIGN_OR_RETURN(std::string rep, GetString(j, "replacement", "Metaspace decoder"));
    if (rep.empty()) return absl::InvalidArgumentError("Metaspace decoder: empty replacement");
    ASSIGN_OR_RETURN(bool strip, GetBool(j, "add_prefix_space", true, "Metaspace decoder"));
    if (const auto it = j.find("prepend_scheme"); it != j.end() && it->is_string()) {
      strip = it->get<std::string>() != "never";
    }
    return std::make_unique<MetaspaceDecoder>(std::move(rep), strip);
  }
  if (type == "Sequence") {
    const auto it = j.find("decoders");
    if (it == j.end() || !it->is_array()) {
      return absl::InvalidArgumentError("Sequence decoder: 'decoders' must be an array");
    }
    std::vector<std::unique_ptr<Decoder>> steps;
    for (const auto& sub : *it) {
      ASSIGN_OR_RETURN(auto step, MakeDecoder(sub));
      if (step) steps.push_back(std::move(step));
    }
    return std::make_unique<SequenceDecoder>(std::move(steps));
  }
  return absl::UnimplementedError(absl::StrCat("unsupported decoder type '", type, "'"));
}

}  // namespace specontext
