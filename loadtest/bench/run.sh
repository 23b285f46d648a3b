#!/usr/bin/env bash
# Side-by-side benchmark: ringcast and nginx+nchan under the same ringcast-loadtest runs, plus
# the fan-out floor (../shared/fanout-floor) in the same session. Prints JSON lines to
# $OUT (default /tmp/ringcast-bench) and a summary table on stdout.
#
#   loadtest/bench/run.sh [scenario...]     default: rate1k rate10k burst idle
#   SERVERS=ringcast CORES=2 OUT=/tmp/x loadtest/bench/run.sh burst
#   SERVERS="before ringcast spin nchan" BEFORE_BIN=/tmp/ringcast-old loadtest/bench/run.sh burst1 light
#
# Scenarios: publishers that do not wait (open-loop rates, pipelined bursts) and publishers that
# wait for each answer before the next (wrk, curl loops, most HTTP clients):
#   rate1k   1,000 subscribers, 500 events/s open-loop (2 connections, up to 1,000 in flight)
#   rate10k  10,000 subscribers, 100 events/s open-loop
#   burst    1,000 subscribers, 5,000 events, 4 connections pipelining 32 requests each
#   burst1   the same burst, each publisher waiting for every answer (--pipeline 1)
#   rate1kw  1,000 subscribers, 500 events/s from 4 connections, one request in flight each
#   rate10kw 10,000 subscribers, 100 events/s from 4 connections, one request in flight each
#   light    10 subscribers, 100 events/s from one waiting publisher (light-load latency)
#   idle     19,900 idle subscribers (memory per connection)
# Servers: ringcast (this tree), spin (this tree with --spin 50us), noslice (this tree with
# --sched-slice 0: the kernel's default scheduler slice on the cores), floor (relay_floor: one
# blocking thread per connection, the publisher's thread writes to every subscriber; the
# light-load latency floor, not a server), before ($BEFORE_BIN: a
# ringcast binary built from an earlier commit), nchan (nginx + nchan).
#
# Needs: nginx with libnginx-mod-nchan (apt-get install -y libnginx-mod-nchan), release builds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/ringcast-bench}"
mkdir -p "$OUT"
SCENARIOS=("${@:-rate1k rate10k burst idle}")
read -r -a SCENARIOS <<<"${SCENARIOS[*]}"
RC_PORT=18181
NC_PORT=18182
CORES="${CORES:-2}"

cargo build --release -p ringcast -p ringcast-loadtest >/dev/null
LT="$ROOT/target/release/ringcast-loadtest"

args_for() {
  case "$1" in
    rate1k) echo "-c 1000 --rate 500 -d 10s -p 2" ;;
    rate10k) echo "-c 10000 --rate 100 -d 10s -p 2" ;;
    burst) echo "-c 1000 --burst 5000 -p 4 --pipeline 32" ;;
    burst1) echo "-c 1000 --burst 5000 -p 4 --pipeline 1" ;;
    rate1kw) echo "-c 1000 --rate 500 -d 10s -p 4 --max-in-flight 1" ;;
    rate10kw) echo "-c 10000 --rate 100 -d 10s -p 4 --max-in-flight 1" ;;
    light) echo "-c 10 --rate 100 -d 10s -p 1 --max-in-flight 1" ;;
    idle) echo "-c 19900 --burst 10 --max-per-process 10000" ;;
  esac
}

port_free() { # port: a leftover server on it would share the traffic (SO_REUSEPORT)
  if ss -Hltn "sport = :$1" | grep -q .; then
    echo "port $1 is already in use (a leftover server?): stop it first" >&2
    exit 1
  fi
}

start_ringcast() { # binary [extra flags...]
  local bin=$1
  shift
  port_free "$RC_PORT"
  "$bin" --listen "127.0.0.1:$RC_PORT" --cores "$CORES" --max-connections 19980 \
    --log-level warn "$@" >"$OUT/ringcast.out" 2>"$OUT/ringcast.err" &
  RC_PID=$!
  for _ in $(seq 100); do grep -q listening "$OUT/ringcast.out" 2>/dev/null && return; sleep 0.05; done
  echo "ringcast did not start" >&2; exit 1
}

