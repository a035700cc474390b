#!/usr/bin/env python3
"""Reference vectors for the ggml dequantizers (core/io/ggml_dequantize.cc).

For every supported ggml type, writes tests/data/gguf/quants/<TYPE>.blocks (raw block bytes) and
<TYPE>.f32 (the elements the gguf Python package's gguf.quants.dequantize computes from them, f32
little-endian). The blocks are random bytes with sane f16 scale fields (finite, both signs, one
subnormal), plus, for the types gguf-py can quantize, blocks quantized from random data, so every bit
of every field is exercised. Needs `pip install gguf numpy` (not the project's runtime).

    python3 tools/reference/make_gguf_quant_vectors.py [--out tests/data/gguf/quants] [--seed 7]
"""
import argparse
import pathlib

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

# Byte offsets of the f16 scale fields inside one block (ggml's block_* structs).
SCALE_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
QUANTIZABLE = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}


def random_blocks(rng, qtype, n_blocks):
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for b in range(n_blocks):
        for k, off in enumerate(SCALE_FIELDS[qtype]):
            # A subnormal f16 in the last block's first field, else a normal value of either sign.
            v = np.float16(3e-6) if (b == n_blocks - 1 and k == 0) else np.float16(rng.normal(0, 0.05))
            raw[b, off:off + 2] = np.frombuffer(v.tobytes(), dtype=np.uint8)
    return raw


def float_bits(rng, qtype, n):
    if qtype == T.F32:
        return rng.normal(0, 3, size=n).astype(np.float32).view(np.uint8)
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    exp_mask, mant_mask = (0x7c00, 0x03ff) if qtype == T.F16 else (0x7f80, 0x007f)
    nan = ((bits & exp_mask) == exp_mask) & ((bits & mant_mask) != 0)
    bits[nan] &= np.uint16(~exp_mask & 0xffff)  # NaN payloads are not compared: make them finite
    bits[:4] = [0x0000, 0x8000, exp_mask, 0x0001]  # +0, -0, +inf, smallest subnormal
    return bits.view(np.uint8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[2] / "tests/data/gguf/quants"))
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for qtype in [T.F32, T.F16, T.BF16]:
        raw = float_bits(rng, qtype, 512)
        ref = quants.dequantize(raw.reshape(1, -1), qtype).astype(np.float32)
        (out / f"{qtype.name}.blocks").write_bytes(raw.tobytes())
        (out / f"{qtype.name}.f32").write_bytes(ref.astype("<f4").tobytes())
    for qtype in SCALE_FIELDS:
        block, size = GGML_QUANT_SIZES[qtype]
        n_blocks = 8 if block == 32 else 4
        raw = random_blocks(rng, qtype, n_blocks)
        if qtype in QUANTIZABLE:
            data = rng.normal(0, 1, size=(1, 4 * block)).astype(np.float32)
            data[0, :block] *= 1e-3  # a block of small values
            raw = np.concatenate([raw, quants.quantize(data, qtype).reshape(-1, size)])
        ref = quants.dequantize(raw.reshape(1, -1), qtype).astype(np.float32)
        assert np.all(np.isfinite(ref)), qtype.name
        (out / f"{qtype.name}.blocks").write_bytes(raw.tobytes())
        (out / f"{qtype.name}.f32").write_bytes(ref.astype("<f4").tobytes())
        print(f"{qtype.name}: {raw.shape[0]} blocks, {ref.size} elements")


if __name__ == "__main__":
    main()
