//! Incremental parsing of an SSE response: HTTP response head, body framing
//! (chunked, Content-Length or until close) and the `text/event-stream` format.
//!
//! Everything is fed in arbitrary pieces (events and chunk headers may be split
//! across reads) and only a bounded prefix of each line is kept, so a
//! subscriber's state stays small whatever the event size.

use std::fmt;

/// The data payload the publisher embeds: `T=<monotonic ns> S=<seq> P=<publisher> <padding>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// CLOCK_MONOTONIC nanoseconds at publish time.
    pub t_ns: u64,
    /// Sequence number, per (publisher, topic), starting at 0.
    pub seq: u64,
    /// Publisher index.
    pub publisher: u32,
}

impl Payload {
    /// Writes the payload, padded with `x` to at least `size` bytes.
    pub fn write_padded(&self, size: usize, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(format!("T={} S={} P={}", self.t_ns, self.seq, self.publisher).as_bytes());
        let written = out.len() - start;
        if written < size {
            out.push(b' ');
            out.resize(start + size.max(written + 1), b'x');
        }
    }

    /// Parses the start of a data line; `None` for data that is not ours.
    pub fn parse(data: &[u8]) -> Option<Payload> {
        let (t_ns, rest) = field(data, b"T=")?;
        let (seq, rest) = field(rest.strip_prefix(b" ")?, b"S=")?;
        let (publisher, rest) = field(rest.strip_prefix(b" ")?, b"P=")?;
        if !(rest.is_empty() || rest[0] == b' ') {
            return None;
        }
        Some(Payload { t_ns, seq, publisher: u32::try_from(publisher).ok()? })
    }
}

/// Parses `<name><decimal>` at the start of `data`.
fn field<'a>(data: &'a [u8], name: &[u8]) -> Option<(u64, &'a [u8])> {
    let rest = data.strip_prefix(name)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let mut value: u64 = 0;
    for &b in &rest[..digits] {
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((value, &rest[digits..]))
}

/// What the stream parser reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// The response head was complete; the status code.
    Head { status: u16 },
    /// A dispatched SSE event with data: ours (`Some`) or foreign (`None`).
    Event(Option<Payload>),
    /// The body ended by its framing (terminal chunk or Content-Length).
    End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    HeadTooLarge,
    BadStatusLine,
    BadHeader,
    BadChunk,
    DataAfterEnd,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ParseError::HeadTooLarge => "response head too large",
            ParseError::BadStatusLine => "bad status line",
            ParseError::BadHeader => "bad response header",
            ParseError::BadChunk => "bad chunked framing",
            ParseError::DataAfterEnd => "data after end of body",
        };
        f.write_str(s)
    }
}

impl std::error::Error for ParseError {}

const MAX_HEAD: usize = 16 * 1024;

/// Response body framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    UntilClose,
}

/// The parsed parts of a response head that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
    /// The server said `Connection: close` (or answered HTTP/1.0 without keep-alive).
    pub close: bool,
}

/// Parses a complete response head (status line + headers, without the final empty line).
pub fn parse_head(head: &[u8]) -> Result<ResponseHead, ParseError> {
    let text = std::str::from_utf8(head).map_err(|_| ParseError::BadHeader)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let status_line = lines.next().ok_or(ParseError::BadStatusLine)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(ParseError::BadStatusLine);
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or(ParseError::BadStatusLine)?;
    let http10 = version == "HTTP/1.0";
    let mut chunked = false;
    let mut length = None;
    let mut close = http10;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once(':').ok_or(ParseError::BadHeader)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.rsplit(',').next().is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<u64>().map_err(|_| ParseError::BadHeader)?);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if no_body {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(ResponseHead { status, framing, close })
}

