// Table-driven bad input against the real generator: each case gets the right gRPC status with a
// message naming the problem, and the server keeps serving afterwards.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

struct BadCase {
  const char* name;
  std::function<void(v1::GenerateRequest*)> mutate;  // applied to a valid request
  grpc::StatusCode code;
  const char* message_part;  // the status message must contain this
};

v1::GenerateRequest ValidRequest() {
  v1::GenerateRequest req;
  req.set_prompt("Once upon a time");
  req.set_max_new_tokens(3);
  return req;
}

class BadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = ModelDir();
    if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
    ASSERT_TRUE(server_.Start(SPC_GENERATOR_BIN, {"--model", dir + "/stories260K.bin", "--tokenizer",
                                                  dir + "/tok512.bin", "--backend", "cpu", "--threads", "1",
                                                  "--log-level", "warning", "--max-message-bytes", "256KiB",
                                                  "--max-prompt-bytes", "16KiB"})
                    .ok());
    stub_ = GeneratorStub(server_.address());
  }
  void ExpectServing() {
    StreamResult ok = CallGenerate(stub_.get(), ValidRequest());
    ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
    EXPECT_EQ(ok.tokens.size(), 3u);
  }
  ServerProcess server_;
  std::unique_ptr<v1::Generator::Stub> stub_;
};

