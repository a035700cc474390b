#!/usr/bin/env bash
# The README's main job: installs the Debian packages, builds, and generates from the embedded
# default model (stories260K, a real 260K-parameter Llama trained on TinyStories).
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/install-deps.sh
cmake --preset default >/dev/null
cmake --build --preset default --target specontext
exec build/bin/specontext generate --model models/stories260K/stories260K.bin \
  --tokenizer models/stories260K/tok512.bin --prompt "${1:-}" --max-new-tokens "${2:-200}" --temperature 0
