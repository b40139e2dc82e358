#!/usr/bin/env bash
# Install the Debian packages qacc needs, only those missing. Idempotent; uses sudo when not root.
set -euo pipefail
# Every package whose files the build, the tests or the demo use is named here (or is a hard
# Depends of one named here): --no-install-recommends leaves out whatever is only recommended,
# such as the cross compilers' C libraries. tests/test_setup.py checks this list against the
# files the build really uses (dpkg -S).
pkgs=(
  build-essential cmake ninja-build pkg-config
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross
  gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
  gcc-arm-none-eabi libnewlib-arm-none-eabi libnewlib-dev
  qemu-user qemu-system-arm libglib2.0-dev
  dpkg-dev xz-utils
  dataset-fashion-mnist
  chromium
)
missing=()
for p in "${pkgs[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
echo "qacc setup: installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
