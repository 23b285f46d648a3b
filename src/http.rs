//! HTTP/1.1 request parsing on httparse, chunked body decoding, and response writing.
//! Incomplete input is a state (`Ok(None)`), not an error; every error maps to one status.

use bytes::{Buf, BufMut, BytesMut};

/// Headers beyond this count are answered 431 like an oversized head.
const MAX_HEADERS: usize = 64;
/// A chunk-size line or trailer line longer than this is malformed.
const MAX_CHUNK_LINE: usize = 1024;
/// Trailer fields are bounded like a head: more lines or bytes than this are answered 431.
const MAX_TRAILER_LINES: usize = MAX_HEADERS;
const MAX_TRAILER_BYTES: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Options,
    Other,
}

/// What the server needs from one request head; the head bytes are consumed after parsing.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    /// HTTP/1.0 when false: answered, then closed.
    pub http11: bool,
    pub keep_alive: bool,
    pub body: BodyKind,
    /// As sent (a POST needs it or chunked encoding).
    pub content_length: Option<usize>,
    pub content_type: Option<String>,
    pub last_event_id: Option<String>,
    /// `Authorization` as sent.
    pub authorization: Option<String>,
    /// `Cookie` as sent (a token may travel there: EventSource cannot set headers).
    pub cookie: Option<String>,
    /// `Origin` as sent (browsers, for CORS).
    pub origin: Option<String>,
    /// `X-Forwarded-For` and `X-Real-IP` as sent (used only from --trust-proxy peers).
    pub forwarded_for: Option<String>,
    pub real_ip: Option<String>,
    /// `Accept-Encoding` allows gzip.
    pub accepts_gzip: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(usize),
    Chunked,
}

/// Everything that ends a request with an error status; `status()` is the one mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    BadRequest(&'static str),
    BadInput(String),
    /// No or a wrong publish credential (answered with `WWW-Authenticate: Bearer`).
    Unauthorized,
    /// This client may not do this (e.g. publish from outside --publish-from).
    Forbidden(&'static str),
    NotFound,
    MethodNotAllowed(&'static str),
    Timeout,
    LengthRequired,
    PayloadTooLarge,
    HeadTooLarge,
    /// A transfer coding this server does not implement (RFC 9112 §6.1: 501).
    NotImplemented,
    /// Past a per-client rate (answered with `Retry-After`).
    TooManyRequests,
    Unavailable,
}

impl HttpError {
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HttpError::BadRequest(_) | HttpError::BadInput(_) => (400, "Bad Request"),
            HttpError::Unauthorized => (401, "Unauthorized"),
            HttpError::Forbidden(_) => (403, "Forbidden"),
            HttpError::NotFound => (404, "Not Found"),
            HttpError::MethodNotAllowed(_) => (405, "Method Not Allowed"),
            HttpError::Timeout => (408, "Request Timeout"),
            HttpError::LengthRequired => (411, "Length Required"),
            HttpError::PayloadTooLarge => (413, "Content Too Large"),
            HttpError::HeadTooLarge => (431, "Request Header Fields Too Large"),
            HttpError::NotImplemented => (501, "Not Implemented"),
            HttpError::TooManyRequests => (429, "Too Many Requests"),
            HttpError::Unavailable => (503, "Service Unavailable"),
        }
    }

    fn reason(&self) -> &str {
        match self {
            HttpError::BadRequest(why) => why,
            HttpError::BadInput(why) => why,
            HttpError::Unauthorized => "a valid token or publish key is needed (Authorization: Bearer ...)",
            HttpError::Forbidden(why) => why,
            HttpError::NotFound => "no such path",
            HttpError::MethodNotAllowed(_) => "method not allowed",
            HttpError::Timeout => "request head not received in time",
            HttpError::LengthRequired => "a body needs Content-Length or chunked encoding",
            HttpError::PayloadTooLarge => "body too large",
            HttpError::HeadTooLarge => "request head too large",
            HttpError::NotImplemented => "transfer coding not implemented (only chunked)",
            HttpError::TooManyRequests => "too many requests from this address, retry later",
            HttpError::Unavailable => "server at capacity, retry later",
        }
    }

    /// The whole response: plain-text reason, `Connection: close`; `cors`: its CORS lines.
    pub fn write_response(&self, out: &mut Vec<u8>, cors: &str) {
        let (code, text) = self.status();
        let mut extra = String::from(cors);
        match self {
            HttpError::MethodNotAllowed(allow) => extra.push_str(&format!("Allow: {allow}\r\n")),
            HttpError::Unavailable | HttpError::TooManyRequests => extra.push_str("Retry-After: 1\r\n"),
            HttpError::Unauthorized => extra.push_str("WWW-Authenticate: Bearer realm=\"ringcast\"\r\n"),
            _ => {}
        }
        let body = format!("{}\n", self.reason());
        write_head(out, code, text, "text/plain; charset=utf-8", body.len(), &extra, false);
        out.extend_from_slice(body.as_bytes());
    }
}