TEST_F(BadInput, EachCaseGetsTheRightStatusAndTheServerKeepsServing) {
  std::mt19937 rng(std::random_device{}());
  const int vocab = 512;
  const int bad_id = std::uniform_int_distribution<int>(vocab, vocab + 1000)(rng);
  const float big_top_p = std::uniform_real_distribution<float>(1.001f, 10.0f)(rng);
  const std::vector<BadCase> cases = {
      {"no prompt field", [](auto* r) { r->clear_prompt(); }, grpc::StatusCode::INVALID_ARGUMENT, "no prompt"},
      {"two prompt fields", [](auto* r) { r->add_token_ids(1); }, grpc::StatusCode::INVALID_ARGUMENT,
       "only one of"},
      {"prompt longer than the context",
       [](auto* r) {
         r->clear_prompt();
         for (int i = 0; i < 600; ++i) r->add_token_ids(1 + i % 500);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "context"},
      {"prompt text over the byte limit", [](auto* r) { r->set_prompt(std::string(20000, 'a')); },
       grpc::StatusCode::INVALID_ARGUMENT, "bytes"},
      {"max_new_tokens 0", [](auto* r) { r->set_max_new_tokens(0); }, grpc::StatusCode::INVALID_ARGUMENT,
       "max_new_tokens"},
      {"max_new_tokens negative", [](auto* r) { r->set_max_new_tokens(-5); }, grpc::StatusCode::INVALID_ARGUMENT,
       "max_new_tokens"},
      {"max_new_tokens huge", [](auto* r) { r->set_max_new_tokens((1 << 20) + 1); },
       grpc::StatusCode::INVALID_ARGUMENT, "max_new_tokens"},
      {"temperature NaN",
       [](auto* r) { r->mutable_sampling()->set_temperature(std::numeric_limits<float>::quiet_NaN()); },
       grpc::StatusCode::INVALID_ARGUMENT, "temperature"},
      {"temperature negative", [](auto* r) { r->mutable_sampling()->set_temperature(-0.5f); },
       grpc::StatusCode::INVALID_ARGUMENT, "temperature"},
      {"top_p 0", [](auto* r) { r->mutable_sampling()->set_top_p(0.0f); }, grpc::StatusCode::INVALID_ARGUMENT,
       "top_p"},
      {"top_p above 1", [&](auto* r) { r->mutable_sampling()->set_top_p(big_top_p); },
       grpc::StatusCode::INVALID_ARGUMENT, "top_p"},
      {"top_p NaN", [](auto* r) { r->mutable_sampling()->set_top_p(std::nanf("")); },
       grpc::StatusCode::INVALID_ARGUMENT, "top_p"},
      {"token id past the vocabulary",
       [&](auto* r) {
         r->clear_prompt();
         r->add_token_ids(1);
         r->add_token_ids(bad_id);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "vocabulary"},
      {"negative token id",
       [](auto* r) {
         r->clear_prompt();
         r->add_token_ids(-1);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "vocabulary"},
      {"stop token id past the vocabulary", [&](auto* r) { r->add_stop_token_ids(bad_id); },
       grpc::StatusCode::INVALID_ARGUMENT, "stop_token_ids"},
      {"budget 0", [](auto* r) { r->mutable_sparsity()->set_budget(0); }, grpc::StatusCode::INVALID_ARGUMENT,
       "budget"},
      {"bad chat role",
       [](auto* r) {
         r->clear_prompt();
         auto* m = r->add_messages();
         m->set_role("wizard");
         m->set_content("hi");
       },
       grpc::StatusCode::INVALID_ARGUMENT, "role"},
      {"oversized message", [](auto* r) { r->set_prompt(std::string(300 * 1024, 'b')); },
       grpc::StatusCode::RESOURCE_EXHAUSTED, ""},
      {"request_id over the limit", [](auto* r) { r->set_request_id(std::string(257, 'r')); },
       grpc::StatusCode::INVALID_ARGUMENT, "request_id is 257 bytes; the limit is 256"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    v1::GenerateRequest req = ValidRequest();
    c.mutate(&req);
    StreamResult r = CallGenerate(stub_.get(), req);
    EXPECT_EQ(r.status.error_code(), c.code) << r.status.error_message();
    EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr(c.message_part));
    EXPECT_TRUE(r.tokens.empty());
    ExpectServing();
  }
  auto body = FetchMetrics(server_.metrics_port());
  ASSERT_TRUE(body.ok());
  EXPECT_GE(MetricValue(*body, "spc_generator_requests_total{code=\"INVALID_ARGUMENT\"}").value_or(0), 15);
}

// A rejected value is echoed cut to a few hundred bytes and escaped: a 3 MiB role neither floods
// the log nor overflows the status trailer (which would cost the client the INVALID_ARGUMENT).
TEST(BadInputEcho, AHugeRejectedValueIsCutInTheStatusAndTheLog) {
  const std::string dir = ModelDir();
  if (dir.empty()) GTEST_FAIL() << "stories260K not found in models/";
  ServerProcess server;
  ASSERT_TRUE(server
                  .Start(SPC_GENERATOR_BIN,
                         {"--model", dir + "/stories260K.bin", "--tokenizer", dir + "/tok512.bin",
                          "--backend", "cpu", "--threads", "1", "--log-level", "info"})
                  .ok());
  auto stub = GeneratorStub(server.address());
  const std::vector<std::pair<std::string, std::string>> roles = {
      {std::string(3 << 20, 'w'), "\"www"},
      {"wiz\nard\"\x01", R"("wiz\nard\"\x01")"},  // one log line, quotes escaped
  };
  for (const auto& [role, echoed] : roles) {
    SCOPED_TRACE(role.size());
    v1::GenerateRequest req = ValidRequest();
    req.clear_prompt();
    auto* m = req.add_messages();
    m->set_role(role);
    m->set_content("hi");
    StreamResult r = CallGenerate(stub.get(), req);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << r.status.error_message().substr(0, 200);
    EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr("messages[0].role"));
    EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr(echoed));
    EXPECT_LE(r.status.error_message().size(), 512u);
  }
  std::ifstream log(server.log_path());
  std::stringstream text;
  text << log.rdbuf();
  EXPECT_THAT(text.str(), ::testing::HasSubstr("(3145728 bytes)"));
  EXPECT_LT(std::filesystem::file_size(server.log_path()), 16u << 10);
}

TEST_F(BadInput, GarbageBytesOnThePort) {
  std::mt19937 rng(std::random_device{}());
  for (int round = 0; round < 5; ++round) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(server_.grpc_port()));
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    std::string garbage(std::uniform_int_distribution<int>(1, 8192)(rng), '\0');
    for (char& ch : garbage) ch = static_cast<char>(rng());
    if (round == 0) garbage = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";  // a confused HTTP/1 client
    (void)!write(fd, garbage.data(), garbage.size());
    char buf[256];
    (void)!read(fd, buf, sizeof(buf));  // the server answers or closes; either way it must survive
    close(fd);
  }
  ASSERT_TRUE(server_.Running());
  ExpectServing();
}

}  // namespace
}  // namespace specontext::testing
