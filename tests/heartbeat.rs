//! Heartbeats: bare `:` comment chunks with no blank line, interleaved with events.

mod support;

use support::{post_request, show, Server, SseItem, SseStream};

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

/// monoio fires timers only when a core's runtime parks, and a core working through a backlog
/// does not park: it must step aside for them now and then (`TIMER_BREAK`), or its quiet
/// streams get no heartbeat (and, behind a proxy, lose their connection) while the backlog lasts.
#[test]
fn heartbeats_keep_coming_while_the_core_works_through_a_backlog() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    // One core with a 4-batch mailbox: four connections pipelining publishes keep it full, so
    // the core always has more to send and never goes idle while the flood lasts.
    let server = Server::start(&["--cores", "1", "--core-queue", "4", "--heartbeat", "300ms"]);
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..100 {
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.write_all(b"GET /events?topic=hot HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while !stop.load(Ordering::Relaxed) && matches!(sock.read(&mut buf), Ok(n) if n > 0) {}
        }));
    }
    server.wait_for_metric("ringcast_subscribers", Duration::from_secs(20), |n| n >= 100.0);
    let mut quiet = server.subscribe(&["quiet"]);
    for _ in 0..4 {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let batch: Vec<u8> = (0..64).flat_map(|_| post_request("/publish?topic=hot", None, b"x")).collect();
            let mut conn = support::Conn::connect(addr);
            while !stop.load(Ordering::Relaxed) {
                conn.send(&batch);
                for _ in 0..64 {
                    conn.read_response().expect("a publish answer").assert_status(200, "flood publish");
                }
            }
        }));
    }
    // The flood is ahead of delivery once publishers wait for room.
    server.wait_for_metric("ringcast_publish_waits_total", Duration::from_secs(20), |n| n > 0.0);
    let waits_before = support::metric(&server.metrics(), "ringcast_publish_waits_total");
    let started = Instant::now();
    let mut beats = 0;
    while beats < 3 {
        match quiet.next_item() {
            Ok(Some(SseItem::Comment(_))) => beats += 1,
            Ok(Some(other)) => panic!("the quiet stream got {other:?}"),
            Ok(None) => panic!("the quiet stream ended"),
            Err(e) => panic!("no heartbeat on the quiet stream after {beats} ({e}): timers held back by the backlog"),
        }
    }
    // ... and it still was while the heartbeats came: they came during the backlog.
    let waits_after = support::metric(&server.metrics(), "ringcast_publish_waits_total");
    stop.store(true, Ordering::Relaxed);
    assert!(waits_after > waits_before, "the flood stopped being ahead of delivery: nothing was tested");
    assert!(started.elapsed() < Duration::from_secs(10), "3 heartbeats of 300 ms took {:?}", started.elapsed());
    drop(quiet);
    drop(server);
    for t in threads {
        let _ = t.join();
    }
}