fn header_eq(name: &str, want: &str) -> bool {
    name.eq_ignore_ascii_case(want)
}

fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| std::str::from_utf8(t).is_ok_and(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Whether an `Accept-Encoding` value admits `coding` (listed without `q=0`).
fn accepts_coding(value: &[u8], coding: &str) -> bool {
    let Ok(value) = std::str::from_utf8(value) else { return false };
    value.split(',').any(|item| {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim();
        let refused = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")).is_some_and(|q| q.trim().parse::<f32>() == Ok(0.0))
        });
        name.eq_ignore_ascii_case(coding) && !refused
    })
}

/// Parses one request head from the front of `buf`. `Ok(None)`: need more bytes.
/// On success the head is removed from `buf`; the body (if any) follows in `buf`.
pub fn parse_request(buf: &mut BytesMut, max_head: usize) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > max_head { Err(HttpError::HeadTooLarge) } else { Ok(None) };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(_) => return Err(HttpError::BadRequest("malformed request")),
    };
    if head_len > max_head {
        return Err(HttpError::HeadTooLarge);
    }
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("/");
    if !target.starts_with('/') && target != "*" {
        return Err(HttpError::BadRequest("request target must be a path"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !valid_query(query) {
        return Err(HttpError::BadRequest("invalid percent-encoding or UTF-8 in the query"));
    }
    let http11 = req.version == Some(1);

    let mut content_length: Option<usize> = None;
    let mut codings: Vec<String> = Vec::new();
    let mut has_te = false;
    let mut keep_alive = http11;
    let mut content_type = None;
    let mut last_event_id = None;
    let mut authorization = None;
    let mut origin = None;
    let mut cookie = None;
    let mut forwarded_for: Option<String> = None;
    let mut real_ip = None;
    let mut accepts_gzip = false;
    let mut hosts = 0;
    for h in req.headers.iter() {
        if header_eq(h.name, "host") {
            hosts += 1;
        } else if header_eq(h.name, "content-length") {
            let text = std::str::from_utf8(h.value).map_err(|_| HttpError::BadRequest("bad Content-Length"))?;
            let text = text.trim();
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::BadRequest("bad Content-Length"));
            }
            // A huge value saturates; it is rejected against --max-body later.
            let n = text.parse::<usize>().unwrap_or(usize::MAX);
            if content_length.is_some_and(|old| old != n) {
                return Err(HttpError::BadRequest("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if header_eq(h.name, "transfer-encoding") {
            // Every Transfer-Encoding line counts: two lines are one list (RFC 9110 §5.3).
            has_te = true;
            let text = std::str::from_utf8(h.value).map_err(|_| HttpError::BadRequest("bad Transfer-Encoding"))?;
            codings.extend(text.split(',').map(|c| c.trim().to_ascii_lowercase()));
        } else if header_eq(h.name, "connection") {
            if has_token(h.value, "close") {
                keep_alive = false;
            } else if !http11 && has_token(h.value, "keep-alive") {
                // HTTP/1.0 keep-alive is not offered: answered, then closed.
                keep_alive = false;
            }
        } else if header_eq(h.name, "content-type") {
            content_type = std::str::from_utf8(h.value).ok().map(|v| v.trim().to_ascii_lowercase());
        } else if header_eq(h.name, "accept-encoding") {
            accepts_gzip |= accepts_coding(h.value, "gzip");
        } else if header_eq(h.name, "last-event-id") {
            last_event_id = std::str::from_utf8(h.value).ok().map(|v| v.trim().to_owned());
        } else if header_eq(h.name, "authorization") {
            authorization = std::str::from_utf8(h.value).ok().map(|v| v.trim().to_owned());
        } else if header_eq(h.name, "origin") {
            origin = std::str::from_utf8(h.value).ok().map(|v| v.trim().to_owned());
        } else if header_eq(h.name, "x-forwarded-for") {
            // Several lines are one list, in order.
            if let Ok(v) = std::str::from_utf8(h.value) {
                forwarded_for = Some(match forwarded_for {
                    Some(before) => format!("{before}, {}", v.trim()),
                    None => v.trim().to_owned(),
                });
            }
        } else if header_eq(h.name, "cookie") {
            cookie = std::str::from_utf8(h.value).ok().map(|v| v.trim().to_owned());
        } else if header_eq(h.name, "x-real-ip") {
            real_ip = std::str::from_utf8(h.value).ok().map(|v| v.trim().to_owned());
        }
    }
    // RFC 9112 §3.2: an HTTP/1.1 request names exactly one Host (two could route differently
    // at a proxy and here).
    if hosts > 1 || (http11 && hosts == 0) {
        return Err(HttpError::BadRequest("an HTTP/1.1 request needs exactly one Host header"));
    }
    if has_te && content_length.is_some() {
        return Err(HttpError::BadRequest("both Content-Length and Transfer-Encoding"));
    }
    let chunked = has_te && check_codings(&codings)?;
    let body = match (content_length, chunked) {
        (_, true) => BodyKind::Chunked,
        (Some(0), _) | (None, false) => BodyKind::None,
        (Some(n), _) => BodyKind::Length(n),
    };
    let request = Request {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        http11,
        keep_alive,
        body,
        content_length,
        content_type,
        last_event_id,
        authorization,
        cookie,
        origin,
        forwarded_for,
        real_ip,
        accepts_gzip,
    };
    buf.advance(head_len);
    Ok(Some(request))
}

/// RFC 9112 §6.1: chunked exactly once and last; any other coding is one this server does not
/// implement (501). Returns true (the body is chunked) when the list is acceptable.
fn check_codings(codings: &[String]) -> Result<bool, HttpError> {
    if codings.iter().any(|c| c.is_empty()) {
        return Err(HttpError::BadRequest("empty Transfer-Encoding"));
    }
    if codings.last().map(String::as_str) != Some("chunked") {
        return Err(HttpError::BadRequest("chunked must be the final transfer coding"));
    }
    if codings.iter().filter(|c| *c == "chunked").count() > 1 {
        return Err(HttpError::BadRequest("chunked applied more than once"));
    }
    if codings.len() > 1 {
        return Err(HttpError::NotImplemented);
    }
    Ok(true)
}

/// A query whose percent-escapes are all `%XX` and that decodes to UTF-8 (`+` is a space).
fn valid_query(query: &str) -> bool {
    let bytes = query.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16);
                let (Some(hi), Some(lo)) =
                    (bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b)))
                else {
                    return false;
                };
                decoded.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    std::str::from_utf8(&decoded).is_ok()
}

