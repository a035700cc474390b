// specontext-client: calls a specontext-generator.
//   specontext-client generate --addr HOST:PORT --prompt TEXT --max-new-tokens N --temperature 0
//     streams the generated text to stdout; errors go to stderr with a non-zero exit.
//   specontext-client info --addr HOST:PORT      prints the model info.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <string>

#include <grpcpp/client_context.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/cli/args.h"
#include "core/status_grpc.h"
#include "core/status_macros.h"
#include "proto/specontext.grpc.pb.h"
#include "tools/client/channel.h"

namespace specontext::client {
namespace {

void DefineCommonFlags(Args& a) {
  a.Define({"addr", "generator address HOST:PORT", false, false, "127.0.0.1:50051"});
  a.Define({"tls-ca", "PEM CA of the server certificate: use TLS", false, false, ""});
  a.Define({"tls-cert", "PEM client certificate (mutual TLS)", false, false, ""});
  a.Define({"tls-key", "PEM key of --tls-cert", false, false, ""});
  a.Define({"tls-server-name", "name to check against the server certificate", false, false, ""});
  a.Define({"timeout-s", "deadline of the call in seconds (0 = none)", false, false, "0"});
}

void DefineGenerateFlags(Args& a) {
  a.Define({"prompt", "prompt text", false, false, ""});
  a.Define({"token-ids", "comma-separated prompt token ids (instead of --prompt)", false, false, ""});
  a.Define({"max-new-tokens", "tokens to generate at most", false, false, "128"});
  a.Define({"temperature", "0 = greedy", false, false, "0"});
  a.Define({"top-k", "0 = off", false, false, "0"});
  a.Define({"top-p", "nucleus threshold in (0, 1]", false, false, "1"});
  a.Define({"seed", "sampling seed", false, false, "0"});
  a.Define({"stop", "stop string (repeatable)", false, true, ""});
  a.Define({"budget", "sparse budget for this request (default: the server's)", false, false, ""});
  a.Define({"dense", "force dense attention", true, false, ""});
  a.Define({"ignore-eos", "keep generating past end-of-sequence", true, false, ""});
  a.Define({"request-id", "request id echoed by the server", false, false, ""});
  a.Define({"print-tokens", "print the token ids (one line) instead of the text", true, false, ""});
  a.Define({"usage", "print usage statistics to stderr at the end", true, false, ""});
}

absl::StatusOr<std::unique_ptr<v1::Generator::Stub>> Connect(const Args& args) {
  ChannelOptions o;
  o.address = args.GetString("addr");
  o.tls_ca_path = args.GetString("tls-ca");
  o.tls_cert_path = args.GetString("tls-cert");
  o.tls_key_path = args.GetString("tls-key");
  o.tls_server_name = args.GetString("tls-server-name");
  ASSIGN_OR_RETURN(auto channel, MakeChannel(o));
  return v1::Generator::NewStub(channel);
}

absl::Status SetDeadline(const Args& args, grpc::ClientContext* ctx) {
  ASSIGN_OR_RETURN(double timeout_s, args.GetDouble("timeout-s"));
  if (timeout_s > 0) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::microseconds(static_cast<int64_t>(timeout_s * 1e6)));
  }
  return absl::OkStatus();
}

