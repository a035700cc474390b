// Test helper: a GgufVocab made from an HF tokenizer.json the way llama.cpp's convert_hf_to_gguf.py
// writes one (get_vocab_base): tokens in id order over the model vocabulary and the added tokens,
// missing ids as "[PAD<id>]" of type UNUSED, added tokens CONTROL when special or when they look
// special (<|...|>, <｜...｜>), else USER_DEFINED, other tokens NORMAL; merges as "a b" strings;
// BOS/EOS from tokenizer_config.json.
#pragma once

#include <map>
#include <string>

#include "core/io/gguf_vocab.h"
#include "nlohmann/json.hpp"

namespace specontext::testing {

inline bool LooksSpecial(const std::string& t) {
  auto wrapped = [&](const std::string& open, const std::string& close) {
    return t.size() >= open.size() + close.size() && t.compare(0, open.size(), open) == 0 &&
           t.compare(t.size() - close.size(), close.size(), close) == 0;
  };
  return wrapped("<|", "|>") || wrapped("<｜", "｜>") || t == "<pad>" || t == "<mask>";
}

inline GgufVocab GgufVocabFromHf(const std::string& tokenizer_json, const std::string& config_json,
                                 const std::string& pre) {
  const auto root = nlohmann::json::parse(tokenizer_json);
  const auto& model = root["model"];
  std::map<int64_t, std::string> by_id;
  for (const auto& [tok, id] : model["vocab"].items()) by_id[id.get<int64_t>()] = tok;
  std::map<int64_t, bool> added_special;
  for (const auto& t : root["added_tokens"]) {
    const int64_t id = t["id"].get<int64_t>();
    by_id[id] = t["content"].get<std::string>();
    added_special[id] = t["special"].get<bool>() || LooksSpecial(by_id[id]);
  }
  GgufVocab v;
  v.model = "gpt2";
  v.pre = pre;
  const int64_t n = by_id.rbegin()->first + 1;
  for (int64_t i = 0; i < n; ++i) {
    const auto it = by_id.find(i);
    if (it == by_id.end()) {
      v.tokens.push_back("[PAD" + std::to_string(i) + "]");
      v.token_types.push_back(5);
      continue;
    }
    v.tokens.push_back(it->second);
    const auto a = added_special.find(i);
    v.token_types.push_back(a == added_special.end() ? 1 : a->second ? 3 : 4);
  }
  for (const auto& m : model["merges"]) {
    v.merges.push_back(m.is_string() ? m.get<std::string>()
                                     : m[0].get<std::string>() + " " + m[1].get<std::string>());
  }
  const auto config = nlohmann::json::parse(config_json);
  auto id_of = [&](const char* key) -> int64_t {
    if (!config.contains(key) || !config[key].is_string()) return -1;
    for (const auto& [id, tok] : by_id) {
      if (tok == config[key].get<std::string>()) return id;
    }
    return -1;
  };
  v.bos_id = id_of("bos_token");
  v.eos_id = id_of("eos_token");
  if (config.contains("add_bos_token") && config["add_bos_token"].is_boolean()) {
    v.add_bos = config["add_bos_token"].get<bool>();
  }
  return v;
}

}  // namespace specontext::testing