#[derive(Debug)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
    /// Trailer lines and bytes seen so far (bounded like a head).
    Trailer(usize, usize),
    Done,
}

/// Incremental decoder of a chunked request body; consumes what it decodes from the buffer.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    body: Vec<u8>,
    max: usize,
}

impl ChunkedDecoder {
    pub fn new(max: usize) -> Self {
        ChunkedDecoder { state: ChunkState::Size, body: Vec::new(), max }
    }

    /// Decodes from `buf`; `Ok(true)` once the last chunk and trailers are in.
    pub fn feed(&mut self, buf: &mut BytesMut) -> Result<bool, HttpError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(buf)? else { return Ok(false) };
                    let size = parse_chunk_size(&line)?;
                    if size > self.max.saturating_sub(self.body.len()) {
                        return Err(HttpError::PayloadTooLarge);
                    }
                    self.state = if size == 0 { ChunkState::Trailer(0, 0) } else { ChunkState::Data(size) };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(false);
                    }
                    let n = left.min(buf.len());
                    self.body.extend_from_slice(&buf[..n]);
                    buf.advance(n);
                    self.state = if n == left { ChunkState::DataEnd } else { ChunkState::Data(left - n) };
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(false);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(HttpError::BadRequest("chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer(lines, bytes) => {
                    let Some(line) = take_line(buf)? else { return Ok(false) };
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    } else if lines + 1 > MAX_TRAILER_LINES || bytes + line.len() + 2 > MAX_TRAILER_BYTES {
                        return Err(HttpError::HeadTooLarge);
                    } else {
                        self.state = ChunkState::Trailer(lines + 1, bytes + line.len() + 2);
                    }
                }
                ChunkState::Done => return Ok(true),
            }
        }
    }

    pub fn into_body(self) -> Vec<u8> {
        self.body
    }
}

