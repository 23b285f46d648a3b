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
    let mut server = Server::start(&["--drain-timeout", "1s", "--header-timeout", "60s", "--drain-delay", "300ms"]);
    // An idle keep-alive connection, a half-sent head, and a stream that is never read again.
    let mut idle = server.connect();
    idle.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    idle.read_response().unwrap().assert_status(200, "health");
    let mut half = server.connect();
    half.send(b"GET /health HTTP/1.1\r\nHo");
    let _unread = server.subscribe(&["stall"]);
    server.wait_for_metric("ringcast_connections", Duration::from_secs(5), |v| v >= 4.0);

    server.signal("TERM");
    // While it drains, /health says so with 503 (a load balancer stops sending clients here);
    // --drain-delay keeps the node up long enough to ask.
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

/// Stage one of a staged drain: for --drain-delay `/health` answers 503 while streams stay open
/// and keep getting events; then the streams end.
#[test]
fn drain_delay_turns_health_503_before_streams_close() {
    let mut server = Server::start(&["--drain-delay", "1500ms", "--drain-timeout", "3s"]);
    let mut stream = server.subscribe(&["dd"]);
    server.signal("TERM");
    let mut health = server.connect();
    loop {
        health.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let resp = health.read_response().expect("health after SIGTERM");
        if resp.status == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // /health says draining, yet the stream is still served: an event published now arrives.
    let id = server.publish("dd", "during the delay");
    assert_eq!(stream.expect_event("event during the drain delay").id.as_deref(), Some(id.as_str()));
    let chunk = stream.expect_chunk("drain retry after the delay");
    let ms = retry_value(&chunk, "after the delay");
    assert!((1000..=5000).contains(&ms), "retry {ms}");
    let status = server.wait_exit(Duration::from_secs(5) + EXIT_MARGIN).expect("no exit after the drain");
    assert_eq!(status.code(), Some(0), "{status}");
}

/// The whole staged drain behind nginx with two nodes through Redis: the drained node's
/// clients are closed spread over --drain-spread (not in one storm), each reconnects through
/// nginx with its Last-Event-ID, ends up on the other node, and misses nothing.
#[test]
fn staged_drain_behind_nginx_moves_every_client_to_the_other_node() {
    use std::sync::{Arc, Barrier};
    use std::thread;
    use std::time::Instant;
    const CLIENTS: usize = 16;
    const TOTAL: usize = 400;
    let redis = support::redis::Redis::start();
    let url = redis.url();
    let start = |name: &str, extra: &[&str]| {
        let mut args = vec!["--redis", url.as_str(), "--node-id", name, "--cores", "2"];
        args.extend_from_slice(extra);
        let node = Server::start(&args);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !node.get("/health").body_str().contains("\"status\":\"ok\"") {
            assert!(Instant::now() < deadline, "node {name} never joined Redis");
            thread::sleep(Duration::from_millis(50));
        }
        node
    };
    let mut a = start("a", &["--drain-delay", "500ms", "--drain-spread", "2s", "--drain-timeout", "6s"]);
    let b = start("b", &[]);
    let nginx = support::nginx::Nginx::start([a.addr, b.addr]);

    // Clients through nginx (round robin spreads them over both nodes).
    let ready = Arc::new(Barrier::new(CLIENTS + 1));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (ready, addr) = (ready.clone(), nginx.addr);
            thread::spawn(move || {
                let open = |headers: &str| {
                    let req = format!("GET /events?topic=s HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n");
                    let s = SseStream::open_with(addr, &req).unwrap_or_else(|e| panic!("client {c}: {e}"));
                    s.head.assert_status(200, "stream through nginx");
                    s
                };
                let mut stream = open("");
                let _ = stream.expect_chunk("opening");
                ready.wait();
                let (mut seen, mut ends) = (Vec::<(String, String)>::new(), Vec::<Instant>::new());
                while seen.len() < TOTAL {
                    match stream.next_item() {
                        Ok(Some(support::SseItem::Event(ev))) => seen.push((ev.id.expect("id"), ev.data)),
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => {
                            // What EventSource does at the end of a stream: reconnect with the
                            // last id (sooner than the `retry:` asks, to keep the test short).
                            ends.push(Instant::now());
                            assert!(ends.len() <= 10, "client {c}: more than 10 reconnects");
                            let last = seen.last().map(|e| e.0.clone()).unwrap_or_default();
                            stream = open(&format!("Last-Event-ID: {last}\r\n"));
                        }
                    }
                }
                (seen, ends)
            })
        })
        .collect();
    ready.wait();
    let on_a = support::metric(&a.metrics(), "ringcast_subscribers") as usize;
    assert!(on_a >= 2, "nginx put {on_a} of {CLIENTS} clients on node a");

    let survivor = b.addr;
    let publisher = thread::spawn(move || {
        (0..TOTAL)
            .map(|i| {
                thread::sleep(Duration::from_millis(10));
                (support::publish(survivor, "s", &format!("e{i}")), format!("e{i}"))
            })
            .collect::<Vec<_>>()
    });
    thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    a.signal("TERM");
    let status = a.wait_exit(Duration::from_secs(6) + EXIT_MARGIN).expect("node a did not exit");
    assert_eq!(status.code(), Some(0), "{status}");
    // Node a is gone while events still come: the clients get the rest from node b.
    assert!(!publisher.is_finished(), "the publisher finished before node a exited");
    let published = publisher.join().expect("publisher");

    let mut first_ends = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let (seen, ends) = client.join().expect("client");
        assert_eq!(seen, published, "client {c}: lost, doubled or reordered across the drain");
        if let Some(first) = ends.first() {
            first_ends.push(*first - signalled);
        }
    }
    // Every client of node a was moved (some may have landed on a again while it was in its
    // delay, and moved again), and none before the delay was over.
    assert!(first_ends.len() >= on_a, "{} clients reconnected, {on_a} were on node a", first_ends.len());
    first_ends.sort();
    assert!(first_ends[0] >= Duration::from_millis(500), "a stream closed during the delay: {first_ends:?}");
    // Spread, not one storm: the closes span a good part of the 2 s window.
    let span = first_ends[first_ends.len() - 1] - first_ends[0];
    assert!(span >= Duration::from_millis(700), "closes within {span:?}: {first_ends:?}");
}
