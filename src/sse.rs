//! Event-stream framing (WHATWG): `id:`/`event:`/`data:` lines, comments and `retry:`,
//! each wrapped once in an HTTP/1.1 chunk so every subscriber can share the same bytes.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// `<unix-ms>-<seq>`, the shape of a Redis stream id; ordered part by part as numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl std::str::FromStr for EventId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, seq) = s.split_once('-').ok_or(())?;
        let digits = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(());
        }
        Ok(EventId { ms: ms.parse().map_err(|_| ())?, seq: seq.parse().map_err(|_| ())? })
    }
}

/// One encoded event: an HTTP chunk (`<hex>\r\n<sse bytes>\r\n`) shared by every subscriber.
/// HTTP/1.0 subscribers get the inner SSE bytes as a zero-copy slice.
#[derive(Clone, Debug)]
pub struct Frame {
    chunk: Bytes,
    body_start: usize,
    /// The gzip-stream chunk, made by the broker while gzip subscribers exist.
    gz: Option<Bytes>,
}

/// How a stream's bytes travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// HTTP/1.0: SSE bytes until close.
    Raw,
    /// HTTP/1.1 chunked.
    Chunked,
    /// Chunked, gzip-encoded (one deflate segment per chunk).
    Gzip,
}

impl Frame {
    /// The bytes for a chunked (HTTP/1.1) stream.
    pub fn chunk(&self) -> &Bytes {
        &self.chunk
    }

    /// The bytes for an unframed (HTTP/1.0) stream: the same memory, sliced.
    pub fn body(&self) -> Bytes {
        self.chunk.slice(self.body_start..self.chunk.len() - 2)
    }

    /// The frame for a stream of the given kind.
    pub fn for_stream(&self, wire: Wire) -> Bytes {
        match wire {
            Wire::Chunked => self.chunk.clone(),
            Wire::Raw => self.body(),
            Wire::Gzip => match &self.gz {
                Some(gz) => gz.clone(),
                // Published before any gzip subscriber existed (replay, or a race): stored block.
                None => crate::gzip::gzip_chunk(&self.chunk[self.body_start..self.chunk.len() - 2], usize::MAX),
            },
        }
    }

    /// Adds the shared gzip chunk (compressed when the SSE bytes reach `min_bytes`).
    pub fn with_gzip(mut self, min_bytes: usize) -> Frame {
        self.gz = Some(crate::gzip::gzip_chunk(&self.chunk[self.body_start..self.chunk.len() - 2], min_bytes));
        self
    }

    /// The size of the shared gzip chunk, when there is one.
    pub fn gzip_len(&self) -> Option<usize> {
        self.gz.as_ref().map(Bytes::len)
    }

    /// Bytes this frame holds (chunk and gzip chunk).
    pub fn memory(&self) -> usize {
        self.chunk.len() + self.gz.as_ref().map_or(0, |gz| gz.len())
    }

    /// The same frame in freshly allocated memory (a refcount of its own).
    pub fn copied(&self) -> Frame {
        Frame {
            chunk: Bytes::copy_from_slice(&self.chunk),
            body_start: self.body_start,
            gz: self.gz.as_ref().map(|gz| Bytes::copy_from_slice(gz)),
        }
    }

    /// Wraps ready SSE bytes in a chunk.
    pub fn from_sse(sse: &[u8]) -> Frame {
        let mut out = BytesMut::with_capacity(sse.len() + 12);
        let body_start = put_chunk_head(&mut out, sse.len());
        out.put_slice(sse);
        out.put_slice(b"\r\n");
        Frame { chunk: out.freeze(), body_start, gz: None }
    }
}

fn put_chunk_head(out: &mut BytesMut, len: usize) -> usize {
    let start = out.len();
    out.put_slice(format!("{len:x}").as_bytes());
    out.put_slice(b"\r\n");
    out.len() - start
}

/// Calls `f` for each line of `data`; CR, LF and CRLF all end a line (WHATWG).
pub fn for_each_line(data: &str, mut f: impl FnMut(&str)) {
    let bytes = data.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                f(&data[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                f(&data[start..i]);
                i += if bytes.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                start = i;
            }
            _ => i += 1,
        }
    }
    f(&data[start..]);
}

/// An event name may not carry a line break or NUL: that would inject fields.
pub fn valid_event_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && !name.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

