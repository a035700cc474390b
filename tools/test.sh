#!/usr/bin/env bash
# The README's test command: installs the Debian packages, configures, builds (CUDA targets too
# where nvcc exists) and runs every test. Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/install-deps.sh
cmake --preset default
cmake --build --preset default
ctest --preset default -j"$(nproc)"
