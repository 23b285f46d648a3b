//! Per client address limits: open streams, new streams per second, publishes per second, and
//! `--trust-proxy` (a trusted proxy's `X-Forwarded-For` names the client). A refused stream gets
//! `200` with a long `retry:` and ends (EventSource retries later); a refused publish gets 429.

mod support;

use support::{connect_from, metric, post_request, Conn, Server, SseStream};

/// Opens a stream from `source` (extra header lines allowed); returns the stream after its
/// first chunk (the opening, or the refusal's `retry:`).
fn open(server: &Server, source: [u8; 4], headers: &str) -> (SseStream, String) {
    let mut conn = connect_from(source, server.addr);
    conn.send(format!("GET /events?topic=t HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes());
    let mut s = SseStream::read_from(conn).expect("stream head");
    s.head.assert_status(200, "stream requests are always answered 200");
    let first = s.next_chunk().expect("first chunk").expect("a first chunk");
    (s, String::from_utf8_lossy(&first).into_owned())
}

/// The refusal: a `retry:` of at least 10 s, then the end of the stream.
fn assert_shed(mut s: SseStream, first: &str, what: &str) {
    let retry: u64 = first.strip_prefix("retry: ").and_then(|r| r.trim().parse().ok()).unwrap_or(0);
    assert!(retry >= 10_000, "{what}: first chunk {first:?}");
    assert!(s.next_chunk().expect("read").is_none(), "{what}: the stream did not end");
}

fn assert_open(first: &str, what: &str) {
    assert!(first.starts_with("retry: 2000"), "{what}: not the normal opening: {first:?}");
}

#[test]
fn streams_per_address_are_capped() {
    let server = Server::start(&["--max-streams-per-ip", "2"]);
    let (a, first) = open(&server, [127, 0, 0, 2], "");
    assert_open(&first, "first");
    let (_b, first) = open(&server, [127, 0, 0, 2], "");
    assert_open(&first, "second");
    let (c, first) = open(&server, [127, 0, 0, 2], "");
    assert_shed(c, &first, "third from one address");
    let (_d, first) = open(&server, [127, 0, 0, 3], "");
    assert_open(&first, "another address");
    drop(a);
    server.wait_for_metric("ringcast_subscribers", std::time::Duration::from_secs(5), |v| v == 2.0);
    let (_e, first) = open(&server, [127, 0, 0, 2], "");
    assert_open(&first, "a closed stream gave its place back");
    assert_eq!(metric(&server.metrics(), "ringcast_client_limit_refused_total{limit=\"streams_per_ip\"}"), 1.0);
    // Counted once, under its own reason: not also as a connection-limit shed.
    let m = server.metrics();
    assert_eq!(metric(&m, "ringcast_refused_total{reason=\"streams_per_ip\"}"), 1.0);
    assert_eq!(metric(&m, "ringcast_refused_total{reason=\"connection_limit\"}"), 0.0);
    assert_eq!(metric(&m, "ringcast_connections_shed_total"), 0.0);
}

#[test]
fn new_streams_per_second_are_rate_limited() {
    let server = Server::start(&["--new-streams-per-ip", "2"]);
    let mut kept = Vec::new();
    for i in 0..2 {
        let (s, first) = open(&server, [127, 0, 0, 2], "");
        assert_open(&first, &format!("stream {i}"));
        kept.push(s);
    }
    let (s, first) = open(&server, [127, 0, 0, 2], "");
    assert_shed(s, &first, "third within a second");
    std::thread::sleep(std::time::Duration::from_millis(700));
    let (_s, first) = open(&server, [127, 0, 0, 2], "");
    assert_open(&first, "after the bucket refilled");
}

fn publish_from(server: &Server, source: [u8; 4]) -> support::Response {
    let mut conn: Conn = connect_from(source, server.addr);
    conn.send(&post_request("/publish?topic=t", Some("text/plain"), b"x"));
    conn.read_response().expect("answer")
}

#[test]
fn publishes_per_second_are_rate_limited_with_429() {
    let server = Server::start(&["--publishes-per-ip", "3"]);
    let mut sub = server.subscribe(&["t"]);
    for i in 0..3 {
        publish_from(&server, [127, 0, 0, 2]).assert_status(200, &format!("publish {i}"));
    }
    let refused = publish_from(&server, [127, 0, 0, 2]);
    refused.assert_status(429, "fourth publish within a second");
    assert_eq!(refused.header("retry-after"), Some("1"));
    publish_from(&server, [127, 0, 0, 3]).assert_status(200, "another address");
    for i in 0..4 {
        assert_eq!(sub.expect_event(&format!("event {i}")).data, "x");
    }
    assert_eq!(metric(&server.metrics(), "ringcast_client_limit_refused_total{limit=\"publishes_per_ip\"}"), 1.0);
}

#[test]
fn a_trusted_proxy_names_the_client() {
    let server = Server::start(&["--max-streams-per-ip", "1", "--trust-proxy", "127.0.0.1"]);
    let (_a, first) = open(&server, [127, 0, 0, 1], "X-Forwarded-For: 10.9.9.9\r\n");
    assert_open(&first, "client 10.9.9.9 via the proxy");
    let (b, first) = open(&server, [127, 0, 0, 1], "X-Forwarded-For: 10.9.9.9\r\n");
    assert_shed(b, &first, "the same client again via the proxy");
    let (_c, first) = open(&server, [127, 0, 0, 1], "X-Forwarded-For: 10.9.9.8, 127.0.0.1\r\n");
    assert_open(&first, "another client via the proxy");
    // An untrusted peer cannot pick its address with the header.
    let (_d, first) = open(&server, [127, 0, 0, 2], "X-Forwarded-For: 10.1.1.1\r\n");
    assert_open(&first, "peer 127.0.0.2");
    let (e, first) = open(&server, [127, 0, 0, 2], "X-Forwarded-For: 10.1.1.2\r\n");
    assert_shed(e, &first, "peer 127.0.0.2 again, whatever it claims");
}

/// Refusals are logged per kind, at most one line every 10 s with the count, never one line per
/// refused request.
#[test]
fn refusals_are_logged_once_per_kind_not_per_request() {
    let server = Server::start(&["--max-streams-per-ip", "1"]);
    let (_kept, first) = open(&server, [127, 0, 0, 4], "");
    assert_open(&first, "the one allowed stream");
    for i in 0..40 {
        let (s, first) = open(&server, [127, 0, 0, 4], "");
        assert_shed(s, &first, &format!("refused stream {i}"));
    }
    let lines = |log: &str| log.lines().filter(|l| l.contains("refused by --max-streams-per-ip")).count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while lines(&server.stderr_log()) == 0 {
        assert!(std::time::Instant::now() < deadline, "no log line for the refusals: {}", server.stderr_log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // More refusals within the 10 s window add no line.
    for _ in 0..10 {
        let (s, first) = open(&server, [127, 0, 0, 4], "");
        assert_shed(s, &first, "refused after the log line");
    }
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let log = server.stderr_log();
    assert_eq!(lines(&log), 1, "{log}");
    let line = log.lines().find(|l| l.contains("refused by --max-streams-per-ip")).unwrap();
    let count: u64 = line.split_whitespace().find_map(|w| w.parse().ok()).expect("a count in the line");
    assert!((1..=40).contains(&count), "{line}");
}