start_floor() { # loadtest/src/bin/relay_floor.rs: the least a relay can do (light rows only)
  port_free "$RC_PORT"
  "$ROOT/target/release/relay_floor" "127.0.0.1:$RC_PORT" >"$OUT/ringcast.out" 2>"$OUT/ringcast.err" &
  RC_PID=$!
  for _ in $(seq 100); do grep -q listening "$OUT/ringcast.out" 2>/dev/null && return; sleep 0.05; done
  echo "relay_floor did not start" >&2; exit 1
}

start_nchan() {
  local dir="$OUT/nchan"
  port_free "$NC_PORT"
  rm -rf "$dir"; mkdir -p "$dir/tmp"
  sed "s/__PORT__/$NC_PORT/; s/^worker_processes 2;/worker_processes $CORES;/" loadtest/bench/nchan.conf >"$dir/nginx.conf"
  nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' 2>"$OUT/nchan.err" &
  NC_MASTER=$!
  for _ in $(seq 100); do
    NC_WORKERS=$(pgrep -P "$NC_MASTER" | paste -sd, - || true)
    [ -n "$NC_WORKERS" ] && [ "$(echo "$NC_WORKERS" | tr ',' '\n' | wc -l)" -ge "$CORES" ] && return
    sleep 0.05
  done
  echo "nginx+nchan did not start" >&2; exit 1
}

run_one() { # server scenario
  local server=$1 scenario=$2 out="$OUT/$1-$2.json" url pids extra=()
  if [ "$server" != nchan ]; then
    case "$server" in
      ringcast) start_ringcast "$ROOT/target/release/ringcast" ;;
      spin) start_ringcast "$ROOT/target/release/ringcast" --spin "${SPIN:-50us}" ;;
      noslice) start_ringcast "$ROOT/target/release/ringcast" --sched-slice 0 ;;
      before) start_ringcast "${BEFORE_BIN:?set BEFORE_BIN to an earlier ringcast binary}" ;;
      floor) start_floor ;;
      *) echo "unknown server $server" >&2; exit 1 ;;
    esac
    url="http://127.0.0.1:$RC_PORT"; pids=$RC_PID
  else
    start_nchan; url="http://127.0.0.1:$NC_PORT"; pids=$NC_WORKERS
    extra=(--sub-path '/sub/{topic}' --pub-path '/pub/{topic}')
  fi
  # shellcheck disable=SC2046
  "$LT" "$url" $(args_for "$scenario") "${extra[@]}" --server-pid "$pids" --json -q >"$out" || true
  if [ "$server" != nchan ]; then kill "$RC_PID"; wait "$RC_PID" 2>/dev/null || true
  else kill "$NC_MASTER"; wait "$NC_MASTER" 2>/dev/null || true; fi
  sleep 1
  echo "$server $scenario: $(head -c 300 "$out")" >&2
}

read -r -a SERVERS <<<"${SERVERS:-ringcast nchan}"
for s in "${SCENARIOS[@]}"; do
  for server in "${SERVERS[@]}"; do run_one "$server" "$s"; done
done

python3 - "$OUT" "${SERVERS[*]}" "${SCENARIOS[@]}" <<'PY'
import json, sys, os
out, servers, scen = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
def g(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d: return None
        d = d[p]
    return d
print("| scenario | server | events/s published | deliveries/s | p50 ms | p99 ms | publish RTT p50 / p99 ms | server CPU µs/delivery | RSS/conn B | delivered % |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in scen:
    for server in servers:
        f = os.path.join(out, f"{server}-{s}.json")
        try: d = json.load(open(f))
        except Exception as e:
            print(f"| {s} | {server} | (no result: {e}) ||||||||"); continue
        row = [s, server]
        row.append(g(d, "publish", "rate"))
        row.append(g(d, "delivery", "rate"))
        p50, p99 = g(d, "latency", "p50_us"), g(d, "latency", "p99_us")
        row.append(None if p50 is None else p50 / 1000)
        row.append(None if p99 is None else p99 / 1000)
        r50, r99 = g(d, "publish", "rtt", "p50_us"), g(d, "publish", "rtt", "p99_us")
        row.append("-" if r50 is None else f"{r50 / 1000:.3g} / {r99 / 1000:.3g}")
        row.append(g(d, "server", "cpu_us_per_event"))
        row.append(g(d, "server", "rss_per_connection_bytes"))
        row.append(g(d, "delivery", "delivered_pct"))
        fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(fmt(v) for v in row) + " |")
PY
