#!/usr/bin/env bash
# Installs what building and testing zbridge needs on a fresh Debian 12 machine:
# clang/llvm and the libbpf headers (the BPF object is compiled by clang from bpf/ at
# `cargo build` time), bpftool (dumps, BTF checks), iproute2 and iptables (the end-to-end tests
# build network namespaces and the datapath benchmark compares with iptables DNAT).
# Safe to run again: it installs only what is missing.
set -euo pipefail

packages=(clang llvm libbpf-dev bpftool iproute2 iptables pkg-config)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not on PATH: install the Rust toolchain (rustup, rustc >= 1.89)" >&2
  exit 1
fi
