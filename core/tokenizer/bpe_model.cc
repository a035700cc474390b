#include "core/tokenizer/bpe_model.h"

#include <queue>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status_macros.h"
#include "core/tokenizer/byte_level.h"
#include "core/tokenizer/utf8.h"

namespace specontext {
namespace {

// Vocabulary ids above this are refused: no real vocabulary comes close, and a bad file must not
// make us allocate gigabytes.
constexpr int64_t kMaxId = int64_t{1} << 24;

// A symbol of the word being merged: a doubly linked list over a vector, as merges remove symbols.
struct Symbol {
  int32_t id;
  int32_t prev, next;  // -1 at the ends
  bool alive;
};

// A candidate merge of the symbol at `pos` with its right neighbour.
struct Candidate {
  int32_t rank, pos, new_id;
  bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
};

}  // namespace

absl::Status BpeModel::AddMerge(std::string_view a, std::string_view b, int32_t rank) {
  const auto ia = vocab_.find(a), ib = vocab_.find(b);
  if (ia == vocab_.end() || ib == vocab_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("merge ", rank, " ('", std::string(a), "', '",
                                                   std::string(b), "') uses a token not in vocab"));
  }
  // With a continuing_subword_prefix the right part loses its prefix when merged.
  std::string_view b_tail = b;
  if (!prefix_.empty() && b_tail.substr(0, prefix_.size()) == prefix_) {
    b_tail.remove_prefix(prefix_.size());
  }
  const std::string merged = absl::StrCat(std::string(a), std::string(b_tail));
  const auto im = vocab_.find(merged);
  if (im == vocab_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("merge ", rank, ": merged token '", merged, "' is not in vocab"));
  }
  // The first occurrence of a pair keeps its (lower) rank, like HF.
  merges_.try_emplace(PairKey(ia->second, ib->second), Merge{rank, im->second});
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::FromJson(const nlohmann::json& model) {
  std::unique_ptr<BpeModel> m(new BpeModel());
  const auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) {
    return absl::InvalidArgumentError("BPE model: 'vocab' must be an object of token -> id");
  }
  int64_t max_id = -1;
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= kMaxId) {
      return absl::InvalidArgumentError(
          absl::StrCat("BPE model: vocab id of '", token, "' must be an integer in [0, 2^24)"));
    }
    m->vocab_[token] = static_cast<int32_t>(id.get<int64_t>());
    max_id = std::max(max_id, id.get<int64_t>());
  }
  m->id_to_token_.resize(static_cast<size_t>(max_id + 1));
  m->has_id_.resize(static_cast<size_t>(max_id + 1));
  for (const auto& [token, id] : m->vocab_) {
    m->id_to_token_[id] = token;
    m->has_id_[id] = true;
  }

  auto get_string = [&](const char* key, std::string* out) -> absl::Status {
    const auto it = model.find(key);
    if (it == model.end() || it->is_null()) return absl::OkStatus();
    if (!it->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat("BPE model: '", key, "' must be a string"));
    }
    *out = it->get<std::string>();
    return absl::OkStatus();
  };
  auto get_bool = [&](const char* key, bool* out) -> absl::Status {
    const auto it = model.find(key);
    if (it == model.end() || it->is_null()) return absl::OkStatus();
    if (!it->is_boolean()) {
      return absl::InvalidArgumentError(absl::StrCat("BPE model: '", key, "' must be a boolean"));
    }
    *out = it->get<bool>();
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(get_string("continuing_subword_prefix", &m->prefix_));
  RETURN_IF_ERROR(get_string("end_of_word_suffix", &m->suffix_));
  std::string unk;
  RETURN_IF_ERROR(get_string("unk_token", &unk));
  if (model.contains("unk_token") && model["unk_token"].is_string()) m->unk_token_ = unk;
  RETURN_IF_ERROR(get_bool("ignore_merges", &m->ignore_merges_));
  RETURN_IF_ERROR(get_bool("byte_fallback", &m->byte_fallback_));
  RETURN_IF_ERROR(get_bool("fuse_unk", &m->fuse_unk_));
  if (const auto d = model.find("dropout"); d != model.end() && !d->is_null()) {
    if (!d->is_number() || d->get<double>() != 0.0) {
      return absl::InvalidArgumentError("BPE model: dropout is not supported (must be null or 0)");
    }
  }

  const auto merges = model.find("merges");
  if (merges != model.end() && !merges->is_null()) {
    if (!merges->is_array())
      return absl::InvalidArgumentError("BPE model: 'merges' must be an array");
    int32_t rank = 0;
    for (const auto& merge : *merges) {
      if (merge.is_string()) {
        const std::string& s = merge.get_ref<const std::string&>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
          return absl::InvalidArgumentError(absl::StrCat("BPE model: merge ", rank, " '", s,
                                                         "' is not two tokens split by a space"));
        }
        RETURN_IF_ERROR(m->AddMerge(std::string_view(s).substr(0, sp),
                                    std::string_view(s).substr(sp + 1), rank));
      } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
                 merge[1].is_string()) {
        RETURN_IF_ERROR(m->AddMerge(merge[0].get_ref<const std::string&>(),
                                    merge[1].get_ref<const std::string&>(), rank));
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("BPE model: merge ", rank, " must be \"a b\" or [\"a\", \"b\"]"));
      }
      ++rank;
    }
  }
  return m;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || id >= id_limit() || !has_id_[id]) return nullptr;
  return &id_to_token_[id];
}

