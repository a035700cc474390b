// The generator serving the real test model from its GGUF file (SmolLM2-135M-Instruct, fetched by
// tools/fetch-smollm2.sh): chat messages rendered with the model's own template (--chat-template auto) give the
// engine CLI's greedy answer. Skips, saying why, when the package index cannot be reached.
#include <gtest/gtest.h>

#include "tests/common/real_model.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

TEST(RealModelE2E, GeneratorServesAGgufChatModel) {
  const auto [gguf, why] = FetchSmolLM2(SPECONTEXT_SOURCE_DIR);
  if (!why.empty()) GTEST_SKIP() << why;
  ServerProcess server;
  absl::Status st = server.Start(SPC_GENERATOR_BIN, {"--model", gguf, "--chat-template", "auto", "--backend", "cpu",
                                                     "--threads", "2", "--log-level", "warning"});
  ASSERT_TRUE(st.ok()) << st;
  auto stub = GeneratorStub(server.address());

  const std::string question = "What is the capital of France?";
  v1::GenerateRequest req;
  auto* m = req.add_messages();
  m->set_role("user");
  m->set_content(question);
  req.set_max_new_tokens(24);
  StreamResult r = CallGenerate(stub.get(), req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_NE(r.text.find("Paris"), std::string::npos) << r.text;

  int code = -1;
  const std::string cli = RunCommand({SPC_ENGINE_CLI_BIN, "generate", "--model", gguf, "--chat-template", "auto",
                                      "--prompt", question, "--max-new-tokens", "24", "--temperature", "0",
                                      "--backend", "cpu", "--threads", "2"},
                                     &code);
  ASSERT_EQ(code, 0);
  EXPECT_EQ(r.text + "\n", cli);
}

}  // namespace
}  // namespace specontext::testing
