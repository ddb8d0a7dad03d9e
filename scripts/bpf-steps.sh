#!/usr/bin/env bash
# Where the programs' run time goes, step by step (BENCHMARKS.md, "Where the programs' time goes").
#
# Builds the programmer bench with the BPF objects' step markers compiled in
# (ZBRIDGE_BPF_STEPS=1: bpf/steps.h; without it the markers compile to nothing): each program
# sums the time between its markers per step in the per-CPU map `zb_steps`. Runs set-ups (2)
# and (2b) of the bench (a pod's connects through a fake ztunnel that asks SO_ORIGINAL_DST),
# reads the map with bpftool while the bench holds, and prints ns per connection for each
# step. Each figure includes one timestamp's own cost: the "(a timestamp alone)" rows measure
# it. Run as root; needs bpftool.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "bpf-steps: run as root (the bench loads BPF programs)" >&2; exit 1; }
command -v bpftool >/dev/null || { echo "bpf-steps: bpftool not found (apt-get install bpftool)" >&2; exit 1; }

work=$(mktemp -d /tmp/zb-steps.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Its own target directory, kept between runs, so that the main build is not disturbed.
export CARGO_TARGET_DIR="$repo/target/steps"
bench=$(cd "$repo" && ZBRIDGE_BPF_STEPS=1 cargo bench --bench programmer --no-run 2>&1 |
	sed -n 's/.*Executable benches\/programmer.rs (\(.*\))$/\1/p')
[ -x "$bench" ] || { echo "bpf-steps: building the bench failed" >&2; exit 1; }

ZBRIDGE_BENCH_STEPS=1 ONLY_ASKS=1 "$bench" --bench >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 600); do
	grep -q '^STEPS ' "$work/log" && break
	kill -0 "$pid" 2>/dev/null || { cat "$work/log" >&2; exit 1; }
	sleep 1
done
connections=$(sed -n 's/^STEPS //p' "$work/log")
bpftool map dump name zb_steps -j >"$work/steps.json"
wait "$pid"
grep -E "^programs' run time, a fake ztunnel|each round|median round|^    (sock_ops|getsockopt|connect4) " "$work/log" | head -6

python3 - "$work/steps.json" "$connections" <<'PY'
import json, sys

# The slots of enum zb_step (bpf/steps.h).
steps = {
    20: "connect4: settings, ztunnel address checks",
    21: "connect4: thread storage lookup",
    22: "connect4: cgroup id, cached entry",
    23: "connect4: record armed, ztunnel chosen",
    24: "connect4: counter",
    25: "connect4: (a timestamp alone)",
    10: "sock_ops TCP_CONNECT: thread storage, armed",
    11: "sock_ops TCP_CONNECT: settings, ports, tuple",
    13: "sock_ops TCP_CONNECT: record stored (map update)",
    14: "sock_ops TCP_CONNECT: (a timestamp alone)",
    0: "getsockopt: settings, local port",
    1: "getsockopt: the tuple (socket fields)",
    2: "getsockopt: record looked up and deleted",
    3: "getsockopt: answer written",
    4: "getsockopt: counter",
    5: "getsockopt: (a timestamp alone)",
}
entries, connections = json.load(open(sys.argv[1])), int(sys.argv[2])

def number(v):
    return v if isinstance(v, int) else int.from_bytes(bytes(int(x, 16) for x in v), "little")

sums = {number(e["key"]): sum(number(c["value"]) for c in e["values"]) for e in entries}
print(f"ns per connection, {connections} connections (each step includes one timestamp):")
for key in [20, 21, 22, 23, 24, 25, 10, 11, 13, 14, 0, 1, 2, 3, 4, 5]:
    print(f"  {steps[key]:<46} {sums.get(key, 0) / connections:7.1f}")
PY
