//! Tokens (JWT): a stream needs one whose `subscribe` patterns cover its topics (401 without a
//! valid one, 403 outside them), from `Authorization: Bearer`, `?token=` or the cookie; a publish
//! needs one whose `publish` patterns cover its topics, or the --publish-key; a stream is closed
//! with `event: ringcast-expired` at its token's `exp`. HS256 secrets and ES256 public keys.

mod support;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{metric, post_request, publish_id, Conn, Response, Server, SseStream};

const SECRET: &str = "test-secret";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(claims: serde_json::Value) -> String {
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn stream_head(server: &Server, path: &str, headers: &str) -> (Response, Conn) {
    let mut conn = server.connect();
    conn.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes());
    (conn.read_head().expect("head"), conn)
}

fn publish(server: &Server, topic: &str, auth: Option<&str>) -> Response {
    let mut req = post_request(&format!("/publish?topic={topic}"), Some("text/plain"), b"payload");
    if let Some(auth) = auth {
        let at = req.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        req.splice(at..at, format!("Authorization: {auth}\r\n").into_bytes());
    }
    let mut conn = server.connect();
    conn.send(&req);
    conn.read_response().expect("answer")
}

#[test]
fn streams_need_a_token_covering_their_topics() {
    let server = Server::start(&["--jwt-secret", SECRET]);
    let good = hs256(json!({"sub": "alice", "subscribe": ["news.*", "user.alice"], "exp": now() + 600}));
    for (path, headers, status, what) in [
        ("/events?topic=news.a".to_string(), String::new(), 401, "no token"),
        (format!("/events?topic=news.a&token={good}"), String::new(), 200, "?token="),
        ("/events?topic=news.a".to_string(), format!("Authorization: Bearer {good}\r\n"), 200, "Bearer"),
        ("/events?topic=user.alice".to_string(), format!("Cookie: a=b; ringcast_token={good}\r\n"), 200, "cookie"),
        (format!("/events?topic=news.a&topic=user.bob&token={good}"), String::new(), 403, "a topic outside"),
        (format!("/events?topic=news.a&token={good}x"), String::new(), 401, "bad signature"),
    ] {
        let (head, _conn) = stream_head(&server, &path, &headers);
        head.assert_status(status, what);
    }
    let expired = hs256(json!({"subscribe": ["*"], "exp": now() - 60}));
    stream_head(&server, &format!("/events?topic=x&token={expired}"), "").0.assert_status(401, "expired");
    let early = hs256(json!({"subscribe": ["*"], "nbf": now() + 600, "exp": now() + 1200}));
    stream_head(&server, &format!("/events?topic=x&token={early}"), "").0.assert_status(401, "not yet valid");
    let other_key = encode(
        &Header::new(Algorithm::HS256),
        &json!({"subscribe": ["*"], "exp": now() + 600}),
        &EncodingKey::from_secret(b"another secret"),
    )
    .unwrap();
    stream_head(&server, &format!("/events?topic=x&token={other_key}"), "").0.assert_status(401, "another key");
}

#[test]
fn publishes_need_a_token_or_the_publish_key() {
    let server = Server::start(&["--jwt-secret", SECRET, "--publish-key", "k3y"]);
    let reader = hs256(json!({"subscribe": ["news.*"], "exp": now() + 600}));
    let mut sub = SseStream::open(server.addr, &format!("/events?topic=news.a&token={reader}")).unwrap();
    sub.head.assert_status(200, "subscriber");
    let writer = hs256(json!({"sub": "svc", "publish": ["news.*"], "exp": now() + 600}));
    publish(&server, "news.a", None).assert_status(401, "no credential");
    publish(&server, "news.a", Some(&format!("Bearer {reader}"))).assert_status(403, "a token without publish rights");
    publish(&server, "other", Some(&format!("Bearer {writer}"))).assert_status(403, "a topic outside publish");
    let ok = publish(&server, "news.a", Some(&format!("Bearer {writer}")));
    ok.assert_status(200, "token with publish rights");
    assert_eq!(sub.expect_event("published with a token").id.as_deref(), Some(publish_id(&ok).as_str()));
    let keyed = publish(&server, "other", Some("Bearer k3y"));
    keyed.assert_status(200, "the publish key");
    let expired = hs256(json!({"publish": ["*"], "exp": now() - 60}));
    publish(&server, "news.a", Some(&format!("Bearer {expired}"))).assert_status(401, "expired token");
    assert!(metric(&server.metrics(), "ringcast_publish_refused_total{reason=\"unauthorized\"}") >= 2.0);
}

