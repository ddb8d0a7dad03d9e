#!/usr/bin/env bash
# The test command: installs what is needed, then checks formatting, lints and runs every
# test. Tests that need root (proc connector, BPF, cgroups, network namespaces) run when this
# is run as root; otherwise they print SKIPPED, and under CI=true a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
