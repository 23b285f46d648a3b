//! Error statuses (400, 404, 405, 408, 411, 413, 431): each is answered with Content-Length and
//! `Connection: close`, the connection is closed, and an open stream keeps receiving events.

mod support;

use std::thread;
use std::time::Duration;
use support::{chunked_body, post_request, Conn, Response, Server, SseStream};

/// A server with one open stream on `alive`, to prove errors do not disturb other clients.
struct Fixture {
    server: Server,
    stream: SseStream,
}

impl Fixture {
    fn start(args: &[&str]) -> Fixture {
        let server = Server::start(args);
        let stream = server.subscribe(&["alive"]);
        Fixture { server, stream }
    }

    /// Sends `raw` on a fresh connection and asserts an error answer with `status`, then close.
    fn expect_error(&mut self, raw: &[u8], status: u16, what: &str) -> Response {
        let mut conn = self.server.connect();
        conn.send(raw);
        let resp = read_error(&mut conn, status, what);
        self.still_serves(what);
        resp
    }

    /// The open stream still gets a freshly published event.
    fn still_serves(&mut self, after: &str) {
        let id = self.server.publish("alive", after);
        let ev = self.stream.expect_event(&format!("stream after {after}"));
        assert_eq!(
            (ev.id.as_deref(), ev.data.as_str()),
            (Some(id.as_str()), after),
            "the open stream missed an event published after: {after}"
        );
    }
}

/// Reads one error answer and checks status, framing, `Connection: close` and the close itself.
fn read_error(conn: &mut Conn, status: u16, what: &str) -> Response {
    let resp = conn.read_response().unwrap_or_else(|e| panic!("{what}: no response: {e}"));
    resp.assert_status(status, what);
    resp.assert_content_length(what);
    resp.assert_connection_close(what);
    conn.assert_closed(what);
    resp
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes()
}

fn raw_publish(query: &str, body: &[u8]) -> Vec<u8> {
    post_request(&format!("/publish?{query}"), Some("text/plain"), body)
}

fn json_publish(body: &str) -> Vec<u8> {
    post_request("/publish", Some("application/json"), body.as_bytes())
}

fn form_publish(body: &str) -> Vec<u8> {
    post_request("/publish", Some("application/x-www-form-urlencoded"), body.as_bytes())
}

