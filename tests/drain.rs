//! SIGTERM / SIGINT drain: every stream gets `retry:` and a clean end, the process exits 0.

mod support;

use std::time::Duration;
use support::{show, Server, SseStream};

/// Margin over `--drain-timeout` for the process to be reaped (debug builds, busy CI).
const EXIT_MARGIN: Duration = Duration::from_secs(5);

fn retry_value(chunk: &[u8], what: &str) -> u64 {
    let text = std::str::from_utf8(chunk).unwrap();
    let value = text
        .strip_prefix("retry: ")
        .and_then(|r| r.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("{what}: drain chunk {:?} is not `retry: N\\n`", show(chunk)));
    value.parse().unwrap_or_else(|_| panic!("{what}: retry {value:?}"))
}

/// Opens streams, signals, and checks each stream's ending and the exit status.
fn drain_with(signal: &str) {
    let mut server = Server::start(&["--drain-timeout", "3s"]);
    let mut streams: Vec<SseStream> =
        vec![server.subscribe(&["d1"]), server.subscribe(&["d1", "d2"]), server.subscribe(&["d3"])];
    let mut old = SseStream::open_with(server.addr, "GET /events?topic=d1 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("HTTP/1.0 stream");
    old.head.assert_status(200, "HTTP/1.0 stream");
    assert_eq!(old.next_item().unwrap(), Some(support::SseItem::Retry("2000".into())));
    // Streams carry events up to the signal.
    let id = server.publish("d1", "before drain");
    for s in streams.iter_mut().take(2) {
        assert_eq!(s.expect_event("before drain").id.as_deref(), Some(id.as_str()));
    }
    assert_eq!(old.expect_event("HTTP/1.0 before drain").id.as_deref(), Some(id.as_str()));

    server.signal(signal);
    for (i, s) in streams.iter_mut().enumerate() {
        let what = format!("SIG{signal} stream {i}");
        let chunk = s.expect_chunk(&what);
        let ms = retry_value(&chunk, &what);
        assert!((1000..=5000).contains(&ms), "{what}: retry {ms} ms");
        let next = s.next_chunk().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(next.as_deref().map(show), None, "{what}: stream went on");
        assert!(!s.unclean_end(), "{what}: closed without the terminal chunk");
        s.conn.assert_closed(&what);
    }
    // The HTTP/1.0 stream: a retry line, then the server closes.
    let mut retries = Vec::new();
    while let Some(item) = old.next_item().expect("HTTP/1.0 drain read") {
        match item {
            support::SseItem::Retry(r) => retries.push(r),
            support::SseItem::Comment(_) => {}
            support::SseItem::Event(e) => panic!("HTTP/1.0 stream got {e:?} during drain"),
        }
    }
    assert_eq!(retries.len(), 1, "HTTP/1.0 drain retry lines: {retries:?}");
    let ms: u64 = retries[0].parse().expect("retry number");
    assert!((1000..=5000).contains(&ms), "HTTP/1.0 drain retry {ms}");

    let status = server
        .wait_exit(Duration::from_secs(3) + EXIT_MARGIN)
        .unwrap_or_else(|| panic!("still running {EXIT_MARGIN:?} after the drain timeout"));
    assert_eq!(status.code(), Some(0), "exit status after SIG{signal}: {status}");
}

#[test]
fn sigterm_drains_streams_and_exits_zero() {
    drain_with("TERM");
}

#[test]
fn sigint_drains_streams_and_exits_zero() {
    drain_with("INT");
}

#[test]
fn sigterm_without_clients_exits_zero() {
    let mut server = Server::start(&["--drain-timeout", "2s"]);
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(2) + EXIT_MARGIN).expect("no exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn idle_and_stalled_clients_do_not_hold_the_drain() {
    let mut server = Server::start(&["--drain-timeout", "1s", "--header-timeout", "60s"]);
    // An idle keep-alive connection, a half-sent head, and a stream that is never read again.
    let mut idle = server.connect();
    idle.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    idle.read_response().unwrap().assert_status(200, "health");
    let mut half = server.connect();
    half.send(b"GET /health HTTP/1.1\r\nHo");
    let _unread = server.subscribe(&["stall"]);
    server.wait_for_metric("ringcast_connections", Duration::from_secs(5), |v| v >= 4.0);

    server.signal("TERM");
    // While it drains, /health says so with 503 (a load balancer stops sending clients here).
    let drained = loop {
        idle.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let resp = idle.read_response().expect("health during the drain");
        if resp.status == 503 {
            break resp;
        }
        resp.assert_status(200, "health before the drain began");
        std::thread::sleep(Duration::from_millis(10));
    };
    let body: serde_json::Value = serde_json::from_str(&drained.body_str()).expect("JSON health");
    assert_eq!(body["status"], "draining", "{body}");
    let status = server
        .wait_exit(Duration::from_secs(1) + EXIT_MARGIN)
        .unwrap_or_else(|| panic!("idle clients held the drain past its timeout"));
    assert_eq!(status.code(), Some(0), "{status}");
    idle.assert_closed("idle keep-alive connection after drain");
    // The half-sent head gets either nothing or an error answer, but the connection ends.
    let rest = half.read_to_end();
    if let Ok(bytes) = rest {
        assert!(bytes.is_empty() || bytes.starts_with(b"HTTP/1.1 "), "half head got {:?}", show(&bytes));
    }
}