/// Finds the end of a response head (`\r\n\r\n` or `\n\n`); returns (head length, bytes to skip).
fn find_head_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let start = from.saturating_sub(3);
    for i in start..buf.len() {
        if buf[i] == b'\n' {
            if i >= 1 && buf[i - 1] == b'\n' {
                return Some((i - 1, i + 1));
            }
            if i >= 3 && &buf[i - 3..i] == b"\r\n\r" {
                return Some((i - 3, i + 1));
            }
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size { value: u64, digits: u8 },
    Extension,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    TrailerLineStart,
    TrailerLine,
    TrailerLf,
    Done,
}

/// Incremental `Transfer-Encoding: chunked` decoder.
#[derive(Debug, Clone)]
pub struct ChunkDecoder {
    state: ChunkState,
    size: u64,
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        ChunkDecoder { state: ChunkState::Size { value: 0, digits: 0 }, size: 0 }
    }
}

impl ChunkDecoder {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Feeds framed bytes, passing each piece of chunk data to `out`.
    /// Returns the number of bytes consumed: less than `input.len()` only once
    /// the terminal chunk and trailer are complete.
    pub fn feed(&mut self, input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<usize, ParseError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size { value, digits } => {
                    if let Some(d) = (b as char).to_digit(16) {
                        if digits >= 15 {
                            return Err(ParseError::BadChunk);
                        }
                        self.state = ChunkState::Size { value: value * 16 + u64::from(d), digits: digits + 1 };
                    } else if digits == 0 {
                        return Err(ParseError::BadChunk);
                    } else {
                        self.size = value;
                        match b {
                            b'\r' => self.state = ChunkState::SizeLf,
                            b'\n' => self.end_size_line(),
                            b';' | b' ' | b'\t' => self.state = ChunkState::Extension,
                            _ => return Err(ParseError::BadChunk),
                        }
                    }
                    i += 1;
                }
                ChunkState::Extension => {
                    match b {
                        b'\r' => self.state = ChunkState::SizeLf,
                        b'\n' => self.end_size_line(),
                        _ => {}
                    }
                    i += 1;
                }
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(ParseError::BadChunk);
                    }
                    self.end_size_line();
                    i += 1;
                }
                ChunkState::Data(remaining) => {
                    let avail = (input.len() - i) as u64;
                    let take = remaining.min(avail) as usize;
                    out(&input[i..i + take]);
                    i += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 { ChunkState::DataCr } else { ChunkState::Data(left) };
                }
                ChunkState::DataCr => {
                    match b {
                        b'\r' => self.state = ChunkState::DataLf,
                        b'\n' => self.state = ChunkState::Size { value: 0, digits: 0 },
                        _ => return Err(ParseError::BadChunk),
                    }
                    i += 1;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(ParseError::BadChunk);
                    }
                    self.state = ChunkState::Size { value: 0, digits: 0 };
                    i += 1;
                }
                ChunkState::TrailerLineStart => {
                    self.state = match b {
                        b'\r' => ChunkState::TrailerLf,
                        b'\n' => ChunkState::Done,
                        _ => ChunkState::TrailerLine,
                    };
                    i += 1;
                }
                ChunkState::TrailerLine => {
                    if b == b'\n' {
                        self.state = ChunkState::TrailerLineStart;
                    }
                    i += 1;
                }
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err(ParseError::BadChunk);
                    }
                    self.state = ChunkState::Done;
                    i += 1;
                }
                ChunkState::Done => return Ok(i),
            }
        }
        Ok(i)
    }

    fn end_size_line(&mut self) {
        self.state = if self.size == 0 { ChunkState::TrailerLineStart } else { ChunkState::Data(self.size) };
    }
}

/// How many bytes of each line are kept; enough for the field name and our payload header.
const LINE_PREFIX: usize = 128;

/// Incremental `text/event-stream` parser (lines end in LF, CRLF or CR).
#[derive(Debug, Clone, Default)]
pub struct SseParser {
    /// Prefix of the line being assembled across feeds.
    line: Vec<u8>,
    /// Full length of that line so far (may exceed `line.len()`).
    line_total: usize,
    /// The previous piece ended in CR: skip a LF at the start of the next.
    skip_lf: bool,
    /// The event being assembled has at least one data line.
    has_data: bool,
    /// Payload parsed from the event's first data line.
    payload: Option<Payload>,
}

