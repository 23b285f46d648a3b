//! Plain endpoints: `/health`, `OPTIONS *`, `/metrics`; every non-stream answer is length-framed.

mod support;

use std::time::Duration;
use support::{metric, Server};

const METRICS: [&str; 7] = [
    "ringcast_connections",
    "ringcast_subscribers",
    "ringcast_topics",
    "ringcast_events_published_total",
    "ringcast_slow_consumer_disconnects_total",
    "ringcast_connections_shed_total",
    "ringcast_rss_bytes",
];

#[test]
fn health_is_ok_json_with_content_length() {
    let server = Server::start(&[]);
    let resp = server.get("/health");
    resp.assert_status(200, "GET /health");
    resp.assert_content_length("GET /health");
    let health: serde_json::Value = serde_json::from_str(&resp.body_str()).expect("JSON health");
    assert_eq!(health["status"], "ok", "{health}");
    assert!(health["node"].as_str().is_some_and(|n| !n.is_empty()), "{health}");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"), "{health}");
    assert!(health["uptime_s"].as_u64().is_some() && health["cores"].as_u64() >= Some(1), "{health}");
    assert!(health["connections"].as_u64() >= Some(1), "this request's connection: {health}");
    assert_eq!(health["redis"], serde_json::Value::Null, "no --redis: {health}");
    let ct = resp.header("content-type").unwrap_or("");
    assert!(ct.starts_with("application/json"), "health Content-Type {ct:?}");
}

#[test]
fn options_star_is_204_with_allow_and_cors() {
    let server = Server::start(&[]);
    let resp = server.request(b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    resp.assert_status(204, "OPTIONS *");
    let allow = resp.header("allow").unwrap_or_else(|| panic!("OPTIONS * without Allow: {}", resp.describe()));
    for m in ["GET", "POST", "OPTIONS"] {
        assert!(allow.split(',').any(|x| x.trim() == m), "Allow {allow:?} lacks {m}");
    }
    assert_eq!(resp.header("access-control-allow-origin"), Some("*"));
    assert!(
        resp.headers.iter().any(
            |(n, _)| n.starts_with("access-control-allow-methods") || n.starts_with("access-control-allow-headers")
        ),
        "OPTIONS * lacks CORS method/header lists: {}",
        resp.describe()
    );
}

#[test]
fn metrics_expose_every_contract_series() {
    let server = Server::start(&[]);
    let resp = server.get("/metrics");
    resp.assert_status(200, "GET /metrics");
    resp.assert_content_length("GET /metrics");
    let ct = resp.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain"), "metrics Content-Type {ct:?}");
    let m = support::parse_metrics(&resp.body_str());
    for name in METRICS {
        let v = metric(&m, name);
        assert!(v >= 0.0, "{name} = {v}");
    }
    assert!(metric(&m, "ringcast_connections") >= 1.0, "the /metrics connection itself is open");
    let reported = metric(&m, "ringcast_rss_bytes");
    let actual = server.rss_bytes() as f64;
    assert!(
        reported > actual / 2.0 && reported < actual * 2.0,
        "ringcast_rss_bytes {reported} far from /proc VmRSS {actual}"
    );
}

#[test]
fn metrics_follow_streams_and_topics() {
    let server = Server::start(&[]);
    let s1 = server.subscribe(&["m1", "m2"]);
    let s2 = server.subscribe(&["m3"]);
    server.wait_for_metric("ringcast_subscribers", Duration::from_secs(5), |v| v == 2.0);
    let m = server.metrics();
    assert!(metric(&m, "ringcast_connections") >= 3.0, "2 streams + /metrics: {m:?}");
    assert!(metric(&m, "ringcast_topics") >= 3.0, "3 distinct topics subscribed: {m:?}");
    drop(s1);
    drop(s2);
    server.wait_for_metric("ringcast_subscribers", Duration::from_secs(5), |v| v == 0.0);
    server.wait_for_metric("ringcast_connections", Duration::from_secs(5), |v| v == 1.0);
}

#[test]
fn non_stream_answers_carry_content_length() {
    let server = Server::start(&[]);
    let cases: [(&[u8], u16); 6] = [
        (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"POST /publish?topic=cl HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", 200),
        (b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"PATCH /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ];
    for (raw, status) in cases {
        let what = String::from_utf8_lossy(&raw[..raw.len().min(30)]).into_owned();
        let resp = server.request(raw);
        resp.assert_status(status, &what);
        resp.assert_content_length(&what);
        assert!(!resp.is_chunked(), "{what}: chunked");
    }
}