/// `1*HEXDIG [ BWS ";" chunk-ext ]`: no sign, no leading space, at most 16 digits.
fn parse_chunk_size(line: &[u8]) -> Result<usize, HttpError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    let rest_ok = rest.is_empty() || rest.iter().find(|&&b| b != b' ' && b != b'\t') == Some(&b';');
    if digits == 0 || digits > 16 || !rest_ok {
        return Err(HttpError::BadRequest("bad chunk size"));
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| HttpError::BadRequest("bad chunk size"))?;
    usize::from_str_radix(text, 16).map_err(|_| HttpError::BadRequest("bad chunk size"))
}

/// Removes one CRLF-terminated line from the front of `buf` (without the CRLF). A bare LF is
/// an error at once (waiting for a CR that never comes would hold the client until timeout).
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, HttpError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(pos) if pos == 0 || buf[pos - 1] != b'\r' => Err(HttpError::BadRequest("bare LF in chunked body")),
        Some(pos) if pos - 1 <= MAX_CHUNK_LINE => {
            let line = buf.split_to(pos - 1);
            buf.advance(2);
            Ok(Some(line))
        }
        Some(_) => Err(HttpError::BadRequest("chunk line too long")),
        None if buf.len() > MAX_CHUNK_LINE => Err(HttpError::BadRequest("chunk line too long")),
        None => Ok(None),
    }
}

/// Status line and the headers every response carries.
pub fn write_head(
    out: &mut Vec<u8>,
    code: u16,
    text: &str,
    content_type: &str,
    content_length: usize,
    extra: &str,
    keep_alive: bool,
) {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    // write! into a Vec cannot fail.
    let _ = std::io::Write::write_fmt(
        out,
        format_args!(
            "HTTP/1.1 {code} {text}\r\nContent-Type: {content_type}\r\nContent-Length: {content_length}\r\n\
             Cache-Control: no-store\r\nConnection: {connection}\r\n{extra}\r\n"
        ),
    );
}

/// A complete response with a body; `cors`: its CORS header lines.
pub fn write_response(
    out: &mut Vec<u8>,
    code: u16,
    text: &str,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    cors: &str,
) {
    write_head(out, code, text, content_type, body.len(), cors, keep_alive);
    out.extend_from_slice(body);
}

