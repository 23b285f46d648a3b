//! `FrameBatch`: the pending frames of one stream as one zero-copy `writev`.
//!
//! monoio 0.2.4 has no `IoVecBuf` for `Vec<Bytes>`, and its `write_vectored_all` corrupts data
//! after a short write (it never advances `iov_base`), so this type owns the `Bytes` and their
//! iovecs and advances them itself.

use bytes::Bytes;
use monoio::buf::IoVecBuf;

/// Linux rejects a writev with more than IOV_MAX (1024) iovecs.
pub const MAX_IOVECS: usize = 1024;

#[derive(Default)]
pub struct FrameBatch {
    frames: Vec<Bytes>,
    iovecs: Vec<libc::iovec>,
    /// First iovec not yet fully written.
    first: usize,
}

impl FrameBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_full(&self) -> bool {
        self.frames.len() >= MAX_IOVECS
    }

    pub fn push(&mut self, frame: Bytes) {
        debug_assert!(!self.is_full());
        self.iovecs.push(libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() });
        self.frames.push(frame);
    }

    /// Bytes not yet written.
    pub fn remaining(&self) -> usize {
        self.iovecs[self.first..].iter().map(|v| v.iov_len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.first >= self.iovecs.len()
    }

    /// Total bytes of the frames in the batch (written or not).
    pub fn total_len(&self) -> usize {
        self.frames.iter().map(Bytes::len).sum()
    }

    /// Marks `n` more bytes as written (after a possibly short writev).
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 && self.first < self.iovecs.len() {
            let iov = &mut self.iovecs[self.first];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                self.first += 1;
            } else {
                // SAFETY: n < iov_len, so the pointer stays inside the frame this iovec describes.
                iov.iov_base = unsafe { (iov.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                iov.iov_len -= n;
                n = 0;
            }
        }
    }

    /// Empties the batch, keeping a small allocation for the next one.
    pub fn clear(&mut self) {
        self.frames.clear();
        self.iovecs.clear();
        self.first = 0;
        if self.frames.capacity() > 64 {
            self.frames.shrink_to(16);
            self.iovecs.shrink_to(16);
        }
    }
}

// SAFETY: every iovec points into a `Bytes` owned by the batch; `Bytes` data never moves while
// referenced, and the iovec array is not touched while the runtime owns the batch.
unsafe impl IoVecBuf for FrameBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs[self.first..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iovecs.len() - self.first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_across_and_inside_frames() {
        let mut b = FrameBatch::new();
        b.push(Bytes::from_static(b"hello"));
        b.push(Bytes::from_static(b"world!"));
        assert_eq!(b.remaining(), 11);
        b.advance(3);
        assert_eq!(b.remaining(), 8);
        assert_eq!(b.read_iovec_len(), 2);
        b.advance(4);
        assert_eq!(b.read_iovec_len(), 1);
        // SAFETY: test reads the iovec the batch describes.
        let rest = unsafe {
            let v = &*b.read_iovec_ptr();
            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
        };
        assert_eq!(rest, b"rld!");
        b.advance(4);
        assert!(b.is_empty());
    }
}