#[test]
fn malformed_request_line_is_400() {
    let mut f = Fixture::start(&[]);
    f.expect_error(b"GARBAGE\r\n\r\n", 400, "request line GARBAGE");
    f.expect_error(b"\x01\x02 / HTTP/1.1\r\n\r\n", 400, "binary method");
    f.expect_error(b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n", 400, "header without colon");
}

#[test]
fn bad_topic_characters_are_400_with_text_reason() {
    let mut f = Fixture::start(&[]);
    for topic in ["bad!topic", "sp%20ace", "%C3%A9", "a%0Ab", "a*b", "a%2Cb"] {
        let resp = f.expect_error(&get(&format!("/events?topic={topic}")), 400, &format!("stream topic {topic}"));
        let ct = resp.header("content-type").unwrap_or("");
        assert!(ct.starts_with("text/plain"), "400 for topic {topic} has Content-Type {ct:?}");
        assert!(!resp.body.is_empty(), "400 for topic {topic} has no reason");
        f.expect_error(&raw_publish(&format!("topic={topic}"), b"x"), 400, &format!("publish topic {topic}"));
    }
    f.expect_error(&json_publish(r#"{"topic":"no spaces","data":"x"}"#), 400, "JSON topic with a space");
}

#[test]
fn topic_over_256_bytes_is_400() {
    let mut f = Fixture::start(&[]);
    let long = "a".repeat(257);
    f.expect_error(&get(&format!("/events?topic={long}")), 400, "257-byte stream topic");
    f.expect_error(&raw_publish(&format!("topic={long}"), b"x"), 400, "257-byte publish topic");
    // The boundary itself is accepted.
    let ok = "a".repeat(256);
    let mut s = f.server.subscribe(&[&ok]);
    f.server.publish(&ok, "boundary");
    assert_eq!(s.expect_event("256-byte topic").data, "boundary");
}

#[test]
fn too_many_topics_is_400() {
    let mut f = Fixture::start(&["--max-topics", "2"]);
    f.expect_error(&get("/events?topic=t1&topic=t2&topic=t3"), 400, "3 topics with --max-topics 2");
    let mut two = f.server.subscribe(&["t1", "t2"]);
    f.server.publish("t2", "two is fine");
    assert_eq!(two.expect_event("2 topics").data, "two is fine");
}

#[test]
fn missing_topic_is_400() {
    let mut f = Fixture::start(&[]);
    f.expect_error(&get("/events"), 400, "GET /events without topic");
    f.expect_error(&get("/events?topic="), 400, "GET /events with empty topic");
    f.expect_error(&get("/events?other=x"), 400, "GET /events?other=x");
    f.expect_error(&post_request("/publish", Some("text/plain"), b"x"), 400, "raw publish without topic");
    f.expect_error(&json_publish(r#"{"data":"x"}"#), 400, "JSON publish without topic");
    f.expect_error(&form_publish("data=x"), 400, "form publish without topic");
}

#[test]
fn event_name_with_cr_lf_or_nul_is_400() {
    let mut f = Fixture::start(&[]);
    for ev in ["a%0Db", "a%0Ab", "a%0D%0Ab", "a%00b"] {
        f.expect_error(&raw_publish(&format!("topic=alive&event={ev}"), b"x"), 400, &format!("raw event name {ev}"));
        f.expect_error(&form_publish(&format!("topic=alive&event={ev}&data=x")), 400, &format!("form event name {ev}"));
    }
    for ev in [r"a\nb", r"a\rb", r"a\u0000b"] {
        f.expect_error(
            &json_publish(&format!(r#"{{"topic":"alive","event":"{ev}","data":"x"}}"#)),
            400,
            &format!("JSON event name {ev}"),
        );
    }
}

#[test]
fn non_utf8_body_is_400() {
    let mut f = Fixture::start(&[]);
    f.expect_error(&raw_publish("topic=alive", b"ok \xff\xfe bad"), 400, "raw non-UTF-8 body");
    f.expect_error(&raw_publish("topic=alive", b"truncated \xe2\x82"), 400, "raw truncated UTF-8 sequence");
    f.expect_error(&form_publish("topic=alive&data=%FF%FE"), 400, "form data decoding to non-UTF-8");
}

#[test]
fn bad_json_is_400() {
    let mut f = Fixture::start(&[]);
    for body in [r#"{"topic":"#, "not json", r#"{"topic":"alive","data":"x""#, r#"{"topic":5,"data":"x"}"#] {
        f.expect_error(&json_publish(body), 400, &format!("JSON body {body}"));
    }
}

#[test]
fn content_length_with_transfer_encoding_is_400() {
    let mut f = Fixture::start(&[]);
    let mut req = b"POST /publish?topic=alive HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Content-Type: text/plain\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    req.extend_from_slice(&chunked_body(&[b"hello"]));
    f.expect_error(&req, 400, "Content-Length and Transfer-Encoding together");
}

#[test]
fn unknown_path_is_404() {
    let mut f = Fixture::start(&[]);
    for path in ["/nope", "/eventsx", "/publish/extra", "/metricsx"] {
        f.expect_error(&get(path), 404, &format!("GET {path}"));
    }
}

#[test]
fn wrong_method_is_405_with_allow() {
    let mut f = Fixture::start(&[]);
    let cases: [(&[u8], &str, &str); 4] = [
        (b"DELETE /publish?topic=alive HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "POST", "DELETE /publish"),
        (b"GET /publish?topic=alive HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "POST", "GET /publish"),
        (b"POST /events?topic=alive HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", "GET", "POST /events"),
        (b"PUT /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", "GET", "PUT /health"),
    ];
    for (raw, allowed, what) in cases {
        let resp = f.expect_error(raw, 405, what);
        let allow = resp.header("allow").unwrap_or_else(|| panic!("{what}: 405 without Allow: {}", resp.describe()));
        assert!(allow.split(',').any(|m| m.trim() == allowed), "{what}: Allow {allow:?} lacks {allowed}");
    }
}

#[test]
fn slow_head_is_408() {
    let mut f = Fixture::start(&["--header-timeout", "1s"]);
    let mut conn = f.server.connect();
    conn.send(b"GET /health HTTP/1.1\r\nHost: 127.0");
    read_error(&mut conn, 408, "half a head then silence");
    f.still_serves("408 half head");
}

#[test]
fn idle_keep_alive_connection_is_closed_quietly() {
    let mut f = Fixture::start(&["--header-timeout", "1s"]);
    let mut conn = f.server.connect();
    conn.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    conn.read_response().expect("first answer").assert_status(200, "GET /health");
    // No byte of a next request: after --header-timeout the server closes without a 408 (one
    // unasked could be read as the answer to a request sent at that moment).
    let rest = conn.read_to_end().expect("read until the server closes");
    assert!(rest.is_empty(), "idle keep-alive got {:?}", String::from_utf8_lossy(&rest));
    f.still_serves("idle keep-alive closed");
}

#[test]
fn trickled_head_is_408() {
    // A client that keeps sending one byte at a time never completes its head in time.
    let mut f = Fixture::start(&["--header-timeout", "1s"]);
    let mut conn = f.server.connect();
    let mut writer = conn.stream.try_clone().unwrap();
    let trickle = thread::spawn(move || {
        use std::io::Write;
        let _ = writer.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ");
        for _ in 0..80 {
            thread::sleep(Duration::from_millis(100));
            if writer.write_all(b"a").is_err() {
                return;
            }
        }
    });
    read_error(&mut conn, 408, "trickled head");
    trickle.join().unwrap();
    f.still_serves("408 trickle");
}

#[test]
fn post_without_length_is_411() {
    let mut f = Fixture::start(&[]);
    f.expect_error(
        b"POST /publish?topic=alive HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n\r\n",
        411,
        "POST without Content-Length or chunked",
    );
}

#[test]
fn body_over_max_body_is_413() {
    let mut f = Fixture::start(&["--max-body", "1000"]);
    f.expect_error(&raw_publish("topic=alive", &[b'x'; 1001]), 413, "1001-byte body with --max-body 1000");
    let mut req = b"POST /publish?topic=alive HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    req.extend_from_slice(&chunked_body(&[&[b'y'; 600], &[b'z'; 600]]));
    f.expect_error(&req, 413, "1200-byte chunked body with --max-body 1000");
    // Exactly the limit is accepted.
    let body = "b".repeat(1000);
    f.server.publish("alive", &body);
    assert_eq!(f.stream.expect_event("1000-byte body").data, body);
}

#[test]
fn head_over_8k_is_431() {
    let mut f = Fixture::start(&[]);
    let big = "v".repeat(9000);
    f.expect_error(
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        431,
        "9000-byte header",
    );
    f.expect_error(
        format!("GET /health?pad={big} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
        431,
        "9000-byte request line",
    );
    let mut req = String::from("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for i in 0..200 {
        req.push_str(&format!("X-H{i}: 0123456789012345678901234567890123456789\r\n"));
    }
    req.push_str("\r\n");
    f.expect_error(req.as_bytes(), 431, "200 headers, ~10 KiB");
    // A head well under the limit is fine.
    let ok = "v".repeat(6000);
    let resp = f.server.request(format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Ok: {ok}\r\n\r\n").as_bytes());
    resp.assert_status(200, "6000-byte header");
}

#[test]
fn max_head_bytes_flag_sets_the_431_limit() {
    let mut f = Fixture::start(&["--max-head-bytes", "1024"]);
    let big = "v".repeat(1500);
    f.expect_error(
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        431,
        "1.5 KiB head with --max-head-bytes 1024",
    );
    let ok = "v".repeat(600);
    let resp = f.server.request(format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Ok: {ok}\r\n\r\n").as_bytes());
    resp.assert_status(200, "650-byte head with --max-head-bytes 1024");
}

/// A POST head to /publish with the given extra header lines, then `body` as is.
fn post_with(headers: &str, body: &[u8]) -> Vec<u8> {
    let mut req =
        format!("POST /publish?topic=alive HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n{headers}\r\n")
            .into_bytes();
    req.extend_from_slice(body);
    req
}

#[test]
fn transfer_codings_other_than_one_final_chunked_are_refused() {
    let mut f = Fixture::start(&[]);
    let body = chunked_body(&[b"hello"]);
    // RFC 9112 §6.1: chunked once, and last.
    f.expect_error(&post_with("Transfer-Encoding: chunked, chunked\r\n", &body), 400, "chunked, chunked");
    f.expect_error(
        &post_with("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", &body),
        400,
        "two Transfer-Encoding: chunked lines",
    );
    f.expect_error(&post_with("Transfer-Encoding: chunked, gzip\r\n", &body), 400, "chunked not last");
    f.expect_error(&post_with("Transfer-Encoding: ,chunked\r\n", &body), 400, "empty coding");
    // A coding this server does not implement, with chunked last: 501.
    f.expect_error(&post_with("Transfer-Encoding: gzip, chunked\r\n", &body), 501, "gzip, chunked");
    f.expect_error(&post_with("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", &body), 501, "gzip line");
    // Still fine: one chunked, any case, with an extension on the chunk line.
    let mut conn = f.server.connect();
    conn.send(&post_with("Transfer-Encoding: Chunked\r\n", b"5 ;name=value\r\nhello\r\n0\r\n\r\n"));
    let resp = conn.read_response().expect("answer");
    resp.assert_status(200, "chunked with a chunk extension");
    assert_eq!(f.stream.expect_event("chunked publish").data, "hello");
}

#[test]
fn chunk_sizes_with_a_sign_or_leading_space_are_400() {
    let mut f = Fixture::start(&[]);
    for (line, what) in [
        (&b" 5\r\nhello\r\n0\r\n\r\n"[..], "leading space"),
        (b"+5\r\nhello\r\n0\r\n\r\n", "plus sign"),
        (b"-5\r\nhello\r\n0\r\n\r\n", "minus sign"),
        (b"0x5\r\nhello\r\n0\r\n\r\n", "0x prefix"),
        (b"5 5\r\nhello\r\n0\r\n\r\n", "two numbers"),
        (b"\r\nhello\r\n0\r\n\r\n", "empty size"),
    ] {
        f.expect_error(&post_with("Transfer-Encoding: chunked\r\n", line), 400, what);
    }
}

#[test]
fn chunk_line_ending_in_bare_lf_is_answered_at_once() {
    let mut f = Fixture::start(&[]);
    // The client sends no more and keeps the connection open: the answer must not wait for
    // the header timeout (10 s); the test's read timeout would fail first.
    let started = std::time::Instant::now();
    f.expect_error(&post_with("Transfer-Encoding: chunked\r\n", b"5\nhello"), 400, "bare LF after a size");
    f.expect_error(&post_with("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\n"), 400, "bare LF, last chunk");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "answered only after {:?}", started.elapsed());
}

#[test]
fn trailers_are_bounded_like_a_head() {
    let mut f = Fixture::start(&[]);
    let mut body = b"5\r\nhello\r\n0\r\n".to_vec();
    for i in 0..5000 {
        body.extend_from_slice(format!("X-T{i}: v\r\n").as_bytes());
    }
    body.extend_from_slice(b"\r\n");
    let mut conn = f.server.connect();
    // The server answers as soon as the bound is passed; the rest of our write may fail.
    let _ = conn.try_send(&post_with("Transfer-Encoding: chunked\r\n", &body));
    read_error(&mut conn, 431, "5,000 trailer lines");
    f.still_serves("after 5,000 trailer lines");
    // A few trailers are fine.
    let mut conn = f.server.connect();
    conn.send(&post_with("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nX-A: 1\r\nX-B: 2\r\n\r\n"));
    conn.read_response().expect("answer").assert_status(200, "two trailer lines");
    assert_eq!(f.stream.expect_event("trailers publish").data, "hello");
}

#[test]
fn invalid_percent_escapes_and_utf8_in_the_query_are_400() {
    let mut f = Fixture::start(&[]);
    f.expect_error(&raw_publish("topic=alive&event=%zz", b"x"), 400, "event=%zz");
    f.expect_error(&raw_publish("topic=alive&event=%4", b"x"), 400, "truncated escape");
    f.expect_error(&raw_publish("topic=alive&event=%ff%fe", b"x"), 400, "escapes that are not UTF-8");
    f.expect_error(&get("/events?topic=alive%"), 400, "a stream request with a bare %");
    // Valid escapes decode.
    let mut conn = f.server.connect();
    conn.send(&raw_publish("topic=alive&event=caf%C3%A9", b"x"));
    conn.read_response().expect("answer").assert_status(200, "escaped UTF-8 event name");
    assert_eq!(f.stream.expect_event("escaped event").event.as_deref(), Some("café"));
}

#[test]
fn trickled_or_stalled_body_is_408_after_body_timeout() {
    let mut f = Fixture::start(&["--body-timeout", "1s", "--header-timeout", "30s"]);
    // One byte every 100 ms: each read is prompt, the whole body is not.
    let mut conn = f.server.connect();
    let mut writer = conn.stream.try_clone().unwrap();
    let trickle = thread::spawn(move || {
        use std::io::Write;
        let _ = writer.write_all(&post_with("Content-Length: 100\r\n", b""));
        for _ in 0..100 {
            thread::sleep(Duration::from_millis(100));
            if writer.write_all(b"a").is_err() {
                return;
            }
        }
    });
    let started = std::time::Instant::now();
    read_error(&mut conn, 408, "trickled body");
    assert!(started.elapsed() < Duration::from_secs(5), "408 only after {:?}", started.elapsed());
    trickle.join().unwrap();
    // A chunked body that stalls half way.
    let mut conn = f.server.connect();
    conn.send(&post_with("Transfer-Encoding: chunked\r\n", b"5\r\nhel"));
    read_error(&mut conn, 408, "stalled chunked body");
    f.still_serves("408 body");
}