/// Topic names: 1-256 bytes of `A-Z a-z 0-9 . _ - : /`.
pub fn valid_topic(topic: &str) -> bool {
    (1..=256).contains(&topic.len())
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'))
}

/// Encodes one event once: `id:`, optional `event:`, one `data:` line per line, blank line.
pub fn encode_event(id: EventId, event: Option<&str>, data: &str) -> Frame {
    let id_text = id.to_string();
    let mut sse_len = 4 + id_text.len() + 1; // "id: " id "\n"
    if let Some(name) = event {
        sse_len += 7 + name.len() + 1;
    }
    for_each_line(data, |line| sse_len += 6 + line.len() + 1);
    sse_len += 1; // blank line dispatches the event

    let mut out = BytesMut::with_capacity(sse_len + 12);
    let body_start = put_chunk_head(&mut out, sse_len);
    out.put_slice(b"id: ");
    out.put_slice(id_text.as_bytes());
    out.put_u8(b'\n');
    if let Some(name) = event {
        out.put_slice(b"event: ");
        out.put_slice(name.as_bytes());
        out.put_u8(b'\n');
    }
    for_each_line(data, |line| {
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
    });
    out.put_u8(b'\n');
    debug_assert_eq!(out.len() - body_start, sse_len);
    out.put_slice(b"\r\n");
    Frame { chunk: out.freeze(), body_start, gz: None }
}

/// A server notice (`ringcast-gap`, `ringcast-history-end`): a named event without an id, so
/// the client's last event id stays that of the last real event.
pub fn encode_notice(name: &str, json: &str) -> Frame {
    Frame::from_sse(format!("event: {name}\ndata: {json}\n\n").as_bytes())
}

/// A `retry:` line (milliseconds) not closed by a blank line, so no client sees an empty event.
pub fn retry_frame(millis: u64) -> Frame {
    Frame::from_sse(format!("retry: {millis}\n").as_bytes())
}

/// The shared heartbeat: one comment line with no blank line after it.
pub static HEARTBEAT_CHUNK: &[u8] = b"2\r\n:\n\r\n";
/// The heartbeat for unframed (HTTP/1.0) streams.
pub static HEARTBEAT_RAW: &[u8] = b":\n";
/// The first bytes of every stream: reconnect delay and a comment, sent at once.
pub static OPENING_SSE: &[u8] = b"retry: 2000\n:ok\n";
/// End of a chunked body.
pub static LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(frame: &Frame) -> String {
        String::from_utf8(frame.body().to_vec()).unwrap()
    }

    #[test]
    fn splits_all_line_endings() {
        let f = encode_event(EventId { ms: 5, seq: 1 }, None, "a\r\nb\rc\nd");
        assert_eq!(sse(&f), "id: 5-1\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
    }

    #[test]
    fn named_event_and_chunk_framing() {
        let f = encode_event(EventId { ms: 1, seq: 0 }, Some("tick"), "x");
        let body = "id: 1-0\nevent: tick\ndata: x\n\n";
        assert_eq!(f.chunk().as_ref(), format!("{:x}\r\n{body}\r\n", body.len()).as_bytes());
    }

    #[test]
    fn empty_and_trailing_newline_data() {
        assert_eq!(sse(&encode_event(EventId::default(), None, "")), "id: 0-0\ndata: \n\n");
        assert_eq!(sse(&encode_event(EventId::default(), None, "a\n")), "id: 0-0\ndata: a\ndata: \n\n");
    }

    #[test]
    fn event_id_round_trip_and_order() {
        let a: EventId = "1700000000000-9".parse().unwrap();
        let b: EventId = "1700000000000-10".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.to_string(), "1700000000000-10");
        for bad in ["", "1", "-1", "1-", "a-1", "1-2-3", "1- 2"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn topic_and_event_rules() {
        assert!(valid_topic("prices/EUR-USD:spot_1.0"));
        assert!(!valid_topic(""));
        assert!(!valid_topic(&"a".repeat(257)));
        assert!(valid_topic(&"a".repeat(256)));
        assert!(!valid_topic("a b"));
        assert!(!valid_topic("é"));
        assert!(valid_event_name("update"));
        assert!(!valid_event_name("a\nb"));
        assert!(!valid_event_name("a\rb"));
        assert!(!valid_event_name("a\0b"));
    }
}
