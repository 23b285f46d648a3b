//! The bad-request suite: smuggling attempts, malformed framing, CR/LF/NUL where they must not
//! be, invalid UTF-8, and dozens of slowloris connections (byte-at-a-time heads and bodies) at
//! once, all against one server while a well-behaved subscriber receives every event a
//! publisher sends throughout. Each bad request gets its exact status (or, for a stream, its
//! safe answer); nothing panics.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use support::Server;

/// (what, request, expected status).
const CASES: &[(&str, &[u8], u16)] = &[
    // Request smuggling: any ambiguity about where a body ends is refused.
    ("CL + TE", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE + CL", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    ("two different CL", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    ("CL list", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 1\r\n\r\na", 400),
    ("CL with sign", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\na", 400),
    ("CL negative", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
    ("TE chunked twice", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE gzip, chunked", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("TE not chunked last", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    ("chunk size overflow", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff1\r\na\r\n0\r\n\r\n", 400),
    ("chunk size with space", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n 1\r\na\r\n0\r\n\r\n", 400),
    ("chunk without CRLF after data", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX0\r\n\r\n", 400),
    ("obs-fold header", b"GET /health HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n", 400),
    ("space before colon", b"GET /health HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    ("no Host (HTTP/1.1)", b"GET /health HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("absolute-form target", b"GET http://h/health HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("unknown version", b"GET /health HTTP/1.7\r\nHost: h\r\n\r\n", 400),
    // CR, LF and NUL where they would break the event stream or a header.
    ("NUL in a header", b"GET /health HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", 400),
    ("NUL in Last-Event-ID", b"GET /events?topic=x HTTP/1.1\r\nHost: h\r\nLast-Event-ID: 1\x00\r\n\r\n", 400),
    ("CR LF in a topic", b"GET /events?topic=a%0d%0ab HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("NUL in a topic", b"GET /events?topic=a%00 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("LF in a published topic", b"POST /publish?topic=a%0ab HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx", 400),
    ("LF in an event name", b"POST /publish?topic=a&event=x%0ay HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx", 400),
    ("CR in a JSON event name", b"POST /publish HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 36\r\n\r\n{\"topic\":\"a\",\"event\":\"x\\ry\",\"data\":1}", 400),
    // Invalid UTF-8 in path, query and body.
    ("invalid UTF-8 in the path", b"GET /events\xff?topic=x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("invalid UTF-8 in the query", b"GET /events?topic=%ff HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("invalid UTF-8 in a raw body", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n\xc3\x28", 400),
    ("invalid UTF-8 in a form", b"POST /publish HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 18\r\n\r\ntopic=x&data=%ff%fe", 400),
    ("oversized body", b"POST /publish?topic=x HTTP/1.1\r\nHost: h\r\nContent-Length: 2000\r\n\r\n", 413),
];

/// Sends `req`, half-closes, returns the status of the first answer (None: closed silently).
fn status_of(addr: std::net::SocketAddr, req: &[u8]) -> Option<u16> {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(req).unwrap();
    let _ = conn.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let text = std::str::from_utf8(answer.get(9..12)?).ok()?;
    text.parse().ok()
}

#[test]
fn bad_requests_get_their_status_while_a_subscriber_gets_everything() {
    let server = Server::start(&[
        "--header-timeout",
        "1s",
        "--body-timeout",
        "1s",
        "--max-body",
        "1000",
        "--max-queued-bytes",
        "65536",
    ]);
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
    // Slowloris: 40 connections trickling a head, 40 trickling a body, one byte every 100 ms.
    let slow: Vec<_> = (0..80)
        .map(|i| {
            let addr = server.addr;
            thread::spawn(move || {
                let req: &[u8] = if i % 2 == 0 {
                    b"GET /events?topic=alive HTTP/1.1\r\nHost: h\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"
                } else {
                    b"POST /publish?topic=alive HTTP/1.1\r\nHost: h\r\nContent-Length: 500\r\n\r\nslow body never ends"
                };
                let mut conn = TcpStream::connect(addr).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut sent = 0;
                // Stop at the body's end or when the server gives up on us (write fails).
                while sent < req.len() && conn.write_all(&req[sent..sent + 1]).is_ok() {
                    sent += 1;
                    thread::sleep(Duration::from_millis(100));
                    if sent % 5 == 0 && closed_with_answer(&conn) {
                        break;
                    }
                }
                let mut answer = Vec::new();
                let _ = conn.read_to_end(&mut answer);
                (i, sent, String::from_utf8_lossy(&answer).into_owned())
            })
        })
        .collect();
    for (what, req, want) in CASES {
        assert_eq!(status_of(server.addr, req), Some(*want), "{what}");
    }
    // A client-sent id with CR/LF is not an error: it is unknown, and echoed JSON-escaped in the
    // gap notice, so it cannot inject a line into the stream.
    let mut odd = support::SseStream::open(server.addr, "/events?topic=x&lastEventId=1%0d%0aevent:%20evil").unwrap();
    odd.head.assert_status(200, "stream with a CR/LF id");
    let gap = odd.expect_event("gap notice for a CR/LF id");
    assert_eq!(gap.event.as_deref(), Some("ringcast-gap"));
    let notice: serde_json::Value = serde_json::from_str(&gap.data).expect("gap notice is one JSON line");
    assert_eq!(notice["lastEventId"], "1\r\nevent: evil");

    for t in slow {
        let (i, sent, answer) = t.join().expect("slowloris thread");
        assert!(answer.starts_with("HTTP/1.1 408 "), "slow client {i} (sent {sent} bytes) got {answer:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let ids = publisher.join().expect("publisher");
    assert!(ids.len() > 50, "too few events published during the run: {}", ids.len());
    for (i, id) in ids.iter().enumerate() {
        let ev = sub.expect_event(&format!("event {i} of {}", ids.len()));
        assert_eq!(ev.id.as_deref(), Some(id.as_str()), "the subscriber missed or reordered events");
    }
    server.get("/health").assert_status(200, "health after the run");
    assert!(!server.stderr_log().contains("panicked"), "a task panicked: {}", server.stderr_log());
}

/// Whether the server already answered and closed (without blocking).
fn closed_with_answer(conn: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    conn.set_nonblocking(true).unwrap();
    let ready = conn.peek(&mut byte).is_ok();
    conn.set_nonblocking(false).unwrap();
    ready
}
