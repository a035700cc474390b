#!/usr/bin/env python3
"""HF transformers baselines for the SpeContext benchmarks 3 and 4, measured like
`specontext bench --sparse --trajectory` on the same GPU.

Random weights of the real architectures (configs from hf_bench.py), bf16, eager attention.

Protocol (the same as the engine's trajectory benchmark):
- R sequences whose caches are pre-filled with PROMPT rows of random K/V per layer (no prefill run);
  the cache then grows: at each measuring point (PROMPT, PROMPT+E, ..., PROMPT+GEN) --warmup + --steps
  single-token decode steps are run (each appends one row) and the median step time (CUDA events) is
  kept; between points the cache is extended with random K/V rows in chunks (cache.update per layer).
- tokens/s = R*GEN / T, with T the trapezoid integral of the step time over the context
  (sum over consecutive points of (t_k + t_k+1)/2 * (c_k+1 - c_k)).
- Benchmark 3 (`--bench 3`): Llama-3.1-8B shape, DynamicCache on the GPU, R in --requests (default
  1,4,8,16); a request count that runs out of memory stops at that point (status "oom" and the context);
  the best completed R is reported in a "best" line.
- Benchmark 4 (`--bench 4`): Llama-3.2-1B shape, one request, HF's offloaded KV cache
  (transformers 5.x: DynamicCache(offloading=True): the layer being computed is on the GPU, the next one
  is prefetched, the others live in CPU memory), with the process capped at --gpu-memory-gib (4) by
  torch.cuda.set_per_process_memory_fraction; also the plain DynamicCache for reference.
JSON lines to --out; --budget-s caps the wall time (points past it are "skipped").

Example: python3 bench/baselines/hf_sparse_bench.py --bench 3 --out $OUT/hf3.jsonl --budget-s 400
"""
import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import DynamicCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_bench import MODELS, build_model  # noqa: E402


def new_cache(model, offloading):
    if not offloading:
        try:
            return DynamicCache(config=model.config)
        except TypeError:
            return DynamicCache()
    try:
        return DynamicCache(config=model.config, offloading=True)
    except TypeError:
        return DynamicCache(offloading=True)


def extend(cache, cfg, batch, rows, chunk=2048):
    """Appends `rows` random K/V rows to every layer (in chunks, layer order as a forward would)."""
    n_kv, hd = cfg["num_key_value_heads"], cfg["head_dim"]
    done = 0
    while done < rows:
        n = min(chunk, rows - done)
        for layer in range(cfg["num_hidden_layers"]):
            k = torch.randn(batch, n_kv, n, hd, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(batch, n_kv, n, hd, device="cuda", dtype=torch.bfloat16)
            cache.update(k, v, layer)
            del k, v
        done += n
    torch.cuda.synchronize()


def time_steps(model, cache, cfg, batch, pos, warmup, steps):
    ids = torch.randint(0, cfg["vocab_size"], (batch, 1), device="cuda")
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.no_grad():
            cp = torch.tensor([pos], device="cuda")
            start.record()
            model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=cp,
                  position_ids=cp.expand(batch, 1), logits_to_keep=1)
            end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
        pos += 1
    return statistics.median(times), pos


