// HF tokenizer.json: added tokens -> normalizer -> pre-tokenizer -> BPE model, and the decoder.
// The post_processor is not applied: callers choose BOS explicitly (Encode's add_bos), which is
// what HF's encode(text, add_special_tokens=False) plus an explicit BOS gives.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/tokenizer/added_tokens.h"
#include "core/tokenizer/bpe_model.h"
#include "core/tokenizer/hf_pipeline.h"
#include "core/tokenizer/string_map.h"
#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/utf8.h"

namespace specontext {
namespace {

using nlohmann::json;

// Nesting deeper than this is refused before building anything (stack safety on hostile input).
constexpr int kMaxJsonDepth = 64;

// Tokens that end a turn or the text in the families we support; those present are EOS ids too.
constexpr const char* kEndTokens[] = {"<|eot_id|>",           "<|eom_id|>",    "<|end_of_text|>",
                                      "<|im_end|>",           "<|endoftext|>", "</s>",
                                      "<｜end▁of▁sentence｜>"};
constexpr const char* kBosTokens[] = {"<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<s>"};

// How many times shorter normalization can make a text; nullopt when it can delete text outright
// (Strip, or a Replace with a regex or an empty replacement). Called on validated stages.
std::optional<int64_t> NormalizerShrink(const json& j) {
  if (j.is_null()) return 1;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    int64_t factor = 1;
    for (const json& sub : j["normalizers"]) {
      const auto f = NormalizerShrink(sub);
      if (!f || factor > (int64_t{1} << 20)) return std::nullopt;
      factor *= *f;
    }
    return factor;
  }
  // One code point becomes at least a quarter of its bytes (U+1D400 -> "A"), and three Hangul
  // jamo compose into one syllable of a third of their bytes.
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD" || type == "Lowercase") {
    return 4;
  }
  if (type == "Prepend") return 1;
  if (type == "Replace") {
    const auto s = j["pattern"].find("String");
    const std::string content = j.value("content", "");
    if (s == j["pattern"].end() || !s->is_string() || content.empty()) return std::nullopt;
    const int64_t from = static_cast<int64_t>(s->get_ref<const std::string&>().size());
    const int64_t to = static_cast<int64_t>(content.size());
    return std::max<int64_t>(1, (from + to - 1) / to);
  }
  return std::nullopt;
}

// Whether pre-tokenization can drop text (a Split that removes matches); `byte_level` is set when
// a ByteLevel stage turns every byte into a character.
bool PreTokenizerDrops(const json& j, bool* byte_level) {
  if (j.is_null()) return false;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    bool drops = false;
    for (const json& sub : j["pretokenizers"]) drops |= PreTokenizerDrops(sub, byte_level);
    return drops;
  }
  if (type == "ByteLevel") *byte_level = true;
  return type == "Split" && j.value("behavior", "") == "Removed";
}

bool TooDeep(std::string_view text) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > kMaxJsonDepth) return true;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return false;
}

