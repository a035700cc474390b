// End to end: the real specontext-generator on loopback, compared with the engine CLI and with
// itself under concurrency; cancellation and deadlines free the request's state.
#include <chrono>
#include <random>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

class GeneratorE2E : public SharedGeneratorSuite {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = ModelDir();
    StartSharedServer(SPC_GENERATOR_BIN, {"--model", dir + "/stories260K.bin", "--tokenizer", dir + "/tok512.bin",
                                          "--backend", "cpu", "--threads", "1", "--log-level", "warning",
                                          "--max-batch", "32"});
  }
  void SetUp() override {
    SharedGeneratorSuite::SetUp();
    if (HasFatalFailure()) return;
    stub_ = GeneratorStub(server_->address());
  }


  std::unique_ptr<v1::Generator::Stub> stub_;
};

std::string RandomPrompt(std::mt19937& rng) {
  static const char* const kWords[] = {"Once", "upon", "a", "time", "there", "was", "little", "girl", "named",
                                       "Lily", "dog", "sun", "park", "happy", "big", "tree", "ball", "mom"};
  std::uniform_int_distribution<int> len(1, 8), word(0, std::size(kWords) - 1);
  std::string p;
  for (int i = len(rng); i > 0; --i) absl::StrAppend(&p, p.empty() ? "" : " ", kWords[word(rng)]);
  return p;
}

TEST_F(GeneratorE2E, GreedyMatchesEngineCli) {
  const std::string dir = ModelDir();
  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 3; ++trial) {
    const std::string prompt = RandomPrompt(rng);
    const int max_new = std::uniform_int_distribution<int>(5, 60)(rng);
    int code = -1;
    const std::string cli = RunCommand({SPC_ENGINE_CLI_BIN, "generate", "--model", dir + "/stories260K.bin",
                                        "--tokenizer", dir + "/tok512.bin", "--backend", "cpu", "--threads", "1",
                                        "--prompt", prompt, "--max-new-tokens", std::to_string(max_new),
                                        "--temperature", "0"},
                                       &code);
    ASSERT_EQ(code, 0) << "engine CLI failed for prompt \"" << prompt << "\"";
    v1::GenerateRequest req;
    req.set_prompt(prompt);
    req.set_max_new_tokens(max_new);
    StreamResult r = CallGenerate(stub_.get(), req);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_TRUE(r.final.done());
    EXPECT_EQ(r.final.usage().generated_tokens(), static_cast<int>(r.tokens.size()));
    EXPECT_GE(r.tokens.size(), 1u);
    EXPECT_EQ(r.text + "\n", cli) << "prompt \"" << prompt << "\"";

    // The client binary prints the same text.
    const std::string client = RunCommand({SPC_CLIENT_BIN, "generate", "--addr", server_->address(), "--prompt",
                                           prompt, "--max-new-tokens", std::to_string(max_new), "--temperature",
                                           "0"},
                                          &code);
    EXPECT_EQ(code, 0);
    EXPECT_EQ(client, cli);
  }
}

TEST_F(GeneratorE2E, ConcurrentStreamsEqualSingleStream) {
  constexpr int kStreams = 32;
  std::mt19937 rng(std::random_device{}());
  std::vector<v1::GenerateRequest> reqs(kStreams);
  for (auto& req : reqs) {
    req.set_prompt(RandomPrompt(rng));
    req.set_max_new_tokens(std::uniform_int_distribution<int>(8, 48)(rng));
    req.set_ignore_eos(true);
  }
  std::vector<StreamResult> single(kStreams), concurrent(kStreams);
  for (int i = 0; i < kStreams; ++i) single[i] = CallGenerate(stub_.get(), reqs[i]);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] { concurrent[i] = CallGenerate(stub_.get(), reqs[i]); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(single[i].status.ok()) << single[i].status.error_message();
    ASSERT_TRUE(concurrent[i].status.ok()) << i << ": " << concurrent[i].status.error_message();
    EXPECT_EQ(static_cast<int>(single[i].tokens.size()), reqs[i].max_new_tokens());
    EXPECT_EQ(concurrent[i].tokens, single[i].tokens) << "stream " << i << " prompt \"" << reqs[i].prompt() << "\"";
    EXPECT_EQ(concurrent[i].text, single[i].text);
  }
  ExpectGeneratorStateFreed(server_->metrics_port());
}

