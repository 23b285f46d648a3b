//! History and resume (docs/CONTRACT.md, "History and resume"), against the real binary:
//! `Last-Event-ID` / `?lastEventId=` resume, the replay -> live hand-over under concurrent
//! publishing, the `ringcast-gap` notice, `?history=N` with the `ringcast-history-end` marker,
//! `--history` / `--history-ttl` bounds and the `ringcast_history_events` gauge.
//!
//! How "what was replayed" is read without timing: a stream's opening bytes are queued when the
//! server registers it, so once its response head has arrived, an event published afterwards
//! (a *sentinel*) is live for it and reaches it after the whole replay. Everything the stream
//! receives before the sentinel is therefore exactly the replay (plus notices).
//!
//! Every test keeps a model of what it published (ids as the server answered them) and compares
//! the stream against it, event by event, ids included.

mod support;

use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use support::{metric, parse_id, pct, post_request, publish_id, Conn, Server, SseEvent, SseItem, SseStream};

const GAP: &str = "ringcast-gap";
const HISTORY_END: &str = "ringcast-history-end";

// ---------------------------------------------------------------------------------------------
// Rig: a server, a keep-alive publisher and a model of everything published
// ---------------------------------------------------------------------------------------------

/// How a stream asks to resume.
#[derive(Clone, Copy, Debug)]
enum Resume<'a> {
    /// No resume id.
    Fresh,
    /// `Last-Event-ID: <id>` header.
    Header(&'a str),
    /// `?lastEventId=<id>` query parameter.
    Query(&'a str),
    /// Both at once (the header must win).
    Both { header: &'a str, query: &'a str },
}

impl<'a> Resume<'a> {
    fn both_ways(id: &'a str) -> [Resume<'a>; 2] {
        [Resume::Header(id), Resume::Query(id)]
    }
}

#[derive(Clone, Debug)]
struct Published {
    id: String,
    topics: Vec<String>,
    data: String,
}

/// Publishes over one keep-alive connection.
struct Publisher {
    conn: Conn,
}

impl Publisher {
    fn new(server: &Server) -> Publisher {
        Publisher { conn: server.connect() }
    }

    /// `POST /publish?topic=..&topic=..` with a raw body; asserts 200 and returns the id.
    fn publish(&mut self, topics: &[&str], data: &str) -> String {
        let query: Vec<String> = topics.iter().map(|t| format!("topic={}", pct(t))).collect();
        let path = format!("/publish?{}", query.join("&"));
        self.conn.send(&post_request(&path, Some("text/plain"), data.as_bytes()));
        let resp = self.conn.read_response().unwrap_or_else(|e| panic!("POST {path}: no response: {e}"));
        resp.assert_status(200, &format!("POST {path}"));
        assert!(
            !resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")),
            "publish closed the keep-alive connection: {}",
            resp.describe()
        );
        publish_id(&resp)
    }
}

struct Rig {
    server: Server,
    publisher: Publisher,
    log: Vec<Published>,
    /// `--history`: events retained per topic.
    cap: usize,
    sentinels: usize,
}

impl Rig {
    fn start(args: &[&str]) -> Rig {
        let mut all = vec!["--cores", "2"];
        all.extend_from_slice(args);
        let cap = match args.iter().position(|a| *a == "--history") {
            Some(i) => args[i + 1].parse().expect("--history N"),
            None => 1000,
        };
        let server = Server::start(&all);
        let publisher = Publisher::new(&server);
        Rig { server, publisher, log: Vec::new(), cap, sentinels: 0 }
    }

    fn publish(&mut self, topics: &[&str], data: &str) -> String {
        let id = self.publisher.publish(topics, data);
        self.record(&id, topics, data);
        id
    }

    /// Adds an event published by other means to the model.
    fn record(&mut self, id: &str, topics: &[&str], data: &str) {
        if let Some(prev) = self.log.last() {
            assert!(parse_id(&prev.id) < parse_id(id), "ids must increase: {} then {id}", prev.id);
        }
        self.log.push(Published {
            id: id.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            data: data.to_string(),
        });
    }

    /// Model: the log indices of the events `topic` retains (its last `cap`).
    fn retained_on(&self, topic: &str) -> Vec<usize> {
        let on: Vec<usize> = (0..self.log.len()).filter(|&i| self.log[i].topics.iter().any(|t| t == topic)).collect();
        on[on.len().saturating_sub(self.cap)..].to_vec()
    }

    /// Model: `(id, data)` of every retained event on any of `topics`, once, in id order.
    fn all(&self, topics: &[&str]) -> Vec<(String, String)> {
        let mut idx: Vec<usize> = topics.iter().flat_map(|t| self.retained_on(t)).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| (self.log[i].id.clone(), self.log[i].data.clone())).collect()
    }

    /// Model: retained events on `topics` with an id greater than `after`.
    fn after(&self, topics: &[&str], after: &str) -> Vec<(String, String)> {
        let after = parse_id(after);
        self.all(topics).into_iter().filter(|(id, _)| parse_id(id) > after).collect()
    }

    /// Model: the last `n` retained events across `topics` (`n` capped at `--history`).
    fn last_n(&self, topics: &[&str], n: usize) -> Vec<(String, String)> {
        let all = self.all(topics);
        all[all.len().saturating_sub(n.min(self.cap))..].to_vec()
    }

    /// Model: the topics of `topics` that lost (evicted) an event newer than `after`, and the
    /// oldest id those topics still retain.
    fn gap(&self, topics: &[&str], after: &str) -> (Vec<String>, Option<String>) {
        let after = parse_id(after);
        let mut gap = Vec::new();
        let mut oldest: Option<String> = None;
        for topic in topics {
            let kept = self.retained_on(topic);
            let lost = (0..self.log.len()).any(|i| {
                self.log[i].topics.iter().any(|t| t == topic) && !kept.contains(&i) && parse_id(&self.log[i].id) > after
            });
            if lost {
                gap.push(topic.to_string());
                if let Some(&first) = kept.first() {
                    let id = &self.log[first].id;
                    let older = match &oldest {
                        None => true,
                        Some(o) => parse_id(id) < parse_id(o),
                    };
                    if older {
                        oldest = Some(id.clone());
                    }
                }
            }
        }
        (gap, oldest)
    }

    /// Opens a stream on `topics` (with `extra` query parameters and the resume mode), then
    /// publishes a sentinel on `topics[0]` and returns everything received before the sentinel.
    /// `expect`: how many items (replayed events and notices) the test expects before it.
    ///
    /// When something is expected, the sentinel is published only once the first of it has
    /// arrived: the server may send the response head a moment before its replay request reaches
    /// the broker, so a sentinel published on seeing the head could become part of the replay;
    /// once a replayed item is here, the replay's snapshot is taken and the sentinel is live.
    /// (With nothing expected the sentinel arrives first either way, and anything the server
    /// wrongly replays still shows up before it.)
    fn replay(&mut self, topics: &[&str], extra: &str, from: Resume, expect: usize) -> Vec<SseEvent> {
        let what = format!("stream {topics:?} {extra:?} {from:?}");
        let mut stream = open_stream(self.server.addr, topics, extra, from, true);
        let mut before = Vec::new();
        while before.len() < expect.min(1) {
            match next_item(&mut stream, &format!("{what} (have {before:?}, expecting {expect} items)")) {
                SseItem::Event(ev) => before.push(ev),
                SseItem::Comment(c) if c.is_empty() => {}
                other => panic!("{what}: unexpected item {other:?} after {before:?}"),
            }
        }
        self.sentinels += 1;
        let sentinel = format!("sentinel-{}", self.sentinels);
        let sentinel_id = self.publish(&[topics[0]], &sentinel);
        let (more, last) = read_until(&mut stream, &sentinel, &what);
        before.extend(more);
        assert_eq!(last.id.as_deref(), Some(sentinel_id.as_str()), "{what}: live sentinel carries its publish id");
        before
    }
}