class HfTokenizer final : public Tokenizer {
 public:
  absl::Status Init(const json& root, const json& config);

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view raw, bool add_bos) const override {
    constexpr auto kAny = [](int, size_t, size_t) { return true; };
    return EncodeText(utf8::Sanitize(raw), add_bos, *raw_matcher_, kAny, kAny);
  }

  absl::StatusOr<std::vector<int32_t>> EncodeParts(std::span<const TextPart> parts,
                                                   bool add_bos) const override {
    if (std::all_of(parts.begin(), parts.end(),
                    [](const TextPart& p) { return p.special_tokens; })) {
      return Tokenizer::EncodeParts(parts, add_bos);
    }
    std::string text;
    std::vector<std::pair<size_t, size_t>> plain;  // byte ranges where special tokens are text
    for (const TextPart& p : parts) {
      const size_t start = text.size();
      text += utf8::Sanitize(p.text);
      if (!p.special_tokens && text.size() > start) plain.emplace_back(start, text.size());
    }
    // Special tokens are all looked for in the raw text, where the template wrote them verbatim;
    // after normalization the plain ranges could no longer be located.
    auto raw_allow = [&](int t, size_t start, size_t end) {
      if (!added_[t].special) return true;
      // The first range ending after `start` is the only one that can overlap [start, end).
      const auto it = std::upper_bound(plain.begin(), plain.end(), start,
                                       [](size_t v, const auto& r) { return v < r.second; });
      return it == plain.end() || it->first >= end;
    };
    auto norm_allow = [&](int t, size_t, size_t) { return !added_[t].special; };
    return EncodeText(text, add_bos, *special_raw_matcher_, raw_allow, norm_allow);
  }

  std::string TokenBytes(int32_t id) const override { return TokenBytesAfter(0, id); }

  std::string TokenBytesAfter(int32_t prev_id, int32_t id) const override {
    const std::string* tok = TokenString(id);
    if (tok == nullptr) return "";
    if (!decoder_) return prev_id < 0 ? *tok : " " + *tok;  // HF joins tokens with spaces
    return decoder_->DecodeToken(*tok, prev_id < 0);
  }

  std::optional<int64_t> MaxBytesPerToken() const override { return max_bytes_per_token_; }
  int32_t vocab_size() const override { return vocab_size_; }
  int32_t bos_id() const override { return bos_id_; }
  bool default_add_bos() const override { return add_bos_; }
  std::vector<int32_t> eos_ids() const override { return eos_ids_; }
  std::optional<int32_t> TokenToId(std::string_view token) const override {
    if (const auto it = added_by_content_.find(token); it != added_by_content_.end()) {
      return added_[it->second].id;
    }
    return model_->TokenToId(token);
  }
  bool IsSpecial(int32_t id) const override {
    const auto it = added_by_id_.find(id);
    return it != added_by_id_.end() && added_[it->second].special;
  }

 private:
  // `text` is valid UTF-8. `raw` finds added tokens in it before normalization, `norm_allow` says
  // which normalized added tokens may match afterwards.
  absl::StatusOr<std::vector<int32_t>> EncodeText(const std::string& text, bool add_bos,
                                                  const AddedTokenMatcher& raw,
                                                  AddedTokenMatcher::MatchFilter raw_allow,
                                                  AddedTokenMatcher::MatchFilter norm_allow) const {
    std::vector<int32_t> ids;
    if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);
    for (const TextSegment& seg : raw.Split(text, raw_allow)) {
      if (seg.token >= 0) {
        ids.push_back(added_[seg.token].id);
        continue;
      }
      std::string part = text.substr(seg.start, seg.end - seg.start);
      if (normalizer_) RETURN_IF_ERROR(normalizer_->Apply(&part));
      for (const TextSegment& sub : norm_matcher_->Split(part, norm_allow)) {
        if (sub.token >= 0) {
          ids.push_back(added_[sub.token].id);
          continue;
        }
        std::vector<PreToken> pieces;
        pieces.push_back(
            {part.substr(sub.start, sub.end - sub.start), seg.start == 0 && sub.start == 0});
        if (pre_tokenizer_) RETURN_IF_ERROR(pre_tokenizer_->Apply(&pieces));
        for (const PreToken& p : pieces) RETURN_IF_ERROR(model_->Tokenize(p.text, &ids));
      }
    }
    return ids;
  }

  const std::string* TokenString(int32_t id) const {
    if (const auto it = added_by_id_.find(id); it != added_by_id_.end()) {
      return &added_[it->second].content;
    }
    return model_->IdToToken(id);
  }
  absl::Status ParseAddedTokens(const json& root);
  absl::StatusOr<int32_t> ConfigToken(const json& config, const char* key) const;

  std::unique_ptr<BpeModel> model_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<Decoder> decoder_;
  std::vector<AddedToken> added_;
  absl::flat_hash_map<int32_t, size_t> added_by_id_;
  StringMap<size_t> added_by_content_;
  std::unique_ptr<AddedTokenMatcher> raw_matcher_, norm_matcher_;
  // The raw matcher plus the normalized special tokens, for EncodeParts.
  std::unique_ptr<AddedTokenMatcher> special_raw_matcher_;
  int32_t vocab_size_ = 0;
  int32_t bos_id_ = -1;
  bool add_bos_ = false;
  std::vector<int32_t> eos_ids_;
  std::optional<int64_t> max_bytes_per_token_;
};

