// A hostile client against a real specontext-retriever, for the before/after figures of docs/services.md
// ("Limits and hardening"): (1) one Select naming one sequence --repeat times, (2) --sessions sessions of
// --sequences sequences that each observe --tokens tokens. Prints what was accepted or refused, the time of
// the Select and the retriever's peak resident memory (VmHWM) and cache bytes after each part.
//
//   retriever_flood_probe --retriever build-cpu/bin/specontext-retriever [-- extra retriever flags]
//
// The head is random, shaped like a large target's (8 KV heads x 128 dims: 4 KiB of f32 K per token) with
// a small hidden size so that observing is cheap. Built by `ninja -C build-cpu retriever_flood_probe`.
#include <sys/types.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <grpcpp/create_channel.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "core/sparse/retrieval_head.h"
#include "tests/services/random_head.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

using Stream = grpc::ClientReaderWriter<v1::RetrieverRequest, v1::RetrieverResponse>;

std::string WriteWideHead(std::mt19937& rng) {
  RetrievalHeadConfig c;
  c.kind = RetrievalHeadKind::kLayer;
  c.attn = Stories260KConfig();
  c.attn.hidden_size = 16;
  c.attn.num_hidden_layers = 1;
  c.attn.num_attention_heads = 8;
  c.attn.num_key_value_heads = 8;
  c.attn.head_dim = 128;
  c.attn.max_position_embeddings = 1 << 17;
  c.target = {"probe", 512, 64, 5, 8, 128};
  const std::string dir = "/tmp/spc_flood_head_" + std::to_string(rng());
  std::filesystem::create_directories(dir);
  absl::Status st = SaveRetrievalHead(dir, c,
                                      {{"embed_tokens.weight", RandomF32(rng, {512, 16})},
                                       {"input_layernorm.weight", RandomF32(rng, {16})},
                                       {"q_proj.weight", RandomF32(rng, {1024, 16})},
                                       {"k_proj.weight", RandomF32(rng, {1024, 16})}});
  if (!st.ok()) {
    std::fprintf(stderr, "cannot write the head: %s\n", st.ToString().c_str());
    std::exit(1);
  }
  return dir;
}

double PeakRssMiB(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / 1024.0;
  }
  return -1;
}

// Writes `reqs`, then a probe (close of an id never opened) and reads up to its answer: the errors the
// requests got, by code name.
bool Exchange(Stream* s, const std::vector<v1::RetrieverRequest>& reqs, std::map<std::string, int>* errors) {
  for (const auto& r : reqs) {
    if (!s->Write(r)) return false;
  }
  v1::RetrieverRequest probe;
  probe.mutable_close()->set_sequence_id(~uint64_t{0});
  if (!s->Write(probe)) return false;
  v1::RetrieverResponse resp;
  while (s->Read(&resp)) {
    if (resp.has_error() && resp.error().sequence_id() == ~uint64_t{0}) return true;
    if (resp.has_error()) {
      ++(*errors)[absl::StatusCodeToString(static_cast<absl::StatusCode>(resp.error().code()))];
    }
  }
  return false;
}

