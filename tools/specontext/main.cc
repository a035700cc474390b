// specontext: the engine's command-line interface.
#include <cstdio>
#include <cstring>

#include "tools/specontext/commands.h"

namespace {

constexpr char kUsage[] =
    "usage: specontext COMMAND [flags]\n"
    "commands:\n"
    "  generate   generate text from a prompt (specontext generate --help)\n"
    "  bench      prefill and decode benchmarks against the memory floor (--sparse: SpeContext "
    "decode)\n"
    "  prune      write a retrieval head from an EAGLE-3 draft or a small model (specontext prune "
    "--help)\n"
    "  score      teacher-forced perplexity of a text, and its logits (specontext score --help)\n"
    "  eval       task accuracy and long-generation fidelity, dense and sparse (specontext eval "
    "--help)\n"
    "  tokenize   token counts of prompts (JSON lines on stdin) with a model's tokenizer and chat "
    "template\n"
    "specontext COMMAND --help prints the command's flags.\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
      std::strcmp(argv[1], "help") == 0) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (std::strcmp(argv[1], "generate") == 0) return specontext::GenerateMain(argc, argv);
  if (std::strcmp(argv[1], "bench") == 0) return specontext::BenchMain(argc, argv);
  if (std::strcmp(argv[1], "prune") == 0) return specontext::PruneMain(argc, argv);
  if (std::strcmp(argv[1], "score") == 0) return specontext::ScoreMain(argc, argv);
  if (std::strcmp(argv[1], "eval") == 0) return specontext::EvalMain(argc, argv);
  if (std::strcmp(argv[1], "tokenize") == 0) return specontext::TokenizeMain(argc, argv);
  std::fprintf(stderr, "specontext: unknown command \"%s\"\n%s", argv[1], kUsage);
  return 2;
}