impl SseParser {
    /// Feeds body bytes; every dispatched event with data is passed to `on_event`.
    pub fn feed(&mut self, mut data: &[u8], on_event: &mut impl FnMut(Option<Payload>)) {
        if self.skip_lf && !data.is_empty() {
            self.skip_lf = false;
            if data[0] == b'\n' {
                data = &data[1..];
            }
        }
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    let part = &data[..i];
                    if self.line_total == 0 {
                        self.process_line(part, part.len(), on_event);
                    } else {
                        self.append(part);
                        let line = std::mem::take(&mut self.line);
                        self.process_line(&line, self.line_total, on_event);
                        self.line = line;
                        self.line.clear();
                        self.line_total = 0;
                    }
                    let cr = data[i] == b'\r';
                    data = &data[i + 1..];
                    if cr {
                        match data.first() {
                            Some(b'\n') => data = &data[1..],
                            Some(_) => {}
                            None => self.skip_lf = true,
                        }
                    }
                }
                None => {
                    self.append(data);
                    break;
                }
            }
        }
    }

    fn append(&mut self, part: &[u8]) {
        let room = LINE_PREFIX.saturating_sub(self.line.len());
        self.line.extend_from_slice(&part[..part.len().min(room)]);
        self.line_total += part.len();
    }

    fn process_line(&mut self, line: &[u8], total: usize, on_event: &mut impl FnMut(Option<Payload>)) {
        if total == 0 {
            if self.has_data {
                on_event(self.payload.take());
            }
            self.has_data = false;
            self.payload = None;
            return;
        }
        if line[0] == b':' {
            return; // comment
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        // A truncated line whose field name exceeds the kept prefix has no
        // colon in `line`, so `name` is the whole prefix and not "data".
        if name == b"data" {
            if !self.has_data {
                self.payload = Payload::parse(value);
            }
            self.has_data = true;
        }
    }
}

enum Phase {
    Head(Vec<u8>),
    Body { framing: BodyState, sse: SseParser },
    Ended,
}

enum BodyState {
    Chunked(ChunkDecoder),
    Length(u64),
    UntilClose,
}

/// Parser for one subscriber connection: response head, body framing and SSE.
pub struct StreamParser {
    phase: Phase,
}

impl Default for StreamParser {
    fn default() -> Self {
        StreamParser { phase: Phase::Head(Vec::new()) }
    }
}

