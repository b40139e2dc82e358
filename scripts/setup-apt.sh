#!/usr/bin/env bash
# Install the Debian packages qacc needs, only those missing. Idempotent; uses sudo when not root.
set -euo pipefail
pkgs=(
  build-essential cmake ninja-build pkg-config
  gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf
  gcc-arm-none-eabi libnewlib-arm-none-eabi
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
