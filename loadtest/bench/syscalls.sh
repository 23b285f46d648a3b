#!/usr/bin/env bash
# Syscalls (and io_uring SQEs) per delivered event, with batching off (`-off`: --batch-max 1
# --send sendmsg, every frame its own broker batch and its own sendmsg), with per-stream
# batching but one sendmsg per stream (`-sendmsg`), and with the defaults (`-on`: per-stream
# batching, one io_uring submit per flush), counted by `perf stat` tracepoints on the ringcast
# process during a ringcast-loadtest run.
#
#   loadtest/bench/syscalls.sh [case...]   cases: see CASES below (default: all)
#   OUT=/tmp/x CORES=2 loadtest/bench/syscalls.sh rate1k-off rate1k-on
#
# Needs: perf (Debian linux-perf) with tracefs, root, release builds. Prints a Markdown table.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/ringcast-syscalls}"
mkdir -p "$OUT"
PORT=18190
CORES="${CORES:-2}"

# name | ringcast flags | loadtest args
CASES=(
  "rate1k-off|--batch-max 1 --send sendmsg|-c 1000 --rate 500 -d 10s -p 2"
  "rate1k-sendmsg|--send sendmsg|-c 1000 --rate 500 -d 10s -p 2"
  "rate1k-on||-c 1000 --rate 500 -d 10s -p 2"
  "rate1k-window5ms|--batch-window 5ms|-c 1000 --rate 500 -d 10s -p 2"
  "light1k-on||-c 1000 --rate 50 -d 10s"
  "rate10k-off|--batch-max 1 --send sendmsg|-c 10000 --rate 100 -d 10s -p 2"
  "rate10k-sendmsg|--send sendmsg|-c 10000 --rate 100 -d 10s -p 2"
  "rate10k-on||-c 10000 --rate 100 -d 10s -p 2"
  "burst-off|--batch-max 1 --send sendmsg|-c 1000 --burst 5000 -p 4 --pipeline 32"
  "burst-sendmsg|--send sendmsg|-c 1000 --burst 5000 -p 4 --pipeline 32"
  "burst-on||-c 1000 --burst 5000 -p 4 --pipeline 32"
)
EVENTS="syscalls:sys_enter_sendmsg,syscalls:sys_enter_writev,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_epoll_wait,io_uring:io_uring_submit_req,raw_syscalls:sys_enter"

cargo build --release -p ringcast -p ringcast-loadtest >/dev/null
LT="$ROOT/target/release/ringcast-loadtest"

want=("$@")
selected() { [ ${#want[@]} -eq 0 ] && return 0; local w; for w in "${want[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }

names=()
for c in "${CASES[@]}"; do
  IFS='|' read -r name flags args <<<"$c"
  selected "$name" || continue
  names+=("$name")
  # shellcheck disable=SC2086
  "$ROOT/target/release/ringcast" --listen "127.0.0.1:$PORT" --cores "$CORES" --max-connections 19980 \
    --log-level warn $flags >"$OUT/$name.server.out" 2>"$OUT/$name.server.err" &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$OUT/$name.server.out" 2>/dev/null && break; sleep 0.05; done
  perf stat -x, -e "$EVENTS" -p "$pid" -o "$OUT/$name.perf" &
  perf_pid=$!
  sleep 0.3
  # shellcheck disable=SC2086
  "$LT" "http://127.0.0.1:$PORT" $args --server-pid "$pid" --json -q >"$OUT/$name.json" || true
  kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 1
  echo "$name done: $(head -c 200 "$OUT/$name.json")" >&2
done

python3 - "$OUT" "${names[@]}" <<'PY'
import json, sys, os
out, names = sys.argv[1], sys.argv[2:]
print("| case | events/s | publish errors | delivered | delivered % | sendmsg/delivery | io_uring_enter/delivery | SQEs/delivery | all syscalls/delivery | server CPU µs/delivery | p50 ms | p99 ms |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for n in names:
    try:
        d = json.load(open(os.path.join(out, n + ".json")))
        counts = {}
        for line in open(os.path.join(out, n + ".perf")):
            f = line.strip().split(",")
            if len(f) > 2 and f[0].replace(".", "").isdigit():
                counts[f[2]] = float(f[0])
    except Exception as e:
        print(f"| {n} | (no result: {e}) |"); continue
    got = d["delivery"]["delivered"] or 1
    per = lambda k: counts.get(k, 0) / got
    f3 = lambda v: f"{v:.3f}"
    print("| " + " | ".join([
        n, f"{d['publish']['rate']:.0f}", str(d["errors"]), str(d["delivery"]["delivered"]), f"{d['delivery']['delivered_pct']:.3f}",
        f3(per("syscalls:sys_enter_sendmsg")), f3(per("syscalls:sys_enter_io_uring_enter")),
        f3(per("io_uring:io_uring_submit_req")), f3(per("raw_syscalls:sys_enter")),
        f3(d["server"]["cpu_us_per_event"]), f"{d['latency']['p50_us']/1000:.2f}", f"{d['latency']['p99_us']/1000:.2f}",
    ]) + " |")
PY
