//! Stream churn: thousands of connect/disconnect cycles leave no subscribers, connections,
//! topic entries or memory behind.

mod support;

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;
use support::{metric, Server, SseStream};

const THREADS: usize = 4;
/// RSS growth allowed over 10,000 cycles after warm-up (allocator caches, metrics buffers).
const RSS_SLACK: u64 = 8 << 20;

/// Runs `cycles` stream open/close cycles over `THREADS` threads; `topic(i)` names cycle i's topic.
fn churn(addr: SocketAddr, cycles: usize, topic: fn(usize) -> String) {
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                for i in (t..cycles).step_by(THREADS) {
                    let topic = topic(i);
                    let mut s = SseStream::open(addr, &support::events_path(&[&topic]))
                        .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
                    s.head.assert_status(200, &format!("cycle {i}"));
                    // The opening chunk proves the stream was registered before we leave.
                    let first = s
                        .next_chunk()
                        .unwrap_or_else(|e| panic!("cycle {i}: {e}"))
                        .unwrap_or_else(|| panic!("cycle {i}: no opening chunk"));
                    assert!(first.starts_with(b"retry:"), "cycle {i}: {first:?}");
                }
            })
        })
        .collect();
    for (t, h) in handles.into_iter().enumerate() {
        h.join().unwrap_or_else(|_| panic!("churn thread {t} failed"));
    }
}

/// Waits until no stream is left; the metrics request itself is the only open connection.
fn settle(server: &Server) {
    server.wait_for_metric("ringcast_subscribers", Duration::from_secs(20), |v| v == 0.0);
    // Earlier /metrics connections close asynchronously; only the current one may remain.
    server.wait_for_metric("ringcast_connections", Duration::from_secs(20), |v| v <= 1.0);
}

#[test]
fn ten_thousand_stream_cycles_leave_nothing_behind() {
    let server = Server::start(&[]);
    churn(server.addr, 1000, |i| format!("churn-{}", i % 50));
    settle(&server);
    let warm = server.rss_bytes();

    churn(server.addr, 10_000, |i| format!("churn-{}", i % 50));
    settle(&server);
    let after = server.rss_bytes();
    eprintln!("server RSS: {} KiB after warm-up, {} KiB after 10,000 cycles", warm / 1024, after / 1024);
    assert!(
        after <= warm + RSS_SLACK,
        "RSS grew from {} KiB after warm-up to {} KiB after 10,000 cycles",
        warm / 1024,
        after / 1024
    );
    // The server still works.
    let mut s = server.subscribe(&["churn-1"]);
    let id = server.publish("churn-1", "still alive");
    assert_eq!(s.expect_event("after churn").id.as_deref(), Some(id.as_str()));
}

#[test]
fn unique_topics_leave_the_topic_index_empty() {
    let server = Server::start(&[]);
    churn(server.addr, 2000, |i| format!("unique-{i}"));
    settle(&server);
    let topics = server.wait_for_metric("ringcast_topics", Duration::from_secs(20), |v| v == 0.0);
    assert_eq!(topics, 0.0);
    let m = server.metrics();
    assert_eq!(metric(&m, "ringcast_subscribers"), 0.0);
}