std::optional<size_t> BpeModel::MaxInputBytesPerToken(bool byte_level) const {
  if (!prefix_.empty() || !suffix_.empty()) return std::nullopt;
  auto has_all_bytes = [&](auto spell) {
    for (int b = 0; b < 256; ++b) {
      if (vocab_.find(spell(static_cast<uint8_t>(b))) == vocab_.end()) return false;
    }
    return true;
  };
  const bool has_unk = unk_token_ && vocab_.contains(*unk_token_);
  if (has_unk && fuse_unk_) return std::nullopt;
  const bool covered =
      has_unk ||
      (byte_fallback_ && has_all_bytes([](uint8_t b) { return absl::StrFormat("<0x%02X>", b); })) ||
      (byte_level &&
       has_all_bytes([](uint8_t b) { return byte_level::Encode(std::string(1, char(b))); }));
  if (!covered) return std::nullopt;
  size_t longest = 4;  // one character, which an unk stands for
  for (const auto& [token, id] : vocab_) longest = std::max(longest, token.size());
  return longest;
}

absl::Status BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return absl::OkStatus();
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    const auto it = cache_.find(word);
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return absl::OkStatus();
    }
  }
  std::vector<int32_t> out;
  if (ignore_merges_) {
    if (const auto it = vocab_.find(word); it != vocab_.end()) out.push_back(it->second);
  }
  if (out.empty()) RETURN_IF_ERROR(MergeWord(word, &out));
  ids->insert(ids->end(), out.begin(), out.end());
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    if (cache_.size() >= kMaxCacheEntries) cache_.clear();  // crude bound; refills quickly
    cache_.emplace(std::string(word), std::move(out));
  }
  return absl::OkStatus();
}

absl::Status BpeModel::MergeWord(std::string_view word, std::vector<int32_t>* ids) const {
  std::vector<Symbol> syms;
  syms.reserve(word.size());
  auto push = [&](int32_t id) {
    const int32_t n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, -1, true});
  };
  std::optional<int32_t> unk_id;
  if (unk_token_) {
    if (const auto it = vocab_.find(*unk_token_); it != vocab_.end()) unk_id = it->second;
  }
  bool pending_unk = false;  // an unk not yet pushed (so fuse_unk can extend it)
  std::string piece;
  for (size_t i = 0; i < word.size();) {
    size_t n = utf8::ValidSequenceLength(word, i);
    if (n == 0) n = 1;  // callers pass valid UTF-8; stay total anyway
    piece.assign(word.substr(i, n));
    if (i > 0 && !prefix_.empty()) piece.insert(0, prefix_);
    if (i + n == word.size() && !suffix_.empty()) piece += suffix_;
    i += n;
    if (const auto it = vocab_.find(piece); it != vocab_.end()) {
      if (pending_unk) push(*unk_id);
      pending_unk = false;
      push(it->second);
      continue;
    }
    if (byte_fallback_) {
      std::vector<int32_t> bytes;
      for (const char c : piece) {
        const auto it = vocab_.find(absl::StrFormat("<0x%02X>", static_cast<uint8_t>(c)));
        if (it == vocab_.end()) break;
        bytes.push_back(it->second);
      }
      if (bytes.size() == piece.size()) {
        if (pending_unk) push(*unk_id);
        pending_unk = false;
        for (const int32_t b : bytes) push(b);
        continue;
      }
    }
    if (unk_token_) {
      if (!unk_id) {
        return absl::InvalidArgumentError(
            absl::StrCat("BPE model: unk_token '", *unk_token_, "' is not in vocab"));
      }
      if (pending_unk && !fuse_unk_) push(*unk_id);
      pending_unk = true;
    }
    // Without an unk token HF drops characters it cannot represent; so do we.
  }
  if (pending_unk) push(*unk_id);
  if (!syms.empty()) syms.back().next = -1;
  for (size_t k = 0; k + 1 < syms.size(); ++k) syms[k].next = static_cast<int32_t>(k + 1);

  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto consider = [&](int32_t pos) {
    const int32_t next = syms[pos].next;
    if (next < 0) return;
    const auto it = merges_.find(PairKey(syms[pos].id, syms[next].id));
    if (it != merges_.end()) queue.push({it->second.rank, pos, it->second.new_id});
  };
  for (int32_t k = 0; k + 1 < static_cast<int32_t>(syms.size()); ++k) consider(k);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = syms[top.pos];
    if (!left.alive || left.next < 0) continue;
    // Stale entry: the pair at `pos` changed since it was queued.
    const auto it = merges_.find(PairKey(left.id, syms[left.next].id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    Symbol& right = syms[left.next];
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) syms[right.next].prev = top.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }
  for (const Symbol& s : syms) {
    if (s.alive) ids->push_back(s.id);
  }
  return absl::OkStatus();
}

}  // namespace specontext