TEST_F(GeneratorE2E, ChatMessagesMatchTextPromptAndStopStringsStop) {
  // With --chat-template none, one user message renders as its content, so both prompt forms
  // give the same greedy continuation.
  v1::GenerateRequest text_req;
  text_req.set_prompt("Once upon a time");
  text_req.set_max_new_tokens(20);
  StreamResult by_text = CallGenerate(stub_.get(), text_req);
  ASSERT_TRUE(by_text.status.ok()) << by_text.status.error_message();
  v1::GenerateRequest chat_req = text_req;
  chat_req.clear_prompt();
  auto* m = chat_req.add_messages();
  m->set_role("user");
  m->set_content("Once upon a time");
  StreamResult by_chat = CallGenerate(stub_.get(), chat_req);
  ASSERT_TRUE(by_chat.status.ok()) << by_chat.status.error_message();
  EXPECT_EQ(by_chat.tokens, by_text.tokens);
  EXPECT_EQ(by_chat.final.usage().prompt_tokens(), by_text.final.usage().prompt_tokens());
  // Stop strings end the text before the stop string.
  v1::GenerateRequest stop_req = text_req;
  const std::string stop = by_text.text.substr(by_text.text.size() / 2, 3);
  stop_req.add_stop(stop);
  StreamResult stopped = CallGenerate(stub_.get(), stop_req);
  ASSERT_TRUE(stopped.status.ok());
  EXPECT_EQ(stopped.final.finish_reason(), v1::FINISH_REASON_STOP_STRING);
  EXPECT_EQ(stopped.text, by_text.text.substr(0, by_text.text.find(stop)));
}

