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

/// Publishes `e<i>` to `topic` for each `i`; returns (id, data) pairs in order.
fn publish_numbered(addr: std::net::SocketAddr, topic: &str, range: std::ops::Range<usize>) -> Vec<(String, String)> {
    range.map(|i| (support::publish(addr, topic, &format!("e{i}")), format!("e{i}"))).collect()
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
    assert_eq!(version, 4);
    // A topic's stream expires --history-ttl (1 h by default) after its last publish.
    let ttl: i64 = redis::cmd("PTTL").arg("ringcast:s:news").query(&mut conn).expect("PTTL");
    assert!(ttl > 3_500_000 && ttl <= 3_600_000, "ringcast:s:news PTTL {ttl}");
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

/// Opens `/events` on a node with extra header lines; asserts a 200 stream.
fn open_stream(node: &Server, path: &str, headers: &str) -> SseStream {
    open_stream_at(node.addr, path, headers)
}

#[test]
fn resume_on_another_node_while_publishing_goes_on() {
    const TOTAL: usize = 300;
    let redis = Redis::start();
    let a = node(&redis.url(), "a");
    let b = node(&redis.url(), "b");
    let mut first = a.subscribe(&["r"]);
    let addr = a.addr;
    let publisher = thread::spawn(move || {
        (0..TOTAL)
            .map(|i| {
                let id = support::publish(addr, "r", &format!("e{i}"));
                if i % 10 == 0 {
                    thread::sleep(Duration::from_millis(2));
                }
                (id, format!("e{i}"))
            })
            .collect::<Vec<_>>()
    });
    // The client sees part of the feed on node a, loses its connection, and comes back through
    // node b with its Last-Event-ID while events keep coming.
    let mut seen = read_events(&mut first, 40, "on node a");
    drop(first);
    let last = seen.last().unwrap().0.clone();
    let mut second = open_stream(&b, "/events?topic=r", &format!("Last-Event-ID: {last}\r\n"));
    seen.extend(read_events(&mut second, TOTAL - 40, "resumed on node b"));
    let published = publisher.join().expect("publisher");
    assert_eq!(seen, published, "the resumed feed differs: lost, doubled or out of order");
}

#[test]
fn a_node_started_later_serves_history_and_resumes_from_redis() {
    let redis = Redis::start();
    let a = node(&redis.url(), "a");
    let published = publish_numbered(a.addr, "h", 0..20);
    let b = node(&redis.url(), "b");

    let mut last5 = open_stream(&b, "/events?topic=h&history=5", "");
    assert_eq!(read_events(&mut last5, 5, "history=5 on node b"), published[15..].to_vec());

    let mut resumed = open_stream(&b, "/events?topic=h", &format!("Last-Event-ID: {}\r\n", published[9].0));
    assert_eq!(read_events(&mut resumed, 10, "resume on node b"), published[10..].to_vec());
    let live = support::publish(a.addr, "h", "live");
    let ev = resumed.expect_event("live after the replay");
    assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(live.as_str()), "live"));

    // An id from before Redis's data: nobody can vouch for it, so the gap notice comes first.
    let mut old = open_stream(&b, "/events?topic=h", "Last-Event-ID: 1000-0\r\n");
    let ev = old.expect_event("gap notice");
    assert_eq!(ev.event.as_deref(), Some("ringcast-gap"), "{ev:?}");
}

/// Redis, node a on it directly, node b through a relay the test can cut (b alone loses Redis).
fn nodes_b_behind_a_relay() -> (Redis, support::relay::Relay, Server, Server) {
    let redis = Redis::start();
    let relay = support::relay::Relay::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let a = node(&redis.url(), "a");
    let b = node(&format!("redis://{}/", relay.addr), "b");
    (redis, relay, a, b)
}

#[test]
fn node_cut_off_from_redis_catches_up_on_what_others_published() {
    let (_redis, relay, a, b) = nodes_b_behind_a_relay();
    let mut on_b = b.subscribe(&["k"]);
    let mut published: Vec<(String, String)> = Vec::new();
    let mut publish = |i: usize| published.push((support::publish(a.addr, "k", &format!("e{i}")), format!("e{i}")));
    for i in 0..10 {
        publish(i);
    }
    // Only node b loses Redis; node a keeps publishing through it.
    relay.cut();
    wait_health(&b, "degraded");
    for i in 10..30 {
        publish(i);
    }
    relay.resume();
    wait_health(&b, "ok");
    for i in 30..35 {
        publish(i);
    }
    assert_eq!(read_events(&mut on_b, 35, "node b"), published, "node b missed, doubled or reordered events");
}

