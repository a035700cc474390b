#!/usr/bin/env python3
"""Renders the real chat templates in tests/data/chat_templates/*.jinja the way transformers'
apply_chat_template does (jinja2 sandbox, trim_blocks and lstrip_blocks, tojson = json.dumps with
ensure_ascii=False, strftime_now defined) and writes tests/data/chat_templates/expected.jsonl:
one {"template", "messages", "add_generation_prompt", "text"} per rendering, which
tests/tokenizer/chat_template_test.cc compares our built-in formats with.

strftime_now renders the fixed date 2026-12-07 ("07 Dec 2026"), so the Llama 3.2 cases are
reproducible; the C++ test sets the same date.

The templates: llama3.0 (the tokenizer_config.json in tests/data/tokenizers), llama3.1
(meta-llama/Llama-3.1-*-Instruct), llama3.2 (meta-llama/Llama-3.2-1B-Instruct GGUF), qwen2.5
(Qwen/Qwen2.5-0.5B-Instruct GGUF), qwen3 (tests/data/tokenizers), smollm2 (the
SmolLM2-135M-Instruct GGUF's tokenizer.chat_template).

Usage (from the repository root; needs jinja2):  python3 tools/reference/make_chat_template_vectors.py
"""
import datetime
import json
import os

from jinja2.sandbox import ImmutableSandboxedEnvironment

FIXED_NOW = datetime.datetime(2026, 12, 7)
BOS = {"llama3": "<|begin_of_text|>", "qwen": "", "smollm2": "<|im_start|>"}

CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}], True),
    ([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": " Hello!\n"}], True),
    ([{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}], False),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
      {"role": "user", "content": "next \u00e9 \U0001F600"}], True),
    ([{"role": "user", "content": "u1"}, {"role": "system", "content": "late system"}], True),
]
TOOL_CONVERSATION = ([{"role": "user", "content": "weather?"},
                      {"role": "tool", "content": "{\"temp\": \"20\u00b0C\"}\n\tok"}], True)


def render(source, messages, gen, bos):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["strftime_now"] = lambda fmt: FIXED_NOW.strftime(fmt)
    return env.from_string(source).render(messages=messages, add_generation_prompt=gen, bos_token=bos,
                                          eos_token="")


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folder = os.path.join(root, "tests/data/chat_templates")
    out = []
    for name in ["llama3.0", "llama3.1", "llama3.2", "qwen2.5", "qwen3", "smollm2"]:
        with open(os.path.join(folder, name + ".jinja"), encoding="utf-8") as f:
            source = f.read()
        bos = BOS["llama3"] if name.startswith("llama3") else BOS["smollm2"] if name == "smollm2" else ""
        convs = CONVERSATIONS + ([TOOL_CONVERSATION] if name in ("llama3.1", "llama3.2") else [])
        for messages, gen in convs:
            out.append({"template": name, "messages": messages, "add_generation_prompt": gen,
                        "text": render(source, messages, gen, bos)})
    with open(os.path.join(folder, "expected.jsonl"), "w", encoding="utf-8") as f:
        for rec in out:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {len(out)} renderings")


if __name__ == "__main__":
    main()
