//! The fuzz targets' bodies, shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/*.rs`,
//! nightly) and by `tests/fuzz_corpus.rs`, which replays `fuzz/corpus/<target>/` on stable.
//! Each function takes the raw input, drives the server's own parsing/encoding functions the
//! way `conn.rs` and `broker.rs` do, and panics when an invariant breaks.

#![allow(dead_code)]

use bytes::BytesMut;
use ringcast::http::{parse_request, put_chunk, BodyKind, ChunkedDecoder, HttpError, Method, Request};
use ringcast::publish::{decode_form, parse_publish, valid_user, validate_topics, MAX_USERS};
use ringcast::sse::{encode_event, encode_notice, retry_frame, valid_event_name, valid_topic, EventId, Frame, Wire};

/// Limits used by the harness: small, so the fuzzer reaches the 431/413 paths within its
/// default input size.
pub const MAX_HEAD: usize = 1024;
pub const MAX_BODY: usize = 2048;
pub const MAX_TOPICS: usize = 8;

// ---------------------------------------------------------------------------------------------
// http_request: bytes as they arrive on a connection -> pipelined request heads and bodies.

/// What one connection's bytes came to: the requests (head as parsed, body as read) and how it
/// ended.
#[derive(Debug, PartialEq, Eq)]
struct Served {
    requests: Vec<(String, Vec<u8>)>,
    end: End,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Input ran out while waiting for more (a head, a body).
    Incomplete,
    /// An error status the server would answer with, then close.
    Error(u16),
}

/// Parses `data` as one connection's bytes, twice: as one read, and in reads of a few bytes
/// (the size taken from the input) — both must come to the same requests and bodies.
pub fn http_request(data: &[u8]) {
    let whole = serve(data, data.len().max(1));
    let step = data.first().map_or(1, |&b| 1 + (b as usize % 17));
    let pieces = serve(data, step);
    assert_eq!(whole.requests, pieces.requests, "one read and {step}-byte reads parse differently");
    match (&whole.end, &pieces.end) {
        (a, b) if a == b => {}
        // A head that is neither complete nor invalid within MAX_HEAD bytes is 431 read by read,
        // while one read may already see the malformed byte further on: both refuse it.
        (End::Error(a), End::Error(b)) if *a == 431 || *b == 431 => {}
        (a, b) => panic!("one read ends {a:?}, {step}-byte reads end {b:?}"),
    }
}

/// The connection loop of `conn::serve` without the socket: parse a head, read its body as
/// `conn::read_body` does, repeat; `step`: bytes per read.
fn serve(data: &[u8], step: usize) -> Served {
    let mut input = data;
    let mut buf = BytesMut::new();
    let mut fill = |buf: &mut BytesMut| -> bool {
        if input.is_empty() {
            return false;
        }
        let n = step.min(input.len());
        buf.extend_from_slice(&input[..n]);
        input = &input[n..];
        true
    };
    let mut requests = Vec::new();
    loop {
        let req = loop {
            let before = buf.clone();
            match parse_request(&mut buf, MAX_HEAD) {
                Ok(Some(req)) => {
                    check_request(&req, &before, &buf);
                    break req;
                }
                Ok(None) => {
                    assert_eq!(buf, before, "an incomplete head consumes nothing");
                    assert!(buf.len() <= MAX_HEAD, "an incomplete head past MAX_HEAD must be 431");
                    if !fill(&mut buf) {
                        return Served { requests, end: End::Incomplete };
                    }
                }
                Err(e) => return Served { requests, end: End::Error(check_error(&e)) },
            }
        };
        let body = match req.body {
            BodyKind::None if req.method == Method::Post && req.content_length.is_none() => {
                return Served { requests, end: End::Error(check_error(&HttpError::LengthRequired)) };
            }
            BodyKind::None => Vec::new(),
            BodyKind::Length(n) if n > MAX_BODY => {
                return Served { requests, end: End::Error(check_error(&HttpError::PayloadTooLarge)) };
            }
            BodyKind::Length(n) => {
                while buf.len() < n {
                    if !fill(&mut buf) {
                        return Served { requests, end: End::Incomplete };
                    }
                }
                buf.split_to(n).to_vec()
            }
            BodyKind::Chunked => {
                let mut decoder = ChunkedDecoder::new(MAX_BODY);
                loop {
                    match decoder.feed(&mut buf) {
                        Ok(true) => break,
                        Ok(false) => {
                            if !fill(&mut buf) {
                                return Served { requests, end: End::Incomplete };
                            }
                        }
                        Err(e) => return Served { requests, end: End::Error(check_error(&e)) },
                    }
                }
                let body = decoder.into_body();
                assert!(body.len() <= MAX_BODY, "chunked body past the limit: {}", body.len());
                body
            }
        };
        requests.push((format!("{req:?}"), body));
    }
}

