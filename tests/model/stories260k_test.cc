// A real trained model end to end on the CPU: stories260K (llama2.c format) greedy from BOS.
#include <gtest/gtest.h>

#include "core/model/engine.h"
#include "core/runtime/runtime.h"

namespace specontext {
namespace {

absl::StatusOr<Runtime> LoadStories() {
  RuntimeOptions ro;
  ro.model_path = SPECONTEXT_MODEL_DIR "/stories260K/stories260K.bin";
  ro.tokenizer_path = SPECONTEXT_MODEL_DIR "/stories260K/tok512.bin";
  ro.backend = "cpu";
  return LoadRuntime(ro);
}

TEST(Stories260K, GreedyFromBosTellsTheKnownStory) {
  auto rt = LoadStories();
  ASSERT_TRUE(rt.ok()) << rt.status();
  auto prompt = EncodePrompt(*rt, "");
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  ASSERT_EQ(*prompt, std::vector<int32_t>{1});
  Engine engine(rt->model.get(), rt->tokenizer.get(), EngineOptions{});
  GenerationRequest req;
  req.prompt = *prompt;
  req.max_new_tokens = 60;
  std::string streamed;
  auto result = engine.Generate(req, [&](const StreamEvent& ev) { streamed += ev.text; });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->text, streamed);
  EXPECT_EQ(result->text.rfind("Once upon a time, there was a little girl named Lily.", 0), 0u) << result->text;
  EXPECT_EQ(rt->tokenizer->Decode(result->tokens, true), result->text);
}

TEST(Stories260K, StopStringEndsBeforeIt) {
  auto rt = LoadStories();
  ASSERT_TRUE(rt.ok()) << rt.status();
  Engine engine(rt->model.get(), rt->tokenizer.get(), EngineOptions{});
  GenerationRequest req;
  req.prompt = {1};
  req.max_new_tokens = 60;
  req.stop_strings = {"little girl"};
  auto result = engine.Generate(req);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->reason, FinishReason::kStopString);
  EXPECT_EQ(result->text, "Once upon a time, there was a ");
}

}  // namespace
}  // namespace specontext
