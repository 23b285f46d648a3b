#!/usr/bin/env bash
# Several nodes through Redis: publish throughput through one local Redis (waiting and pipelined
# publishers), Redis's CPU per publish, and publish -> receive latency on another node against a
# single node, all in one session. JSON lines go to $OUT (default /tmp/ringcast-cluster), a
# summary table to stdout.
#
#   loadtest/bench/cluster.sh
#
# Needs redis-server and redis-cli (Debian package redis-server), release builds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/ringcast-cluster}"
mkdir -p "$OUT"
CORES="${CORES:-2}"
REDIS_PORT=16379
A_PORT=18191
B_PORT=18192
cargo build --release -p ringcast -p ringcast-loadtest >/dev/null
RC="$ROOT/target/release/ringcast"
LT="$ROOT/target/release/ringcast-loadtest"

for p in $REDIS_PORT $A_PORT $B_PORT; do
  if ss -Hltn "sport = :$p" | grep -q .; then echo "port $p is in use: stop what holds it" >&2; exit 1; fi
done

redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS=()
cleanup() { kill "${PIDS[@]}" "$REDIS_PID" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do redis-cli -p $REDIS_PORT ping >/dev/null 2>&1 && break; sleep 0.05; done

start_node() { # port name [flags...] -> sets NODE_PID
  local port=$1 name=$2
  shift 2
  "$RC" --listen "127.0.0.1:$port" --cores "$CORES" --node-id "$name" --log-level warn "$@" \
    >"$OUT/$name.out" 2>"$OUT/$name.err" &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  for _ in $(seq 100); do grep -q listening "$OUT/$name.out" 2>/dev/null && break; sleep 0.05; done
  for _ in $(seq 100); do curl -s "http://127.0.0.1:$port/health" | grep -q '"ok"' && return; sleep 0.05; done
  echo "node $name did not become healthy" >&2; exit 1
}
stop_nodes() { kill "${PIDS[@]}" 2>/dev/null || true; wait "${PIDS[@]}" 2>/dev/null || true; PIDS=(); sleep 0.5; }
redis_cpu() { redis-cli -p $REDIS_PORT info cpu | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.3f", s}'; }

run() { # name loadtest-args...
  local name=$1
  shift
  local before after
  before=$(redis_cpu)
  "$LT" "$@" --json -q >"$OUT/$name.json" || true
  after=$(redis_cpu)
  echo "$name $before $after" >>"$OUT/redis-cpu.txt"
  echo "$name: $(head -c 200 "$OUT/$name.json")" >&2
}
: >"$OUT/redis-cpu.txt"

# 1. Publishes/s through Redis, one node, 10 subscribers.
REDIS="redis://127.0.0.1:$REDIS_PORT/"
start_node $A_PORT a --redis "$REDIS"
A=$NODE_PID
run redis-wait "http://127.0.0.1:$A_PORT" -c 10 --burst 20000 -p 4 --pipeline 1 --server-pid "$A"
run redis-pipe "http://127.0.0.1:$A_PORT" -c 10 --burst 100000 -p 4 --pipeline 64 --server-pid "$A"
# 2. Light load: publish on node a, receive on node b; the same on node a alone with Redis.
start_node $B_PORT b --redis "$REDIS"
run light-cross "http://127.0.0.1:$B_PORT" --publish-to "http://127.0.0.1:$A_PORT" -c 10 --rate 100 -d 10s -p 1 --max-in-flight 1
run light-same "http://127.0.0.1:$A_PORT" -c 10 --rate 100 -d 10s -p 1 --max-in-flight 1
# 3. 1,000 subscribers on node b, 500 events/s published on node a.
run load-cross "http://127.0.0.1:$B_PORT" --publish-to "http://127.0.0.1:$A_PORT" -c 1000 --rate 500 -d 10s -p 4 --max-in-flight 1
stop_nodes
# 4. The same without Redis: one node alone.
start_node $A_PORT alone
run light-alone "http://127.0.0.1:$A_PORT" -c 10 --rate 100 -d 10s -p 1 --max-in-flight 1
run load-alone "http://127.0.0.1:$A_PORT" -c 1000 --rate 500 -d 10s -p 4 --max-in-flight 1
run alone-wait "http://127.0.0.1:$A_PORT" -c 10 --burst 20000 -p 4 --pipeline 1 --server-pid "$NODE_PID"
run alone-pipe "http://127.0.0.1:$A_PORT" -c 10 --burst 100000 -p 4 --pipeline 64 --server-pid "$NODE_PID"
stop_nodes

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
cpu = {}
for line in open(os.path.join(out, "redis-cpu.txt")):
    name, a, b = line.split()
    cpu[name] = float(b) - float(a)
def g(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d: return None
        d = d[p]
    return d
print("| run | publishes/s | delivered % | p50 ms | p99 ms | publish RTT p50 / p99 ms | Redis CPU µs/publish |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in ["redis-wait", "redis-pipe", "alone-wait", "alone-pipe", "light-alone", "light-same", "light-cross", "load-alone", "load-cross"]:
    try: d = json.load(open(os.path.join(out, name + ".json")))
    except Exception as e:
        print(f"| {name} | (no result: {e}) ||||||"); continue
    pubs = g(d, "publish", "published") or 0
    rate = g(d, "publish", "rate")
    p50, p99 = g(d, "latency", "p50_us"), g(d, "latency", "p99_us")
    r50, r99 = g(d, "publish", "rtt", "p50_us"), g(d, "publish", "rtt", "p99_us")
    rc = cpu.get(name, 0) * 1e6 / pubs if pubs else None
    f = lambda v, k=1000: "-" if v is None else f"{v / k:.3g}"
    print(f"| {name} | {rate:.0f} | {g(d, 'delivery', 'delivered_pct')} | {f(p50)} | {f(p99)} | {f(r50)} / {f(r99)} | "
          + ("-" if rc is None or name.startswith(('alone', 'light-alone', 'load-alone')) else f"{rc:.1f}") + " |")
PY