/// What a parsed head must satisfy, whatever the bytes.
fn check_request(req: &Request, before: &BytesMut, after: &BytesMut) {
    let consumed = before.len() - after.len();
    assert!(consumed > 0 && consumed <= MAX_HEAD, "head of {consumed} bytes");
    assert_eq!(&before[consumed..], &after[..], "only the head is consumed");
    assert_eq!(before[consumed - 1], b'\n', "the head ends with its blank line");
    assert!(req.path.starts_with('/') || req.path == "*", "path {:?}", req.path);
    assert!(!req.path.contains('?'), "path {:?} holds the query", req.path);
    assert!(strict_query_ok(&req.query), "query {:?} passed with a bad escape", req.query);
    match req.body {
        BodyKind::Length(n) => assert!(n > 0 && req.content_length == Some(n)),
        BodyKind::Chunked => assert_eq!(req.content_length, None, "Content-Length with chunked"),
        BodyKind::None => assert!(matches!(req.content_length, None | Some(0))),
    }
    if !req.http11 {
        assert!(!req.keep_alive, "HTTP/1.0 is answered, then closed");
    }
    if let Some(ct) = &req.content_type {
        assert_eq!(ct, &ct.trim().to_ascii_lowercase(), "content type is trimmed, lowercase");
    }
    for v in [&req.last_event_id, &req.authorization, &req.cookie, &req.origin, &req.real_ip].into_iter().flatten() {
        assert_eq!(v, v.trim());
        assert!(!v.contains(['\r', '\n']), "header value {v:?} holds a line break");
    }
}

/// Independent of `http::valid_query`: every `%` starts `%XX`, and the decoded bytes are UTF-8.
fn strict_query_ok(query: &str) -> bool {
    let b = query.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if i + 2 >= b.len() {
                return false;
            }
            let hex = &b[i + 1..i + 3];
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return false;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).is_ok()
}

/// An error's status is one the server answers with, and its response is well-formed HTTP.
fn check_error(e: &HttpError) -> u16 {
    let (code, _) = e.status();
    assert!(matches!(code, 400 | 401 | 403 | 404 | 405 | 408 | 411 | 413 | 429 | 431 | 501 | 503), "{code}");
    let mut out = Vec::new();
    e.write_response(&mut out, "");
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(&out) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("error response does not parse: {other:?} {:?}", String::from_utf8_lossy(&out)),
    };
    assert_eq!(resp.code, Some(code));
    let length = resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length")).expect("length");
    let length: usize = std::str::from_utf8(length.value).unwrap().parse().unwrap();
    assert_eq!(length, out.len() - head, "Content-Length of the error response");
    code
}

// ---------------------------------------------------------------------------------------------
// publish_body: `<query>\n<content-type>\n<body>` -> the publish the server would build.

/// Splits off the first line (without its `\n`); `None` when there is no `\n`.
fn split_line(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    }
}