/// `/events?topic=..[&extra][&lastEventId=..]`.
fn stream_path(topics: &[&str], extra: &str, from: Resume) -> String {
    let mut query: Vec<String> = topics.iter().map(|t| format!("topic={}", pct(t))).collect();
    if !extra.is_empty() {
        query.push(extra.to_string());
    }
    if let Resume::Query(id) | Resume::Both { query: id, .. } = from {
        query.push(format!("lastEventId={}", pct(id)));
    }
    format!("/events?{}", query.join("&"))
}

/// Opens a stream and checks the 200 event-stream head and the opening `retry:` / `:ok` lines.
/// When the head is back, the server has registered the stream.
fn open_stream(addr: std::net::SocketAddr, topics: &[&str], extra: &str, from: Resume, http11: bool) -> SseStream {
    let path = stream_path(topics, extra, from);
    let version = if http11 { "HTTP/1.1" } else { "HTTP/1.0" };
    let mut req = format!("GET {path} {version}\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n");
    if let Resume::Header(id) | Resume::Both { header: id, .. } = from {
        req.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    req.push_str("\r\n");
    let what = format!("GET {path} ({from:?})");
    let mut s = SseStream::open_with(addr, &req).unwrap_or_else(|e| panic!("{what}: {e}"));
    s.head.assert_status(200, &what);
    assert_eq!(s.head.header("content-type"), Some("text/event-stream; charset=utf-8"), "{what}");
    let opening = [next_item(&mut s, &what), next_item(&mut s, &what)];
    assert_eq!(opening, [SseItem::Retry("2000".into()), SseItem::Comment("ok".into())], "{what}: opening lines");
    s
}

fn next_item(s: &mut SseStream, what: &str) -> SseItem {
    match s.next_item() {
        Ok(Some(item)) => item,
        Ok(None) => panic!("{what}: stream ended"),
        Err(e) => panic!("{what}: read failed (the read timeout bounds every wait): {e}"),
    }
}

/// Reads events (skipping heartbeats) until one whose data is `sentinel`; returns the events
/// before it and the sentinel itself.
fn read_until(s: &mut SseStream, sentinel: &str, what: &str) -> (Vec<SseEvent>, SseEvent) {
    let mut seen = Vec::new();
    loop {
        match next_item(s, what) {
            SseItem::Event(ev) if ev.data == sentinel => return (seen, ev),
            SseItem::Event(ev) => {
                assert!(seen.len() < 100_000, "{what}: runaway stream");
                seen.push(ev)
            }
            SseItem::Comment(c) if c.is_empty() => {}
            other => panic!("{what}: unexpected item {other:?} after {seen:?}"),
        }
    }
}

/// Checks that every event is a plain replayed event (id, no name) and returns `(id, data)`.
fn plain(events: &[SseEvent], what: &str) -> Vec<(String, String)> {
    events
        .iter()
        .map(|ev| {
            assert!(ev.event.is_none(), "{what}: unexpected named event {ev:?} in {events:#?}");
            let id = ev.id.clone().unwrap_or_else(|| panic!("{what}: event without id: {ev:?}"));
            (id, ev.data.clone())
        })
        .collect()
}

/// Asserts `ev` is a notice named `name` without an `id:` line; returns its JSON data.
fn notice(ev: &SseEvent, name: &str, what: &str) -> Value {
    assert_eq!(ev.event.as_deref(), Some(name), "{what}: expected a {name} notice, got {ev:?}");
    assert_eq!(ev.id, None, "{what}: a notice must not carry an id: line: {ev:?}");
    serde_json::from_str(&ev.data).unwrap_or_else(|e| panic!("{what}: notice data is not JSON ({e}): {ev:?}"))
}

/// Asserts a `ringcast-gap` notice with these fields (topics compared as a set).
fn assert_gap(ev: &SseEvent, last_event_id: &str, topics: &[&str], oldest: Option<&str>, what: &str) {
    let mut data = notice(ev, GAP, what);
    if let Some(Value::Array(t)) = data.get_mut("topics") {
        t.sort_by_key(|v| v.to_string());
    }
    let mut topics: Vec<&str> = topics.to_vec();
    topics.sort();
    assert_eq!(
        data,
        json!({"lastEventId": last_event_id, "topics": topics, "oldestRetained": oldest}),
        "{what}: gap notice"
    );
}

/// Splits off a leading gap notice and checks it; the rest must be plain events.
fn expect_gap_then(
    events: &[SseEvent],
    last_event_id: &str,
    topics: &[&str],
    oldest: Option<&str>,
    what: &str,
) -> Vec<(String, String)> {
    let first = events.first().unwrap_or_else(|| panic!("{what}: no gap notice (nothing before the sentinel)"));
    assert_gap(first, last_event_id, topics, oldest, what);
    plain(&events[1..], what)
}

// ---------------------------------------------------------------------------------------------
// Resume positions, topics, header vs query
// ---------------------------------------------------------------------------------------------

#[test]
fn resume_on_one_topic_from_every_position_via_header_and_query() {
    let mut rig = Rig::start(&[]);
    // An id from this process older than everything on "t": resuming from it replays all of "t".
    let before = rig.publish(&["other"], "before");
    let mut on_t = Vec::new();
    for i in 0..6 {
        on_t.push(rig.publish(&["t"], &format!("t{i}")));
        rig.publish(&["other"], &format!("o{i}"));
    }
    let positions =
        [("before the first retained id", before.clone()), ("first", on_t[0].clone()), ("middle", on_t[3].clone())];
    for (name, id) in &positions {
        for from in Resume::both_ways(id) {
            let what = format!("resume {name} {from:?}");
            let expected = rig.after(&["t"], id);
            assert!(!expected.is_empty());
            let got = rig.replay(&["t"], "", from, expected.len());
            assert_eq!(plain(&got, &what), expected, "{what}: every retained event after the id, once, in order");
        }
    }
    // After the last event on "t" (sentinels included): nothing is replayed, and no gap.
    for mode in 0..2 {
        let last = rig.all(&["t"]).last().unwrap().0.clone();
        let from = if mode == 0 { Resume::Header(&last) } else { Resume::Query(&last) };
        let got = rig.replay(&["t"], "", from, 0);
        assert_eq!(got, vec![], "resume from the last id {from:?}: nothing before the live sentinel");
    }
    // The first resume case really replayed the whole topic.
    assert_eq!(
        rig.after(&["t"], &before)[..6].iter().map(|e| e.1.as_str()).collect::<Vec<_>>(),
        ["t0", "t1", "t2", "t3", "t4", "t5"]
    );
}

#[test]
fn one_id_resumes_several_topics_and_shared_events_arrive_once() {
    let mut rig = Rig::start(&[]);
    let script: [(&[&str], &str); 10] = [
        (&["a"], "a0"),
        (&["b"], "b0"),
        (&["a", "b"], "ab0"),
        (&["c"], "c0"),
        (&["a"], "a1"),
        (&["b", "c"], "bc0"),
        (&["a", "b", "c"], "abc0"),
        (&["c"], "c1"),
        (&["b"], "b1"),
        (&["a", "b"], "ab1"),
    ];
    for (topics, data) in script {
        rig.publish(topics, data);
    }
    let ids: Vec<String> = rig.log.iter().map(|p| p.id.clone()).collect();
    // Every position, including ids of events on "c" (not subscribed), alternating the ways.
    for (i, id) in ids.iter().enumerate() {
        let from = if i % 2 == 0 { Resume::Header(id) } else { Resume::Query(id) };
        let what = format!("resume [a, b] after event #{i} {from:?}");
        let expected = rig.after(&["a", "b"], id);
        let got = plain(&rig.replay(&["a", "b"], "", from, expected.len()), &what);
        assert_eq!(got, expected, "{what}");
        let unique: HashSet<&String> = got.iter().map(|(id, _)| id).collect();
        assert_eq!(unique.len(), got.len(), "{what}: an event on two topics arrived twice: {got:?}");
    }
    // Spot check of the model itself: after a0, [a, b] gets b0 ab0 a1 bc0 abc0 b1 ab1 (+ sentinels).
    let after_a0 = rig.after(&["a", "b"], &ids[0]);
    let data: Vec<&str> = after_a0.iter().map(|e| e.1.as_str()).take(7).collect();
    assert_eq!(data, ["b0", "ab0", "a1", "bc0", "abc0", "b1", "ab1"]);
    // A single topic of several, resumed from an id on the other.
    let what = "resume [c] from an id on b";
    let expected = rig.after(&["c"], &ids[1]);
    assert_eq!(plain(&rig.replay(&["c"], "", Resume::Query(&ids[1]), expected.len()), what), expected, "{what}");
}

#[test]
fn header_wins_over_query_parameter() {
    let mut rig = Rig::start(&[]);
    let ids: Vec<String> = (0..5).map(|i| rig.publish(&["t"], &format!("e{i}"))).collect();
    // Header later than the query value, and earlier: the header decides both times.
    for (header, query) in [(&ids[3], &ids[0]), (&ids[0], &ids[3])] {
        let what = format!("Last-Event-ID {header} with ?lastEventId={query}");
        let expected = rig.after(&["t"], header);
        let got = rig.replay(&["t"], "", Resume::Both { header, query }, expected.len());
        assert_eq!(plain(&got, &what), expected, "{what}: the header wins");
    }
    // A valid header with a malformed query value: no gap, resume from the header's id.
    let what = "Last-Event-ID valid, ?lastEventId=junk";
    let expected = rig.after(&["t"], &ids[2]);
    let got = rig.replay(&["t"], "", Resume::Both { header: &ids[2], query: "junk" }, expected.len());
    assert_eq!(plain(&got, what), expected, "{what}");
    // A resume id takes precedence over ?history=N (history is for fresh subscriptions).
    let what = "Last-Event-ID with ?history=1";
    let expected = rig.after(&["t"], &ids[1]);
    let got = rig.replay(&["t"], "history=1", Resume::Header(&ids[1]), expected.len());
    assert_eq!(plain(&got, what), expected, "{what}");
}

#[test]
fn replayed_events_keep_their_original_id_name_and_data() {
    let mut rig = Rig::start(&[]);
    let addr = rig.server.addr;
    // A live subscriber sees the events as published...
    let mut live = open_stream(addr, &["t"], "", Resume::Fresh, true);
    let first = rig.publish(&["other"], "first");
    let mut conn = rig.server.connect();
    let mut ids = Vec::new();
    for (query, event, body) in [
        ("topic=t&event=greeting", Some("greeting"), "hello"),
        ("topic=t", None, "line one\nline two\r\nline three"),
        ("topic=t&event=tick", Some("tick"), ""),
    ] {
        conn.send(&post_request(&format!("/publish?{query}"), Some("text/plain"), body.as_bytes()));
        let resp = conn.read_response().expect("publish answer");
        resp.assert_status(200, query);
        let id = publish_id(&resp);
        rig.record(&id, &["t"], body);
        ids.push((id, event));
    }
    let mut live_events = Vec::new();
    for _ in 0..3 {
        match next_item(&mut live, "live stream") {
            SseItem::Event(ev) => live_events.push(ev),
            other => panic!("live stream: unexpected {other:?}"),
        }
    }
    let live_ids: Vec<(Option<String>, Option<&str>)> =
        live_events.iter().map(|e| (e.id.clone(), e.event.as_deref())).collect();
    let want: Vec<(Option<String>, Option<&str>)> = ids.iter().map(|(id, ev)| (Some(id.clone()), *ev)).collect();
    assert_eq!(live_ids, want, "live: ids are the publish ids, names as published");
    assert_eq!(live_events[1].data_lines, 3);
    // ...and a resumed stream gets the very same events: id (= publish id), name, data lines.
    for from in Resume::both_ways(&first) {
        let later = rig.after(&["t"], &ids[2].0);
        let got = rig.replay(&["t"], "", from, 3 + later.len());
        assert!(got.len() >= 3, "{from:?}: replay too short: {got:#?}");
        assert_eq!(got[..3], live_events[..], "{from:?}: replay must reproduce the published events exactly");
        assert_eq!(plain(&got[3..], "later sentinels"), later, "{from:?}: then the earlier sentinels");
    }
    // HTTP/1.0 streams (no chunked framing) are resumed the same way.
    let mut s = open_stream(addr, &["t"], "", Resume::Header(&first), false);
    assert!(!s.head.is_chunked(), "HTTP/1.0 stream must not be chunked");
    for expected in &live_events {
        match next_item(&mut s, "HTTP/1.0 resume") {
            SseItem::Event(ev) => assert_eq!(&ev, expected, "HTTP/1.0 resume"),
            other => panic!("HTTP/1.0 resume: unexpected {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replay -> live hand-over under a concurrent publisher
// ---------------------------------------------------------------------------------------------

#[test]
fn resume_while_a_publisher_hammers_the_topics_has_no_gap_and_no_duplicate() {
    const EVENTS: usize = 2000;
    const TOPICS: [&str; 2] = ["ha", "hb"];
    let server = Server::start(&["--cores", "2", "--history", "5000"]);
    let addr = server.addr;
    // (id, topics, data) in publish order, shared with the subscribers.
    let log: Arc<Mutex<Vec<Published>>> = Arc::new(Mutex::new(Vec::new()));
    // Subscriber plans: (subscribe when this many are published, resume this many back, topics).
    let plans: Vec<(usize, usize, Vec<&'static str>)> = vec![
        (150, 1, vec!["ha"]),
        (400, 150, vec!["hb"]),
        (600, 37, vec!["ha", "hb"]),
        (800, 400, vec!["ha"]),
        (1000, 1, vec!["ha", "hb"]),
        (1200, 999, vec!["hb"]),
        (1400, 5, vec!["ha", "hb"]),
        (1700, 300, vec!["ha", "hb"]),
    ];

    let mut publisher = Publisher::new(&server);
    let mut subscribers = Vec::new();
    for i in 0..EVENTS {
        for (k, (at, back, topics)) in plans.iter().enumerate() {
            if *at != i {
                continue;
            }
            let (resume_index, resume_id) = {
                let log = log.lock().unwrap();
                let idx = i - back;
                (idx, log[idx].id.clone())
            };
            let topics = topics.clone();
            let (sent_tx, sent_rx) = mpsc::channel::<()>();
            subscribers.push(thread::spawn(move || {
                let what = format!("subscriber #{k} on {topics:?} resuming after event #{resume_index}");
                let from = if k % 2 == 0 { Resume::Header(&resume_id) } else { Resume::Query(&resume_id) };
                let path = stream_path(&topics, "", from);
                let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
                if let Resume::Header(id) = from {
                    req.push_str(&format!("Last-Event-ID: {id}\r\n"));
                }
                req.push_str("\r\n");
                let mut conn = Conn::connect(addr);
                conn.send(req.as_bytes());
                let _ = sent_tx.send(());
                let mut s = SseStream::read_from(conn).unwrap_or_else(|e| panic!("{what}: {e}"));
                s.head.assert_status(200, &what);
                let opening = [next_item(&mut s, &what), next_item(&mut s, &what)];
                assert_eq!(opening, [SseItem::Retry("2000".into()), SseItem::Comment("ok".into())], "{what}");
                let (got, end) = read_until(&mut s, "end", &what);
                (k, topics, resume_index, got, end)
            }));
            // The publisher goes on as soon as the request is on the wire: replay and live race.
            sent_rx.recv_timeout(Duration::from_secs(10)).expect("subscriber sent its request");
        }
        let topics: &[&str] = match i % 5 {
            0 | 1 => &TOPICS[..1],
            2 | 3 => &TOPICS[1..],
            _ => &TOPICS[..],
        };
        let data = i.to_string();
        let id = publisher.publish(topics, &data);
        log.lock().unwrap().push(Published { id, topics: topics.iter().map(|t| t.to_string()).collect(), data });
    }
    let end_id = publisher.publish(&TOPICS, "end");

    let log = log.lock().unwrap();
    for window in log.windows(2) {
        assert!(parse_id(&window[0].id) < parse_id(&window[1].id), "ids must increase in publish order");
    }
    for handle in subscribers {
        let (k, topics, resume_index, got, end) = handle.join().expect("subscriber thread");
        let what = format!("subscriber #{k} on {topics:?} resuming after event #{resume_index}");
        assert_eq!(end.id.as_deref(), Some(end_id.as_str()), "{what}: final event id");
        let expected: Vec<(String, String)> = log[resume_index + 1..]
            .iter()
            .filter(|p| p.topics.iter().any(|t| topics.contains(&t.as_str())))
            .map(|p| (p.id.clone(), p.data.clone()))
            .collect();
        let got = plain(&got, &what);
        if got != expected {
            let first_diff =
                got.iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(got.len().min(expected.len()));
            panic!(
                "{what}: got {} events, expected {}; first difference at #{first_diff}: got {:?}, expected {:?}",
                got.len(),
                expected.len(),
                got.get(first_diff.saturating_sub(1)..(first_diff + 3).min(got.len())),
                expected.get(first_diff.saturating_sub(1)..(first_diff + 3).min(expected.len())),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gap notices
// ---------------------------------------------------------------------------------------------

#[test]
fn ids_evicted_by_the_history_bound_get_a_gap_then_what_is_retained() {
    let mut rig = Rig::start(&["--history", "3"]);
    rig.publish(&["u"], "u0");
    let t: Vec<String> = (0..10).map(|i| rig.publish(&["t"], &format!("t{i}"))).collect();
    let u1 = rig.publish(&["u"], "u1");
    // t0..t6 are evicted; t7 t8 t9 remain. Spelled out once (the model agrees)...
    let what = "resume [t] after the 2nd of 10 with --history 3";
    let got = rig.replay(&["t"], "", Resume::Header(&t[1]), 4);
    let rest = expect_gap_then(&got, &t[1], &["t"], Some(&t[7]), what);
    let expected: Vec<(String, String)> = (7..10).map(|i| (t[i].clone(), format!("t{i}"))).collect();
    assert_eq!(rest, expected, "{what}: the retained events follow the notice");
    // ...then against the model (each sentinel evicts one more event from "t").
    let cases: [(&[&str], &str); 7] = [
        (&["t"], &t[1]),
        (&["t", "u"], &t[1]),
        (&["u", "t"], &t[5]),
        (&["t"], &t[7]),
        (&["t"], &t[8]),
        (&["u"], &t[1]),
        (&["t", "u"], &u1),
    ];
    for (i, (topics, after)) in cases.into_iter().enumerate() {
        let from = if i % 2 == 0 { Resume::Query(after) } else { Resume::Header(after) };
        let what = format!("case {i}: resume {topics:?} after {after} ({from:?})");
        let expected = rig.after(topics, after);
        let (gap_topics, oldest) = rig.gap(topics, after);
        let got = rig.replay(topics, "", from, expected.len() + usize::from(!gap_topics.is_empty()));
        if gap_topics.is_empty() {
            assert_eq!(plain(&got, &what), expected, "{what}: no gap");
        } else {
            let gap_topics: Vec<&str> = gap_topics.iter().map(String::as_str).collect();
            let rest = expect_gap_then(&got, after, &gap_topics, oldest.as_deref(), &what);
            assert_eq!(rest, expected, "{what}: the retained events after the id follow the notice");
        }
    }
    // Case 1 named only "t" in the gap ("u" lost nothing). From the newest evicted id of "t",
    // nothing after it was lost: no gap; from the one before, a gap.
    let on_t: Vec<usize> = (0..rig.log.len()).filter(|&i| rig.log[i].topics == ["t"]).collect();
    let first_kept = on_t.iter().position(|&i| i == rig.retained_on("t")[0]).unwrap();
    let newest_evicted = rig.log[on_t[first_kept - 1]].id.clone();
    let older = rig.log[on_t[first_kept - 2]].id.clone();
    let what = format!("resume [t] after the newest evicted id {newest_evicted}");
    assert!(rig.gap(&["t"], &newest_evicted).0.is_empty());
    let expected = rig.after(&["t"], &newest_evicted);
    assert_eq!(
        plain(&rig.replay(&["t"], "", Resume::Header(&newest_evicted), expected.len()), &what),
        expected,
        "{what}"
    );
    let what = format!("resume [t] after {older}, one before the newest evicted");
    let expected = rig.after(&["t"], &older);
    let oldest = expected[0].0.clone();
    let got = rig.replay(&["t"], "", Resume::Header(&older), expected.len() + 1);
    assert_eq!(expect_gap_then(&got, &older, &["t"], Some(&oldest), &what), expected, "{what}");
}

#[test]
fn unknown_future_and_malformed_ids_get_a_gap_then_everything_retained() {
    let mut rig = Rig::start(&[]);
    rig.publish(&["x"], "x0");
    rig.publish(&["a"], "a0");
    rig.publish(&["a", "b"], "ab0");
    rig.publish(&["a"], "a1");
    // `None`: an id just past the newest issued, computed when used (sentinels move it on).
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("from before this process", Some("1-0")),
        ("newer than any id issued (same ms, next seq)", None),
        ("newer than any id issued (a day ahead)", Some("99999999999999-0")),
        ("malformed", Some("junk")),
        ("malformed", Some("12-")),
        ("malformed", Some("-")),
        ("malformed", Some("-7")),
        ("malformed", Some("1-2-3")),
        ("malformed", Some("abc-1")),
        ("malformed", Some("0x1-0")),
        ("malformed (over 20 digits)", Some("123456789012345678901-0")),
        ("malformed (u64 overflow)", Some("99999999999999999999-0")),
        ("malformed with JSON metacharacters", Some("a\"b\\c")),
    ];
    for (kind, fixed) in &cases {
        for way in 0..2 {
            for topics in [&["a", "b"][..], &["b"][..]] {
                let id = match fixed {
                    Some(id) => id.to_string(),
                    None => {
                        let (ms, seq) = parse_id(&rig.log.last().unwrap().id);
                        format!("{ms}-{}", seq + 1)
                    }
                };
                let from = if way == 0 { Resume::Header(&id) } else { Resume::Query(&id) };
                let what = format!("{kind} id {id:?} on {topics:?} via {from:?}");
                let expected = rig.all(topics);
                let oldest = expected[0].0.clone();
                let got = rig.replay(topics, "", from, expected.len() + 1);
                let rest = expect_gap_then(&got, &id, topics, Some(&oldest), &what);
                assert_eq!(rest, expected, "{what}: all retained events follow the notice");
            }
        }
    }
    // A topic with nothing retained: the notice says null, nothing follows.
    let what = "unknown id on an empty topic";
    let got = rig.replay(&["empty"], "", Resume::Header("1-0"), 1);
    assert_eq!(expect_gap_then(&got, "1-0", &["empty"], None, what), vec![], "{what}");
}

#[test]
fn gap_notice_echoes_the_given_id_verbatim() {
    // Contract: "lastEventId":"<given>". An id with leading zeros parses, but the client must
    // find its own text in the notice.
    let mut rig = Rig::start(&[]);
    rig.publish(&["t"], "t0");
    for id in ["0001-0", "1-00"] {
        let what = format!("gap for {id:?}");
        let expected = rig.all(&["t"]);
        let oldest = expected[0].0.clone();
        let got = rig.replay(&["t"], "", Resume::Header(id), expected.len() + 1);
        assert_eq!(expect_gap_then(&got, id, &["t"], Some(&oldest), &what), expected, "{what}");
    }
}

#[test]
fn id_from_a_previous_server_process_gets_a_gap() {
    let mut old = Rig::start(&[]);
    old.publish(&["t"], "old0");
    let old_id = old.publish(&["t"], "old1");
    old.server.signal("TERM");
    let status = old.server.wait_exit(Duration::from_secs(10)).expect("old server exits after SIGTERM");
    assert!(status.success(), "old server exit status {status}");

    let mut rig = Rig::start(&[]);
    let n0 = rig.publish(&["t"], "new0");
    rig.publish(&["t"], "new1");
    for from in Resume::both_ways(&old_id) {
        let what = format!("resume with {old_id} from the previous process ({from:?})");
        let expected = rig.all(&["t"]);
        let got = rig.replay(&["t"], "", from, expected.len() + 1);
        let rest = expect_gap_then(&got, &old_id, &["t"], Some(&n0), &what);
        assert_eq!(rest, expected, "{what}: everything this process retains follows");
    }
}

// ---------------------------------------------------------------------------------------------
// ?history=N and the history-end marker
// ---------------------------------------------------------------------------------------------

#[test]
fn history_n_replays_the_last_n_across_topics_with_optional_end_marker() {
    let mut rig = Rig::start(&[]);
    for (topics, data) in [
        (&["a"][..], "a0"),
        (&["b"][..], "b0"),
        (&["a", "b"][..], "ab0"),
        (&["c"][..], "c0"),
        (&["a"][..], "a1"),
        (&["b"][..], "b1"),
        (&["a", "b"][..], "ab1"),
        (&["c"][..], "c1"),
    ] {
        rig.publish(topics, data);
    }
    for n in [1usize, 3, 4, 100] {
        // Without the marker: exactly the last N, nothing else before live events.
        let what = format!("?history={n} on [a, b]");
        let expected = rig.last_n(&["a", "b"], n);
        let got = rig.replay(&["a", "b"], &format!("history={n}"), Resume::Fresh, expected.len());
        assert_eq!(plain(&got, &what), expected, "{what}");
        // With the marker: the same replay, then the marker naming the last replayed id.
        let what = format!("?history={n}&history-end=1 on [a, b]");
        let expected = rig.last_n(&["a", "b"], n);
        let got = rig.replay(&["a", "b"], &format!("history={n}&history-end=1"), Resume::Fresh, expected.len() + 1);
        let (marker, events) = got.split_last().unwrap_or_else(|| panic!("{what}: no marker"));
        assert_eq!(plain(events, &what), expected, "{what}");
        let data = notice(marker, HISTORY_END, &what);
        assert_eq!(data, json!({"lastEventId": expected.last().unwrap().0}), "{what}: marker");
    }
    // N larger than what is retained: all of it (ab0/ab1 once each).
    let what = "?history=1000 on [a, b]";
    let expected = rig.all(&["a", "b"]);
    let got = rig.replay(&["a", "b"], "history=1000", Resume::Fresh, expected.len());
    assert_eq!(plain(&got, what), expected, "{what}");
    let unique: HashSet<String> = expected.iter().map(|e| e.0.clone()).collect();
    assert_eq!(unique.len(), expected.len());
    // A topic with nothing retained: the marker says null.
    let what = "?history=5&history-end=1 on [empty]";
    let got = rig.replay(&["empty"], "history=5&history-end=1", Resume::Fresh, 1);
    assert_eq!(got.len(), 1, "{what}: only the marker, got {got:?}");
    assert_eq!(notice(&got[0], HISTORY_END, what), json!({"lastEventId": null}), "{what}");
}

#[test]
fn history_zero_or_garbage_replays_nothing() {
    let mut rig = Rig::start(&[]);
    for i in 0..3 {
        rig.publish(&["t"], &format!("t{i}"));
    }
    // These streams are live from the start, so each iteration's sentinel goes to a topic of
    // its own: an earlier sentinel still on its way to a core may legitimately reach a live
    // stream that registered a moment after it was published.
    for (k, extra) in ["", "history=0", "history=abc", "history=-1", "history=", "history=1.5"].iter().enumerate() {
        let own = format!("s{k}");
        let got = rig.replay(&[&own, "t"], extra, Resume::Fresh, 0);
        assert_eq!(got, vec![], "?{extra}: no replay");
    }
    let what = "?history=0&history-end=1";
    let got = rig.replay(&["t"], "history=0&history-end=1", Resume::Fresh, 1);
    assert_eq!(got.len(), 1, "{what}: only the marker, got {got:?}");
    assert_eq!(notice(&got[0], HISTORY_END, what), json!({"lastEventId": null}), "{what}");
}

#[test]
fn history_n_is_capped_by_the_history_flag() {
    let mut rig = Rig::start(&["--history", "3"]);
    for i in 0..5 {
        rig.publish(&["a"], &format!("a{i}"));
        rig.publish(&["b"], &format!("b{i}"));
    }
    // Each topic retains 3 (6 in all), but N is capped at 3 across the stream's topics.
    let what = "?history=10 on [a, b] with --history 3";
    let expected = rig.last_n(&["a", "b"], 3);
    let got = rig.replay(&["a", "b"], "history=10&history-end=1", Resume::Fresh, expected.len() + 1);
    let (marker, events) = got.split_last().unwrap_or_else(|| panic!("{what}: nothing"));
    assert_eq!(plain(events, what), expected, "{what}");
    assert_eq!(notice(marker, HISTORY_END, what), json!({"lastEventId": expected[2].0}), "{what}");
    // One topic: its 3 retained events.
    let what = "?history=10 on [a] with --history 3";
    let expected = rig.last_n(&["a"], 3);
    let got = rig.replay(&["a"], "history=10", Resume::Fresh, expected.len());
    assert_eq!(plain(&got, what), expected, "{what}");
}

#[test]
fn history_zero_flag_disables_replay_and_resume_gets_a_gap() {
    let mut rig = Rig::start(&["--history", "0"]);
    let t0 = rig.publish(&["t"], "t0");
    rig.publish(&["t"], "t1");
    // (Checked with the marker: without one, nothing tells the client when the empty replay
    // is done; see `events_published_once_the_head_is_here_are_never_lost` for that case.)
    let what = "--history 0: ?history=5&history-end=1";
    let got = rig.replay(&["t"], "history=5&history-end=1", Resume::Fresh, 1);
    assert_eq!(got.len(), 1, "{what}: only the marker, got {got:?}");
    assert_eq!(notice(&got[0], HISTORY_END, what), json!({"lastEventId": null}), "{what}");
    for from in Resume::both_ways(&t0) {
        let what = format!("--history 0: resume after t0 ({from:?})");
        let got = rig.replay(&["t"], "", from, 1);
        assert_eq!(expect_gap_then(&got, &t0, &["t"], None, &what), vec![], "{what}: a gap and nothing else");
    }
    assert_eq!(metric(&rig.server.metrics(), "ringcast_history_events"), 0.0);
}

// ---------------------------------------------------------------------------------------------
// --history-ttl
// ---------------------------------------------------------------------------------------------

/// `?history=N&history-end=1` read up to the marker (no sentinel: nothing is published).
fn history_marker(rig: &Rig, topics: &[&str], n: usize, what: &str) -> (Vec<(String, String)>, Value) {
    let mut s = open_stream(rig.server.addr, topics, &format!("history={n}&history-end=1"), Resume::Fresh, true);
    let mut events = Vec::new();
    loop {
        match next_item(&mut s, what) {
            SseItem::Event(ev) if ev.event.as_deref() == Some(HISTORY_END) => {
                return (plain(&events, what), notice(&ev, HISTORY_END, what));
            }
            SseItem::Event(ev) => events.push(ev),
            SseItem::Comment(c) if c.is_empty() => {}
            other => panic!("{what}: unexpected {other:?}"),
        }
    }
}

/// Waits (bounded) until `?history=100` on `topics` replays nothing.
fn wait_until_history_empty(rig: &Rig, topics: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (events, marker) = history_marker(rig, topics, 100, "TTL wait");
        if events.is_empty() {
            assert_eq!(marker, json!({"lastEventId": null}), "TTL wait: marker with nothing replayed");
            return;
        }
        assert!(Instant::now() < deadline, "--history-ttl 1s: events still replayed after 15 s: {events:?}");
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn history_ttl_drops_old_events() {
    let mut rig = Rig::start(&["--history-ttl", "1s"]);
    let t: Vec<String> = (0..3).map(|i| rig.publish(&["t"], &format!("t{i}"))).collect();
    // Right after publishing (far less than a second): all three are retained.
    let (events, marker) = history_marker(&rig, &["t"], 10, "?history=10 right after publishing");
    assert_eq!(events, rig.all(&["t"]), "?history=10 right after publishing");
    assert_eq!(marker, json!({"lastEventId": t[2]}));

    // Expiry runs once a second and drops events older than 1 s: after 2.5 s they are gone.
    thread::sleep(Duration::from_millis(2500));
    wait_until_history_empty(&rig, &["t"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&rig.server.metrics(), "ringcast_history_events") != 0.0 {
        assert!(Instant::now() < deadline, "ringcast_history_events never reached 0");
        thread::sleep(Duration::from_millis(100));
    }

    // Resuming from an expired id: what came after it was dropped, so a gap (nothing retained).
    let what = "resume after t0 once t1, t2 expired";
    let got = rig.replay(&["t"], "", Resume::Header(&t[0]), 1);
    let rest = expect_gap_then(&got, &t[0], &["t"], None, what);
    assert_eq!(rest, vec![], "{what}");
}

#[test]
fn history_ttl_gap_survives_a_topic_emptied_and_refilled() {
    // t0 expires (the topic is emptied), then t1 is published: a client resuming from an id
    // before t0 has missed t0, so it must get a gap before t1.
    let mut rig = Rig::start(&["--history-ttl", "1s"]);
    let before = rig.publish(&["other"], "before");
    let t0 = rig.publish(&["t"], "t0");
    thread::sleep(Duration::from_millis(2500));
    wait_until_history_empty(&rig, &["t", "other"]);
    let t1 = rig.publish(&["t"], "t1");
    let what = format!("resume [t] after {before} (t0 {t0} expired, t1 {t1} retained)");
    let got = rig.replay(&["t"], "", Resume::Header(&before), 2);
    let rest = expect_gap_then(&got, &before, &["t"], Some(&t1), &what);
    assert_eq!(rest, vec![(t1.clone(), "t1".to_string())], "{what}");
}

// ---------------------------------------------------------------------------------------------
// The response head marks the subscription
// ---------------------------------------------------------------------------------------------

/// An event published after the client has the stream's response head must reach the stream:
/// live, or in its replay. This holds trivially for plain live streams; the streams here wait
/// for a replay from the broker first (an empty one): `?history-end=1` alone, and `?history=5`
/// on a server without history. Each iteration races one publish against the replay request;
/// a server that sends the head before its replay request is on the way to the broker drops
/// the event now and then (it is skipped as "part of the replay", which does not hold it).
#[test]
fn events_published_once_the_head_is_here_are_never_lost() {
    const ROUNDS: usize = 600;
    for (args, extra, marker) in
        [(&["--cores", "2"][..], "history-end=1", true), (&["--cores", "2", "--history", "0"][..], "history=5", false)]
    {
        let server = Server::start(args);
        let mut publisher = Publisher::new(&server);
        let mut lost = Vec::new();
        for i in 0..ROUNDS {
            let topic = format!("race{}", i % 4);
            let what = format!("{args:?} ?{extra} round {i}");
            let mut s = open_stream(server.addr, &[&topic], extra, Resume::Fresh, true);
            // Failure bound for a local event: generous, but keeps a failing run short.
            s.conn.stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let data = format!("p{i}");
            let id = publisher.publish(&[&topic], &data);
            let mut items = Vec::new();
            let delivered = loop {
                match s.next_item() {
                    Ok(Some(SseItem::Comment(c))) if c.is_empty() => {}
                    Ok(Some(SseItem::Event(ev))) if ev.data == data => {
                        assert_eq!(ev.id.as_deref(), Some(id.as_str()), "{what}");
                        break true;
                    }
                    Ok(Some(item)) => items.push(item),
                    Ok(None) | Err(_) => break false,
                }
            };
            // Before the event: the end marker when asked for (saying nothing was replayed).
            let want: Vec<SseItem> = if marker {
                vec![SseItem::Event(SseEvent {
                    id: None,
                    event: Some(HISTORY_END.into()),
                    data: r#"{"lastEventId":null}"#.into(),
                    data_lines: 1,
                })]
            } else {
                vec![]
            };
            assert_eq!(items, want, "{what}");
            if !delivered {
                lost.push(format!("{id} ({data} on {topic})"));
            }
        }
        assert!(
            lost.is_empty(),
            "{args:?} ?{extra}: {} of {ROUNDS} events published after the stream's head never reached it: {lost:?}",
            lost.len()
        );
    }
}

#[test]
fn history_byte_budget_keeps_the_newest_events_within_it() {
    let server = Server::start(&["--history-max-bytes", "20000"]);
    let data = "x".repeat(1000);
    let ids: Vec<String> = (0..100).map(|_| server.publish("budget", &data)).collect();
    let mut s = SseStream::open(server.addr, "/events?topic=budget&history=100&history-end=1").expect("stream");
    s.head.assert_status(200, "history stream");
    let mut got = Vec::new();
    loop {
        let ev = s.expect_event("history");
        if ev.event.as_deref() == Some("ringcast-history-end") {
            break;
        }
        got.push(ev.id.expect("id"));
    }
    // ~1.4 KB per retained 1,000-byte event: about 14 fit in 20,000 bytes, the newest ones.
    assert!(!got.is_empty() && got.len() < 20, "{} events retained", got.len());
    assert_eq!(got[..], ids[ids.len() - got.len()..], "not the newest events, in order");
    let bytes = server.wait_for_metric("ringcast_history_bytes", Duration::from_secs(5), |v| v > 0.0);
    assert!(bytes <= 20000.0, "ringcast_history_bytes {bytes}");
}
