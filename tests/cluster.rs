//! Several nodes through one real redis-server: cluster-wide ids, every event on every node
//! exactly once and in the same order, external publishers through `FCALL ringcast_publish`,
//! and a node that serves on (degraded) while Redis is away, then rejoins.

mod support;

use std::collections::HashSet;
use std::thread;
use std::time::{Duration, Instant};
use support::redis::Redis;
use support::{parse_id, publish_id, publish_request, Server, SseStream};

/// Waits until the node's `/health` reports `status` (the Redis link is up, or not).
fn wait_health(node: &Server, status: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = node.get("/health");
        resp.assert_status(200, "GET /health");
        let health: serde_json::Value = serde_json::from_str(&resp.body_str()).expect("JSON health");
        if health["status"] == status {
            return health;
        }
        assert!(Instant::now() < deadline, "node never reported {status}: {health}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn node(redis_url: &str, name: &str) -> Server {
    let node = Server::start(&["--redis", redis_url, "--node-id", name, "--cores", "2"]);
    let health = wait_health(&node, "ok");
    assert_eq!(health["node"], name, "{health}");
    node
}

/// Reads `n` events; returns (id, data) in arrival order.
fn read_events(stream: &mut SseStream, n: usize, what: &str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let ev = stream.expect_event(&format!("{what}: event {i} of {n}"));
            (ev.id.expect("every event has an id"), ev.data)
        })
        .collect()
}

#[test]
fn three_nodes_deliver_every_event_once_in_one_order() {
    const PER_NODE: usize = 150;
    let redis = Redis::start();
    let nodes: Vec<Server> = ["a", "b", "c"].iter().map(|n| node(&redis.url(), n)).collect();
    let mut both: Vec<SseStream> = nodes.iter().map(|n| n.subscribe(&["x", "y"])).collect();
    let mut only_x: Vec<SseStream> = nodes.iter().map(|n| n.subscribe(&["x"])).collect();

    // Every node publishes at once, alternating the two topics.
    let publishers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let addr = n.addr;
            thread::spawn(move || {
                (0..PER_NODE)
                    .map(|k| {
                        let topic = if k % 2 == 0 { "x" } else { "y" };
                        let data = format!("node{i}-{k}");
                        let resp = publish_request(
                            addr,
                            &format!("/publish?topic={topic}"),
                            Some("text/plain"),
                            data.as_bytes(),
                        );
                        resp.assert_status(200, &data);
                        assert!(!resp.body_str().contains("degraded"), "{data}: {}", resp.body_str());
                        (publish_id(&resp), data, topic)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let published: Vec<(String, String, &str)> =
        publishers.into_iter().flat_map(|p| p.join().expect("publisher thread")).collect();
    let total = published.len();

    let first = read_events(&mut both[0], total, "node a, x+y");
    // Ids increase strictly across topics and nodes.
    assert!(first.windows(2).all(|w| parse_id(&w[0].0) < parse_id(&w[1].0)), "ids out of order");
    // Exactly the published events, each once, with the id its publisher was answered.
    let want: HashSet<(String, String)> = published.iter().map(|(id, d, _)| (id.clone(), d.clone())).collect();
    let got: HashSet<(String, String)> = first.iter().cloned().collect();
    assert_eq!(got.len(), total, "duplicates on node a");
    assert_eq!(got, want, "node a's events differ from the published ones");
    for (i, stream) in both.iter_mut().enumerate().skip(1) {
        assert_eq!(read_events(stream, total, "x+y"), first, "node {i} saw another order");
    }
    let xs: Vec<(String, String)> =
        first.iter().filter(|(id, _)| published.iter().any(|(p, _, t)| p == id && *t == "x")).cloned().collect();
    for (i, stream) in only_x.iter_mut().enumerate() {
        assert_eq!(read_events(stream, xs.len(), "x only"), xs, "node {i}, topic x");
    }
    // Nothing more arrives: no echo of a node's own publishes.
    let marker = support::publish(nodes[1].addr, "x", "marker");
    for stream in both.iter_mut().chain(only_x.iter_mut()) {
        let ev = stream.expect_event("marker");
        assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(marker.as_str()), "marker"));
    }
}

#[test]
fn fcall_from_another_service_reaches_every_node() {
    let redis = Redis::start();
    let a = node(&redis.url(), "a");
    let b = node(&redis.url(), "b");
    let mut on_a = a.subscribe(&["news"]);
    let mut on_b = b.subscribe(&["alerts"]);
    let mut conn = redis.connection();
    let id: String = redis::cmd("FCALL")
        .arg("ringcast_publish")
        .arg(0)
        .arg("news,alerts")
        .arg("from a service\nline 2")
        .arg("svc")
        .query(&mut conn)
        .expect("FCALL ringcast_publish");
    for (stream, what) in [(&mut on_a, "node a"), (&mut on_b, "node b")] {
        let ev = stream.expect_event(what);
        assert_eq!(ev.id.as_deref(), Some(id.as_str()), "{what}");
        assert_eq!(ev.event.as_deref(), Some("svc"), "{what}");
        assert_eq!(ev.data, "from a service\nline 2", "{what}");
    }
    // The id is ordered with HTTP publishes, and a bad call is refused by the function.
    let later = support::publish(a.addr, "news", "after");
    assert!(parse_id(&later) > parse_id(&id));
    let bad: redis::RedisResult<String> =
        redis::cmd("FCALL").arg("ringcast_publish").arg(0).arg("bad topic!").arg("x").query(&mut conn);
    assert!(bad.is_err(), "a bad topic was accepted");
    let version: i64 = redis::cmd("FCALL").arg("ringcast_version").arg(0).query(&mut conn).expect("version");
    assert_eq!(version, 1);
}

#[test]
fn node_serves_degraded_without_redis_then_rejoins() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap().port();
    let url = format!("redis://127.0.0.1:{port}/");
    let node = Server::start(&["--redis", &url, "--node-id", "lonely"]);
    let health = wait_health(&node, "degraded");
    assert_eq!(health["node"], "lonely");
    let mut sub = node.subscribe(&["t"]);

    // Alone: numbered and delivered locally, and the answer says so.
    let resp = publish_request(node.addr, "/publish?topic=t", Some("text/plain"), b"alone");
    resp.assert_status(200, "degraded publish");
    let body: serde_json::Value = serde_json::from_str(&resp.body_str()).unwrap();
    assert_eq!(body["degraded"], true, "{body}");
    let ev = sub.expect_event("degraded event");
    assert_eq!((ev.id.as_deref(), ev.data.as_str()), (body["id"].as_str(), "alone"));

    // Redis appears: the node reconnects by itself and publishes through it again, with ids
    // after the ones it handed out alone.
    let _redis = Redis::start_on(port);
    wait_health(&node, "ok");
    let resp = publish_request(node.addr, "/publish?topic=t", Some("text/plain"), b"together");
    resp.assert_status(200, "publish through Redis");
    assert!(!resp.body_str().contains("degraded"), "{}", resp.body_str());
    let ev = sub.expect_event("event through Redis");
    assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(publish_id(&resp).as_str()), "together"));
    assert!(parse_id(&publish_id(&resp)) > parse_id(body["id"].as_str().unwrap()));
    let m = node.metrics();
    assert_eq!(support::metric(&m, "ringcast_redis_up"), 1.0);
}