/// Head of an event stream: chunked on HTTP/1.1, unframed until close on HTTP/1.0.
pub fn write_stream_head(out: &mut Vec<u8>, chunked: bool, gzip: bool, cors: &str) {
    if gzip {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nVary: Accept-Encoding\r\n");
        out.extend_from_slice(
            b"Content-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n\
              X-Accel-Buffering: no\r\n",
        );
        out.extend_from_slice(cors.as_bytes());
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        return;
    }
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n\
          X-Accel-Buffering: no\r\n",
    );
    out.extend_from_slice(cors.as_bytes());
    if chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
    } else {
        out.extend_from_slice(b"Connection: close\r\n\r\n");
    }
}

/// Appends `sse` as one chunk (or raw when not chunked).
pub fn put_chunk(out: &mut Vec<u8>, sse: &[u8], chunked: bool) {
    if chunked {
        let _ = std::io::Write::write_fmt(out, format_args!("{:x}\r\n", sse.len()));
        out.put_slice(sse);
        out.put_slice(b"\r\n");
    } else {
        out.put_slice(sse);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<Request>, HttpError> {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_request(&mut buf, 8192)
    }

    #[test]
    fn partial_is_not_an_error() {
        assert!(parse("GET /events HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn parses_path_query_and_headers() {
        let r = parse("GET /events?topic=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1-2\r\n\r\n").unwrap().unwrap();
        assert_eq!((r.method, r.path.as_str(), r.query.as_str()), (Method::Get, "/events", "topic=a"));
        assert_eq!(r.last_event_id.as_deref(), Some("1-2"));
        assert!(r.http11 && r.keep_alive);
    }

    #[test]
    fn errors_map_to_statuses() {
        let cases = [
            ("GARBAGE\r\n\r\n", 400),
            ("POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n", 400),
            ("POST /publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        ];
        for (text, code) in cases {
            assert_eq!(parse(text).unwrap_err().status().0, code, "{text:?}");
        }
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "a".repeat(9000));
        assert_eq!(parse(&big).unwrap_err().status().0, 431);
        assert_eq!(parse(&"a".repeat(9000)).unwrap_err().status().0, 431);
        assert_eq!(parse("GET /a\x01 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err().status().0, 400);
    }

    #[test]
    fn accept_encoding() {
        for (value, want) in [
            ("gzip", true),
            ("gzip, deflate", true),
            ("br;q=1, GZIP;q=0.5", true),
            ("gzip;q=0", false),
            ("deflate", false),
        ] {
            assert_eq!(accepts_coding(value.as_bytes(), "gzip"), want, "{value}");
        }
    }

    #[test]
    fn http10_closes() {
        let r = parse("GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap();
        assert!(!r.http11 && !r.keep_alive);
    }

    #[test]
    fn chunked_decoding_byte_by_byte() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let mut dec = ChunkedDecoder::new(100);
        let mut buf = BytesMut::new();
        let mut done = false;
        for &b in wire.iter() {
            buf.put_u8(b);
            if dec.feed(&mut buf).unwrap() {
                done = true;
                break;
            }
        }
        assert!(done);
        assert_eq!(dec.into_body(), b"hello world");
    }

    #[test]
    fn chunked_limits() {
        let mut dec = ChunkedDecoder::new(4);
        let mut buf = BytesMut::from(&b"5\r\nhello\r\n0\r\n\r\n"[..]);
        assert_eq!(dec.feed(&mut buf).unwrap_err(), HttpError::PayloadTooLarge);
        let mut dec = ChunkedDecoder::new(100);
        let mut buf = BytesMut::from(&b"zz\r\n"[..]);
        assert_eq!(dec.feed(&mut buf).unwrap_err().status().0, 400);
    }
}
