//! HTTP/1.1 pipelining and keep-alive, HTTP/1.0 close, request heads split across writes.

mod support;

use std::thread;
use std::time::Duration;
use support::{parse_id, post_request, publish_id, Conn, Response, Server, SseStream};

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

fn publish_req(topic: &str, data: &str) -> Vec<u8> {
    post_request(&format!("/publish?topic={topic}"), Some("text/plain"), data.as_bytes())
}

fn assert_health(resp: &Response, what: &str) {
    resp.assert_status(200, what);
    resp.assert_content_length(what);
    let health: serde_json::Value = serde_json::from_str(&resp.body_str()).expect("JSON health");
    assert_eq!(health["status"], "ok", "{what}: {health}");
}

#[test]
fn three_publishes_in_one_write_answer_in_order() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["pipe"]);
    let mut batch = Vec::new();
    for i in 0..3 {
        batch.extend_from_slice(&publish_req("pipe", &format!("p{i}")));
    }
    let mut conn = server.connect();
    conn.send(&batch);
    let mut ids = Vec::new();
    for i in 0..3 {
        let resp = conn.read_response().unwrap_or_else(|e| panic!("pipelined publish {i}: {e}"));
        resp.assert_status(200, &format!("pipelined publish {i}"));
        resp.assert_content_length(&format!("pipelined publish {i}"));
        ids.push(publish_id(&resp));
    }
    assert!(parse_id(&ids[0]) < parse_id(&ids[1]) && parse_id(&ids[1]) < parse_id(&ids[2]));
    for (i, id) in ids.iter().enumerate() {
        let ev = s.expect_event("pipelined event");
        assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(id.as_str()), format!("p{i}").as_str()));
    }
    // The connection is still usable afterwards.
    conn.send(HEALTH);
    assert_health(&conn.read_response().unwrap(), "health after the batch");
}

#[test]
fn health_publish_health_in_one_write() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["mix"]);
    let mut batch = HEALTH.to_vec();
    batch.extend_from_slice(&publish_req("mix", "middle"));
    batch.extend_from_slice(HEALTH);
    let mut conn = server.connect();
    conn.send(&batch);
    assert_health(&conn.read_response().unwrap(), "first health");
    let resp = conn.read_response().unwrap();
    resp.assert_status(200, "pipelined publish");
    let id = publish_id(&resp);
    assert_health(&conn.read_response().unwrap(), "second health");
    let ev = s.expect_event("pipelined publish event");
    assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(id.as_str()), "middle"));
}

#[test]
fn fifty_pipelined_publishes_across_read_buffers() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["many"]);
    let mut batch = Vec::new();
    for i in 0..50 {
        batch.extend_from_slice(&publish_req("many", &format!("{i:03}-{}", "x".repeat(300))));
    }
    assert!(batch.len() > 16 * 1024);
    let mut conn = server.connect();
    conn.send(&batch);
    let mut ids = Vec::new();
    for i in 0..50 {
        let resp = conn.read_response().unwrap_or_else(|e| panic!("pipelined publish {i}: {e}"));
        resp.assert_status(200, &format!("pipelined publish {i}"));
        ids.push(publish_id(&resp));
    }
    for (i, id) in ids.iter().enumerate() {
        let ev = s.expect_event("event of the batch");
        assert_eq!(ev.id.as_deref(), Some(id.as_str()), "event {i}");
        assert!(ev.data.starts_with(&format!("{i:03}-")), "event {i} data");
        assert_eq!(ev.data.len(), 304, "event {i} data length");
    }
}