#[test]
fn events_trimmed_while_a_node_was_cut_off_are_signalled_as_a_gap() {
    let (redis, relay, a, b) = nodes_b_behind_a_relay();
    let mut on_a = a.subscribe(&["k"]);
    let mut on_b = b.subscribe(&["k"]);
    let first = publish_numbered(a.addr, "k", 0..5);
    assert_eq!(read_events(&mut on_b, 5, "node b before the cut"), first);
    relay.cut();
    wait_health(&b, "degraded");
    for i in 5..10 {
        support::publish(a.addr, "k", &format!("e{i}"));
    }
    // Redis trims what node b has not read yet (as a long outage past ringcast:all's cap would).
    let _: usize = redis::cmd("XTRIM").arg("ringcast:all").arg("MAXLEN").arg(0).query(&mut redis.connection()).unwrap();
    relay.resume();
    wait_health(&b, "ok");
    let later = publish_numbered(a.addr, "k", 10..13);

    let gap = on_b.expect_event("node b after the trim");
    assert_eq!(gap.event.as_deref(), Some("ringcast-gap"), "{gap:?}");
    assert_eq!(gap.id, None, "{gap:?}");
    let notice: serde_json::Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(notice["lastEventId"], first[4].0.as_str(), "{notice}");
    assert!(notice["topics"].is_null(), "{notice}");
    assert_eq!(read_events(&mut on_b, 3, "node b after the gap"), later);
    assert_eq!(support::metric(&b.metrics(), "ringcast_relay_gaps_total"), 1.0);
    // Node a never lost its relay: every event, no notice.
    let all = read_events(&mut on_a, 13, "node a");
    assert!(all.iter().map(|(_, d)| d.as_str()).eq((0..13)
        .map(|i| format!("e{i}"))
        .collect::<Vec<_>>()
        .iter()
        .map(String::as_str)));
    assert_eq!(support::metric(&a.metrics(), "ringcast_relay_gaps_total"), 0.0);
}

#[test]
fn redis_restart_degrades_then_nodes_rejoin() {
    let mut redis = Redis::start();
    let port = redis.port;
    let a = node(&redis.url(), "a");
    let b = node(&redis.url(), "b");
    let mut on_b = b.subscribe(&["k"]);
    let before = publish_numbered(a.addr, "k", 0..10);
    assert_eq!(read_events(&mut on_b, 10, "before the restart"), before);

    redis.kill();
    wait_health(&a, "degraded");
    wait_health(&b, "degraded");
    let resp = publish_request(a.addr, "/publish?topic=k", Some("text/plain"), b"alone on a");
    assert!(resp.body_str().contains("\"degraded\":true"), "{}", resp.body_str());

    // Redis comes back empty (no persistence): both nodes reconnect by themselves.
    let _redis = Redis::start_on(port);
    wait_health(&a, "ok");
    wait_health(&b, "ok");
    let after: Vec<(String, String)> = (10..20)
        .map(|i| {
            let resp = publish_request(a.addr, "/publish?topic=k", Some("text/plain"), format!("e{i}").as_bytes());
            resp.assert_status(200, "publish after the restart");
            assert!(!resp.body_str().contains("degraded"), "e{i}: {}", resp.body_str());
            (publish_id(&resp), format!("e{i}"))
        })
        .collect();
    // The degraded publish stayed on node a; node b gets everything published through Redis.
    assert_eq!(read_events(&mut on_b, 10, "after the restart"), after);
    assert!(parse_id(&after[0].0) > parse_id(&before[9].0), "ids went back after the restart");
    assert!(support::metric(&b.metrics(), "ringcast_redis_reconnects_total") >= 1.0);
}

