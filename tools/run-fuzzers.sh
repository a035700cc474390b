#!/usr/bin/env bash
# Builds the libFuzzer targets (cmake --preset fuzz: clang, ASan+UBSan, no services, no tests) and runs
# each for SECONDS on a scratch copy of its seed corpus. Exits non-zero if any target crashes.
# Targets: every tests/fuzz/*_fuzz.cc (model files, tokenizers, eval tasks, and openai_request_fuzz: the
# request bodies of the generator's OpenAI-compatible HTTP API).
#   tools/run-fuzzers.sh [SECONDS=60] [TARGET...]
set -euo pipefail
secs="${1:-60}"
shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build-fuzz"
cd "$root"

cmake --preset fuzz >"$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
if (($# > 0)); then
  targets=("$@")
else
  targets=()
  for src in tests/fuzz/*_fuzz.cc; do targets+=("$(basename "$src" .cc)"); done
fi
cmake --build "$build" --target "${targets[@]}" -j "${JOBS:-$(nproc)}"

work="$build/fuzz-work"
mkdir -p "$work"
failed=()
for t in "${targets[@]}"; do
  bin="$(find "$build" -type f -name "$t" -perm -u+x | head -n 1)"
  [[ -n "$bin" ]] || { echo "run-fuzzers: no binary for $t" >&2; failed+=("$t"); continue; }
  corpus="$work/$t/corpus"
  rm -rf "$corpus"
  mkdir -p "$corpus" "$work/$t/artifacts"
  if [[ -d "tests/fuzz/corpus/$t" ]]; then cp -r "tests/fuzz/corpus/$t/." "$corpus/"; fi
  echo "run-fuzzers: $t for ${secs}s"
  if "$bin" "$corpus" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
       -print_final_stats=1 -artifact_prefix="$work/$t/artifacts/" >"$work/$t/log.txt" 2>&1; then
    grep -E "^stat::number_of_executed_units|^Done" "$work/$t/log.txt" | tr '\n' ' '; echo
  else
    echo "run-fuzzers: $t FAILED (log: $work/$t/log.txt, artifacts: $work/$t/artifacts/)" >&2
    tail -n 40 "$work/$t/log.txt" >&2
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "run-fuzzers: crashes in: ${failed[*]}" >&2
  exit 1
fi
echo "run-fuzzers: all ${#targets[@]} targets ran ${secs}s without a crash"