int Main(int argc, char** argv) {
  std::string bin;
  int repeat = 20000, sessions = 24, sequences = 256, tokens = 256, select_tokens = 1024;
  std::vector<std::string> extra = {"--log-level", "warning"};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--retriever") bin = next();
    else if (a == "--repeat") repeat = std::stoi(next());
    else if (a == "--sessions") sessions = std::stoi(next());
    else if (a == "--sequences") sequences = std::stoi(next());
    else if (a == "--tokens") tokens = std::stoi(next());
    else if (a == "--") {
      for (++i; i < argc; ++i) extra.push_back(argv[i]);
    } else {
      std::fprintf(stderr, "usage: %s --retriever BIN [--repeat N] [--sessions S] [--sequences N] [--tokens T] "
                   "[-- retriever flags]\n", argv[0]);
      return 2;
    }
  }
  std::mt19937 rng(1234);
  const std::string head = WriteWideHead(rng);
  RemoveOnExit head_guard{head};
  std::vector<std::string> args = {"--head", head};
  args.insert(args.end(), extra.begin(), extra.end());
  ServerProcess server;
  if (absl::Status st = server.Start(bin, args); !st.ok()) {
    std::fprintf(stderr, "cannot start %s: %s\n", bin.c_str(), st.ToString().c_str());
    return 1;
  }
  auto channel_args = grpc::ChannelArguments();
  channel_args.SetMaxReceiveMessageSize(1 << 30);
  auto stub = v1::Retriever::NewStub(
      grpc::CreateCustomChannel(server.address(), grpc::InsecureChannelCredentials(), channel_args));
  auto cache_mib = [&] {
    auto body = FetchMetrics(server.metrics_port());
    return body.ok() ? MetricValue(*body, "spc_retriever_cache_bytes").value_or(-1) / (1 << 20) : -1.0;
  };
  auto tokens_of = [&](uint64_t id, int n) {
    v1::RetrieverRequest r;
    r.mutable_observe()->set_sequence_id(id);
    for (int t = 0; t < n; ++t) r.mutable_observe()->add_token_ids(static_cast<int32_t>(rng() % 512));
    return r;
  };
  std::printf("retriever: %s %s\n", bin.c_str(), absl::StrJoin(extra, " ").c_str());

  // (1) One sequence of `select_tokens` tokens, selected `repeat` times in one Select (budget 2048).
  {
    grpc::ClientContext ctx;
    std::unique_ptr<Stream> s = stub->Session(&ctx);
    v1::RetrieverRequest open;
    open.mutable_open()->set_sequence_id(1);
    open.mutable_open()->set_max_tokens(select_tokens);
    std::map<std::string, int> errors;
    Exchange(s.get(), {open, tokens_of(1, select_tokens)}, &errors);
    v1::RetrieverRequest sel;
    for (int i = 0; i < repeat; ++i) sel.mutable_select()->add_sequence_ids(1);
    sel.mutable_select()->set_budget(2048);
    const absl::Time t0 = absl::Now();
    v1::RetrieverResponse resp;
    const bool answered = s->Write(sel) && s->Read(&resp);
    const double secs = absl::ToDoubleSeconds(absl::Now() - t0);
    std::string outcome = !answered ? "stream broken"
                          : resp.has_error()
                              ? absl::StatusCodeToString(static_cast<absl::StatusCode>(resp.error().code())) + ": " +
                                    resp.error().message().substr(0, 80)
                              : absl::StrCat("answered, ", resp.ByteSizeLong(), " bytes");
    std::printf("select x%d: %.3f s, %s; peak RSS %.0f MiB\n", repeat, secs, outcome.c_str(), PeakRssMiB(server.pid()));
    s->WritesDone();
    s->Finish();
  }
  // (2) `sessions` sessions held open at once, each with `sequences` sequences of `tokens` tokens.
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<Stream>> streams;
  int sessions_ok = 0, sessions_refused = 0;
  std::map<std::string, int> errors;
  const absl::Time t0 = absl::Now();
  for (int k = 0; k < sessions; ++k) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    streams.push_back(stub->Session(contexts.back().get()));
    std::vector<v1::RetrieverRequest> reqs;
    for (int q = 0; q < sequences; ++q) {
      v1::RetrieverRequest open;
      open.mutable_open()->set_sequence_id(q);
      open.mutable_open()->set_max_tokens(tokens);
      reqs.push_back(open);
      reqs.push_back(tokens_of(q, tokens));
    }
    if (Exchange(streams.back().get(), reqs, &errors)) {
      ++sessions_ok;
    } else {
      ++sessions_refused;
    }
  }
  std::string refused;
  for (const auto& [code, n] : errors) absl::StrAppend(&refused, " ", code, "=", n);
  std::printf("%d sessions x %d sequences x %d tokens: %d sessions served, %d refused; per-sequence errors:%s; "
              "cache %.0f MiB, peak RSS %.0f MiB, %.1f s\n",
              sessions, sequences, tokens, sessions_ok, sessions_refused, refused.empty() ? " none" : refused.c_str(),
              cache_mib(), PeakRssMiB(server.pid()), absl::ToDoubleSeconds(absl::Now() - t0));
  for (auto& c : contexts) c->TryCancel();
  for (auto& s : streams) s->Finish();
  return 0;
}

}  // namespace
}  // namespace specontext::testing

int main(int argc, char** argv) { return specontext::testing::Main(argc, argv); }
