// Built-in chat formats produce the exact strings of the models' Jinja templates.
#include "core/tokenizer/chat_template.h"

#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/tokenizer/test_strings.h"

namespace specontext {
namespace {

using ::testing::HasSubstr;

// The built-in format `kind` without template parameters (Llama 3.0's layout for kLlama3).
std::string Render(ChatTemplateKind kind, const std::vector<ChatMessage>& m, bool gen = true) {
  auto s = ApplyChatTemplate(ChatTemplate{kind}, m, gen);
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

TEST(ChatTemplateTest, Llama3ByNameHasTheLlama31DateBlock) {
  auto t = ParseChatTemplate("llama3");
  ASSERT_TRUE(t.ok());
  auto s = ApplyChatTemplate(*t, std::vector<ChatMessage>{{"user", "Hi"}}, true);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
            "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
  t->today_date = "";  // Llama 3.2: today's date
  s = ApplyChatTemplate(*t, std::vector<ChatMessage>{{"user", "Hi"}}, true);
  ASSERT_TRUE(s.ok());
  EXPECT_THAT(*s, ::testing::MatchesRegex(".*Today Date: [0-9][0-9] [A-Z][a-z][a-z] 20[0-9][0-9]\n\n.*"));
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
  auto r = ApplyChatTemplate(ChatTemplate{ChatTemplateKind::kChatml},
                             std::vector<ChatMessage>{{"robot", "x"}}, true);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("'robot'"));
  EXPECT_FALSE(ApplyChatTemplate(ChatTemplate{ChatTemplateKind::kDeepseekR1},
                                 std::vector<ChatMessage>{{"tool", "x"}}, true)
                   .ok());
  EXPECT_FALSE(ApplyChatTemplate(ChatTemplate{ChatTemplateKind::kLlama3}, {}, true).ok());
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
  auto llama = ChatTemplateFromConfig(testing::ReadFile(dir + "/llama3/tokenizer_config.json"));
  ASSERT_TRUE(llama.ok() && llama->has_value());
  EXPECT_EQ((*llama)->kind, ChatTemplateKind::kLlama3);
  EXPECT_FALSE((*llama)->knowledge_date_block);  // Llama 3.0
  auto qwen = ChatTemplateFromConfig(testing::ReadFile(dir + "/qwen3/tokenizer_config.json"));
  ASSERT_TRUE(qwen.ok() && qwen->has_value());
  EXPECT_EQ((*qwen)->kind, ChatTemplateKind::kQwen3);
  EXPECT_EQ(DetectChatTemplateKind("{% for m in messages %}<|im_start|>{{m.role}}{% endfor %}"),
            ChatTemplateKind::kChatml);
  EXPECT_EQ(DetectChatTemplateKind("{{bos_token}}<｜User｜>{{m}}<｜Assistant｜>"),
            ChatTemplateKind::kDeepseekR1);
  EXPECT_EQ(DetectChatTemplateKind("{{ messages }}"), ChatTemplateKind::kNone);
  auto none = ChatTemplateFromConfig("{}");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  EXPECT_FALSE(ChatTemplateFromConfig("[").ok());
  // A template that is none of ours is refused, not rendered in another layout.
  auto gemma = ChatTemplateFromConfig(
      R"({"chat_template": "{% for m in messages %}<start_of_turn>{{ m.content }}{% endfor %}"})");
  ASSERT_FALSE(gemma.ok());
  EXPECT_EQ(gemma.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(gemma.status().message()), HasSubstr("--chat-template"));
}

// The default system prompt comes from the template text, whatever it says.
TEST(ChatTemplateTest, DefaultSystemPromptIsReadFromTheTemplate) {
  auto t = ChatTemplateFromJinja(
      "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe \\'kind\\'.<|im_end|>\\n' }}"
      "{% endif %}{% for m in messages %}<|im_start|>{% endfor %}");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->kind, ChatTemplateKind::kChatml);
  EXPECT_EQ(t->default_system, "Be 'kind'.");
  auto plain = ChatTemplateFromJinja("{% for m in messages %}{{ '<|im_start|>' + m.role }}{% endfor %}");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->default_system, "");
}

// Golden: our rendering equals the real templates rendered by jinja2 as transformers does
// (tests/data/chat_templates/expected.jsonl, from tools/reference/make_chat_template_vectors.py).
TEST(ChatTemplateTest, MatchesRealTemplates) {
  const std::string dir = std::string(SPECONTEXT_TEST_DATA) + "/chat_templates/";
  std::ifstream in(dir + "expected.jsonl");
  ASSERT_TRUE(in.good());
  size_t n = 0;
  for (std::string line; std::getline(in, line);) {
    const auto rec = nlohmann::json::parse(line);
    const std::string name = rec["template"];
    const bool gen = rec["add_generation_prompt"];
    // The Llama 3.0 base template appends the assistant header even without a generation prompt.
    if (name == "llama3.0" && !gen) continue;
    auto tmpl = ChatTemplateFromJinja(testing::ReadFile(dir + name + ".jinja"));
    ASSERT_TRUE(tmpl.ok()) << name << ": " << tmpl.status();
    if (name == "llama3.2") {
      EXPECT_EQ(tmpl->today_date, "") << "Llama 3.2 writes today's date";
      tmpl->today_date = "07 Dec 2026";  // the date the reference rendered with
    }
    std::vector<ChatMessage> messages;
    for (const auto& m : rec["messages"]) messages.push_back({m["role"], m["content"]});
    auto text = ApplyChatTemplate(*tmpl, messages, gen);
    ASSERT_TRUE(text.ok()) << name << ": " << text.status();
    EXPECT_EQ(*text, rec["text"].get<std::string>()) << name << " " << rec["messages"].dump();
    ++n;
  }
  EXPECT_GE(n, 25u);
}

}  // namespace
}  // namespace specontext
