#!/usr/bin/env python3
"""Seed corpus for tests/fuzz/gguf_fuzz.cc: small valid GGUF files written with the gguf Python package's
GGUFWriter (a writer independent of ours), covering every metadata value type, nested arrays, version 2,
a non-default alignment, tiny llama/qwen2/qwen3 models (F32, F16, Q8_0, Q4_K; llama with rope_freqs) and
one tensor of each quantized type. Each file stays under a few KB. Needs `pip install gguf numpy`.

    python3 tools/reference/make_gguf_fuzz_corpus.py [--out tests/fuzz/corpus/gguf_fuzz]
"""
import argparse
import pathlib
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V, GGUFWriter

rng = np.random.default_rng(11)


def write(path, arch, fill, alignment=None):
    w = GGUFWriter(str(path), arch)
    if alignment:
        w.data_alignment = alignment
        w.add_uint32("general.alignment", alignment)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quant_bytes(qtype, rows, cols):
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    return raw


def all_types(w):
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -7)
    w.add_uint64("t.u64", 1 << 40)
    w.add_int64("t.i64", -(1 << 40))
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", -2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    for vt, vals in [(V.UINT8, [1, 2]), (V.INT8, [-1, 3]), (V.UINT16, [7]), (V.INT16, [-7, 8]),
                     (V.UINT32, [9, 10]), (V.INT32, [-11]), (V.UINT64, [12]), (V.INT64, [-13, 14]),
                     (V.FLOAT32, [1.5, -2.5]), (V.FLOAT64, [3.25]), (V.BOOL, [True, False]),
                     (V.STRING, ["a", "", "bc"])]:
        w.add_key_value(f"a.{vt.name.lower()}", vals, V.ARRAY, sub_type=vt)
    w.add_key_value("a.nested", [[1, 2], [3]], V.ARRAY)
    w.add_key_value("a.nested_str", [["x", "y"], ["z"]], V.ARRAY)
    w.add_tensor("x", np.arange(4, dtype=np.float32))


def model(arch, matrix, d=32, ff=32, rope_freqs=False, tied=True):
    heads, kv, hd, vocab, layers = (2, 1, 16, 8, 1)

    def fill(w):
        w.add_context_length(64)
        w.add_embedding_length(d)
        w.add_feed_forward_length(ff)
        w.add_block_count(layers)
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
        w.add_key_length(hd)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(["a", "b", "c", "ab", "bc", "abc", "<s>", "</s>"])
        w.add_token_types([1, 1, 1, 1, 1, 1, 3, 3])
        w.add_token_merges(["a b", "b c", "ab c"])
        w.add_bos_token_id(6)
        w.add_eos_token_id(7)
        w.add_chat_template("{{ messages }}")

        def mat(name, rows, cols):
            # Matrices whose rows are not whole blocks of `matrix` stay F16 (real files mix types too).
            qt = matrix if cols % GGML_QUANT_SIZES[matrix][0] == 0 else Q.F16
            if qt in (Q.F32, Q.F16):
                a = rng.normal(0, 0.05, size=(rows, cols)).astype(np.float32 if qt == Q.F32 else np.float16)
                w.add_tensor(name, a)
            else:
                w.add_tensor(name, quant_bytes(qt, rows, cols), raw_dtype=qt)

        def vec(name, n):
            w.add_tensor(name, (1 + rng.normal(0, 0.05, size=n)).astype(np.float32))

        mat("token_embd.weight", vocab, d)
        if not tied:
            mat("output.weight", vocab, d)
        vec("output_norm.weight", d)
        if rope_freqs:
            w.add_tensor("rope_freqs.weight", np.linspace(1, 8, hd // 2).astype(np.float32))
        for l in range(layers):
            p = f"blk.{l}."
            vec(p + "attn_norm.weight", d)
            vec(p + "ffn_norm.weight", d)
            mat(p + "attn_q.weight", heads * hd, d)
            mat(p + "attn_k.weight", kv * hd, d)
            mat(p + "attn_v.weight", kv * hd, d)
            mat(p + "attn_output.weight", d, heads * hd)
            mat(p + "ffn_gate.weight", ff, d)
            mat(p + "ffn_up.weight", ff, d)
            mat(p + "ffn_down.weight", d, ff)
            if arch == "qwen2":
                vec(p + "attn_q.bias", heads * hd)
                vec(p + "attn_k.bias", kv * hd)
                vec(p + "attn_v.bias", kv * hd)
            if arch == "qwen3":
                vec(p + "attn_q_norm.weight", hd)
                vec(p + "attn_k_norm.weight", hd)
    return fill


def quant_types(w):
    for qt in [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.BF16, Q.IQ4_NL]:
        block, _ = GGML_QUANT_SIZES[qt]
        w.add_tensor(qt.name.lower(), quant_bytes(qt, 1, max(block, 2)), raw_dtype=qt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[2] / "tests/fuzz/corpus/gguf_fuzz"))
    out = pathlib.Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "all_types", "llama", all_types)
    write(out / "align64", "llama", all_types, alignment=64)
    write(out / "quant_types", "llama", quant_types)
    # Tiny models (hidden 32; 256 for the K-quant one, whose narrow matrices stay F16).
    write(out / "qwen2_q8_0", "qwen2", model("qwen2", Q.Q8_0))
    write(out / "qwen3_q4_k", "qwen3", model("qwen3", Q.Q4_K, d=256, ff=8))
    write(out / "llama_f16_rope_freqs", "llama", model("llama", Q.F16, rope_freqs=True, tied=False))
    # Version 2: the same layout with another version number.
    data = bytearray((out / "all_types").read_bytes())
    data[4:8] = struct.pack("<I", 2)
    (out / "all_types_v2").write_bytes(bytes(data))
    for p in sorted(out.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
