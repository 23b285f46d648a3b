//! `--slow-consumer latest`: a subscriber that stops reading is not cut off; past
//! `--max-queued-bytes` its pending events are conflated to the newest one per topic, and once it
//! reads again it gets the events in id order, each once and intact, including the newest event
//! of each topic; only conflated events are missing.
//! (The default `disconnect` policy is covered by tests/slow_consumer.rs.)

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::{metric, parse_id, post_request, publish_id, show, Server};

/// 3000 x 4 KiB = 12 MiB: far more than the kernel buffers of one unread loopback socket.
const EVENTS: usize = 3000;
const EVENT_BYTES: usize = 4096;
const TOPICS: [&str; 2] = ["p1", "p2"];
/// Failure bound for reading back what the subscriber was sent.
const READ_BOUND: Duration = Duration::from_secs(30);

fn payload(i: usize, topic: &str) -> String {
    let mut p = format!("{topic} {i:05} ");
    p.push_str(&"x".repeat(EVENT_BYTES - p.len()));
    p
}

#[test]
fn unread_subscriber_is_conflated_not_disconnected() {
    unread_subscriber_is_conflated(&[]);
}

/// The same with held writes: the queue fills to the bound between writes.
#[test]
fn unread_subscriber_is_conflated_with_batch_window() {
    unread_subscriber_is_conflated(&["--batch-window", "20ms"]);
}

fn unread_subscriber_is_conflated(extra: &[&str]) {
    let mut args =
        vec!["--slow-consumer", "latest", "--max-queued-bytes", "65536", "--max-body", "65536", "--heartbeat", "60s"];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    let mut sub = server.subscribe(&TOPICS);

    // Publish everything (pipelined, 64 requests per write) while the subscriber reads nothing.
    let mut conn = server.connect();
    let mut published: HashMap<String, (usize, &str)> = HashMap::with_capacity(EVENTS);
    let mut last_id: HashMap<&str, String> = HashMap::new();
    let mut prev: Option<(u64, u64)> = None;
    for i in 0..EVENTS {
        let topic = TOPICS[i % 2];
        if i % 64 == 0 {
            let mut batch = Vec::new();
            for j in i..(i + 64).min(EVENTS) {
                let t = TOPICS[j % 2];
                batch.extend(post_request(
                    &format!("/publish?topic={t}"),
                    Some("text/plain"),
                    payload(j, t).as_bytes(),
                ));
            }
            conn.send(&batch);
        }
        let resp = conn.read_response().unwrap_or_else(|e| panic!("publish {i}: {e}"));
        resp.assert_status(200, &format!("publish {i}"));
        let id = publish_id(&resp);
        let key = parse_id(&id);
        assert!(prev.map_or(true, |p| p < key), "publish {i}: id {id} not after {prev:?}");
        prev = Some(key);
        published.insert(id.clone(), (i, topic));
        last_id.insert(topic, id);
    }

    let m = server.metrics();
    let disconnects = metric(&m, "ringcast_slow_consumer_disconnects_total");
    let conflated = metric(&m, "ringcast_conflated_events_total");
    assert_eq!(disconnects, 0.0, "--slow-consumer latest disconnected the unread subscriber");
    assert!(conflated > 0.0, "no event was conflated after {EVENTS} x {EVENT_BYTES} B to an unread stream");
    assert_eq!(metric(&m, "ringcast_subscribers"), 1.0, "the unread subscriber is gone");

    // Now read: events arrive in increasing id order, each once, intact, and the newest event
    // of each topic is among them.
    let deadline = Instant::now() + READ_BOUND;
    let mut received: Vec<String> = Vec::new();
    let mut seen_last: HashMap<&str, bool> = TOPICS.iter().map(|t| (*t, false)).collect();
    let mut prev: Option<(u64, u64)> = None;
    while seen_last.values().any(|seen| !seen) {
        assert!(
            Instant::now() < deadline,
            "after {READ_BOUND:?} and {} events, still missing the newest event of {:?}",
            received.len(),
            seen_last.iter().filter(|(_, s)| !**s).map(|(t, _)| t).collect::<Vec<_>>()
        );
        let ev = sub.next_event().unwrap_or_else(|e| {
            panic!(
                "subscriber stream broke after {} events (last {:?}): {e}; ended {}, unclean {}; metrics {:?}",
                received.len(),
                received.last(),
                sub.ended(),
                sub.unclean_end(),
                server.metrics()
            )
        });
        let id = ev.id.clone().unwrap_or_else(|| panic!("event without id after {:?}: {ev:?}", received.last()));
        let key = parse_id(&id);
        assert!(
            prev.map_or(true, |p| p < key),
            "event {id} after {:?}: ids not increasing (or duplicated)",
            received.last()
        );
        prev = Some(key);
        let &(i, topic) = published.get(&id).unwrap_or_else(|| panic!("received id {id} that was never published"));
        let want = payload(i, topic);
        assert!(ev.data == want, "event {id} (publish {i}, {topic}): data differs: {:?}", show(ev.data.as_bytes()));
        assert_eq!(ev.event, None, "event {id}");
        if last_id[topic] == id {
            seen_last.insert(topic, true);
        }
        received.push(id);
    }

    // Everything not conflated was delivered (the stream's only losses are counted).
    let conflated = metric(&server.metrics(), "ringcast_conflated_events_total");
    assert_eq!(
        received.len() as f64,
        EVENTS as f64 - conflated,
        "received {} of {EVENTS} events with {conflated} conflated",
        received.len()
    );

    println!("{extra:?}: received {} of {EVENTS}; conflated {conflated}", received.len());
    // The stream is still live.
    let id = server.publish("p2", "after");
    let ev = sub.expect_event("live event after the backlog");
    assert_eq!(ev.id.as_deref(), Some(id.as_str()), "{ev:?}");
    assert_eq!(ev.data, "after");
    let m = server.metrics();
    assert_eq!(metric(&m, "ringcast_slow_consumer_disconnects_total"), 0.0);
    assert_eq!(metric(&m, "ringcast_subscribers"), 1.0);
}
