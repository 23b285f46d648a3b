//! `--max-connections`: streams over the limit get `200` + `retry:` + end, other requests 503.

mod support;

use std::time::{Duration, Instant};
use support::{show, Server, SseStream};

/// Asserts a shed stream: 200 event-stream, one `retry: N` chunk (2000..=5000), terminal chunk, close.
fn assert_shed_stream(server: &Server, what: &str) {
    let mut s = SseStream::open(server.addr, "/events?topic=over").expect("open shed stream");
    s.head.assert_status(200, what);
    assert_eq!(s.head.header("content-type"), Some("text/event-stream; charset=utf-8"), "{what}");
    assert!(s.head.is_chunked(), "{what}: {}", s.head.describe());
    let chunk =
        s.next_chunk().unwrap_or_else(|e| panic!("{what}: {e}")).unwrap_or_else(|| panic!("{what}: no retry chunk"));
    let text = String::from_utf8(chunk.clone()).unwrap();
    let value = text
        .strip_prefix("retry: ")
        .and_then(|r| r.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("{what}: chunk {:?} is not `retry: N\\n`", show(&chunk)));
    let ms: u64 = value.parse().unwrap_or_else(|_| panic!("{what}: retry {value:?}"));
    assert!((2000..=5000).contains(&ms), "{what}: retry {ms} ms");
    let next = s.next_chunk().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(next, None, "{what}: the shed stream went on");
    assert!(!s.unclean_end(), "{what}: closed without the terminal chunk 0\\r\\n\\r\\n");
    s.conn.assert_closed(what);
}

/// Opens a stream, retrying while the server still counts a just-closed connection.
fn subscribe_when_admitted(server: &Server, topics: &[&str]) -> SseStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = SseStream::open(server.addr, &support::events_path(topics)).unwrap();
        s.head.assert_status(200, "stream after a slot freed");
        let first = s.next_chunk().unwrap().expect("opening chunk");
        if first.ends_with(b":ok\n") {
            return s;
        }
        assert!(first.starts_with(b"retry: "), "{:?}", show(&first));
        assert!(Instant::now() < deadline, "no stream admitted 10 s after a slot was freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Publishes, retrying on 503 while the server still counts a just-closed connection.
fn publish_when_admitted(server: &Server, topic: &str, data: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = support::publish_request(
            server.addr,
            &format!("/publish?topic={topic}"),
            Some("text/plain"),
            data.as_bytes(),
        );
        if resp.status == 200 {
            return support::publish_id(&resp);
        }
        resp.assert_status(503, "publish near the limit");
        assert!(Instant::now() < deadline, "publish refused for 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /metrics`, retrying on 503 while the server still counts a just-closed connection.
fn metrics_when_admitted(server: &Server) -> std::collections::HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = server.get("/metrics");
        if resp.status == 200 {
            return support::parse_metrics(&resp.body_str());
        }
        resp.assert_status(503, "metrics near the limit");
        assert!(Instant::now() < deadline, "/metrics refused for 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn streams_over_the_limit_get_retry_and_end() {
    let server = Server::start(&["--max-connections", "3"]);
    let s1 = server.subscribe(&["a"]);
    let s2 = server.subscribe(&["a"]);
    let mut s3 = server.subscribe(&["a", "b"]);
    assert_shed_stream(&server, "4th stream at --max-connections 3");
    assert_shed_stream(&server, "5th stream at --max-connections 3");

    // A non-stream request at the limit: 503 with Retry-After and Content-Length.
    let mut conn = server.connect();
    conn.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let resp = conn.read_response().expect("answer at the limit");
    resp.assert_status(503, "health at the limit");
    resp.assert_content_length("503");
    let retry_after =
        resp.header("retry-after").unwrap_or_else(|| panic!("503 without Retry-After: {}", resp.describe()));
    assert!(
        !retry_after.is_empty() && retry_after.bytes().all(|b| b.is_ascii_digit()),
        "Retry-After {retry_after:?} is not delta-seconds"
    );
    conn.assert_closed("after the 503");

    // Closing one stream admits a new one.
    drop(s1);
    let mut s4 = subscribe_when_admitted(&server, &["a"]);
    // Free a slot for publishing; the streams still open receive the event.
    drop(s2);
    let id = publish_when_admitted(&server, "a", "after shedding");
    for (name, s) in [("s3", &mut s3), ("s4", &mut s4)] {
        let ev = s.expect_event(name);
        assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(id.as_str()), "after shedding"), "{name}");
    }
    let shed = metrics_when_admitted(&server)["ringcast_connections_shed_total"];
    assert!(shed >= 3.0, "ringcast_connections_shed_total = {shed}");
}

#[test]
fn idle_connections_count_toward_the_limit() {
    let server = Server::start(&["--max-connections", "3"]);
    // Three keep-alive connections, each answered once and then left idle.
    let mut idle = Vec::new();
    for i in 0..3 {
        let mut conn = server.connect();
        conn.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        conn.read_response().unwrap_or_else(|e| panic!("idle {i}: {e}")).assert_status(200, "health below the limit");
        idle.push(conn);
    }
    assert_shed_stream(&server, "stream with 3 idle keep-alive connections open");
    drop(idle);
    let mut s = subscribe_when_admitted(&server, &["z"]);
    let id = publish_when_admitted(&server, "z", "admitted");
    assert_eq!(s.expect_event("admitted").id.as_deref(), Some(id.as_str()));
}
