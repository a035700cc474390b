// The runtime's view of a model's tokenizer config: ResolveChatTemplate("auto") takes the chat
// template from the tokenizer_config.json text that came with the tokenizer (a GGUF's embedded
// one included), keeps its default system prompt, and refuses a template none of ours renders.
#include "core/io/gguf_vocab.h"
#include "core/runtime/runtime.h"
#include "gtest/gtest.h"

namespace specontext {
namespace {

constexpr char kSmolLm2Template[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\\n' }}{% endif %}";

// A runtime whose tokenizer came from an (embedded) GGUF vocabulary with `chat_template`.
Runtime GgufRuntime(const std::string& chat_template) {
  GgufVocab v;
  v.model = "gpt2";
  v.pre = "smollm";
  v.tokens = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "aa"};
  v.token_types = {3, 3, 3, 1, 1};
  v.merges = {"a a"};
  v.eos_id = 2;
  v.chat_template = chat_template;
  auto texts = HfTokenizerFromGguf(v);
  EXPECT_TRUE(texts.ok()) << texts.status();
  Runtime rt;
  rt.checkpoint.embedded_tokenizer_json = texts->tokenizer_json;
  rt.checkpoint.embedded_tokenizer_config_json = texts->tokenizer_config_json;
  auto tok = ParseHfTokenizer(texts->tokenizer_json, texts->tokenizer_config_json);
  EXPECT_TRUE(tok.ok()) << tok.status();
  rt.tokenizer = *std::move(tok);
  rt.tokenizer_config_json = texts->tokenizer_config_json;
  return rt;
}

TEST(RuntimeTokenizerTest, AutoTakesTheEmbeddedTemplateWithItsDefaultSystem) {
  const Runtime rt = GgufRuntime(kSmolLm2Template);
  auto tmpl = ResolveChatTemplate("auto", rt);
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  EXPECT_EQ(tmpl->kind, ChatTemplateKind::kChatml);
  EXPECT_EQ(tmpl->default_system,
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  auto text = ApplyChatTemplate(*tmpl, std::vector<ChatMessage>{{"user", "Hi"}}, true);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  auto ids = EncodePrompt(rt, *text, /*templated=*/true);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(ids->front(), 1);  // <|im_start|>
}

TEST(RuntimeTokenizerTest, AutoRefusesAnUnknownTemplate) {
  const Runtime rt =
      GgufRuntime("{% for m in messages %}<start_of_turn>{{ m.content }}{% endfor %}");
  auto tmpl = ResolveChatTemplate("auto", rt);
  ASSERT_FALSE(tmpl.ok());
  EXPECT_EQ(tmpl.status().code(), absl::StatusCode::kUnimplemented);
  // A name still works.
  auto named = ResolveChatTemplate("chatml", rt);
  ASSERT_TRUE(named.ok());
  EXPECT_EQ(named->default_system, "");
}

TEST(RuntimeTokenizerTest, NoTemplateFallsBackToTheArchitecture) {
  Runtime rt = GgufRuntime("");
  rt.checkpoint.config.arch = Architecture::kQwen2;
  auto tmpl = ResolveChatTemplate("auto", rt);
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  EXPECT_EQ(tmpl->kind, ChatTemplateKind::kChatml);
}

}  // namespace
}  // namespace specontext
