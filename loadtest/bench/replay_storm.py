#!/usr/bin/env python3
"""Resume storm on a node that cannot vouch from memory: its replays come from Redis.

    loadtest/bench/replay_storm.py BINARY [--streams N] [--events K] [--size B]

Starts redis-server and node A, publishes K events of B bytes through A, then starts node B
(BINARY) and opens N streams to it, each with Last-Event-ID = the first event's id and a
small receive buffer, that do not read: each is owed K-1 events read back from Redis. Prints
node B's peak RSS (VmHWM) and RSS once every stream's head has arrived and 3 s have passed.
Loopback only; ports 18301-18303.
"""
import argparse, http.client, os, socket, subprocess, sys, time

p = argparse.ArgumentParser()
p.add_argument("binary")
p.add_argument("--streams", type=int, default=500)
p.add_argument("--events", type=int, default=1000)
p.add_argument("--size", type=int, default=512)
a = p.parse_args()

REDIS, A, B = 18303, 18301, 18302
procs = []
def start(cmd):
    pr = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    procs.append(pr)
    return pr

def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"port {port} never opened")

def vm(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
try:
    start(["redis-server", "--port", str(REDIS), "--save", "", "--appendonly", "no"])
    wait_port(REDIS)
    url = f"redis://127.0.0.1:{REDIS}/"
    start([a.binary, "--listen", f"127.0.0.1:{A}", "--redis", url, "--cores", "1"])
    wait_port(A)
    time.sleep(0.5)
    conn = http.client.HTTPConnection("127.0.0.1", A)
    body = "x" * a.size
    first = None
    for i in range(a.events):
        conn.request("POST", "/publish?topic=storm", body, {"Content-Type": "text/plain"})
        r = conn.getresponse()
        data = r.read().decode()
        if first is None:
            first = data.split('"id":"')[1].split('"')[0]
    node_b = start([a.binary, "--listen", f"127.0.0.1:{B}", "--redis", url, "--cores", "2"])
    wait_port(B)
    time.sleep(0.5)
    base = vm(node_b.pid, "VmRSS")
    socks = []
    t0 = time.time()
    req = (f"GET /events?topic=storm HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {first}\r\n\r\n").encode()
    for _ in range(a.streams):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", B))
        s.sendall(req)
        socks.append(s)
    for s in socks:
        s.settimeout(10)
        if not s.recv(64).startswith(b"HTTP/1.1 200"):
            sys.exit("a stream was not answered 200")
    time.sleep(3)
    print(f"streams {a.streams} x {a.events - 1} replayed events of {a.size} B from Redis: "
          f"node B RSS before {base / 2**20:.1f} MiB, after {vm(node_b.pid, 'VmRSS') / 2**20:.1f} MiB, "
          f"peak {vm(node_b.pid, 'VmHWM') / 2**20:.1f} MiB ({time.time() - t0:.1f} s)")
finally:
    for pr in reversed(procs):
        pr.kill()
        pr.wait()