#[test]
fn keep_alive_serves_sequential_requests() {
    let server = Server::start(&[]);
    let mut conn = server.connect();
    for round in 0..5 {
        conn.send(HEALTH);
        let resp = conn.read_response().unwrap();
        assert_health(&resp, &format!("keep-alive round {round}"));
        assert!(
            !resp.headers_named("connection").iter().any(|v| v.eq_ignore_ascii_case("close")),
            "HTTP/1.1 health answer closes the connection: {}",
            resp.describe()
        );
        conn.send(&publish_req("ka", &format!("r{round}")));
        let resp = conn.read_response().unwrap();
        resp.assert_status(200, "keep-alive publish");
        conn.send(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let resp = conn.read_response().unwrap();
        resp.assert_status(200, "keep-alive metrics");
        resp.assert_content_length("metrics");
    }
}

#[test]
fn http10_request_is_answered_then_closed() {
    let server = Server::start(&[]);
    let mut conn = server.connect();
    conn.send(b"GET /health HTTP/1.0\r\n\r\n");
    let resp = conn.read_response().expect("HTTP/1.0 answer");
    assert_health(&resp, "HTTP/1.0 health");
    conn.assert_closed("after an HTTP/1.0 answer");

    let mut conn = server.connect();
    conn.send(b"POST /publish?topic=old HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc");
    let resp = conn.read_response().expect("HTTP/1.0 publish answer");
    resp.assert_status(200, "HTTP/1.0 publish");
    resp.assert_content_length("HTTP/1.0 publish");
    publish_id(&resp);
    conn.assert_closed("after an HTTP/1.0 publish");
}

#[test]
fn connection_close_request_is_answered_then_closed() {
    let server = Server::start(&[]);
    let mut conn = server.connect();
    conn.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    assert_health(&conn.read_response().unwrap(), "Connection: close health");
    conn.assert_closed("after Connection: close");
}

#[test]
fn error_ends_the_pipeline() {
    let server = Server::start(&[]);
    let mut conn = server.connect();
    let mut batch = b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec();
    batch.extend_from_slice(HEALTH);
    conn.send(&batch);
    let resp = conn.read_response().unwrap();
    resp.assert_status(404, "pipelined 404");
    resp.assert_connection_close("pipelined 404");
    conn.assert_closed("the request after an error must not be answered");
}

#[test]
fn request_split_into_single_bytes() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["bytes"]);
    let req = publish_req("bytes", "dribbled");
    let mut conn = server.connect();
    for b in &req {
        conn.send(std::slice::from_ref(b));
        thread::sleep(Duration::from_millis(1));
    }
    let resp = conn.read_response().unwrap();
    resp.assert_status(200, "byte-by-byte publish");
    let ev = s.expect_event("byte-by-byte event");
    assert_eq!(ev.id.as_deref(), Some(publish_id(&resp).as_str()));
    assert_eq!(ev.data, "dribbled");
}

#[test]
fn publish_then_stream_on_one_connection() {
    let server = Server::start(&[]);
    let mut batch = publish_req("later", "before the stream");
    batch.extend_from_slice(b"GET /events?topic=later HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let mut conn = Conn::connect(server.addr);
    conn.send(&batch);
    let resp = conn.read_response().unwrap();
    resp.assert_status(200, "publish before the stream");
    let mut s = SseStream::read_from(conn).expect("pipelined stream head");
    s.head.assert_status(200, "pipelined GET /events");
    assert!(s.head.is_chunked(), "{}", s.head.describe());
    let first = s.expect_chunk("opening chunk of the pipelined stream");
    assert!(first.starts_with(b"retry:"), "{first:?}");
    let id = server.publish("later", "after");
    let ev = s.expect_event("pipelined stream event");
    assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(id.as_str()), "after"));
}

/// Pipelines one publish per body to `topic` on one connection (written from another thread:
/// the answers must be read while the requests still go out) and checks every answer is 200,
/// in order, with increasing ids.
fn pipeline_publishes(server: &Server, topic: &str, bodies: impl Iterator<Item = String>) {
    use std::io::Write;
    let mut batch = Vec::new();
    let mut count = 0;
    for body in bodies {
        batch.extend_from_slice(&publish_req(topic, &body));
        count += 1;
    }
    let stream = std::net::TcpStream::connect(server.addr).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || writer.write_all(&batch));
    let mut conn = Conn::from_stream(stream);
    let mut last = None;
    for i in 0..count {
        let resp = conn.read_response().unwrap_or_else(|e| panic!("pipelined publish {i}: {e}"));
        resp.assert_status(200, &format!("pipelined publish {i}"));
        let id = parse_id(&publish_id(&resp));
        assert!(last < Some(id), "answer {i} out of order");
        last = Some(id);
    }
    sender.join().unwrap().unwrap();
}

#[test]
fn thousands_of_pipelined_publishes_are_published_in_bounded_batches_and_answered_in_order() {
    const N: usize = 3000; // several gather batches (at most 1024 each)
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["flood"]);
    pipeline_publishes(&server, "flood", (0..N).map(|i| format!("f{i}")));
    for i in 0..N {
        assert_eq!(s.expect_event("subscriber").data, format!("f{i}"));
    }
}

#[test]
fn pipelined_large_publishes_are_batched_by_bytes_and_all_delivered() {
    const N: usize = 40; // 40 x 200 KB = 8 MB: at least two gather batches of at most 4 MiB
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["big"]);
    let body = |i: usize| format!("{i:03}{}", "y".repeat(200_000));
    // The subscriber reads as events come (8 MB is more than --max-queued-bytes).
    let reader = thread::spawn(move || (0..N).map(|_| s.expect_event("subscriber").data).collect::<Vec<_>>());
    pipeline_publishes(&server, "big", (0..N).map(body));
    let got = reader.join().expect("subscriber");
    for (i, data) in got.iter().enumerate() {
        assert!(*data == body(i), "event {i} differs");
    }
}
