//! `POST /publish`: raw, JSON and form bodies, chunked request bodies, the JSON answer.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};
use support::{chunked_body, parse_id, publish_id, publish_request, Conn, Server};

#[test]
fn raw_publish_answers_json_id_with_content_length() {
    let server = Server::start(&[]);
    let resp = publish_request(server.addr, "/publish?topic=news", Some("text/plain"), b"hello");
    resp.assert_status(200, "raw publish");
    resp.assert_content_length("raw publish");
    let ct = resp.header("content-type").unwrap_or("");
    assert!(ct.starts_with("application/json"), "publish answer Content-Type {ct:?}");
    let id = publish_id(&resp);
    assert_eq!(resp.body_str(), format!("{{\"id\":\"{id}\"}}"));
    let (ms, _) = parse_id(&id);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(ms.abs_diff(now) < 3_600_000, "id {id} is not near the current unix time in ms ({now})");
}

#[test]
fn publish_without_subscribers_succeeds() {
    let server = Server::start(&[]);
    let a = server.publish("nobody", "x");
    let b = server.publish("nobody", "y");
    assert!(parse_id(&b) > parse_id(&a));
}

#[test]
fn raw_body_with_any_other_content_type_or_none() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["raw"]);
    for (ct, body) in [(Some("application/octet-stream"), "octets"), (None, "no type"), (Some("text/csv"), "a,b,c")] {
        let resp = publish_request(server.addr, "/publish?topic=raw", ct, body.as_bytes());
        resp.assert_status(200, &format!("raw publish with {ct:?}"));
        let id = publish_id(&resp);
        let ev = s.expect_event("raw event");
        assert_eq!(ev.id.as_deref(), Some(id.as_str()));
        assert_eq!(ev.data, body, "content type {ct:?}");
    }
}

#[test]
fn raw_body_with_event_and_two_topics() {
    let server = Server::start(&[]);
    let mut a = server.subscribe(&["ra"]);
    let mut b = server.subscribe(&["rb"]);
    let resp = publish_request(server.addr, "/publish?topic=ra&topic=rb&event=update", Some("text/plain"), b"payload");
    resp.assert_status(200, "raw publish to two topics");
    let id = publish_id(&resp);
    for (name, s) in [("ra", &mut a), ("rb", &mut b)] {
        let ev = s.expect_event(name);
        assert_eq!(ev.id.as_deref(), Some(id.as_str()), "{name}");
        assert_eq!(ev.event.as_deref(), Some("update"), "{name}");
        assert_eq!(ev.data, "payload", "{name}");
    }
}

#[test]
fn json_topic_with_string_data_and_event() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["j1"]);
    let resp = publish_request(
        server.addr,
        "/publish",
        Some("application/json"),
        br#"{"topic":"j1","event":"greet","data":"line one\nline \"two\" \u00e9"}"#,
    );
    resp.assert_status(200, "JSON publish");
    let id = publish_id(&resp);
    let ev = s.expect_event("JSON event");
    assert_eq!(ev.id.as_deref(), Some(id.as_str()));
    assert_eq!(ev.event.as_deref(), Some("greet"));
    assert_eq!(ev.data, "line one\nline \"two\" é");
    assert_eq!(ev.data_lines, 2);
}

#[test]
fn json_topics_array_reaches_every_topic_once() {
    let server = Server::start(&[]);
    let mut a = server.subscribe(&["ja"]);
    let mut b = server.subscribe(&["jb"]);
    let mut both = server.subscribe(&["ja", "jb"]);
    let resp =
        publish_request(server.addr, "/publish", Some("application/json"), br#"{"topics":["ja","jb"],"data":"fan"}"#);
    resp.assert_status(200, "JSON topics publish");
    let id = publish_id(&resp);
    let marker = server.publish("jb", "marker");
    for (name, s) in [("ja", &mut a), ("jb", &mut b), ("ja+jb", &mut both)] {
        let ev = s.expect_event(name);
        assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(id.as_str()), "fan"), "{name}");
    }
    let ev = b.expect_event("jb marker");
    assert_eq!(ev.id.as_deref(), Some(marker.as_str()));
    let ev = both.expect_event("ja+jb marker");
    assert_eq!(ev.id.as_deref(), Some(marker.as_str()), "a stream on both topics got the two-topic event twice");
}

