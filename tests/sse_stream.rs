//! `GET /events`: response head, opening chunk, event framing, ids, topics, disconnects.

mod support;

use std::time::Duration;
use support::{events_path, parse_id, show, Server, SseItem, SseParser, SseStream};

#[test]
fn stream_head_is_exactly_the_contract() {
    let server = Server::start(&[]);
    let s = SseStream::open(server.addr, "/events?topic=news").expect("open stream");
    let h = &s.head;
    assert_eq!(h.version, "HTTP/1.1", "{}", h.describe());
    h.assert_status(200, "GET /events");
    assert_eq!(h.header("content-type"), Some("text/event-stream; charset=utf-8"));
    assert_eq!(h.header("cache-control"), Some("no-cache"));
    assert_eq!(h.header("x-accel-buffering"), Some("no"));
    assert_eq!(h.header("transfer-encoding"), Some("chunked"));
    assert_eq!(h.header("access-control-allow-origin"), Some("*"));
    assert_eq!(h.header("content-length"), None, "a stream must not carry Content-Length: {}", h.describe());
    for name in ["content-type", "cache-control", "x-accel-buffering", "transfer-encoding"] {
        assert_eq!(h.headers_named(name).len(), 1, "duplicate {name}: {h:?}");
    }
}

#[test]
fn opening_chunk_is_retry_then_comment_without_blank_line() {
    let server = Server::start(&[]);
    let mut s = SseStream::open(server.addr, "/events?topic=news").expect("open stream");
    let first = s.next_chunk().expect("read").expect("opening chunk");
    assert!(first.starts_with(b"retry: "), "opening chunk {:?} must begin with retry:", show(&first));
    let text = String::from_utf8(first.clone()).expect("UTF-8");
    assert!(text.lines().any(|l| l.starts_with(':')), "opening chunk {text:?} has no comment line");
    assert!(!text.contains("\n\n"), "opening chunk {text:?} has a blank line (phantom event in httpx-sse)");
    assert_eq!(text, "retry: 2000\n:ok\n", "contract: first chunk");
    assert_eq!(
        SseParser::default().push(&first).unwrap(),
        vec![SseItem::Retry("2000".into()), SseItem::Comment("ok".into())]
    );
}

#[test]
fn event_is_one_chunk_with_id_and_data() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["news"]);
    let id = server.publish("news", "hello");
    let chunk = s.expect_chunk("event chunk");
    assert_eq!(
        String::from_utf8(chunk).unwrap(),
        format!("id: {id}\ndata: hello\n\n"),
        "an unnamed event is exactly id + data + blank line in one chunk"
    );
}

#[test]
fn cr_lf_and_crlf_all_split_data_lines() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["lines"]);
    let id = server.publish("lines", "a\r\nb\rc\nd");
    let chunk = String::from_utf8(s.expect_chunk("event chunk")).unwrap();
    assert_eq!(
        chunk,
        format!("id: {id}\ndata: a\ndata: b\ndata: c\ndata: d\n\n"),
        "publishing a\\r\\nb\\rc\\nd must give 4 data lines"
    );
    let items = SseParser::default().push(chunk.as_bytes()).unwrap();
    match &items[..] {
        [SseItem::Event(ev)] => {
            assert_eq!(ev.data_lines, 4);
            assert_eq!(ev.data, "a\nb\nc\nd");
        }
        other => panic!("expected one event, parsed {other:?}"),
    }
}

#[test]
fn blank_lines_and_field_text_in_data_cannot_forge_events() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["inject"]);
    let id = server.publish("inject", "x\n\nid: 1-1\nevent: evil\ndata: y");
    let ev = s.expect_event("injected data");
    assert_eq!(ev.id.as_deref(), Some(id.as_str()));
    assert_eq!(ev.event, None, "data must not set the event name: {ev:?}");
    assert_eq!(ev.data, "x\n\nid: 1-1\nevent: evil\ndata: y");
    let marker = server.publish("inject", "after");
    let next = s.expect_event("marker");
    assert_eq!(
        (next.id.as_deref(), next.data.as_str()),
        (Some(marker.as_str()), "after"),
        "the published text forged an extra event"
    );
}

#[test]
fn utf8_data_arrives_intact() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["utf8"]);
    let text = "héllo wörld ✓ 日本語 🎉";
    server.publish("utf8", text);
    assert_eq!(s.expect_event("utf8").data, text);
}

#[test]
fn named_event_has_event_line() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["chat"]);
    let resp =
        support::publish_request(server.addr, "/publish?topic=chat&event=message.new", Some("text/plain"), b"hi");
    resp.assert_status(200, "named publish");
    let id = support::publish_id(&resp);
    let chunk = String::from_utf8(s.expect_chunk("named event")).unwrap();
    assert_eq!(chunk, format!("id: {id}\nevent: message.new\ndata: hi\n\n"));
}

#[test]
fn every_event_has_an_id_increasing_in_publish_order() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["seq"]);
    let mut published = Vec::new();
    for i in 0..30 {
        published.push(server.publish("seq", &format!("n{i}")));
    }
    let mut last = (0, 0);
    for (i, want) in published.iter().enumerate() {
        let ev = s.expect_event("sequence");
        let id = ev.id.clone().unwrap_or_else(|| panic!("event {i} has no id: {ev:?}"));
        assert_eq!(&id, want, "event {i} id differs from the publish answer");
        assert_eq!(ev.data, format!("n{i}"), "event {i} out of order");
        let pair = parse_id(&id);
        assert!(pair > last, "id {id} does not increase after {last:?}");
        last = pair;
    }
}

