//! Targeted delivery: a publish with `"users": [...]` reaches only the streams whose token `sub`
//! is one of them (and that take one of its topics), live, on resume, and on every node of a
//! cluster (HTTP publishes on another node, `FCALL ringcast_publish ... users`, and history read
//! back from Redis by a node that started later).

mod support;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::time::{SystemTime, UNIX_EPOCH};
use support::redis::Redis;
use support::{post_request, publish_id, Conn, Response, Server, SseStream};

const SECRET: &str = "targeted-secret";
const KEY: &str = "publisher-key";

fn token(sub: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    let claims = json!({"sub": sub, "subscribe": ["*"], "exp": exp});
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A stream for `user` (a token with that `sub`), opening chunk read.
fn stream_as(server: &Server, user: &str, topics: &str, headers: &str) -> SseStream {
    let path = format!("/events?{topics}&token={}", token(user));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
    let mut s = SseStream::open_with(server.addr, &request).expect("stream");
    s.head.assert_status(200, &path);
    let first = s.expect_chunk("opening chunk");
    assert!(first.starts_with(b"retry:"), "opening chunk");
    s
}

fn publish_json(server: &Server, body: serde_json::Value) -> Response {
    let mut req = post_request("/publish", Some("application/json"), body.to_string().as_bytes());
    let at = req.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    req.splice(at..at, format!("Authorization: Bearer {KEY}\r\n").into_bytes());
    let mut conn = Conn::connect(server.addr);
    conn.send(&req);
    conn.read_response().expect("publish answer")
}

fn published(server: &Server, body: serde_json::Value) -> String {
    let resp = publish_json(server, body);
    resp.assert_status(200, "publish");
    publish_id(&resp)
}

fn next_data(stream: &mut SseStream, what: &str) -> String {
    stream.expect_event(what).data
}

#[test]
fn targeted_events_reach_only_their_users() {
    let server = Server::start(&["--jwt-secret", SECRET, "--publish-key", KEY, "--cores", "2"]);
    let mut alice = stream_as(&server, "alice", "topic=t", "");
    let mut alice_other_topic = stream_as(&server, "alice", "topic=o", "");
    let mut alice_again = stream_as(&server, "alice", "topic=t&topic=o", "");
    let mut bob = stream_as(&server, "bob", "topic=t", "");
    let mut carol = stream_as(&server, "carol", "topic=t", "");

    let first = published(&server, json!({"topic": "t", "users": ["alice", "bob"], "data": "for alice and bob"}));
    published(&server, json!({"topic": "t", "users": ["carol"], "data": "for carol"}));
    published(&server, json!({"topic": "t", "data": "for everyone"}));
    published(&server, json!({"topic": "o", "data": "o for everyone"}));

    assert_eq!(next_data(&mut alice, "alice"), "for alice and bob");
    assert_eq!(next_data(&mut alice, "alice"), "for everyone");
    // Both of alice's streams on `t` get it; her stream on `o` only gets `o`'s events.
    assert_eq!(next_data(&mut alice_again, "alice again"), "for alice and bob");
    assert_eq!(next_data(&mut alice_again, "alice again"), "for everyone");
    assert_eq!(next_data(&mut alice_again, "alice again"), "o for everyone");
    assert_eq!(next_data(&mut alice_other_topic, "alice on o"), "o for everyone");
    assert_eq!(next_data(&mut bob, "bob"), "for alice and bob");
    assert_eq!(next_data(&mut bob, "bob"), "for everyone");
    assert_eq!(next_data(&mut carol, "carol"), "for carol");
    assert_eq!(next_data(&mut carol, "carol"), "for everyone");

    // Resuming from before the first: each gets what was for them, nothing else.
    let before = {
        let (ms, seq) = support::parse_id(&first);
        if seq > 0 {
            format!("{ms}-{}", seq - 1)
        } else {
            format!("{}-0", ms - 1)
        }
    };
    let resume = format!("Last-Event-ID: {before}\r\n");
    let mut carol_back = stream_as(&server, "carol", "topic=t", &resume);
    assert_eq!(next_data(&mut carol_back, "carol resumed"), "for carol");
    assert_eq!(next_data(&mut carol_back, "carol resumed"), "for everyone");
    let mut bob_back = stream_as(&server, "bob", "topic=t", &resume);
    assert_eq!(next_data(&mut bob_back, "bob resumed"), "for alice and bob");
    assert_eq!(next_data(&mut bob_back, "bob resumed"), "for everyone");
}

#[test]
fn targeted_publishes_are_checked() {
    let server = Server::start(&["--publish-open"]);
    for (body, what) in [
        (json!({"topic": "t", "users": "alice", "data": "x"}), "users not a list"),
        (json!({"topic": "t", "users": ["a b"], "data": "x"}), "space in a name"),
        (json!({"topic": "t", "users": ["a,b"], "data": "x"}), "comma in a name"),
        (json!({"topic": "t", "users": [""], "data": "x"}), "empty name"),
        (json!({"topic": "t", "users": [7], "data": "x"}), "not a string"),
    ] {
        let mut conn = Conn::connect(server.addr);
        conn.send(&post_request("/publish", Some("application/json"), body.to_string().as_bytes()));
        conn.read_response().expect("answer").assert_status(400, what);
    }
    // Without tokens no stream has a user: a targeted event reaches nobody, others flow on.
    let mut anyone = server.subscribe(&["t"]);
    let mut conn = Conn::connect(server.addr);
    conn.send(&post_request("/publish?topic=t&user=alice", Some("text/plain"), b"private"));
    conn.read_response().expect("answer").assert_status(200, "targeted publish, raw body, ?user=");
    support::publish(server.addr, "t", "public");
    assert_eq!(anyone.expect_event("anonymous stream").data, "public");
}

#[test]
fn targeted_events_cross_nodes_through_redis() {
    let redis = Redis::start();
    let start = |name: &str| {
        let node = Server::start(&[
            "--jwt-secret",
            SECRET,
            "--publish-key",
            KEY,
            "--redis",
            &redis.url(),
            "--node-id",
            name,
            "--cores",
            "2",
        ]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !node.get("/health").body_str().contains("\"status\":\"ok\"") {
            assert!(std::time::Instant::now() < deadline, "node {name} never joined Redis");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        node
    };
    let a = start("a");
    let b = start("b");
    // Resumes below start after this event: Redis holds everything since (it vouches).
    let warm_up = published(&a, json!({"topic": "t", "data": "before the streams"}));
    // Node b must have it before the live streams open there, or (a relay that lags, say under
    // a loaded test run) it would reach them live.
    b.wait_for_metric("ringcast_events_published_total", std::time::Duration::from_secs(20), |n| n >= 1.0);
    let mut alice_on_b = stream_as(&b, "alice", "topic=t", "");
    let mut carol_on_b = stream_as(&b, "carol", "topic=t", "");
    let mut alice_on_a = stream_as(&a, "alice", "topic=t", "");

    published(&a, json!({"topic": "t", "users": ["alice"], "data": "http on a, for alice"}));
    let mut conn = redis.connection();
    let _: String = redis::cmd("FCALL")
        .arg("ringcast_publish")
        .arg(0)
        .arg("t")
        .arg("fcall, for carol")
        .arg("")
        .arg("")
        .arg("")
        .arg("")
        .arg("")
        .arg("carol")
        .query(&mut conn)
        .expect("FCALL ringcast_publish with users");
    published(&b, json!({"topic": "t", "data": "for everyone"}));
    let bad: redis::RedisResult<String> = redis::cmd("FCALL")
        .arg("ringcast_publish")
        .arg(0)
        .arg("t")
        .arg("x")
        .arg("")
        .arg("")
        .arg("")
        .arg("")
        .arg("")
        .arg("bad name")
        .query(&mut conn);
    assert!(bad.is_err(), "the function accepted a user name with a space");

    assert_eq!(next_data(&mut alice_on_b, "alice on b"), "http on a, for alice");
    assert_eq!(next_data(&mut alice_on_b, "alice on b"), "for everyone");
    assert_eq!(next_data(&mut alice_on_a, "alice on a"), "http on a, for alice");
    assert_eq!(next_data(&mut alice_on_a, "alice on a"), "for everyone");
    assert_eq!(next_data(&mut carol_on_b, "carol on b"), "fcall, for carol");
    assert_eq!(next_data(&mut carol_on_b, "carol on b"), "for everyone");

    // A node that started after the events reads them back from Redis, still filtered.
    let c = start("c");
    let resume = format!("Last-Event-ID: {warm_up}\r\n");
    let mut carol_on_c = stream_as(&c, "carol", "topic=t", &resume);
    assert_eq!(next_data(&mut carol_on_c, "carol resumed on c"), "fcall, for carol");
    assert_eq!(next_data(&mut carol_on_c, "carol resumed on c"), "for everyone");
    let mut alice_on_c = stream_as(&c, "alice", "topic=t", &resume);
    assert_eq!(next_data(&mut alice_on_c, "alice resumed on c"), "http on a, for alice");
    assert_eq!(next_data(&mut alice_on_c, "alice resumed on c"), "for everyone");
}
