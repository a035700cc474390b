// Built-in chat formats produce the exact strings of the models' Jinja templates.
#include "core/tokenizer/chat_template.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/test_strings.h"

namespace specontext {
namespace {

using ::testing::HasSubstr;

std::string Render(ChatTemplateKind kind, const std::vector<ChatMessage>& m, bool gen = true) {
  auto s = ApplyChatTemplate(kind, m, gen);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : "";
}

TEST(ChatTemplateTest, Llama3) {
  EXPECT_EQ(Render(ChatTemplateKind::kLlama3, {{"system", "Be brief. "}, {"user", " Hi!\n"}}),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(Render(ChatTemplateKind::kLlama3, {{"user", "a"}, {"assistant", "b"}}, false),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\na<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nb<|eot_id|>");
}

TEST(ChatTemplateTest, Chatml) {
  EXPECT_EQ(Render(ChatTemplateKind::kChatml, {{"system", "S"}, {"user", "Hello"}}),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(Render(ChatTemplateKind::kChatml, {{"user", " x "}}, false),
            "<|im_start|>user\n x <|im_end|>\n");
}

TEST(ChatTemplateTest, Qwen3DropsOldReasoningAndKeepsTheLast) {
  const std::vector<ChatMessage> m = {{"user", "2+2?"},
                                      {"assistant", "<think>\nadd\n</think>\n\n4"},
                                      {"user", "and 3+3?"},
                                      {"assistant", "<think>\nagain\n</think>\n\n6"}};
  EXPECT_EQ(Render(ChatTemplateKind::kQwen3, m, false),
            "<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\n4<|im_end|>\n"
            "<|im_start|>user\nand 3+3?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nagain\n</think>\n\n6<|im_end|>\n");
  EXPECT_EQ(
      Render(ChatTemplateKind::kQwen3, {{"system", "S"}, {"user", "hi"}}),
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(Render(ChatTemplateKind::kQwen3, {{"user", "q"}, {"assistant", "plain"}}, false),
            "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n\n</"
            "think>\n\nplain<|im_end|>\n");
  EXPECT_EQ(
      Render(ChatTemplateKind::kQwen3, {{"user", "q"}, {"tool", "r1"}, {"tool", "r2"}}, false),
      "<|im_start|>user\nq<|im_end|>\n<|im_start|>user\n<tool_response>\nr1\n</tool_response>"
      "\n<tool_response>\nr2\n</tool_response><|im_end|>\n");
}

TEST(ChatTemplateTest, DeepseekR1) {
  EXPECT_EQ(
      Render(
          ChatTemplateKind::kDeepseekR1,
          {{"system", "S"}, {"user", "u1"}, {"assistant", "<think>r</think>a1"}, {"user", "u2"}}),
      "<｜begin▁of▁sentence｜>S<｜User｜>u1<｜Assistant｜>a1<｜end▁of▁sentence｜>"
      "<｜User｜>u2<｜Assistant｜><think>\n");
}

TEST(ChatTemplateTest, NoneConcatenates) {
  EXPECT_EQ(Render(ChatTemplateKind::kNone, {{"user", "Once upon"}, {"user", " a time"}}),
            "Once upon a time");
}

TEST(ChatTemplateTest, RejectsBadRolesAndEmpty) {
  auto r =
      ApplyChatTemplate(ChatTemplateKind::kChatml, std::vector<ChatMessage>{{"robot", "x"}}, true);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("'robot'"));
  EXPECT_FALSE(ApplyChatTemplate(ChatTemplateKind::kDeepseekR1,
                                 std::vector<ChatMessage>{{"tool", "x"}}, true)
                   .ok());
  EXPECT_FALSE(ApplyChatTemplate(ChatTemplateKind::kLlama3, {}, true).ok());
}

TEST(ChatTemplateTest, ParseAndDetect) {
  for (const auto kind :
       {ChatTemplateKind::kNone, ChatTemplateKind::kLlama3, ChatTemplateKind::kChatml,
        ChatTemplateKind::kQwen3, ChatTemplateKind::kDeepseekR1}) {
    auto parsed = ParseChatTemplateKind(ChatTemplateKindName(kind));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, kind);
  }
  auto bad = ParseChatTemplateKind("jinja");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("jinja"));

  const std::string dir = SPECONTEXT_TOKENIZER_DIR;
  auto llama =
      DetectChatTemplateFromConfig(testing::ReadFile(dir + "/llama3/tokenizer_config.json"));
  ASSERT_TRUE(llama.ok());
  EXPECT_EQ(*llama, ChatTemplateKind::kLlama3);
  auto qwen = DetectChatTemplateFromConfig(testing::ReadFile(dir + "/qwen3/tokenizer_config.json"));
  ASSERT_TRUE(qwen.ok());
  EXPECT_EQ(*qwen, ChatTemplateKind::kQwen3);
  EXPECT_EQ(DetectChatTemplateKind("{% for m in messages %}<|im_start|>{{m.role}}{% endfor %}"),
            ChatTemplateKind::kChatml);
  EXPECT_EQ(DetectChatTemplateKind("{{bos_token}}<｜User｜>{{m}}<｜Assistant｜>"),
            ChatTemplateKind::kDeepseekR1);
  EXPECT_EQ(DetectChatTemplateKind("{{ messages }}"), ChatTemplateKind::kNone);
  auto none = DetectChatTemplateFromConfig("{}");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, ChatTemplateKind::kNone);
  EXPECT_FALSE(DetectChatTemplateFromConfig("[").ok());
}

}  // namespace
}  // namespace specontext