impl StreamParser {
    /// Feeds bytes read from the socket.
    pub fn feed(&mut self, mut data: &[u8], on: &mut impl FnMut(StreamEvent)) -> Result<(), ParseError> {
        while !data.is_empty() {
            match &mut self.phase {
                Phase::Head(buf) => {
                    let from = buf.len();
                    let room = MAX_HEAD + 4 - from;
                    let take = data.len().min(room);
                    buf.extend_from_slice(&data[..take]);
                    match find_head_end(buf, from) {
                        Some((head_len, skip)) => {
                            let head = parse_head(&buf[..head_len])?;
                            let rest_in_buf = buf.len() - skip;
                            // Bytes of `data` that belong to the body.
                            data = &data[take - rest_in_buf..];
                            on(StreamEvent::Head { status: head.status });
                            let framing = match head.framing {
                                Framing::Chunked => BodyState::Chunked(ChunkDecoder::default()),
                                Framing::Length(0) => {
                                    self.phase = Phase::Ended;
                                    on(StreamEvent::End);
                                    continue;
                                }
                                Framing::Length(n) => BodyState::Length(n),
                                Framing::UntilClose => BodyState::UntilClose,
                            };
                            self.phase = Phase::Body { framing, sse: SseParser::default() };
                        }
                        None if buf.len() > MAX_HEAD => return Err(ParseError::HeadTooLarge),
                        None => return Ok(()),
                    }
                }
                Phase::Body { framing, sse } => {
                    let mut sink = |p| on(StreamEvent::Event(p));
                    let ended = match framing {
                        BodyState::Chunked(dec) => {
                            let used = dec.feed(data, &mut |piece| sse.feed(piece, &mut sink))?;
                            data = &data[used..];
                            dec.is_done()
                        }
                        BodyState::Length(left) => {
                            let take = (*left).min(data.len() as u64) as usize;
                            sse.feed(&data[..take], &mut sink);
                            data = &data[take..];
                            *left -= take as u64;
                            *left == 0
                        }
                        BodyState::UntilClose => {
                            sse.feed(data, &mut sink);
                            data = &[];
                            false
                        }
                    };
                    if ended {
                        self.phase = Phase::Ended;
                        on(StreamEvent::End);
                    }
                }
                Phase::Ended => return Err(ParseError::DataAfterEnd),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(seq: u64) -> Payload {
        Payload { t_ns: 1_000_000 + seq, seq, publisher: 0 }
    }

    fn data(seq: u64, size: usize) -> Vec<u8> {
        let mut v = Vec::new();
        payload(seq).write_padded(size, &mut v);
        v
    }

    /// Feeds `input` in pieces of `step` bytes; collects the events.
    fn run(input: &[u8], step: usize) -> Result<Vec<StreamEvent>, ParseError> {
        let mut p = StreamParser::default();
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            p.feed(piece, &mut |e| out.push(e))?;
        }
        Ok(out)
    }

    fn chunk(body: &[u8]) -> Vec<u8> {
        let mut v = format!("{:x}\r\n", body.len()).into_bytes();
        v.extend_from_slice(body);
        v.extend_from_slice(b"\r\n");
        v
    }

    fn event(seq: u64, size: usize) -> Vec<u8> {
        let mut v = format!("id: 1700000000000-{seq}\nevent: tick\ndata: ").into_bytes();
        v.extend_from_slice(&data(seq, size));
        v.extend_from_slice(b"\n\n");
        v
    }

    const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\
Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";

    fn chunked_stream(n: u64, size: usize) -> Vec<u8> {
        let mut s = CHUNKED_HEAD.to_vec();
        s.extend(chunk(b"retry: 2000\n:ok\n"));
        for seq in 0..n {
            s.extend(chunk(&event(seq, size)));
            if seq % 3 == 0 {
                s.extend(chunk(b":\n"));
            }
        }
        s
    }

    fn expected(n: u64) -> Vec<StreamEvent> {
        let mut v = vec![StreamEvent::Head { status: 200 }];
        v.extend((0..n).map(|s| StreamEvent::Event(Some(payload(s)))));
        v
    }

    #[test]
    fn payload_roundtrip_and_padding() {
        let p = Payload { t_ns: 123456789012345, seq: 42, publisher: 3 };
        let mut v = Vec::new();
        p.write_padded(100, &mut v);
        assert_eq!(v.len(), 100);
        assert!(v.starts_with(b"T=123456789012345 S=42 P=3 xxx"));
        assert_eq!(Payload::parse(&v), Some(p));
        let mut short = Vec::new();
        p.write_padded(1, &mut short);
        assert_eq!(short, b"T=123456789012345 S=42 P=3");
        assert_eq!(Payload::parse(&short), Some(p));
        assert_eq!(Payload::parse(b"hello"), None);
        assert_eq!(Payload::parse(b"T=1 S=2"), None);
        assert_eq!(Payload::parse(b"T=1 S=2 P=3x"), None);
        assert_eq!(Payload::parse(b"T=99999999999999999999999 S=2 P=3"), None);
    }

    #[test]
    fn chunked_stream_any_split() {
        let input = chunked_stream(10, 200);
        for step in [1, 2, 3, 5, 7, 16, 61, 4096] {
            assert_eq!(run(&input, step).unwrap(), expected(10), "step {step}");
        }
    }

    #[test]
    fn chunked_terminal_chunk_ends_stream() {
        let mut input = chunked_stream(2, 10);
        input.extend_from_slice(b"0\r\n\r\n");
        let mut want = expected(2);
        want.push(StreamEvent::End);
        for step in [1, 4, 1000] {
            assert_eq!(run(&input, step).unwrap(), want);
        }
        // Drain case from the contract: a retry chunk, then the terminal chunk.
        let mut input = CHUNKED_HEAD.to_vec();
        input.extend(chunk(b"retry: 2000\n"));
        input.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(run(&input, 3).unwrap(), vec![StreamEvent::Head { status: 200 }, StreamEvent::End]);
        input.extend_from_slice(b"x");
        assert_eq!(run(&input, 100), Err(ParseError::DataAfterEnd));
    }

    #[test]
    fn event_split_over_chunks() {
        // One event spread over several chunks, with chunk extensions.
        let ev = event(7, 300);
        let mut input = CHUNKED_HEAD.to_vec();
        for (i, part) in ev.chunks(13).enumerate() {
            if i % 2 == 0 {
                input.extend_from_slice(format!("{:X};ext=1\r\n", part.len()).as_bytes());
                input.extend_from_slice(part);
                input.extend_from_slice(b"\r\n");
            } else {
                input.extend(chunk(part));
            }
        }
        for step in [1, 9, 1 << 20] {
            assert_eq!(
                run(&input, step).unwrap(),
                vec![StreamEvent::Head { status: 200 }, StreamEvent::Event(Some(payload(7)))]
            );
        }
    }

    #[test]
    fn plain_stream_until_close() {
        let mut input = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\nretry: 2000\n:ok\n".to_vec();
        for seq in 0..5 {
            input.extend(event(seq, 64));
        }
        for step in [1, 2, 11, 10_000] {
            assert_eq!(run(&input, step).unwrap(), expected(5));
        }
    }

    #[test]
    fn content_length_body_and_lf_only_head() {
        let ev = event(0, 20);
        let mut input = format!("HTTP/1.1 200 OK\nContent-Length: {}\n\n", ev.len()).into_bytes();
        input.extend_from_slice(&ev);
        let mut want = expected(1);
        want.push(StreamEvent::End);
        assert_eq!(run(&input, 1).unwrap(), want);
        assert_eq!(run(&input, 1000).unwrap(), want);
    }

    #[test]
    fn error_status_and_bad_input() {
        let input = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbad";
        assert_eq!(run(input, 5).unwrap(), vec![StreamEvent::Head { status: 400 }, StreamEvent::End]);
        assert_eq!(run(b"SSH-2.0\r\n\r\n", 4), Err(ParseError::BadStatusLine));
        let mut bad_chunk = CHUNKED_HEAD.to_vec();
        bad_chunk.extend_from_slice(b"zz\r\n");
        assert_eq!(run(&bad_chunk, 1), Err(ParseError::BadChunk));
        let big = vec![b'a'; MAX_HEAD + 10];
        let mut head = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        head.extend(big);
        assert_eq!(run(&head, 1000), Err(ParseError::HeadTooLarge));
    }

    #[test]
    fn sse_line_endings_and_fields() {
        let mut got = Vec::new();
        let mut p = SseParser::default();
        let text = b"data: T=5 S=1 P=0\r\rdata:T=6 S=2 P=1\r\ndata: second line\r\n\r\n\
: comment\n\nevent: x\ndata\n\ndata: foreign\n\nid: 3\n\ndatax: T=1 S=1 P=1\n\n";
        for step in [1, 2, 3, 100] {
            got.clear();
            for piece in text.chunks(step) {
                p.feed(piece, &mut |e| got.push(e));
            }
            assert_eq!(
                got,
                vec![
                    Some(Payload { t_ns: 5, seq: 1, publisher: 0 }),
                    Some(Payload { t_ns: 6, seq: 2, publisher: 1 }),
                    None,
                    None,
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn long_lines_keep_bounded_state() {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        let mut text = b"data: ".to_vec();
        text.extend(data(9, 100_000));
        text.extend_from_slice(b"\n\n");
        for piece in text.chunks(1000) {
            p.feed(piece, &mut |e| got.push(e));
            assert!(p.line.capacity() <= 4 * LINE_PREFIX);
        }
        assert_eq!(got, vec![Some(payload(9))]);
    }

    #[test]
    fn head_parsing() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close").unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.close);
        let h = parse_head(b"HTTP/1.0 204 No Content\r\nConnection: keep-alive").unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        assert!(!h.close);
        assert_eq!(parse_head(b"HTTP/1.1 20 OK"), Err(ParseError::BadStatusLine));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nnocolon"), Err(ParseError::BadHeader));
    }
}
