#!/usr/bin/env bash
# wrk as most people first point it at a server: 100 connections POSTing to /publish, each
# sending its next request when the answer comes, while 1,000 subscribers (ringcast-loadtest)
# listen on the topic and count what they get. Publishing then outruns delivery, so this
# measures back-pressure: how long publishers wait, and whether they wait fairly.
#
#   loadtest/bench/wrk_publish.sh                       # this tree's binary
#   SERVERS="start=/tmp/old/ringcast ringcast=target/release/ringcast" loadtest/bench/wrk_publish.sh
#   ROUNDS=3 CONNECTIONS=100 WRK_SECONDS=5 CORES=2 OUT=/tmp/wrk loadtest/bench/wrk_publish.sh
#
# Needs wrk (apt-get install -y wrk) and release builds. Prints one line per server and round:
# wrk's requests/s and latency p50/p90/p99, its timeouts (2 s), and what the subscribers got.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/ringcast-wrk}"
ROUNDS="${ROUNDS:-1}"
CONNECTIONS="${CONNECTIONS:-100}"
SECONDS_="${WRK_SECONDS:-5}"
CORES="${CORES:-2}"
PORT=18183
mkdir -p "$OUT"
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }
cargo build --release -p ringcast -p ringcast-loadtest >/dev/null
read -r -a SERVERS <<<"${SERVERS:-ringcast=$ROOT/target/release/ringcast}"

cat >"$OUT/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body   = "hello from wrk, a 64-byte event body padded out with some xxxxx"
wrk.headers["Content-Type"] = "text/plain"
EOF

for round in $(seq "$ROUNDS"); do
  for entry in "${SERVERS[@]}"; do
    name=${entry%%=*}; bin=${entry#*=}
    if ss -Hltn "sport = :$PORT" | grep -q .; then echo "port $PORT is in use" >&2; exit 1; fi
    "$bin" --listen "127.0.0.1:$PORT" --cores "$CORES" --max-connections 19980 --log-level warn \
      >"$OUT/server.out" 2>"$OUT/server.err" &
    pid=$!
    for _ in $(seq 100); do grep -q listening "$OUT/server.out" 2>/dev/null && break; sleep 0.05; done
    # The subscribers stay long enough to take every event wrk gets published.
    target/release/ringcast-loadtest "http://127.0.0.1:$PORT" -c 1000 --rate 1 -d "$((SECONDS_ * 4 + 10))s" -p 1 \
      --topic-prefix wrk --json -q >"$OUT/$name-$round-subs.json" 2>/dev/null &
    subs=$!
    sleep 2
    wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_}s" --latency -s "$OUT/post.lua" \
      "http://127.0.0.1:$PORT/publish?topic=wrk0" >"$OUT/$name-$round-wrk.txt"
    wait "$subs" || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 - "$OUT/$name-$round-wrk.txt" "$OUT/$name-$round-subs.json" "$name" "$round" <<'PY'
import json, re, sys
wrk, subs, name, rnd = open(sys.argv[1]).read(), json.load(open(sys.argv[2])), sys.argv[3], sys.argv[4]
def pct(p):
    m = re.search(rf"^\s*{p}%\s+(\S+)", wrk, re.M)
    return m.group(1) if m else "-"
rps = re.search(r"Requests/sec:\s+(\S+)", wrk).group(1)
timeouts = re.search(r"timeout (\d+)", wrk)
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
d = subs["delivery"]
print(f"{name} round {rnd}: {float(rps):,.0f} publishes/s, p50 {pct(50)} p90 {pct(90)} p99 {pct(99)}, "
      f"timeouts {timeouts.group(1) if timeouts else 0}, non-2xx {non2xx.group(1) if non2xx else 0}; "
      f"subscribers got {d['foreign']:,} of wrk's events, lost {d['lost']}, disconnects {d['disconnects']}")
PY
    sleep 1
  done
done
