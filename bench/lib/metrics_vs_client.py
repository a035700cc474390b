#!/usr/bin/env python3
"""Compares a generator's /metrics deltas over a run with the serving benchmark client's own figures.

Usage: metrics_vs_client.py BEFORE.txt AFTER.txt LOADGEN.jsonl [LOADGEN.jsonl ...]
BEFORE/AFTER are /metrics scrapes around the runs; the loadgen files are the runs between them. Prints one
JSON object: request and token counts, mean TTFT and TPOT from the server's histograms (sum/count deltas)
beside the client's means, and the SpeContext gauges and counters (overlap, hidden vs exposed copy time,
bytes loaded vs a full reload, fallbacks, memory by tier)."""
import json
import re
import sys

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def parse(path):
    values = {}
    for line in open(path):
        m = LINE.match(line)
        if m and not line.startswith("#"):
            if m.group(1).endswith("_bucket"):
                continue
            key = m.group(1) + (m.group(2) or "")
            values[key] = values.get(key, 0.0) + float(m.group(3))
    return values


def total(values, name):
    """Sum over every label set of a metric."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def main(argv):
    before, after = parse(argv[1]), parse(argv[2])
    delta = lambda n: total(after, n) - total(before, n)  # noqa: E731
    runs = []
    for path in argv[3:]:
        for line in open(path):
            j = json.loads(line)
            if j.get("type") == "summary":
                runs.append(j)
    done = sum(r["completed"] for r in runs)
    out_tokens = sum(r["total_output_tokens"] for r in runs)
    weighted = lambda key: sum(r[key] * r["completed"] for r in runs) / max(done, 1)  # noqa: E731
    ttft_n, tpot_n = delta("spc_time_to_first_token_seconds_count"), delta("spc_time_per_output_token_seconds_count")
    report = {
        "client_requests": done,
        "server_requests": delta("spc_generator_requests_total"),
        "client_output_tokens": out_tokens,
        "server_generated_tokens": delta("spc_generator_generated_tokens_total"),
        "client_mean_ttft_ms": weighted("mean_ttft_ms"),
        "server_mean_ttft_ms": 1e3 * delta("spc_time_to_first_token_seconds_sum") / max(ttft_n, 1),
        "client_mean_tpot_ms": weighted("mean_tpot_ms"),
        "server_mean_tpot_ms": 1e3 * delta("spc_time_per_output_token_seconds_sum") / max(tpot_n, 1),
        "sparse_steps": delta("spc_sparse_decode_steps_total"),
        "dense_steps": delta("spc_dense_decode_steps_total"),
        "elastic_overlap_ratio": total(after, "spc_elastic_overlap_ratio"),
        "prefetch_hidden_s": delta("spc_prefetch_hidden_seconds_total"),
        "prefetch_exposed_s": delta("spc_prefetch_exposed_seconds_total"),
        "kv_bytes_loaded": delta("spc_kv_bytes_loaded_total"),
        "kv_bytes_full_reload": delta("spc_kv_bytes_full_reload_total"),
        "retrieval_fallback_steps": delta("spc_retrieval_fallback_steps_total"),
        "weak_retrieval_fallback_steps": delta("spc_weak_retrieval_fallback_steps_total"),
        "device_memory_peak_bytes": total(after, "spc_device_memory_peak_bytes"),
        "device_memory_bytes": {k: v for k, v in after.items() if k.startswith("spc_device_memory_bytes")},
        "host_kv_bytes": total(after, "spc_host_kv_bytes"),
        "resident_layers": total(after, "spc_resident_layers"),
        "offloaded_layers": total(after, "spc_offloaded_layers"),
    }
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()}))


if __name__ == "__main__":
    main(sys.argv)