def trajectory(model, cfg, batch, prompt, gen, every, warmup, steps, offloading, deadline, emit, common):
    points = list(range(prompt, prompt + gen, every)) + [prompt + gen]
    base = dict(common, batch=batch, prompt=prompt, generated=gen, measure_every=every,
                cache="offloaded" if offloading else "dynamic")
    ms, pos, status, err = [], 0, "ok", ""
    cache = new_cache(model, offloading)
    try:
        for c in points:
            if time.time() > deadline:
                status = "skipped"
                break
            if c > pos:
                extend(cache, cfg, batch, c - pos)
                pos = c
            t, pos = time_steps(model, cache, cfg, batch, pos, warmup, steps)
            ms.append(t)
            emit(dict(base, kind="trajectory_point", context=c, step_ms=t, tokens_per_s=batch * 1e3 / t,
                      peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)))
    except torch.cuda.OutOfMemoryError as e:
        status, err = "oom", str(e).splitlines()[0][:200]
    except RuntimeError as e:
        msg = str(e).splitlines()[0][:200]
        status, err = ("oom" if "out of memory" in msg.lower() else "error"), msg
    del cache
    gc.collect()
    torch.cuda.empty_cache()
    rec = dict(base, kind="trajectory", status=status, points=points[:len(ms)], step_ms=ms)
    if status == "ok":
        total_ms = sum(0.5 * (ms[k] + ms[k + 1]) * (points[k + 1] - points[k]) for k in range(len(points) - 1))
        rec.update(generate_seconds=total_ms / 1e3, tokens_per_s=batch * gen / (total_ms / 1e3),
                   method="tokens/s = R*GEN / trapezoid integral of the median step time over the context")
    else:
        rec.update(error=err, stopped_at_context=points[len(ms)] if len(ms) < len(points) else None)
    rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    torch.cuda.reset_peak_memory_stats()
    emit(rec)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", choices=["3", "4"], required=True)
    ap.add_argument("--out", required=True, help="JSON lines output path (appended)")
    ap.add_argument("--requests", default=None, help="comma list (bench 3 default 1,4,8,16; bench 4: 1)")
    ap.add_argument("--trajectory", default="2048:32768", help="PROMPT:GEN")
    ap.add_argument("--measure-every", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attn", default="eager")
    ap.add_argument("--caches", default=None, help="bench 4: comma list of offloaded,dynamic")
    ap.add_argument("--gpu-memory-gib", type=float, default=None, help="cap (bench 4 default 4)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting new points after this")
    args = ap.parse_args()

    t0 = time.time()
    prompt, gen = (int(x) for x in args.trajectory.split(":"))
    name = "llama-3.1-8b" if args.bench == "3" else "llama-3.2-1b"
    requests = [int(r) for r in (args.requests or ("1,4,8,16" if args.bench == "3" else "1")).split(",")]
    caches = (args.caches or ("dynamic" if args.bench == "3" else "offloaded,dynamic")).split(",")
    cap = args.gpu_memory_gib if args.gpu_memory_gib is not None else (4.0 if args.bench == "4" else None)
    total = torch.cuda.get_device_properties(0).total_memory
    if cap is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
    common = dict(bench=int(args.bench), model=name, attn=args.attn, gpu=torch.cuda.get_device_name(0),
                  torch=torch.__version__, transformers=transformers.__version__, gpu_memory_cap_gib=cap,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out = open(args.out, "a", buffering=1)

    def emit(rec):
        out.write(json.dumps(rec) + "\n")
        keys = ("kind", "cache", "batch", "context", "status", "step_ms", "tokens_per_s", "error")
        print(json.dumps({k: rec[k] for k in keys if k in rec}), flush=True)

    cfg = MODELS[name]
    model = build_model(cfg, args.attn)
    runs = [(r, c) for c in caches for r in requests]
    results = []
    for i, (r, c) in enumerate(runs):
        # Each run gets its share of the remaining budget, so none is starved.
        deadline = t0 + args.budget_s * (i + 1) / len(runs)
        results.append(trajectory(model, cfg, r, prompt, gen, args.measure_every, args.warmup, args.steps,
                                  c == "offloaded", deadline, emit, common))
    done = [x for x in results if x["status"] == "ok"]
    if done:
        best = max(done, key=lambda x: x["tokens_per_s"])
        emit(dict(common, kind="best", batch=best["batch"], cache=best["cache"], tokens_per_s=best["tokens_per_s"],
                  tried=[dict(batch=x["batch"], cache=x["cache"], status=x["status"],
                              tokens_per_s=x.get("tokens_per_s")) for x in results]))
    print(f"total {time.time() - t0:.0f} s, {len(done)} of {len(results)} trajectories complete", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
