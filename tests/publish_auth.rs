//! Who may publish: `--publish-key` (Bearer token, 401 without it), and without a key only the
//! `--publish-from` addresses (loopback by default; 403 for others) unless `--publish-open`.
//! Refused before the body is read, counted in `/metrics`, and subscribers are not affected.

mod support;

use support::{connect_from, metric, post_request, publish_id, Conn, Response, Server};

fn publish_as(conn: &mut Conn, auth: Option<&str>, data: &str) -> Response {
    let mut req = post_request("/publish?topic=t", Some("text/plain"), data.as_bytes());
    if let Some(auth) = auth {
        let at = req.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        req.splice(at..at, format!("Authorization: {auth}\r\n").into_bytes());
    }
    conn.send(&req);
    conn.read_response().expect("an answer")
}

#[test]
fn publish_key_is_required_when_set() {
    let server = Server::start(&["--publish-key", "s3cret"]);
    let mut sub = server.subscribe(&["t"]);
    for (auth, what) in
        [(None, "no Authorization"), (Some("Bearer wrong"), "wrong key"), (Some("Basic s3cret"), "not Bearer")]
    {
        let resp = publish_as(&mut server.connect(), auth, "refused");
        resp.assert_status(401, what);
        assert!(
            resp.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")),
            "{what}: {}",
            resp.describe()
        );
    }
    let resp = publish_as(&mut server.connect(), Some("Bearer s3cret"), "accepted");
    resp.assert_status(200, "right key");
    let ev = sub.expect_event("the accepted publish");
    assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(publish_id(&resp).as_str()), "accepted"));
    // The key opens publishing from any address.
    let resp = publish_as(&mut connect_from([127, 0, 0, 2], server.addr), Some("Bearer s3cret"), "from .2");
    resp.assert_status(200, "key from another address");
    let m = server.metrics();
    assert_eq!(metric(&m, "ringcast_publish_refused_total{reason=\"unauthorized\"}"), 3.0);
}

#[test]
fn without_a_key_only_allowed_addresses_publish() {
    let server = Server::start(&["--publish-from", "127.0.0.1/32,::1"]);
    let mut sub = server.subscribe(&["t"]);
    // Refused before the body: a 1 MB upload announced but never sent is answered at once.
    let mut other = connect_from([127, 0, 0, 2], server.addr);
    other.send(b"POST /publish?topic=t HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n");
    let resp = other.read_response().expect("answer before the body");
    resp.assert_status(403, "publish from 127.0.0.2");
    resp.assert_connection_close("403");
    // Subscribing from there is fine, and so is publishing from an allowed address.
    let mut far_sub = support::SseStream::read_from({
        let mut c = connect_from([127, 0, 0, 2], server.addr);
        c.send(b"GET /events?topic=t HTTP/1.1\r\nHost: x\r\n\r\n");
        c
    })
    .expect("stream from 127.0.0.2");
    far_sub.head.assert_status(200, "stream from 127.0.0.2");
    let _ = far_sub.next_chunk();
    let id = server.publish("t", "from loopback");
    assert_eq!(sub.expect_event("local publish").id.as_deref(), Some(id.as_str()));
    assert_eq!(far_sub.expect_event("remote subscriber").id.as_deref(), Some(id.as_str()));
    assert_eq!(metric(&server.metrics(), "ringcast_publish_refused_total{reason=\"forbidden\"}"), 1.0);

    let open = Server::start(&["--publish-from", "127.0.0.1/32", "--publish-open"]);
    publish_as(&mut connect_from([127, 0, 0, 2], open.addr), None, "open").assert_status(200, "--publish-open");
}

#[test]
fn bad_publish_from_stops_start_up() {
    let out = support::command()
        .args(["--listen", "127.0.0.1:0", "--publish-from", "10.0.0.0/40"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ringcast");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("prefix"), "no reason given");
}