absl::Status HfTokenizer::ParseAddedTokens(const json& root) {
  const auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_array()) return absl::InvalidArgumentError("'added_tokens' must be an array");
  for (const auto& t : *it) {
    if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() ||
        !t.contains("content") || !t["content"].is_string()) {
      return absl::InvalidArgumentError("added token needs an integer 'id' and a string 'content'");
    }
    AddedToken tok;
    const int64_t id = t["id"].get<int64_t>();
    if (id < 0 || id >= (int64_t{1} << 24)) {
      return absl::InvalidArgumentError(absl::StrCat("added token id ", id, " out of range"));
    }
    tok.id = static_cast<int32_t>(id);
    tok.content = t["content"].get<std::string>();
    if (tok.content.empty()) return absl::InvalidArgumentError("added token with empty content");
    auto flag = [&](const char* key, bool fallback, bool* out) -> absl::Status {
      const auto f = t.find(key);
      if (f == t.end() || f->is_null()) {
        *out = fallback;
      } else if (f->is_boolean()) {
        *out = f->get<bool>();
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("added token '", tok.content, "': '", key, "' must be a boolean"));
      }
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(flag("special", false, &tok.special));
    RETURN_IF_ERROR(flag("lstrip", false, &tok.lstrip));
    RETURN_IF_ERROR(flag("rstrip", false, &tok.rstrip));
    RETURN_IF_ERROR(flag("single_word", false, &tok.single_word));
    RETURN_IF_ERROR(flag("normalized", !tok.special, &tok.normalized));
    added_by_id_[tok.id] = added_.size();
    added_by_content_.try_emplace(tok.content, added_.size());
    added_.push_back(std::move(tok));
  }
  return absl::OkStatus();
}

// A token named by tokenizer_config.json ("<s>" or {"content": "<s>"}); -1 when null or absent.
absl::StatusOr<int32_t> HfTokenizer::ConfigToken(const json& config, const char* key) const {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return -1;
  const json* v = &*it;
  if (v->is_object()) {
    const auto c = v->find("content");
    if (c == v->end()) return absl::InvalidArgumentError(absl::StrCat(key, " has no 'content'"));
    v = &*c;
  }
  if (!v->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer_config.json: ", key, " must be a string"));
  }
  const auto id = TokenToId(v->get<std::string>());
  if (!id) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer_config.json: ", key, " '",
                                                   v->get<std::string>(), "' is not a token"));
  }
  return *id;
}

