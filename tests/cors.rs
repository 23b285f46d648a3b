//! CORS: `*` by default (any page reads public feeds, no credentials); with `--cors-origin` an
//! allow-list, each allowed Origin echoed with credentials allowed and `Vary: Origin`, others
//! answered without CORS headers; preflights for `/publish` follow the same list.

mod support;

use support::{Response, Server};

fn request(server: &Server, head: &str) -> Response {
    let mut conn = server.connect();
    conn.send(head.as_bytes());
    conn.read_head().expect("response head")
}

fn stream_from(server: &Server, origin: Option<&str>) -> Response {
    let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
    request(server, &format!("GET /events?topic=t HTTP/1.1\r\nHost: x\r\n{origin}\r\n"))
}

#[test]
fn any_origin_by_default_without_credentials() {
    let server = Server::start(&[]);
    for resp in [stream_from(&server, Some("https://any.example")), stream_from(&server, None)] {
        resp.assert_status(200, "stream");
        assert_eq!(resp.header("access-control-allow-origin"), Some("*"), "{}", resp.describe());
        assert_eq!(resp.header("access-control-allow-credentials"), None);
    }
    let health = server.get("/health");
    assert_eq!(health.header("access-control-allow-origin"), Some("*"));
}

#[test]
fn allow_list_echoes_allowed_origins_only() {
    let server = Server::start(&["--cors-origin", "https://app.example,https://b.example/"]);
    let ok = stream_from(&server, Some("https://app.example"));
    ok.assert_status(200, "allowed origin");
    assert_eq!(ok.header("access-control-allow-origin"), Some("https://app.example"), "{}", ok.describe());
    assert_eq!(ok.header("access-control-allow-credentials"), Some("true"));
    assert!(ok.headers_named("vary").iter().any(|v| v.contains("Origin")));
    let b = stream_from(&server, Some("https://b.example"));
    assert_eq!(b.header("access-control-allow-origin"), Some("https://b.example"), "trailing / in the flag");

    for origin in [Some("https://evil.example"), Some("https://app.example.evil"), None] {
        let resp = stream_from(&server, origin);
        resp.assert_status(200, "the stream itself is served (the browser withholds it)");
        assert_eq!(resp.header("access-control-allow-origin"), None, "{origin:?}: {}", resp.describe());
        assert_eq!(resp.header("access-control-allow-credentials"), None);
    }

    // Preflight of a page's POST /publish with a key.
    let pre = |origin: &str| {
        request(
            &server,
            &format!(
                "OPTIONS /publish HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization\r\n\r\n"
            ),
        )
    };
    let allowed = pre("https://app.example");
    allowed.assert_status(204, "preflight");
    assert_eq!(allowed.header("access-control-allow-origin"), Some("https://app.example"));
    assert!(allowed.header("access-control-allow-methods").is_some_and(|m| m.contains("POST")));
    assert!(allowed.header("access-control-allow-headers").is_some_and(|h| h.contains("Authorization")));
    let refused = pre("https://evil.example");
    refused.assert_status(204, "preflight from another origin");
    assert_eq!(refused.header("access-control-allow-origin"), None);
    assert_eq!(refused.header("access-control-allow-methods"), None);

    // A publish answer carries its request's CORS lines.
    let mut conn = server.connect();
    let mut req = support::post_request("/publish?topic=t", Some("text/plain"), b"x");
    let at = req.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    req.splice(at..at, b"Origin: https://b.example\r\n".iter().copied());
    conn.send(&req);
    let resp = conn.read_response().expect("publish answer");
    resp.assert_status(200, "publish");
    assert_eq!(resp.header("access-control-allow-origin"), Some("https://b.example"));
}
