//! `/metrics` read by the reference Prometheus parser (Python `prometheus_client`, Debian
//! package python3-prometheus-client): the format is valid, per-core series are labelled by
//! core and add up to the totals, and the publish -> write histogram counts delivered events.

mod support;

use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};
use support::Server;

/// Every sample of the server's `/metrics`, as the reference parser read it.
fn parsed_metrics(server: &Server) -> Vec<Value> {
    let text = server.get("/metrics").body_str();
    // Debian's interpreter, where the package installs the module (a pyenv one may lack it).
    let python = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/parse_metrics.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test.sh installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the Prometheus parser refused /metrics: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn samples<'a>(all: &'a [Value], name: &str) -> Vec<&'a Value> {
    all.iter().filter(|s| s["name"] == name).collect()
}

fn value(all: &[Value], name: &str) -> f64 {
    let found = samples(all, name);
    assert_eq!(found.len(), 1, "{name}: {found:?}");
    found[0]["value"].as_f64().unwrap()
}

#[test]
fn metrics_parse_and_per_core_series_add_up() {
    let server = Server::start(&["--cores", "2"]);
    let mut streams: Vec<_> = (0..6).map(|_| server.subscribe(&["m"])).collect();
    // A gzip stream, and an event big enough to be deflated once for it.
    let gz = support::SseStream::open_with(
        server.addr,
        "GET /events?topic=m HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n",
    )
    .unwrap();
    gz.head.assert_status(200, "gzip stream");
    let _gz = gz.without_parsing();
    for i in 0..20 {
        server.publish("m", &format!("event {i}"));
    }
    server.publish("m", &"compressible ".repeat(500));
    for s in &mut streams {
        for _ in 0..21 {
            s.expect_event("every event");
        }
    }
    // The cores record an event's write once their pass is over: wait until all are in.
    server.wait_for_metric("ringcast_publish_to_write_seconds_count", std::time::Duration::from_secs(5), |v| v >= 21.0);

    let all = parsed_metrics(&server);
    for (per_core, total) in [
        ("ringcast_core_events_delivered_total", "ringcast_frames_queued_total"),
        ("ringcast_core_subscribers", "ringcast_subscribers"),
        ("ringcast_core_stream_sends_total", "ringcast_stream_sends_total"),
    ] {
        let cores = samples(&all, per_core);
        assert_eq!(cores.len(), 2, "{per_core}: one sample per core: {cores:?}");
        let labels: Vec<&str> = cores.iter().map(|s| s["labels"]["core"].as_str().unwrap()).collect();
        assert_eq!(labels, ["0", "1"], "{per_core}");
        let sum: f64 = cores.iter().map(|s| s["value"].as_f64().unwrap()).sum();
        assert_eq!(sum, value(&all, total), "{per_core} adds up to {total}");
    }
    assert_eq!(value(&all, "ringcast_frames_queued_total"), 7.0 * 21.0, "deliveries");
    let bytes: f64 = samples(&all, "ringcast_core_bytes_out_total").iter().map(|s| s["value"].as_f64().unwrap()).sum();
    assert!(bytes > 500.0 * 13.0 * 6.0, "bytes out {bytes}: the big event alone went to 6 plain streams");
    let connections: f64 =
        samples(&all, "ringcast_core_connections").iter().map(|s| s["value"].as_f64().unwrap()).sum();
    assert!(connections >= 7.0, "open connections by core: {connections}");

    // The latency histogram: cumulative buckets, +Inf equal to the count, sum positive.
    let hist = "ringcast_publish_to_write_seconds";
    let buckets = samples(&all, &format!("{hist}_bucket"));
    assert!(buckets.len() >= 10, "{buckets:?}");
    assert_eq!(
        buckets[0]["labels"]["le"].as_str().and_then(|s| s.parse::<f64>().ok()),
        Some(1e-5),
        "first bucket 10 us"
    );
    let counts: Vec<f64> = buckets.iter().map(|b| b["value"].as_f64().unwrap()).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "buckets not cumulative: {counts:?}");
    let count = value(&all, &format!("{hist}_count"));
    assert_eq!(*counts.last().unwrap(), count);
    assert!(count >= 21.0, "{count} events written");
    assert!(value(&all, &format!("{hist}_sum")) > 0.0);

    // The big event was deflated once for the gzip stream: the ratio is well under 1.
    let ratio = value(&all, "ringcast_gzip_ratio");
    assert!(ratio > 0.0 && ratio < 0.5, "gzip ratio {ratio}");
    let reasons: Vec<&str> =
        samples(&all, "ringcast_refused_total").iter().map(|s| s["labels"]["reason"].as_str().unwrap()).collect();
    assert!(reasons.contains(&"connection_limit") && reasons.contains(&"slow_consumer"), "{reasons:?}");
    let families: Vec<&str> = all.iter().map(|s| s["type"].as_str().unwrap()).collect();
    assert!(families.contains(&"histogram") && families.contains(&"counter") && families.contains(&"gauge"));
}
