#!/usr/bin/env python3
"""Small checkpoints written by the publishers' own libraries, for the C++ readers' tests.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch safetensors \
        --index-url https://download.pytorch.org/whl/cpu   (safetensors from PyPI)
    /tmp/venv/bin/python tools/reference/make_draft_fixtures.py tests/data

Writes (every file < 100 KB):
  torch/state_dict.bin        torch.save of a module state dict (OrderedDict with _metadata) plus f32/f16/bf16/
                              bool/int64 tensors, a scalar, an nn.Parameter, and four views sharing one storage
                              (offset slice, strided column, transpose)
  torch/legacy.bin            the same tensors with _use_new_zipfile_serialization=False (refused: legacy format)
  torch/forbidden_global.bin  a torch.save-shaped zip whose data.pkl calls os.system (refused by name)
  torch/compressed.bin        torch/state_dict.bin repacked with deflate (refused: compressed entry)
  eagle3/<layout>/            tiny EAGLE-3 drafts in each publisher's layout, for a target with hidden 32,
                              8 layers, 4 query / 2 KV heads of dim 8, vocabulary 320:
    safeailab    config.json as SafeAILab/EAGLE eagle/traineagle3/config.json + pytorch_model.bin (f16)
    specforge    LlamaForCausalLMEagle3 + eagle_config ids [0, 3, 6] (layer outputs) + model.safetensors
                 (bf16, BOOL t2d, I64 d2t), rope_theta 1e6
    eagle31      SpecForge EAGLE-3.1: fc_norm + norm_output, fc_norm.{0,1,2}.weight
    speculators  vLLM speculators: Eagle3Speculator, transformer_layer_config (qwen3: q/k norms),
                 top-level eagle_aux_hidden_state_layer_ids [1, 3, 6] (layer inputs), norm_before_fc with
                 input_norm.weight, layers.0.* names, embed_tokens.weight
Tensor values: element k of tensor NAME is pattern(k, salt(NAME)) = ((37 k + salt) mod 31 - 15) / 16, exact in
f16 and bf16, salt = FNV-1a-32(NAME) mod 997, so the C++ tests recompute every expected value.
"""
import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import torch
from safetensors.torch import save_file

HIDDEN, INTER, HEADS, KV, HD, VOCAB, DRAFT_VOCAB = 32, 48, 4, 2, 8, 320, 64


def salt(name):
    h = 0x811C9DC5
    for c in name.encode():
        h = ((h ^ c) * 0x01000193) & 0xFFFFFFFF
    return h % 997


def pattern(name, shape, dtype):
    n = 1
    for d in shape:
        n *= d
    s = salt(name)
    vals = [((37 * k + s) % 31 - 15) / 16.0 for k in range(n)]
    return torch.tensor(vals, dtype=torch.float32).reshape(shape).to(dtype)