absl::Status HfTokenizer::Init(const json& root, const json& config) {
  if (!root.is_object()) return absl::InvalidArgumentError("tokenizer.json must be a JSON object");
  const auto model = root.find("model");
  if (model == root.end() || !model->is_object()) {
    return absl::InvalidArgumentError("tokenizer.json has no 'model' object");
  }
  std::string type = "BPE";  // old files leave the BPE model's type out
  if (const auto t = model->find("type"); t != model->end()) {
    if (!t->is_string()) return absl::InvalidArgumentError("model 'type' must be a string");
    type = t->get<std::string>();
  }
  if (type != "BPE") {
    return absl::UnimplementedError(absl::StrCat("unsupported model type '", type, "'"));
  }
  ASSIGN_OR_RETURN(model_, BpeModel::FromJson(*model));
  auto stage = [&](const char* key) -> const json& {
    static const json kNull;
    const auto it = root.find(key);
    return it == root.end() ? kNull : *it;
  };
  ASSIGN_OR_RETURN(normalizer_, MakeNormalizer(stage("normalizer")));
  ASSIGN_OR_RETURN(pre_tokenizer_, MakePreTokenizer(stage("pre_tokenizer")));
  ASSIGN_OR_RETURN(decoder_, MakeDecoder(stage("decoder")));
  RETURN_IF_ERROR(ParseAddedTokens(root));
  raw_matcher_ = std::make_unique<AddedTokenMatcher>(&added_, /*normalized=*/false);
  // Normalized added tokens are searched for in normalized text, so their content is normalized
  // too.
  std::vector<std::string> normalized_contents;
  for (const AddedToken& t : added_) {
    normalized_contents.push_back(t.content);
    if (normalizer_ && t.normalized)
      RETURN_IF_ERROR(normalizer_->Apply(&normalized_contents.back()));
  }
  norm_matcher_ =
      std::make_unique<AddedTokenMatcher>(&added_, /*normalized=*/true, normalized_contents);
  auto raw_or_special = [](const AddedToken& t) { return !t.normalized || t.special; };
  special_raw_matcher_ = std::make_unique<AddedTokenMatcher>(
      &added_, absl::FunctionRef<bool(const AddedToken&)>(raw_or_special));

  // Input text reaches the model through normalization and pre-tokenization, so a model token
  // stands for at most (its longest string) x (how much normalization can shrink text) bytes.
  bool byte_level = false;
  const std::optional<int64_t> shrink = NormalizerShrink(stage("normalizer"));
  const bool drops = PreTokenizerDrops(stage("pre_tokenizer"), &byte_level);
  const std::optional<size_t> model_bytes = model_->MaxInputBytesPerToken(byte_level);
  const bool swallows_space = std::any_of(added_.begin(), added_.end(),
                                          [](const AddedToken& t) { return t.lstrip || t.rstrip; });
  if (shrink && !drops && model_bytes && !swallows_space) {
    size_t longest = *model_bytes;
    for (const AddedToken& t : added_) longest = std::max(longest, t.content.size());
    max_bytes_per_token_ = static_cast<int64_t>(longest) * *shrink;
  }

  vocab_size_ = model_->id_limit();
  for (const AddedToken& t : added_) vocab_size_ = std::max(vocab_size_, t.id + 1);

  // BOS/EOS: tokenizer_config.json when given, else the well-known special tokens.
  if (config.is_object()) {
    ASSIGN_OR_RETURN(bos_id_, ConfigToken(config, "bos_token"));
    ASSIGN_OR_RETURN(const int32_t eos, ConfigToken(config, "eos_token"));
    if (eos >= 0) eos_ids_.push_back(eos);
    // Not an HF key: the GGUF converter (core/io/gguf_vocab.cc) lists the file's end-of-turn
    // token here so that it ends generation like EOS.
    if (const auto it = config.find("end_of_turn_tokens"); it != config.end() && !it->is_null()) {
      if (!it->is_array()) {
        return absl::InvalidArgumentError("tokenizer_config.json: end_of_turn_tokens must be a list");
      }
      for (const json& name : *it) {
        json one = {{"token", name}};
        ASSIGN_OR_RETURN(const int32_t id, ConfigToken(one, "token"));
        if (id >= 0) eos_ids_.push_back(id);
      }
    }
  } else {
    for (const char* name : kBosTokens) {
      const auto it = added_by_content_.find(name);
      if (it != added_by_content_.end() && added_[it->second].special) {
        bos_id_ = added_[it->second].id;
        break;
      }
    }
  }
  add_bos_ = bos_id_ >= 0;
  if (config.is_object()) {
    if (const auto it = config.find("add_bos_token"); it != config.end() && it->is_boolean()) {
      add_bos_ = it->get<bool>() && bos_id_ >= 0;
    }
  }
  for (const char* name : kEndTokens) {
    const auto it = added_by_content_.find(name);
    if (it != added_by_content_.end() && added_[it->second].special) {
      eos_ids_.push_back(added_[it->second].id);
    }
  }
  std::sort(eos_ids_.begin(), eos_ids_.end());
  eos_ids_.erase(std::unique(eos_ids_.begin(), eos_ids_.end()), eos_ids_.end());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseHfTokenizer(std::string_view json_text,
                                                            std::string_view config_text) {
  if (TooDeep(json_text) || TooDeep(config_text)) {
    return absl::InvalidArgumentError(absl::StrCat("JSON nested deeper than ", kMaxJsonDepth));
  }
  try {
    const json root = json::parse(json_text.begin(), json_text.end(), nullptr, false);
    if (root.is_discarded()) return absl::InvalidArgumentError("tokenizer.json is not valid JSON");
    json config;  // null unless given
    if (!config_text.empty()) {
      config = json::parse(config_text.begin(), config_text.end(), nullptr, false);
      if (config.is_discarded()) {
        return absl::InvalidArgumentError("tokenizer_config.json is not valid JSON");
      }
    }
    auto tok = std::make_unique<HfTokenizer>();
    RETURN_IF_ERROR(tok->Init(root, config));
    return std::unique_ptr<Tokenizer>(std::move(tok));
  } catch (const std::exception& e) {
    // Type checks above should make this unreachable; never let an exception escape.
    return absl::InvalidArgumentError(absl::StrCat("bad tokenizer.json: ", e.what()));
  }
}

}  // namespace specontext