/// Input: the query string, a newline, the Content-Type value, a newline, the body. Without
/// the second line there is no Content-Type; without the first newline the input is the query.
pub fn publish_body(data: &[u8]) {
    let (query, rest) = split_line(data);
    let (content_type, body) = match rest {
        Some(rest) => {
            let (ct, body) = split_line(rest);
            (Some(ct), body.unwrap_or(b""))
        }
        None => (None, &b""[..]),
    };
    // As `parse_request` hands them over: the query is UTF-8 (else 400 before this), the
    // content type trimmed and lowercased (dropped when not UTF-8).
    let query = String::from_utf8_lossy(query);
    let content_type = content_type.and_then(|c| std::str::from_utf8(c).ok()).map(|c| c.trim().to_ascii_lowercase());

    check_form_decoding(query.as_bytes());
    check_form_decoding(body);
    check_events_query(&query);

    match parse_publish(&query, content_type.as_deref(), body, MAX_TOPICS) {
        Ok(p) => {
            assert!(!p.topics.is_empty() && p.topics.len() <= MAX_TOPICS, "{} topics", p.topics.len());
            for (i, t) in p.topics.iter().enumerate() {
                assert!(valid_topic(t), "topic {t:?}");
                assert!(!p.topics[..i].contains(t), "topic {t:?} twice");
            }
            if let Some(e) = &p.event {
                assert!(valid_event_name(e), "event name {e:?}");
            }
            assert!(p.users.len() <= MAX_USERS);
            for (i, u) in p.users.iter().enumerate() {
                assert!(valid_user(u), "user {u:?}");
                assert!(!p.users[..i].contains(u), "user {u:?} twice");
            }
            let mime = content_type.as_deref().map(|c| c.split(';').next().unwrap_or("").trim()).unwrap_or("");
            if !matches!(mime, "application/json" | "application/x-www-form-urlencoded") {
                assert_eq!(p.data.as_bytes(), body, "a raw body is the data as sent");
            }
            // What the broker does next: encode it once.
            let id = EventId { ms: body.len() as u64, seq: query.len() as u64 };
            check_frame(id, p.event.as_deref(), &p.data);
        }
        Err(e) => assert_eq!(check_error(&e), 400, "{e:?}"),
    }
}

/// The strict form decoder agrees with `form_urlencoded` wherever it accepts the input (it
/// only refuses what `form_urlencoded` would decode lossily).
fn check_form_decoding(input: &[u8]) {
    if let Ok(pairs) = decode_form(input) {
        let lenient: Vec<(String, String)> =
            form_urlencoded::parse(input).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        assert_eq!(pairs, lenient, "decode_form and form_urlencoded differ on {:?}", String::from_utf8_lossy(input));
    }
}

/// `GET /events?...` as `conn::stream_events` reads its query: topics, resume id, history.
fn check_events_query(query: &str) {
    let mut names = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "topic" => names.push(v.into_owned()),
            "lastEventId" => {
                if let Ok(id) = v.parse::<EventId>() {
                    assert_eq!(id.to_string().parse::<EventId>(), Ok(id), "event id {v:?} round trip");
                }
            }
            "history" => {
                let _ = v.parse::<usize>().unwrap_or(0);
            }
            _ => {}
        }
    }
    match validate_topics(names.iter().map(String::as_str), MAX_TOPICS) {
        Ok(topics) => {
            assert!(!topics.is_empty() && topics.len() <= MAX_TOPICS);
            assert!(topics.iter().all(|t| valid_topic(t) && names.iter().any(|n| n == &**t)));
        }
        Err(e) => assert_eq!(check_error(&e), 400),
    }
}

// ---------------------------------------------------------------------------------------------
// frame_encode: `<id>\0<event>\0<data>` -> the event's frame, parsed back.