#[test]
fn a_stream_ends_at_its_tokens_exp() {
    let server = Server::start(&["--jwt-secret", SECRET]);
    let token = hs256(json!({"subscribe": ["t"], "exp": now() + 2}));
    let mut s = SseStream::open(server.addr, &format!("/events?topic=t&token={token}")).unwrap();
    s.head.assert_status(200, "stream");
    let writer = hs256(json!({"publish": ["t"], "exp": now() + 600}));
    let resp = publish(&server, "t", Some(&format!("Bearer {writer}")));
    resp.assert_status(200, "publish before exp");
    assert_eq!(s.expect_event("live event").id.as_deref(), Some(publish_id(&resp).as_str()));
    let started = Instant::now();
    let ev = s.expect_event("the expiry notice");
    assert_eq!(ev.event.as_deref(), Some("ringcast-expired"), "{ev:?}");
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(s.next_chunk().expect("read").is_none(), "the stream did not end after the notice");
}

#[test]
fn es256_public_key_tokens() {
    let dir = std::env::temp_dir().join(format!("ringcast-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = (dir.join("key.pem"), dir.join("public.pem"));
    let run = |args: &[&str]| {
        let status = Command::new("openssl").args(args).current_dir(&dir).status().expect("openssl (Debian package)");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "key.pem"]);
    run(&["pkey", "-in", "key.pem", "-pubout", "-out", "public.pem"]);
    let server = Server::start(&["--jwt-public-key", public.to_str().unwrap()]);
    let pem = std::fs::read(&key).unwrap();
    let token = encode(
        &Header::new(Algorithm::ES256),
        &json!({"subscribe": ["t"], "exp": now() + 600}),
        &EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap();
    stream_head(&server, &format!("/events?topic=t&token={token}"), "").0.assert_status(200, "ES256 token");
    let hs = hs256(json!({"subscribe": ["t"], "exp": now() + 600}));
    stream_head(&server, &format!("/events?topic=t&token={hs}"), "").0.assert_status(401, "HS256 without a secret");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_dashboard_stats_stream_needs_a_token_covering_stats() {
    let server = Server::start(&["--jwt-secret", SECRET]);
    let reader = hs256(json!({"sub": "alice", "subscribe": ["news.*"], "exp": now() + 600}));
    let operator = hs256(json!({"sub": "ops", "subscribe": ["$stats"], "exp": now() + 600}));
    for (headers, status, what) in [
        (String::new(), 401, "no token"),
        (format!("Cookie: ringcast_token={reader}\r\n"), 403, "a token without $stats"),
        (format!("Cookie: ringcast_token={operator}\r\n"), 200, "a token covering $stats"),
    ] {
        let (head, _conn) = stream_head(&server, "/dashboard/stats", &headers);
        head.assert_status(status, what);
    }
    // The page itself holds no data: it is served without a token.
    server.get("/").assert_status(200, "GET /");
    let mut s = SseStream::open_with(
        server.addr,
        &format!("GET /dashboard/stats?token={operator} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"),
    )
    .unwrap();
    s.head.assert_status(200, "stats with ?token=");
    let ev = s.expect_event("stats");
    assert_eq!(ev.event.as_deref(), Some("stats"), "{ev:?}");
}