def vocab_maps():
    """d2t (int64 [draft]) and t2d (bool [vocab]): draft id i is target id floor(i * VOCAB / DRAFT_VOCAB)."""
    targets = [i * VOCAB // DRAFT_VOCAB for i in range(DRAFT_VOCAB)]
    d2t = torch.tensor([t - i for i, t in enumerate(targets)], dtype=torch.int64)
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[targets] = True
    return d2t, t2d


def layer_tensors(prefix, dtype, qk_norm=False):
    shapes = {
        "self_attn.q_proj.weight": [HEADS * HD, 2 * HIDDEN],
        "self_attn.k_proj.weight": [KV * HD, 2 * HIDDEN],
        "self_attn.v_proj.weight": [KV * HD, 2 * HIDDEN],
        "self_attn.o_proj.weight": [HIDDEN, HEADS * HD],
        "mlp.gate_proj.weight": [INTER, HIDDEN],
        "mlp.up_proj.weight": [INTER, HIDDEN],
        "mlp.down_proj.weight": [HIDDEN, INTER],
        "hidden_norm.weight": [HIDDEN],
        "input_layernorm.weight": [HIDDEN],
        "post_attention_layernorm.weight": [HIDDEN],
    }
    if qk_norm:
        shapes["self_attn.q_norm.weight"] = [HD]
        shapes["self_attn.k_norm.weight"] = [HD]
    return {prefix + k: pattern(prefix + k, v, dtype) for k, v in shapes.items()}


def head_tensors(dtype, extra=()):
    t = {"fc.weight": pattern("fc.weight", [HIDDEN, 3 * HIDDEN], dtype),
         "norm.weight": pattern("norm.weight", [HIDDEN], dtype),
         "lm_head.weight": pattern("lm_head.weight", [DRAFT_VOCAB, HIDDEN], dtype)}
    for name, shape in extra:
        t[name] = pattern(name, shape, dtype)
    return t


def llama_config(**kw):
    c = {"bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1, "hidden_act": "silu", "hidden_size": HIDDEN,
         "initializer_range": 0.02, "intermediate_size": INTER, "max_position_embeddings": 2048,
         "model_type": "llama", "num_attention_heads": HEADS, "num_key_value_heads": KV, "num_hidden_layers": 1,
         "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "use_cache": True, "vocab_size": VOCAB,
         "draft_vocab_size": DRAFT_VOCAB}
    c.update(kw)
    return c


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def torch_files(out):
    os.makedirs(out, exist_ok=True)
    linear = torch.nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(pattern("linear.weight", [3, 4], torch.float32))
        linear.bias.copy_(pattern("linear.bias", [3], torch.float32))
    sd = collections.OrderedDict()
    sd.update(linear.state_dict())  # keeps the OrderedDict; _metadata below makes torch emit BUILD
    sd._metadata = linear.state_dict()._metadata
    sd["f32"] = pattern("f32", [3, 5], torch.float32)
    sd["f16"] = pattern("f16", [4, 3], torch.float16)
    sd["bf16"] = pattern("bf16", [2, 2, 3], torch.bfloat16)
    sd["mask"] = torch.tensor([k % 3 == 0 for k in range(7)])
    sd["ids"] = torch.tensor([-2, 0, 5, 2 ** 40], dtype=torch.int64)
    sd["scalar"] = torch.tensor(2.5)
    sd["param"] = torch.nn.Parameter(pattern("param", [2, 3], torch.float32))
    base = torch.arange(24, dtype=torch.float32)
    sd["base"] = base.view(4, 6)
    sd["row1"] = base[6:12]
    sd["col"] = base.view(4, 6)[:, 1]
    sd["t"] = base.view(4, 6).t()
    torch.save(sd, os.path.join(out, "state_dict.bin"))
    torch.save(sd, os.path.join(out, "legacy.bin"), _use_new_zipfile_serialization=False)

    # A pickle that would run os.system("echo pwned") under pickle.load: GLOBAL 'os system' + REDUCE.
    evil = (b"\x80\x02}q\x00X\x01\x00\x00\x00xcos\nsystem\nX\x0a\x00\x00\x00echo pwned\x85Rs.")
    with zipfile.ZipFile(os.path.join(out, "forbidden_global.bin"), "w", zipfile.ZIP_STORED) as z:
        z.writestr("forbidden_global/data.pkl", evil)
        z.writestr("forbidden_global/byteorder", "little")
        z.writestr("forbidden_global/version", "3\n")

    src = zipfile.ZipFile(os.path.join(out, "state_dict.bin"))
    with zipfile.ZipFile(os.path.join(out, "compressed.bin"), "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename.replace("state_dict/", "compressed/"), src.read(info.filename))

    # Sanity: the restricted loader of torch itself reads the good file.
    back = torch.load(os.path.join(out, "state_dict.bin"), weights_only=True)
    assert torch.equal(back["t"], base.view(4, 6).t())


def drafts(out):
    d2t, t2d = vocab_maps()
    # SafeAILab: torch.save of the draft's state dict (f16), config as eagle/traineagle3/config.json.
    d = os.path.join(out, "safeailab")
    os.makedirs(d, exist_ok=True)
    sd = collections.OrderedDict()
    sd.update(layer_tensors("midlayer.", torch.float16))
    sd.update(head_tensors(torch.float16))
    sd["d2t"], sd["t2d"] = d2t, t2d
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    write_json(os.path.join(d, "config.json"),
               llama_config(architectures=["LlamaForCausalLM"], pad_token_id=0, torch_dtype="float16",
                            transformers_version="4.28.1"))

    # SpecForge / SGLang: safetensors, no embedding, BOOL t2d, eagle_config ids are layer outputs.
    d = os.path.join(out, "specforge")
    os.makedirs(d, exist_ok=True)
    t = dict(layer_tensors("midlayer.", torch.bfloat16))
    t.update(head_tensors(torch.bfloat16))
    t["d2t"], t["t2d"] = d2t, t2d
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(d, "config.json"),
               llama_config(architectures=["LlamaForCausalLMEagle3"], head_dim=HD, rope_theta=1000000.0,
                            rope_scaling=None, torch_dtype="bfloat16", transformers_version="4.51.0",
                            eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 3, 6]}))

    # EAGLE-3.1 (SpecForge configs/qwen3-30B-A3B-eagle3.1.json): fc_norm + norm_output.
    d = os.path.join(out, "eagle31")
    os.makedirs(d, exist_ok=True)
    t = dict(layer_tensors("midlayer.", torch.bfloat16))
    t.update(head_tensors(torch.bfloat16, [("fc_norm.%d.weight" % i, [HIDDEN]) for i in range(3)]))
    t["d2t"], t["t2d"] = d2t, t2d
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(d, "config.json"),
               llama_config(architectures=["LlamaForCausalLMEagle3"], head_dim=HD, fc_norm=True, norm_output=True,
                            rope_theta=1000000.0, rope_scaling=None, torch_dtype="bfloat16"))

    # vLLM speculators: layers.0.*, nested transformer_layer_config (qwen3), top-level aux ids (inputs),
    # norm_before_fc (input_norm.weight), the verifier's embedding saved with the speculator.
    d = os.path.join(out, "speculators")
    os.makedirs(d, exist_ok=True)
    t = dict(layer_tensors("layers.0.", torch.bfloat16, qk_norm=True))
    t.update(head_tensors(torch.bfloat16, [("input_norm.weight", [3 * HIDDEN]), ("embed_tokens.weight", [VOCAB, HIDDEN])]))
    t["d2t"], t["t2d"] = d2t, t2d
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(d, "config.json"), {
        "architectures": ["Eagle3Speculator"], "auto_map": {"": "eagle3.Eagle3SpeculatorConfig"},
        "draft_vocab_size": DRAFT_VOCAB, "eagle_aux_hidden_state_layer_ids": [1, 3, 6], "norm_before_fc": True,
        "fc_norm": False, "norm_before_residual": True, "norm_output": False, "has_no_defaults_at_init": False,
        "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3,
                                                     "accept_tolerance": 0.0, "verifier_accept_k": 1}],
                               "verifier": {"architectures": ["Qwen3ForCausalLM"], "name_or_path": "tiny-target"}},
        "speculators_model_type": "eagle3", "speculators_version": "0.3.0", "target_hidden_size": None,
        "dtype": "bfloat16",
        "transformer_layer_config": {"attention_bias": False, "head_dim": HD, "hidden_act": "silu",
                                     "hidden_size": HIDDEN, "intermediate_size": INTER, "model_type": "qwen3",
                                     "num_attention_heads": HEADS, "num_hidden_layers": 1, "num_key_value_heads": KV,
                                     "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
                                     "vocab_size": VOCAB},
        "transformers_version": "4.56.1"})


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/data"
    torch_files(os.path.join(root, "torch"))
    drafts(os.path.join(root, "eagle3"))
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if ("/torch/" in p or "/eagle3/" in p) and os.path.getsize(p) > 100_000:
                raise SystemExit(f"{p} is over 100 KB")
    print("torch", torch.__version__)


if __name__ == "__main__":
    main()