TEST_F(GeneratorE2E, ClientCancellationFreesState) {
  v1::GenerateRequest req;
  req.set_prompt("Once upon a time");
  req.set_max_new_tokens(400);
  req.set_ignore_eos(true);
  for (int i = 0; i < 4; ++i) {
    grpc::ClientContext ctx;
    auto reader = stub_->Generate(&ctx, req);
    v1::GenerateResponse resp;
    ASSERT_TRUE(reader->Read(&resp));  // generation has started
    ctx.TryCancel();
    while (reader->Read(&resp)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  ExpectGeneratorStateFreed(server_->metrics_port());
  auto body = FetchMetrics(server_->metrics_port());
  ASSERT_TRUE(body.ok());
  EXPECT_GE(MetricValue(*body, "spc_generator_cancelled_total").value_or(0), 4);
}

TEST_F(GeneratorE2E, DeadlineFreesState) {
  v1::GenerateRequest req;
  req.set_prompt("Once upon a time");
  req.set_max_new_tokens(500);
  req.set_ignore_eos(true);
  StreamResult r = CallGenerate(stub_.get(), req, /*timeout_s=*/0.01);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << r.status.error_message();
  EXPECT_LT(r.tokens.size(), 500u);
  ExpectGeneratorStateFreed(server_->metrics_port());
  // The server keeps serving.
  req.set_max_new_tokens(4);
  r = CallGenerate(stub_.get(), req);
  EXPECT_TRUE(r.status.ok());
  EXPECT_EQ(r.tokens.size(), 4u);
}

// --max-context caps what a request may reach: GetModelInfo reports it, a long max_new_tokens is clamped to
// it, a prompt that leaves no room under it is refused; a value past the model's context stops the start.
TEST(GeneratorMaxContext, CapsRequestsAndIsReported) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  const std::vector<std::string> base = {"--model",   dir + "/stories260K.bin", "--tokenizer", dir + "/tok512.bin",
                                         "--backend", "cpu", "--threads", "1", "--log-level", "warning"};
  std::vector<std::string> bad = {SPC_GENERATOR_BIN};
  bad.insert(bad.end(), base.begin(), base.end());
  bad.insert(bad.end(), {"--listen", "127.0.0.1:0", "--metrics-port", "0", "--max-context", "513"});
  int code = 0;
  RunCommand(bad, &code);
  EXPECT_NE(code, 0) << "--max-context past the model's 512 tokens must stop the server";

  std::vector<std::string> args = base;
  args.insert(args.end(), {"--max-context", "48"});
  ServerProcess server;
  ASSERT_TRUE(server.Start(SPC_GENERATOR_BIN, args).ok());
  auto stub = GeneratorStub(server.address());
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  ASSERT_TRUE(stub->GetModelInfo(&ctx, v1::ModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.max_context(), 48);
  v1::GenerateRequest req;
  for (int i = 0; i < 20; ++i) req.add_token_ids(5 + i);
  req.set_max_new_tokens(1000);
  req.set_ignore_eos(true);
  StreamResult r = CallGenerate(stub.get(), req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.final.usage().generated_tokens(), 28);
  v1::GenerateRequest full;
  for (int i = 0; i < 48; ++i) full.add_token_ids(5);
  full.set_max_new_tokens(4);
  StreamResult refused = CallGenerate(stub.get(), full);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << refused.status.error_message();
  EXPECT_THAT(refused.status.error_message(), ::testing::HasSubstr("max context is 48"));
}

// The request id comes back once, in the first message: a long id costs its bytes once per call.
TEST_F(GeneratorE2E, RequestIdIsSentOnlyInTheFirstMessage) {
  for (const std::string& id : {std::string(256, 'i'), std::string()}) {
    SCOPED_TRACE(id.size());
    v1::GenerateRequest req;
    req.set_prompt("Once upon a time");
    req.set_max_new_tokens(8);
    req.set_ignore_eos(true);
    req.set_request_id(id);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub_->Generate(&ctx, req);
    std::vector<std::string> ids;
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) ids.push_back(resp.request_id());
    ASSERT_TRUE(reader->Finish().ok());
    ASSERT_GE(ids.size(), 2u);
    if (id.empty()) {
      EXPECT_THAT(ids[0], ::testing::StartsWith("req-"));  // assigned by the server
    } else {
      EXPECT_EQ(ids[0], id);
    }
    for (size_t i = 1; i < ids.size(); ++i) EXPECT_EQ(ids[i], "") << "message " << i;
  }
}

TEST_F(GeneratorE2E, ModelInfoHealthAndMetrics) {
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&ctx, v1::ModelInfoRequest(), &info).ok());
  // The model's name, not where the server keeps it.
  EXPECT_EQ(info.model_name(), "stories260K");
  EXPECT_EQ(info.vocab_size(), 512);
  EXPECT_EQ(info.max_context(), 512);
  EXPECT_EQ(info.n_kv_heads(), 4);
  EXPECT_TRUE(info.has_tokenizer());

  auto health = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext hctx;
  grpc::health::v1::HealthCheckRequest hreq;
  grpc::health::v1::HealthCheckResponse hresp;
  ASSERT_TRUE(health->Check(&hctx, hreq, &hresp).ok());
  EXPECT_EQ(hresp.status(), grpc::health::v1::HealthCheckResponse::SERVING);

  auto body = FetchMetrics(server_->metrics_port());
  ASSERT_TRUE(body.ok());
  EXPECT_THAT(*body, ::testing::HasSubstr("# TYPE spc_time_to_first_token_seconds histogram"));
  EXPECT_THAT(*body, ::testing::HasSubstr("spc_device_memory_bytes{kind=\"weights\"}"));
  EXPECT_GT(MetricValue(*body, "spc_device_memory_bytes{kind=\"weights\"}").value_or(0), 0);
}

}  // namespace
}  // namespace specontext::testing
