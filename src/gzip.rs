//! gzip event streams, compressed once per event and shared by every gzip subscriber.
//!
//! A stream is the 10-byte gzip header, then per event one independent raw-deflate segment
//! (fresh compressor, no shared window) ended by a sync flush (`00 00 ff ff`, not final), so
//! segments can be concatenated in any per-connection order. Small frames are stored blocks.
//! The deflate stream is never finished and no trailer is sent: Chromium stops delivering after
//! a final block, and a wrong CRC hangs some clients.

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress};

/// gzip member header: deflate, no flags, no mtime, unknown OS.
pub const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0xff];
/// Largest stored block (LEN is 16 bits).
const STORED_MAX: usize = 0xffff;

/// Appends `data` as non-final stored blocks (byte-aligned, readable at once by any inflater).
pub fn put_stored(out: &mut BytesMut, data: &[u8]) {
    for block in data.chunks(STORED_MAX) {
        let len = block.len() as u16;
        out.put_u8(0x00); // BFINAL=0, BTYPE=00
        out.put_u16_le(len);
        out.put_u16_le(!len);
        out.put_slice(block);
    }
}

/// One self-contained deflate segment: level-1 compression with a fresh window, sync-flushed.
pub fn deflate_segment(data: &[u8]) -> Vec<u8> {
    let mut z = Compress::new(Compression::fast(), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    loop {
        let consumed = z.total_in() as usize;
        // Writing into a Vec's spare capacity cannot fail with a stream error.
        let _ = z.compress_vec(&data[consumed..], &mut out, FlushCompress::Sync);
        if z.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    out
}

/// The gzip-stream chunk for an event's SSE bytes: compressed when at least `min_bytes`
/// (and smaller that way), otherwise stored.
pub fn gzip_chunk(sse: &[u8], min_bytes: usize) -> Bytes {
    let compressed = (sse.len() >= min_bytes).then(|| deflate_segment(sse)).filter(|c| c.len() < sse.len());
    let body_len = compressed.as_ref().map_or(stored_len(sse.len()), Vec::len);
    let mut out = BytesMut::with_capacity(body_len + 12);
    out.put_slice(format!("{body_len:x}\r\n").as_bytes());
    match compressed {
        Some(c) => out.put_slice(&c),
        None => put_stored(&mut out, sse),
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

fn stored_len(len: usize) -> usize {
    len + 5 * len.div_ceil(STORED_MAX).max(1)
}

/// The first chunk of a gzip stream: the gzip header plus `sse` as a stored block.
pub fn opening_chunk(sse: &[u8]) -> Vec<u8> {
    let mut body = BytesMut::with_capacity(sse.len() + 16);
    body.put_slice(&GZIP_HEADER);
    put_stored(&mut body, sse);
    let mut out = format!("{:x}\r\n", body.len()).into_bytes();
    out.extend_from_slice(&body);
    out.extend_from_slice(b"\r\n");
    out
}

/// The heartbeat comment `:\n` as a stored block in a chunk.
pub static HEARTBEAT_GZIP: &[u8] = b"7\r\n\x00\x02\x00\xfd\xff:\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    /// Strips chunk framing (one chunk) and returns its body.
    fn unchunk(chunk: &[u8]) -> &[u8] {
        let crlf = chunk.windows(2).position(|w| w == b"\r\n").unwrap();
        let len = usize::from_str_radix(std::str::from_utf8(&chunk[..crlf]).unwrap(), 16).unwrap();
        assert_eq!(&chunk[crlf + 2 + len..], b"\r\n");
        &chunk[crlf + 2..crlf + 2 + len]
    }

    fn inflate_all(stream: &[u8]) -> Vec<u8> {
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(1 << 20);
        d.decompress_vec(stream, &mut out, FlushDecompress::Sync).unwrap();
        assert_eq!(d.total_in() as usize, stream.len(), "every byte decodable without more input");
        out
    }

    #[test]
    fn segments_concatenate_in_any_order() {
        let big = format!("data: {}\n\n", "{\"price\":1.2345,\"sym\":\"EURUSD\"}".repeat(100));
        let small = "data: hi\n\n";
        let a = gzip_chunk(big.as_bytes(), 1024);
        let b = gzip_chunk(small.as_bytes(), 1024);
        assert!(unchunk(&a).len() < big.len() / 2, "large frame is compressed");
        assert!(unchunk(&a).ends_with(&[0, 0, 0xff, 0xff]));
        for order in [[&a, &b, &a], [&b, &a, &b]] {
            let stream: Vec<u8> = order.iter().flat_map(|c| unchunk(c).to_vec()).collect();
            let text = inflate_all(&stream);
            let want: String = order.iter().map(|c| if std::ptr::eq(*c, &a) { big.as_str() } else { small }).collect();
            assert_eq!(String::from_utf8(text).unwrap(), want);
        }
    }

    #[test]
    fn heartbeat_and_opening_are_valid() {
        assert_eq!(inflate_all(unchunk(HEARTBEAT_GZIP)), b":\n");
        let open = opening_chunk(b"retry: 2000\n:ok\n");
        let body = unchunk(&open);
        assert_eq!(&body[..10], &GZIP_HEADER);
        assert_eq!(inflate_all(&body[10..]), b"retry: 2000\n:ok\n");
        let huge = vec![b'x'; 200_000];
        let c = gzip_chunk(&huge, usize::MAX);
        assert_eq!(inflate_all(unchunk(&c)), huge);
    }
}