/// Input: an id (`ms-seq`, else one derived from the bytes), NUL, an event name, NUL, the data
/// (lossy UTF-8). Without the NULs there is no event name (one NUL: the rest is the data).
pub fn frame_encode(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let id_part = parts.next().unwrap_or(b"");
    let (event_part, data_part) = match (parts.next(), parts.next()) {
        (Some(e), Some(d)) => (Some(e), d),
        (Some(d), None) => (None, d),
        _ => (None, &b""[..]),
    };
    let id = std::str::from_utf8(id_part).ok().and_then(|s| s.parse::<EventId>().ok()).unwrap_or_else(|| {
        let ms = id_part.iter().fold(0u64, |h, &b| h.wrapping_mul(131).wrapping_add(b as u64));
        EventId { ms, seq: id_part.len() as u64 }
    });
    let text = String::from_utf8_lossy(data_part);
    let name = event_part.map(String::from_utf8_lossy);
    // The server encodes only names `valid_event_name` lets through (publish.rs checks it).
    let event = match &name {
        Some(n) if valid_event_name(n) => Some(&**n),
        Some(n) => {
            assert!(n.is_empty() || n.len() > 256 || n.contains(['\r', '\n', '\0']), "{n:?} refused");
            None
        }
        None => None,
    };
    check_frame(id, event, &text);
    check_notice(&text);
    check_retry(id.ms);
}

/// One dispatched event as an EventSource sees it.
#[derive(Debug, Default, PartialEq, Eq)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    retry: Option<String>,
    other: Vec<String>,
}

/// A small WHATWG event-stream parser: lines end at CRLF, CR or LF; `field: value` (one space
/// after the colon dropped), `:comment`; a blank line dispatches. Returns the dispatched events
/// and what was pending after the last blank line.
fn parse_sse(bytes: &[u8]) -> (Vec<SseEvent>, SseEvent) {
    let text = std::str::from_utf8(bytes).expect("SSE bytes are UTF-8");
    let mut events = Vec::new();
    let mut cur = SseEvent::default();
    let mut lines = split_lines(text);
    // The last piece has no line end: a line still being received, not one to act on.
    let unterminated = lines.pop().unwrap_or("");
    for line in lines {
        if line.is_empty() {
            events.push(std::mem::take(&mut cur));
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => cur.id = Some(value.to_owned()),
            "event" => cur.event = Some(value.to_owned()),
            "data" => cur.data.push(value.to_owned()),
            "retry" => cur.retry = Some(value.to_owned()),
            _ => cur.other.push(line.to_owned()),
        }
    }
    if !unterminated.is_empty() {
        cur.other.push(unterminated.to_owned());
    }
    (events, cur)
}

/// Lines of `text` split at CRLF, CR or LF (not `sse::for_each_line`: an independent reading).
/// A final line without a terminator is still a line.
fn split_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut rest = text;
    loop {
        match rest.find(['\r', '\n']) {
            Some(i) => {
                lines.push(&rest[..i]);
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
            None => {
                lines.push(rest);
                return lines;
            }
        }
    }
}

/// Strips one HTTP chunk (`<hex>\r\n<body>\r\n`, exactly) and returns its body.
fn unchunk(chunk: &[u8]) -> &[u8] {
    let crlf = chunk.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
    let size = std::str::from_utf8(&chunk[..crlf]).expect("hex size");
    assert!(!size.is_empty() && size.bytes().all(|b| b.is_ascii_hexdigit()), "chunk size {size:?}");
    let len = usize::from_str_radix(size, 16).unwrap();
    assert_eq!(chunk.len(), crlf + 2 + len + 2, "chunk length");
    assert_eq!(&chunk[crlf + 2 + len..], b"\r\n", "chunk ends with CRLF");
    &chunk[crlf + 2..crlf + 2 + len]
}

/// Inflates one gzip-stream chunk's raw-deflate segment (no gzip header: that is in the
/// stream's opening chunk).
fn inflate(segment: &[u8]) -> Vec<u8> {
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(segment.len() * 4 + 64);
    loop {
        let (before_in, before_out) = (d.total_in(), d.total_out());
        d.decompress_vec(&segment[d.total_in() as usize..], &mut out, flate2::FlushDecompress::Sync)
            .expect("a valid deflate segment");
        // Done once all input is in and the output had room to spare (nothing left inside).
        if d.total_in() as usize == segment.len() && out.len() < out.capacity() {
            return out;
        }
        let progress = d.total_in() > before_in || d.total_out() > before_out;
        assert!(progress || out.len() == out.capacity(), "inflate made no progress");
        out.reserve(out.capacity().max(64));
    }
}

