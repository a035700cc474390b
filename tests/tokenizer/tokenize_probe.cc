// Prompt size vs tokenization time (not a test): the time a generator handler spends encoding a
// prompt before the context check. For each tokenizer file and text kind, encodes prompts of 4 KiB
// to 1 MiB and prints one line per size. With --reference, llama2.c files are also encoded with
// llama2.c's quadratic merge loop (the algorithm before O(n log n) merges) up to --reference-max.
//
//   build-cpu/bin/tokenize_probe [--reference] [--reference-max BYTES] FILE...
// FILE: a tokenizer.json or a llama2.c tokenizer .bin (by extension).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/utf8.h"

namespace specontext {
namespace {

std::string ReadAll(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return "";
  std::string data;
  char buf[1 << 16];
  for (size_t n; (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) data.append(buf, n);
  std::fclose(f);
  return data;
}

// llama2.c's encode as llama2.c writes it: one full rescan of the pairs per merge.
class QuadraticLlama2c {
 public:
  explicit QuadraticLlama2c(const std::string& data) {
    for (size_t off = 4; off + 8 <= data.size();) {
      float score;
      int32_t len;
      std::memcpy(&score, data.data() + off, 4);
      std::memcpy(&len, data.data() + off + 4, 4);
      index_.try_emplace(data.substr(off + 8, len), static_cast<int32_t>(pieces_.size()));
      pieces_.push_back(data.substr(off + 8, len));
      scores_.push_back(score);
      off += 8 + static_cast<size_t>(len);
    }
  }
  size_t Encode(std::string_view raw) const {
    const std::string text = utf8::Sanitize(raw);
    std::vector<int32_t> toks;
    if (const int32_t s = Find(" "); s >= 0) toks.push_back(s);
    for (size_t i = 0; i < text.size();) {
      const size_t n = utf8::ValidSequenceLength(text, i);
      if (const int32_t id = Find(text.substr(i, n)); id >= 0) {
        toks.push_back(id);
      } else {
        for (size_t k = 0; k < n; ++k) toks.push_back(static_cast<uint8_t>(text[i + k]) + 3);
      }
      i += n;
    }
    while (true) {
      float best = -1e10f;
      int32_t best_id = -1;
      size_t best_idx = 0;
      for (size_t i = 0; i + 1 < toks.size(); ++i) {
        const int32_t id = Find(pieces_[toks[i]] + pieces_[toks[i + 1]]);
        if (id >= 0 && scores_[id] > best) {
          best = scores_[id];
          best_id = id;
          best_idx = i;
        }
      }
      if (best_id < 0) break;
      toks[best_idx] = best_id;
      toks.erase(toks.begin() + static_cast<std::ptrdiff_t>(best_idx) + 1);
    }
    return toks.size();
  }

 private:
  int32_t Find(const std::string& s) const {
    const auto it = index_.find(s);
    return it == index_.end() ? -1 : it->second;
  }
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  absl::flat_hash_map<std::string, int32_t> index_;
};

struct TextKind {
  const char* name;
  std::string unit;  // repeated to the prompt size
};

const TextKind kKinds[] = {
    {"prose", "Once upon a time, there was a little girl named Lily. She loved to play outside "
              "in the sunshine with her big red ball. "},
    {"one-word", "a"},
    {"spaces", " "},
    {"digits", "0123456789"},
    {"cjk", "\u4f60\u597d\u4e16\u754c"},
};

std::string Repeat(const std::string& unit, size_t size) {
  std::string s;
  while (s.size() < size) s += unit;
  s.resize(size);
  return utf8::Sanitize(s);  // the cut may split a character
}

double Seconds(const std::function<size_t()>& f, size_t* tokens) {
  const auto t0 = std::chrono::steady_clock::now();
  *tokens = f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int Main(int argc, char** argv) {
  bool reference = false;
  size_t reference_max = 64 << 10;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--reference") {
      reference = true;
    } else if (a == "--reference-max" && i + 1 < argc) {
      reference_max = std::stoul(argv[++i]);
    } else {
      files.push_back(a);
    }
  }
  std::printf("file\ttext\tbytes\ttokens\tseconds\talgorithm\n");
  for (const std::string& file : files) {
    const bool json = file.size() > 5 && file.substr(file.size() - 5) == ".json";
    auto tok = json ? LoadHfTokenizer(file) : LoadLlama2cTokenizer(file);
    if (!tok.ok()) {
      std::fprintf(stderr, "%s\n", std::string(tok.status().message()).c_str());
      return 1;
    }
    std::unique_ptr<QuadraticLlama2c> quadratic;
    if (reference && !json) quadratic = std::make_unique<QuadraticLlama2c>(ReadAll(file));
    for (const TextKind& kind : kKinds) {
      for (size_t size = 4 << 10; size <= (1 << 20); size *= 4) {
        const std::string text = Repeat(kind.unit, size);
        size_t n = 0;
        const double s = Seconds([&] { return (*tok)->Encode(text, true)->size(); }, &n);
        std::printf("%s\t%s\t%zu\t%zu\t%.3f\tcurrent\n", file.c_str(), kind.name, size, n, s);
        if (quadratic && size <= reference_max) {
          const double q = Seconds([&] { return quadratic->Encode(text) + 1; }, &n);
          std::printf("%s\t%s\t%zu\t%zu\t%.3f\tquadratic\n", file.c_str(), kind.name, size, n, q);
        }
        std::fflush(stdout);
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace specontext

int main(int argc, char** argv) { return specontext::Main(argc, argv); }