#[test]
fn killed_node_behind_nginx_its_clients_resume_on_the_other() {
    const TOTAL: usize = 200;
    let redis = Redis::start();
    let nodes = [node(&redis.url(), "a"), node(&redis.url(), "b")];
    let nginx = support::nginx::Nginx::start([nodes[0].addr, nodes[1].addr]);

    // A client through nginx; find the node it landed on.
    let mut stream = SseStream::open(nginx.addr, "/events?topic=n").expect("stream through nginx");
    stream.head.assert_status(200, "GET /events through nginx");
    let deadline = Instant::now() + Duration::from_secs(10);
    let victim = loop {
        let counts: Vec<f64> = nodes.iter().map(|n| support::metric(&n.metrics(), "ringcast_subscribers")).collect();
        if let Some(i) = counts.iter().position(|&c| c == 1.0) {
            break i;
        }
        assert!(Instant::now() < deadline, "the stream reached no node: {counts:?}");
        thread::sleep(Duration::from_millis(20));
    };
    let survivor = nodes[1 - victim].addr;
    let publisher = thread::spawn(move || {
        (0..TOTAL)
            .map(|i| {
                thread::sleep(Duration::from_millis(2));
                (support::publish(survivor, "n", &format!("e{i}")), format!("e{i}"))
            })
            .collect::<Vec<_>>()
    });

    let mut seen = read_events(&mut stream, 30, "before the kill");
    nodes[victim].signal("KILL");
    // What an EventSource does: on the stream's end, reconnect with the last id it saw.
    let mut reconnects = 0;
    while seen.len() < TOTAL {
        match stream.next_event() {
            Ok(ev) => seen.push((ev.id.expect("id"), ev.data)),
            Err(_) => {
                reconnects += 1;
                assert!(reconnects <= 5, "more than 5 reconnects");
                let last = seen.last().unwrap().0.clone();
                stream = open_stream_at(nginx.addr, "/events?topic=n", &format!("Last-Event-ID: {last}\r\n"));
            }
        }
    }
    assert!(reconnects >= 1, "the stream never ended although its node was killed");
    assert_eq!(seen, publisher.join().expect("publisher"), "lost, doubled or reordered across the kill");
}

/// Opens `/events` at an address (a node or nginx) with extra header lines; asserts a 200 stream.
fn open_stream_at(addr: std::net::SocketAddr, path: &str, headers: &str) -> SseStream {
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{headers}\r\n");
    let s = SseStream::open_with(addr, &req).unwrap_or_else(|e| panic!("open {path}: {e}"));
    s.head.assert_status(200, path);
    s
}

#[test]
fn without_history_redis_keeps_no_per_topic_streams() {
    let redis = Redis::start();
    let node = Server::start(&["--redis", &redis.url(), "--node-id", "h0", "--cores", "1", "--history-ttl", "0"]);
    wait_health(&node, "ok");
    let mut s = node.subscribe(&["nohist"]);
    let id = support::publish(node.addr, "nohist", "x");
    assert_eq!(s.expect_event("subscriber").id.as_deref(), Some(id.as_str()));
    let mut conn = redis.connection();
    let exists: i64 = redis::cmd("EXISTS").arg("ringcast:s:nohist").query(&mut conn).unwrap();
    assert_eq!(exists, 0, "--history-ttl 0 wrote a per-topic stream");
    // The stream of all events (catch-up after a relay outage) is kept all the same.
    let all: i64 = redis::cmd("XLEN").arg("ringcast:all").query(&mut conn).unwrap();
    assert_eq!(all, 1);
}

#[test]
fn a_publish_redis_ran_but_never_answered_is_delivered_once() {
    let redis = Redis::start();
    let a = node(&redis.url(), "a");
    let mut on_a = a.subscribe(&["dup"]);
    // A publish just before keeps the node's Redis connection fresh (checked with PING only
    // when idle for 200 ms), so the next pipeline is sent without a check.
    let warm = support::publish(a.addr, "dup", "warm");
    // Redis stops for 3 s, longer than the node's 2 s Redis timeout: the publish pipeline times
    // out, yet Redis runs the FCALL waiting in its socket when it wakes.
    let sleeper = {
        let client = redis.client();
        thread::spawn(move || {
            let mut c = client.get_connection().unwrap();
            let _: String = redis::cmd("DEBUG").arg("SLEEP").arg(3).query(&mut c).unwrap();
        })
    };
    thread::sleep(Duration::from_millis(50));
    let resp = publish_request(a.addr, "/publish?topic=dup", Some("text/plain"), b"once");
    resp.assert_status(200, "publish while Redis sleeps");
    sleeper.join().unwrap();
    wait_health(&a, "ok");
    let after = support::publish(a.addr, "dup", "after");
    assert_eq!(on_a.expect_event("warm-up").id, Some(warm));
    let first = on_a.expect_event("the publish made while Redis slept");
    assert_eq!(first.data, "once");
    let second = on_a.expect_event("the next publish");
    assert_eq!((second.data.as_str(), second.id.as_deref()), ("after", Some(after.as_str())), "delivered twice?");
    // Redis took it: it has its cluster id, not a local one.
    assert!(!resp.body_str().contains("degraded"), "answered degraded: {}", resp.body_str());
    assert_eq!(first.id, Some(publish_id(&resp)));
}
