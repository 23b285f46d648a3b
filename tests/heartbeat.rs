//! Heartbeats: bare `:` comment chunks with no blank line, interleaved with events.

mod support;

use support::{show, Server, SseItem, SseStream};

/// Reads `n` heartbeat chunks, asserting each is exactly `:\n`; returns any events seen between.
fn expect_heartbeats(s: &mut SseStream, n: usize, what: &str) {
    for i in 0..n {
        let chunk = s
            .next_chunk()
            .unwrap_or_else(|e| panic!("{what}: heartbeat {i}: {e}"))
            .unwrap_or_else(|| panic!("{what}: stream ended before heartbeat {i}"));
        assert_eq!(chunk, b":\n", "{what}: chunk {i} is {:?}, expected a bare heartbeat", show(&chunk));
    }
}

#[test]
fn heartbeat_chunks_are_bare_comments() {
    let server = Server::start(&["--heartbeat", "200ms"]);
    let mut s = server.subscribe(&["hb"]);
    expect_heartbeats(&mut s, 4, "idle stream");
    assert_eq!(s.parser().empty_blocks, 0, "a blank line followed a comment (phantom events in httpx-sse)");
}

#[test]
fn heartbeats_interleave_with_events() {
    let server = Server::start(&["--heartbeat", "200ms"]);
    let mut s = server.subscribe(&["hb"]);
    expect_heartbeats(&mut s, 1, "before the event");
    let id = server.publish("hb", "between beats");
    // Heartbeats may precede the event; the event chunk must be intact and whole.
    let chunk = s.expect_chunk("event among heartbeats");
    assert_eq!(String::from_utf8(chunk).unwrap(), format!("id: {id}\ndata: between beats\n\n"));
    expect_heartbeats(&mut s, 2, "after the event");
    assert_eq!(s.parser().empty_blocks, 0);
}

#[test]
fn every_stream_gets_heartbeats() {
    let server = Server::start(&["--heartbeat", "200ms"]);
    let mut streams: Vec<SseStream> = (0..4).map(|i| server.subscribe(&[&format!("hb{i}")])).collect();
    for (i, s) in streams.iter_mut().enumerate() {
        expect_heartbeats(s, 2, &format!("stream {i}"));
    }
}

#[test]
fn heartbeat_from_environment_and_bare_seconds() {
    let server = Server::start_with_env(&[], &[("RINGCAST_HEARTBEAT", "150ms")]);
    let mut s = server.subscribe(&["env"]);
    expect_heartbeats(&mut s, 2, "RINGCAST_HEARTBEAT=150ms");

    let server = Server::start(&["--heartbeat", "1"]);
    let mut s = server.subscribe(&["bare"]);
    expect_heartbeats(&mut s, 1, "--heartbeat 1 (seconds)");
}

#[test]
fn http10_stream_gets_heartbeats() {
    let server = Server::start(&["--heartbeat", "200ms"]);
    let mut s = SseStream::open_with(server.addr, "GET /events?topic=old HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("open HTTP/1.0 stream");
    s.head.assert_status(200, "HTTP/1.0 stream");
    let mut comments = 0;
    while comments < 3 {
        match s.next_item().expect("read").expect("stream ended") {
            SseItem::Comment(c) if c.is_empty() => comments += 1,
            SseItem::Comment(c) => assert_eq!(c, "ok", "unexpected comment"),
            SseItem::Retry(r) => assert_eq!(r, "2000"),
            SseItem::Event(e) => panic!("unexpected event {e:?}"),
        }
    }
    assert_eq!(s.parser().empty_blocks, 0);
}
