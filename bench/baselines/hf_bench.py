#!/usr/bin/env python3
"""HF transformers baseline on the GPU machine: prefill tokens/s and decode step time.

Random weights of real architectures (Llama-3.1-8B and Llama-3.2-1B configs, written out below so
nothing is downloaded), bf16, eager and sdpa attention, batch {1,4,16,32} x context {2K,8K,32K}.

Protocol (the same as the engine's benchmark):
- prefill: one forward over [batch, context] random token ids into an empty DynamicCache, with
  logits for the last position only; tokens/s = batch * context / median time.
- decode: a DynamicCache pre-filled with `context` random K/V rows per layer (no prefill run, so
  large shapes stay cheap), then single-token steps; the step time is the median.
- timing with CUDA events after warm-up; fewer repetitions at large shapes; shapes that run out of
  memory are recorded with status "oom"; shapes past the time budget with status "skipped".
Writes one JSON object per line to --out.

Example: python3 bench/baselines/hf_bench.py --out $OUT/hf.jsonl
"""
import argparse
import datetime
import gc
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

LLAMA_31_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
    eos_token_id=128001, hidden_act="silu",
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192))
LLAMA_32_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
    eos_token_id=128001, hidden_act="silu",
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192))
MODELS = {"llama-3.1-8b": LLAMA_31_8B, "llama-3.2-1b": LLAMA_32_1B}


def build_model(cfg_dict, attn):
    config = LlamaConfig(**cfg_dict)
    config.attn_implementation = attn
    kwargs = dict(attn_implementation=attn)
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, **kwargs)
        except TypeError:  # older transformers spell it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16, **kwargs)
    return model.eval()


def make_cache(model):
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def time_cuda(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def prefill(model, cfg, batch, ctx):
    ids = torch.randint(0, cfg["vocab_size"], (batch, ctx), device="cuda")
    tokens = batch * ctx
    reps = 3 if tokens <= 16384 else (2 if tokens <= 65536 else 1)

    def step():
        with torch.no_grad():
            model(input_ids=ids, past_key_values=make_cache(model), use_cache=True, logits_to_keep=1)

    times = time_cuda(step, warmup=1, reps=reps)
    med = statistics.median(times)
    return dict(median_ms=med, times_ms=times, tokens_per_s=tokens / (med / 1e3), reps=reps)


def decode(model, cfg, batch, ctx):
    n_kv, hd = cfg["num_key_value_heads"], cfg["head_dim"]
    cache = make_cache(model)
    for layer in range(cfg["num_hidden_layers"]):
        k = torch.randn(batch, n_kv, ctx, hd, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, n_kv, ctx, hd, device="cuda", dtype=torch.bfloat16)
        cache.update(k, v, layer)
        del k, v
    ids = torch.randint(0, cfg["vocab_size"], (batch, 1), device="cuda")
    reps = 10 if batch * ctx <= 65536 else 5
    pos = [ctx]

    def step():
        with torch.no_grad():
            cp = torch.tensor([pos[0]], device="cuda")
            model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=cp,
                  position_ids=cp.expand(batch, 1), logits_to_keep=1)
        pos[0] += 1

    times = time_cuda(step, warmup=2, reps=reps)
    med = statistics.median(times)
    del cache
    return dict(median_ms=med, times_ms=times, tokens_per_s=batch / (med / 1e3), reps=reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON lines output path")
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ",".join(MODELS))
    ap.add_argument("--attn", default="eager,sdpa")
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--phases", default="decode,prefill")
    ap.add_argument("--prefill-max-tokens", type=int, default=65536,
                    help="skip prefill shapes with more batch*context tokens (time budget)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new shapes after this")
    args = ap.parse_args()

    t0 = time.time()
    gpu = torch.cuda.get_device_name(0)
    common = dict(gpu=gpu, torch=torch.__version__, transformers=transformers.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out = open(args.out, "a", buffering=1)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    combos = [(m, a) for m in args.models.split(",") for a in args.attn.split(",")]
    for i, (name, attn) in enumerate(combos):
        cfg = MODELS[name]
        # Each (model, attention) pair gets its share of the budget, so none is starved.
        deadline = t0 + args.budget_s * (i + 1) / len(combos)
        model = build_model(cfg, attn)
        for phase in args.phases.split(","):
            for ctx in contexts:
                for batch in batches:
                    rec = dict(common, model=name, attn=attn, phase=phase, batch=batch, context=ctx)
                    if time.time() > deadline:
                        rec.update(status="skipped", reason="time budget")
                    elif phase == "prefill" and batch * ctx > args.prefill_max_tokens:
                        rec.update(status="skipped", reason=f"prefill over {args.prefill_max_tokens} tokens")
                    else:
                        try:
                            rec.update(prefill(model, cfg, batch, ctx) if phase == "prefill"
                                       else decode(model, cfg, batch, ctx))
                            rec["status"] = "ok"
                        except torch.cuda.OutOfMemoryError as e:
                            rec.update(status="oom", error=str(e).splitlines()[0][:200])
                        except RuntimeError as e:  # cuBLAS/cuDNN allocation failures surface here
                            msg = str(e).splitlines()[0][:200]
                            rec.update(status="oom" if "out of memory" in msg.lower() else "error", error=msg)
                        gc.collect()
                        torch.cuda.empty_cache()
                    rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    torch.cuda.reset_peak_memory_stats()
                    out.write(json.dumps(rec) + "\n")
                    rows.append(rec)
                    print(f"{name:13s} {attn:5s} {phase:7s} b={batch:<3d} ctx={ctx:<6d} {rec['status']:7s} "
                          + (f"{rec['median_ms']:9.2f} ms {rec['tokens_per_s']:12.1f} tok/s" if rec["status"] == "ok" else
                             rec.get("reason", rec.get("error", ""))[:80]), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    print(f"total {time.time() - t0:.0f} s, {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} shapes measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