absl::Status RunGenerate(const Args& args) {
  v1::GenerateRequest req;
  req.set_prompt(args.GetString("prompt"));
  if (args.Has("token-ids") && !args.GetString("token-ids").empty()) {
    for (absl::string_view piece : absl::StrSplit(args.GetString("token-ids"), ',')) {
      int32_t id;
      if (!absl::SimpleAtoi(piece, &id)) return absl::InvalidArgumentError("--token-ids expects integers");
      req.add_token_ids(id);
    }
  }
  ASSIGN_OR_RETURN(int64_t max_new, args.GetInt("max-new-tokens"));
  req.set_max_new_tokens(static_cast<int32_t>(std::clamp<int64_t>(max_new, INT32_MIN, INT32_MAX)));
  ASSIGN_OR_RETURN(double temperature, args.GetDouble("temperature"));
  ASSIGN_OR_RETURN(int64_t top_k, args.GetInt("top-k"));
  ASSIGN_OR_RETURN(double top_p, args.GetDouble("top-p"));
  ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed"));
  req.mutable_sampling()->set_temperature(static_cast<float>(temperature));
  req.mutable_sampling()->set_top_k(static_cast<int32_t>(top_k));
  req.mutable_sampling()->set_top_p(static_cast<float>(top_p));
  req.mutable_sampling()->set_seed(static_cast<uint64_t>(seed));
  for (const std::string& s : args.GetAll("stop")) req.add_stop(s);
  if (args.Has("budget") && !args.GetString("budget").empty()) {
    ASSIGN_OR_RETURN(int64_t budget, args.GetInt("budget"));
    req.mutable_sparsity()->set_budget(budget);
  }
  req.mutable_sparsity()->set_dense(args.GetBool("dense"));
  req.set_ignore_eos(args.GetBool("ignore-eos"));
  req.set_request_id(args.GetString("request-id"));

  ASSIGN_OR_RETURN(auto stub, Connect(args));
  grpc::ClientContext ctx;
  RETURN_IF_ERROR(SetDeadline(args, &ctx));
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  v1::GenerateResponse last;
  const bool print_tokens = args.GetBool("print-tokens");
  std::string ids;
  while (reader->Read(&resp)) {
    if (print_tokens) {
      for (int32_t id : resp.token_ids()) absl::StrAppend(&ids, ids.empty() ? "" : " ", id);
    } else if (!resp.text().empty()) {
      std::fwrite(resp.text().data(), 1, resp.text().size(), stdout);
      std::fflush(stdout);
    }
    if (resp.done()) last = resp;
  }
  RETURN_IF_ERROR(FromGrpcStatus(reader->Finish()));
  if (print_tokens) std::fputs(ids.c_str(), stdout);
  std::fputc('\n', stdout);
  if (args.GetBool("usage")) {
    const v1::Usage& u = last.usage();
    std::fprintf(stderr, "[usage] prompt_tokens=%d generated_tokens=%d ttft_ms=%.1f tokens_per_s=%.2f finish=%s\n",
                 u.prompt_tokens(), u.generated_tokens(), u.time_to_first_token_ms(), u.tokens_per_second(),
                 v1::FinishReason_Name(last.finish_reason()).c_str());
    const v1::SparsityStats& sp = last.sparsity();
    if (sp.sparse()) {
      std::fprintf(stderr,
                   "[sparsity] budget=%lld retrieval_steps=%lld fallback_steps=%lld overlap=%.3f "
                   "kv_bytes_loaded=%lld full_reload_bytes=%lld offloaded_layers=%d captured_mass=%.3f\n",
                   static_cast<long long>(sp.budget()), static_cast<long long>(sp.retrieval_steps()),
                   static_cast<long long>(sp.fallback_steps()), sp.elastic_overlap_ratio(),
                   static_cast<long long>(sp.kv_bytes_loaded()), static_cast<long long>(sp.full_reload_bytes()),
                   sp.offloaded_layers(), sp.captured_attention_mass());
    }
  }
  return absl::OkStatus();
}

absl::Status RunInfo(const Args& args) {
  ASSIGN_OR_RETURN(auto stub, Connect(args));
  grpc::ClientContext ctx;
  RETURN_IF_ERROR(SetDeadline(args, &ctx));
  v1::ModelInfo info;
  RETURN_IF_ERROR(FromGrpcStatus(stub->GetModelInfo(&ctx, v1::ModelInfoRequest(), &info)));
  std::printf("%s", info.DebugString().c_str());
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  const std::string cmd = argc >= 2 ? argv[1] : "";
  constexpr char kUsage[] =
      "usage: specontext-client generate|info --addr HOST:PORT [flags]\n"
      "  (specontext-client generate --help, specontext-client info --help: the flags)\n";
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (cmd != "generate" && cmd != "info") {
    std::fputs(kUsage, stderr);
    return 2;
  }
  Args args;
  DefineCommonFlags(args);
  if (cmd == "generate") DefineGenerateFlags(args);
  absl::Status st = args.Parse(argc, argv, 2);
  if (st.ok() && args.help_requested()) {
    std::fputs(CommandUsage("specontext-client " + cmd, args).c_str(), stdout);
    return 0;
  }
  if (st.ok() && !args.positional().empty()) {
    st = absl::InvalidArgumentError("unexpected argument \"" + args.positional()[0] + "\"");
  }
  if (!st.ok()) {
    std::fprintf(stderr, "specontext-client %s: %s\n\nflags:\n%s", cmd.c_str(), std::string(st.message()).c_str(),
                 args.Usage().c_str());
    return 2;
  }
  st = cmd == "generate" ? RunGenerate(args) : RunInfo(args);
  if (!st.ok()) {
    std::fprintf(stderr, "specontext-client %s: error: %s: %s\n", cmd.c_str(),
                 absl::StatusCodeToString(st.code()).c_str(), std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace specontext::client

int main(int argc, char** argv) { return specontext::client::Main(argc, argv); }
