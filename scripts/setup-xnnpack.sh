#!/usr/bin/env bash
# Install XNNPACK for AArch64 (the benchmark peer of `qacc bench`): Debian's libxnnpack-dev from the
# arm64 foreign architecture, plus the arm64 C library the peer harness links against and runs
# with under qemu-aarch64. Idempotent (does nothing when everything is installed); sudo when not
# root. `make setup` (hence `make test`: tests/bench/test_bench.py runs the peer) and `make bench` run it.
set -euo pipefail
pkgs=(
  libxnnpack-dev:arm64 libxnnpack0:arm64 libpthreadpool-dev:arm64 libcpuinfo-dev:arm64
  libc6-dev:arm64 libc6:arm64
  gcc-aarch64-linux-gnu qemu-user
)
sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi

missing=()
for p in "${pkgs[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "qacc setup-xnnpack: enabling the arm64 foreign architecture (dpkg --add-architecture arm64)"
  $sudo dpkg --add-architecture arm64
fi
echo "qacc setup-xnnpack: installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