#[test]
fn json_non_string_data_is_published_as_compact_json() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["obj"]);
    let cases: [(&[u8], &str); 4] = [
        (
            br#"{ "topic" : "obj", "data" : { "a" : 1, "b" : [ true, null, "x y" ] } }"#,
            r#"{"a":1,"b":[true,null,"x y"]}"#,
        ),
        (br#"{"topic":"obj","data":42}"#, "42"),
        (br#"{"topic":"obj","data":[1, 2,  3]}"#, "[1,2,3]"),
        (br#"{"topic":"obj","data":false}"#, "false"),
    ];
    for (body, want) in cases {
        let resp = publish_request(server.addr, "/publish", Some("application/json"), body);
        resp.assert_status(200, want);
        let id = publish_id(&resp);
        let ev = s.expect_event(want);
        assert_eq!(ev.id.as_deref(), Some(id.as_str()));
        assert_eq!(ev.data, want);
        assert_eq!(ev.data_lines, 1, "compact JSON is one line");
    }
}

#[test]
fn json_content_type_with_charset_parameter() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["cs"]);
    let resp = publish_request(
        server.addr,
        "/publish",
        Some("application/json; charset=utf-8"),
        br#"{"topic":"cs","data":"ok"}"#,
    );
    resp.assert_status(200, "JSON with charset");
    let ev = s.expect_event("JSON with charset");
    assert_eq!(ev.data, "ok", "the JSON body was published raw");
}

#[test]
fn form_urlencoded_fields() {
    let server = Server::start(&[]);
    let mut a = server.subscribe(&["fa"]);
    let mut b = server.subscribe(&["fb"]);
    let resp = publish_request(
        server.addr,
        "/publish",
        Some("application/x-www-form-urlencoded"),
        b"topic=fa&topic=fb&event=ping&data=hello+world%21%0Asecond+line%3D%26",
    );
    resp.assert_status(200, "form publish");
    let id = publish_id(&resp);
    for (name, s) in [("fa", &mut a), ("fb", &mut b)] {
        let ev = s.expect_event(name);
        assert_eq!(ev.id.as_deref(), Some(id.as_str()), "{name}");
        assert_eq!(ev.event.as_deref(), Some("ping"), "{name}");
        assert_eq!(ev.data, "hello world!\nsecond line=&", "{name}");
    }
}

#[test]
fn chunked_request_body_is_decoded() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["chunky"]);
    // "é" is split across two chunks: the body must be decoded only once complete.
    let body = chunked_body(&[b"first part, ", b"h\xc3", b"\xa9llo, ", b"last part"]);
    let mut req = b"POST /publish?topic=chunky HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    req.extend_from_slice(&body);
    let mut conn = Conn::connect(server.addr);
    conn.send(&req);
    let resp = conn.read_response().expect("chunked publish answer");
    resp.assert_status(200, "chunked publish");
    let id = publish_id(&resp);
    let ev = s.expect_event("chunked body event");
    assert_eq!(ev.id.as_deref(), Some(id.as_str()));
    assert_eq!(ev.data, "first part, héllo, last part");
}

#[test]
fn chunked_json_body_sent_in_separate_writes() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["cj"]);
    let mut conn = Conn::connect(server.addr);
    conn.send(
        b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n",
    );
    for part in [&br#"{"topic":"#[..], br#""cj","da"#, br#"ta":"split"}"#] {
        std::thread::sleep(std::time::Duration::from_millis(20));
        conn.send(format!("{:x}\r\n", part.len()).as_bytes());
        conn.send(part);
        conn.send(b"\r\n");
    }
    conn.send(b"0\r\n\r\n");
    let resp = conn.read_response().expect("chunked JSON answer");
    resp.assert_status(200, "chunked JSON publish");
    let ev = s.expect_event("chunked JSON event");
    assert_eq!(ev.id.as_deref(), Some(publish_id(&resp).as_str()));
    assert_eq!(ev.data, "split");
}

#[test]
fn published_total_counts_publishes() {
    let server = Server::start(&[]);
    let before = support::metric(&server.metrics(), "ringcast_events_published_total");
    assert_eq!(before, 0.0);
    for i in 0..3 {
        server.publish("count", &i.to_string());
    }
    server.wait_for_metric("ringcast_events_published_total", std::time::Duration::from_secs(5), |v| v == 3.0);
}

#[test]
fn publish_time_histogram_counts_each_answered_publish() {
    let server = Server::start(&[]);
    for i in 0..3 {
        server.publish("timed", &i.to_string());
    }
    // Two pipelined on one connection: each is timed on its own.
    let mut conn = server.connect();
    let mut both = support::post_request("/publish?topic=timed", Some("text/plain"), b"x");
    both.extend(support::post_request("/publish?topic=timed", Some("text/plain"), b"y"));
    conn.send(&both);
    for _ in 0..2 {
        conn.read_response().expect("pipelined answer").assert_status(200, "pipelined publish");
    }
    let m = server.metrics();
    assert_eq!(support::metric(&m, "ringcast_publish_seconds_count"), 5.0, "{m:?}");
    assert_eq!(support::metric(&m, "ringcast_publish_seconds_bucket{le=\"+Inf\"}"), 5.0);
    let sum = support::metric(&m, "ringcast_publish_seconds_sum");
    assert!(sum > 0.0 && sum < 5.0 * 10.0, "sum {sum}");
    // Cumulative buckets never decrease.
    let bounds = ["0.00001", "0.000025", "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01"];
    let counts: Vec<f64> =
        bounds.iter().map(|b| support::metric(&m, &format!("ringcast_publish_seconds_bucket{{le=\"{b}\"}}"))).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
}
