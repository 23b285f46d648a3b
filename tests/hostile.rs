//! 10,000 hostile or broken requests (random bytes, and valid requests with bytes flipped,
//! dropped, cut or CR/LF/NUL inserted) against the real binary: each gets an allowed status or
//! a clean close, nothing panics, and a subscriber receives every event published meanwhile.

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use support::Server;

const REQUESTS: usize = 10_000;
const THREADS: usize = 4;
const ALLOWED: [u16; 14] = [200, 204, 400, 401, 403, 404, 405, 408, 411, 413, 429, 431, 501, 503];

const TEMPLATES: [&[u8]; 6] = [
    b"GET /events?topic=fuzz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /publish?topic=fuzz&event=e HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 31\r\n\r\n{\"topic\":\"fuzz\",\"data\":\"hello\"}",
    b"POST /publish?topic=fuzz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1-0\r\nAccept-Encoding: gzip\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\nOrigin: https://a.example\r\n\r\n",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn hostile(rng: &mut Rng) -> Vec<u8> {
    if rng.below(5) == 0 {
        return (0..rng.below(600)).map(|_| rng.next() as u8).collect();
    }
    let mut req = TEMPLATES[rng.below(TEMPLATES.len())].to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(req.len());
        match rng.below(5) {
            0 => req[at] = rng.next() as u8,
            1 => {
                req.remove(at);
            }
            2 => req.insert(at, [b'\r', b'\n', 0, b'%', 0xff][rng.below(5)]),
            3 => req.truncate(at),
            _ => req.splice(at..at, b"\r\nX-Junk: \x01\x7f\r\n".iter().copied()).for_each(drop),
        }
        if req.is_empty() {
            req.push(b'G');
        }
    }
    req
}

/// Sends one request and half-closes; the answer must be an allowed status, or a clean close.
fn send_one(addr: std::net::SocketAddr, req: &[u8]) -> Result<Option<u16>, String> {
    let mut conn = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = conn.write_all(req);
    let _ = conn.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    match conn.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(format!("no answer and no close: {e}")),
    }
    if answer.is_empty() {
        return Ok(None);
    }
    let status = answer
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| std::str::from_utf8(&rest[..3.min(rest.len())]).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", String::from_utf8_lossy(&answer[..answer.len().min(80)])))?;
    if ALLOWED.contains(&status) {
        Ok(Some(status))
    } else {
        Err(format!("status {status}"))
    }
}

#[test]
fn ten_thousand_hostile_requests_leave_everyone_else_served() {
    let server = Server::start(&["--header-timeout", "2s"]);
    let mut sub = server.subscribe(&["alive"]);
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (addr, stop) = (server.addr, stop.clone());
        thread::spawn(move || {
            let mut ids = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                ids.push(support::publish(addr, "alive", &format!("e{}", ids.len())));
                thread::sleep(Duration::from_millis(5));
            }
            ids
        })
    };
    let attackers: Vec<_> = (0..THREADS)
        .map(|t| {
            let addr = server.addr;
            thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) * 0x1234_5678_9abc_def1));
                for i in 0..REQUESTS / THREADS {
                    let req = hostile(&mut rng);
                    if let Err(e) = send_one(addr, &req) {
                        panic!("request {i} of thread {t} ({:?}): {e}", String::from_utf8_lossy(&req));
                    }
                }
            })
        })
        .collect();
    for a in attackers {
        a.join().expect("an attacker thread failed");
    }
    stop.store(true, Ordering::Relaxed);
    let ids = publisher.join().expect("publisher");
    assert!(ids.len() > 10, "too few events published during the run: {}", ids.len());
    for (i, id) in ids.iter().enumerate() {
        let ev = sub.expect_event(&format!("event {i} of {}", ids.len()));
        assert_eq!(ev.id.as_deref(), Some(id.as_str()), "the subscriber missed or reordered events");
    }
    server.get("/health").assert_status(200, "health after the run");
    assert!(!server.stderr_log().contains("panicked"), "a connection task panicked: {}", server.stderr_log());
}