#[test]
fn one_connection_receives_several_topics() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["alpha", "beta"]);
    let a = server.publish("alpha", "from alpha");
    let b = server.publish("beta", "from beta");
    let e1 = s.expect_event("alpha event");
    let e2 = s.expect_event("beta event");
    assert_eq!((e1.id.as_deref(), e1.data.as_str()), (Some(a.as_str()), "from alpha"));
    assert_eq!((e2.id.as_deref(), e2.data.as_str()), (Some(b.as_str()), "from beta"));
}

#[test]
fn one_publish_to_two_subscribed_topics_arrives_once() {
    let server = Server::start(&[]);
    let mut s = server.subscribe(&["alpha", "beta"]);
    let resp = support::publish_request(server.addr, "/publish?topic=alpha&topic=beta", Some("text/plain"), b"both");
    resp.assert_status(200, "publish to two topics");
    let id = support::publish_id(&resp);
    let marker = server.publish("alpha", "marker");
    let first = s.expect_event("double-topic event");
    assert_eq!((first.id.as_deref(), first.data.as_str()), (Some(id.as_str()), "both"));
    let second = s.expect_event("marker");
    assert_eq!(
        (second.id.as_deref(), second.data.as_str()),
        (Some(marker.as_str()), "marker"),
        "the two-topic event was delivered more than once"
    );
}

#[test]
fn subscribers_of_other_topics_get_nothing() {
    let server = Server::start(&[]);
    let mut other = server.subscribe(&["gamma"]);
    let mut target = server.subscribe(&["alpha"]);
    server.publish("alpha", "for alpha");
    server.publish("beta", "for beta");
    server.publish("alph", "prefix topic");
    server.publish("alpha2", "longer topic");
    let g = server.publish("gamma", "for gamma");
    let ev = other.expect_event("gamma stream");
    assert_eq!(
        (ev.id.as_deref(), ev.data.as_str()),
        (Some(g.as_str()), "for gamma"),
        "a gamma subscriber received another topic's event first"
    );
    assert_eq!(target.expect_event("alpha stream").data, "for alpha");
    let a2 = server.publish("alpha", "again");
    let ev = target.expect_event("alpha stream second");
    assert_eq!(
        (ev.id.as_deref(), ev.data.as_str()),
        (Some(a2.as_str()), "again"),
        "an alpha subscriber received events of alph/alpha2/beta/gamma"
    );
}

#[test]
fn topics_with_all_allowed_characters_work() {
    let server = Server::start(&[]);
    let topic = "Az09._-:/x";
    let long = "t".repeat(256);
    let mut s = server.subscribe(&[topic, &long]);
    server.publish(topic, "punct");
    server.publish(&long, "long");
    assert_eq!(s.expect_event("punct topic").data, "punct");
    assert_eq!(s.expect_event("256-byte topic").data, "long");
}

#[test]
fn http10_stream_is_unframed_and_carries_events() {
    let server = Server::start(&[]);
    let mut s = SseStream::open_with(server.addr, "GET /events?topic=old HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("open HTTP/1.0 stream");
    s.head.assert_status(200, "HTTP/1.0 stream");
    assert_eq!(s.head.header("content-type"), Some("text/event-stream; charset=utf-8"));
    assert!(!s.head.is_chunked(), "an HTTP/1.0 client must not get chunked framing: {}", s.head.describe());
    assert_eq!(s.head.header("content-length"), None);
    assert_eq!(s.next_item().unwrap(), Some(SseItem::Retry("2000".into())));
    assert_eq!(s.next_item().unwrap(), Some(SseItem::Comment("ok".into())));
    let id = server.publish("old", "line1\nline2");
    let ev = s.expect_event("HTTP/1.0 event");
    assert_eq!(ev.id.as_deref(), Some(id.as_str()));
    assert_eq!(ev.data, "line1\nline2");
}

#[test]
fn closed_stream_is_removed() {
    let server = Server::start(&[]);
    let s1 = server.subscribe(&["bye"]);
    let s2 = server.subscribe(&["bye", "other"]);
    server.wait_for_metric("ringcast_subscribers", Duration::from_secs(5), |v| v == 2.0);
    drop(s1);
    server.wait_for_metric("ringcast_subscribers", Duration::from_secs(5), |v| v == 1.0);
    drop(s2);
    server.wait_for_metric("ringcast_subscribers", Duration::from_secs(5), |v| v == 0.0);
    // Publishing to the topic of the departed streams still works.
    server.publish("bye", "nobody listens");
}

#[test]
fn stream_closed_without_reading_anything_is_removed() {
    let server = Server::start(&[]);
    {
        let mut conn = server.connect();
        conn.send(format!("GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", events_path(&["quiet"])).as_bytes());
        server.wait_for_metric("ringcast_subscribers", Duration::from_secs(5), |v| v == 1.0);
    }
    server.wait_for_metric("ringcast_subscribers", Duration::from_secs(5), |v| v == 0.0);
}