/// `encode_event` parses back into the same event: id, event name, one data line per line of
/// `data`, nothing else; one event, ended by a blank line; the same bytes on every wire.
pub fn check_frame(id: EventId, event: Option<&str>, data: &str) {
    let frame = encode_event(id, event, data);
    let sse = unchunk(frame.chunk()).to_vec();
    check_wires(&frame, &sse);
    assert!(sse.ends_with(b"\n\n"), "frame ends with a blank line");
    assert!(sse.starts_with(b"id: "), "frame starts with its id");
    let (events, pending) = parse_sse(&sse);
    assert_eq!(pending, SseEvent::default(), "bytes after the dispatching blank line");
    assert_eq!(events.len(), 1, "one event, not {}: {:?}", events.len(), String::from_utf8_lossy(&sse));
    let got = &events[0];
    assert_eq!(got.id.as_deref(), Some(&*id.to_string()), "id field");
    assert_eq!(got.id.as_deref().map(str::parse::<EventId>), Some(Ok(id)), "id parses back");
    assert_eq!(got.event.as_deref(), event, "event field");
    assert_eq!(got.data, split_lines(data), "data lines");
    assert_eq!((&got.retry, got.other.len()), (&None, 0), "no injected fields");
    // The id and event lines are whole lines: no CR or LF inside.
    let head_lines = 1 + usize::from(event.is_some());
    for line in sse.split(|&b| b == b'\n').take(head_lines) {
        assert!(!line.contains(&b'\r'), "CR inside {:?}", String::from_utf8_lossy(line));
    }
    // What an EventSource hands the page: data lines joined with LF.
    assert_eq!(got.data.join("\n"), split_lines(data).join("\n"));
}

/// The raw (HTTP/1.0), chunked and gzip wires carry the same SSE bytes.
fn check_wires(frame: &Frame, sse: &[u8]) {
    assert_eq!(frame.body().as_ref(), sse, "raw wire");
    assert_eq!(frame.for_stream(Wire::Raw).as_ref(), sse, "raw wire");
    assert_eq!(frame.for_stream(Wire::Chunked).as_ref(), frame.chunk().as_ref());
    let mut chunked = Vec::new();
    put_chunk(&mut chunked, sse, true);
    assert_eq!(chunked, frame.chunk().as_ref(), "http::put_chunk frames it the same");
    // Stored (no gzip chunk yet), always compressed, and the broker's default choice.
    assert_eq!(inflate(unchunk(&frame.for_stream(Wire::Gzip))), sse, "stored gzip chunk");
    for min in [0, 1024] {
        let gz = frame.clone().with_gzip(min);
        assert_eq!(gz.gzip_len(), Some(gz.for_stream(Wire::Gzip).len()));
        assert_eq!(inflate(unchunk(&gz.for_stream(Wire::Gzip))), sse, "gzip chunk (min {min})");
    }
    let copy = frame.copied();
    assert_eq!(copy.chunk(), frame.chunk());
}

/// A server notice carrying `text` as JSON: one event, no id, the JSON back in one data line.
fn check_notice(text: &str) {
    let json = serde_json::Value::String(text.to_owned()).to_string();
    let frame = encode_notice("ringcast-gap", &json);
    let sse = unchunk(frame.chunk()).to_vec();
    check_wires(&frame, &sse);
    let (events, pending) = parse_sse(&sse);
    assert_eq!(pending, SseEvent::default());
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].id.as_deref(), events[0].event.as_deref()), (None, Some("ringcast-gap")));
    assert_eq!(events[0].data.len(), 1, "JSON stays on one data line");
    let back: serde_json::Value = serde_json::from_str(&events[0].data[0]).expect("JSON");
    assert_eq!(back.as_str(), Some(text));
}

/// `retry:` sets the delay and dispatches nothing.
fn check_retry(millis: u64) {
    let frame = retry_frame(millis);
    let sse = unchunk(frame.chunk()).to_vec();
    check_wires(&frame, &sse);
    let (events, pending) = parse_sse(&sse);
    assert!(events.is_empty(), "retry frame dispatches no event");
    assert_eq!(pending.retry, Some(millis.to_string()));
}
