//! Batched stream sends: one io_uring `SENDMSG` per stream, all of a flush in one
//! `io_uring_enter`.
//!
//! On loopback a delivery costs one trip through the kernel's TCP stack per send; what a
//! server can still save is the syscall around each send. `../shared/fanout-floor` measures
//! io_uring sends submitted together at 6-18 % less CPU per delivered event (counting the
//! `ksoftirqd` work they shift) than one
//! `write(2)` per socket at one event per send, so each core keeps a small ring of its own
//! (separate from monoio's, which owns its completions) for the flush. Every send carries
//! `MSG_DONTWAIT`, which makes io_uring answer `-EAGAIN` at once on a full socket instead of
//! waiting for room: the whole batch completes inside the submit call, the frames it points at
//! are not touched meanwhile, and a full socket goes to the stream's backlog writer exactly as
//! with `sendmsg(2)`.

use crate::event::StreamKey;
use io_uring::{opcode, types, IoUring};
use std::os::fd::RawFd;

/// Submission queue entries: streams per `io_uring_enter`.
const RING_ENTRIES: u32 = 1024;
/// iovecs gathered per submission (bounds the scratch memory: 64 Ki × 16 bytes).
const MAX_IOVECS_PER_SUBMIT: usize = 64 * 1024;

/// Which way `Hub::flush` sends (`--send`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SendChoice {
    /// io_uring batches where the core runs the io_uring driver, else `sendmsg`.
    Auto,
    /// io_uring batches on every core (start-up fails where a ring cannot be built).
    Uring,
    /// One `sendmsg(2)` per stream.
    Sendmsg,
}

struct Item {
    sk: StreamKey,
    fd: RawFd,
    iov_start: usize,
    iov_len: usize,
    offered: usize,
}

/// One core's send ring and the scratch arrays of the batch being built.
pub struct BatchSender {
    ring: IoUring,
    items: Vec<Item>,
    iovecs: Vec<libc::iovec>,
    msgs: Vec<libc::msghdr>,
}

impl BatchSender {
    /// Builds the ring and checks that this kernel answers a send to a full socket with
    /// `-EAGAIN` at once (a kernel that waited for room instead would stall the core).
    pub fn new() -> std::io::Result<BatchSender> {
        let mut ring = IoUring::new(RING_ENTRIES)?;
        if !full_socket_fails_fast(&mut ring)? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this kernel's io_uring waits on a full socket despite MSG_DONTWAIT",
            ));
        }
        Ok(BatchSender { ring, items: Vec::new(), iovecs: Vec::new(), msgs: Vec::new() })
    }

    /// True when one more stream of `frames` frames does not fit: `submit` first.
    pub fn is_full(&self, frames: usize) -> bool {
        self.items.len() >= RING_ENTRIES as usize
            || (!self.items.is_empty() && self.iovecs.len() + frames > MAX_IOVECS_PER_SUBMIT)
    }

    /// Adds one stream's send of `frames` (gathered, in order).
    ///
    /// # Safety
    /// Every frame must stay alive and unchanged until the next `submit` returns: only
    /// pointers to them are kept, and the kernel reads them during `submit`.
    pub unsafe fn add<'a>(&mut self, sk: StreamKey, fd: RawFd, frames: impl Iterator<Item = &'a [u8]>) {
        let iov_start = self.iovecs.len();
        let mut offered = 0;
        for f in frames {
            self.iovecs.push(libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() });
            offered += f.len();
        }
        self.items.push(Item { sk, fd, iov_start, iov_len: self.iovecs.len() - iov_start, offered });
    }

    /// Sends everything added, in one `io_uring_enter`, and reports each stream's outcome:
    /// `done(stream, bytes offered, Ok(bytes sent) or Err(errno))`.
    pub fn submit(&mut self, mut done: impl FnMut(StreamKey, usize, Result<usize, i32>)) {
        if self.items.is_empty() {
            return;
        }
        // The iovec array is complete, so pointers into it stay valid from here on.
        self.msgs.clear();
        for it in &self.items {
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.iovecs[it.iov_start..].as_mut_ptr();
            msg.msg_iovlen = it.iov_len as _;
            self.msgs.push(msg);
        }
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        {
            let mut sq = self.ring.submission();
            for (i, it) in self.items.iter().enumerate() {
                let entry = opcode::SendMsg::new(types::Fd(it.fd), &self.msgs[i])
                    .flags(flags as u32)
                    .build()
                    .user_data(i as u64);
                // SAFETY: `msgs` and `iovecs` (and the frames they point at) are neither moved nor
                // freed until every completion of this batch has been reaped below.
                let pushed = unsafe { sq.push(&entry) };
                // `is_full` bounds a batch by the ring size and each submit empties the queue; a
                // lost entry would make the wait below wait for ever, so this must hold.
                assert!(pushed.is_ok(), "io_uring send batch larger than the ring");
            }
        }
        let want = self.items.len();
        let mut got = 0;
        while got < want {
            if let Err(e) = self.ring.submit_and_wait(want - got) {
                if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                    // Transient (ENOMEM, EAGAIN): the entries stay queued and point at our
                    // arrays, so nothing may be freed before they complete; retrying is all that
                    // is safe. Logged once per process and then every 10,000th time.
                    static FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                    if FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10_000 == 0 {
                        log::error!("io_uring send batch: {e}; retrying");
                    }
                    std::thread::yield_now();
                }
            }
            for cqe in self.ring.completion() {
                let it = &self.items[cqe.user_data() as usize];
                let res = cqe.result();
                done(it.sk, it.offered, if res >= 0 { Ok(res as usize) } else { Err(-res) });
                got += 1;
            }
        }
        self.items.clear();
        self.iovecs.clear();
    }
}

/// Sends to a full socket pair through `ring` and reports whether the answer came at once.
fn full_socket_fails_fast(ring: &mut IoUring) -> std::io::Result<bool> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let (mut a, b) = std::os::unix::net::UnixStream::pair()?;
    a.set_nonblocking(true)?;
    let chunk = [0u8; 16 * 1024];
    while a.write(&chunk).is_ok() {}
    let mut iov = libc::iovec { iov_base: chunk.as_ptr() as *mut libc::c_void, iov_len: chunk.len() };
    // SAFETY: all-zero is a valid msghdr; it, `iov` and `chunk` outlive the completion below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let flags = (libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32;
    let entry = opcode::SendMsg::new(types::Fd(a.as_raw_fd()), &msg).flags(flags).build();
    // SAFETY: see above; the entry's completion is reaped before this function returns.
    unsafe { ring.submission().push(&entry) }.map_err(|_| std::io::Error::other("io_uring queue full"))?;
    ring.submit()?;
    for _ in 0..200 {
        if let Some(cqe) = ring.completion().next() {
            return Ok(cqe.result() == -libc::EAGAIN);
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
    // It is waiting for room: closing the peer ends it (EPIPE), then it can be reaped.
    drop(b);
    ring.submit_and_wait(1)?;
    ring.completion().for_each(drop);
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn key(key: usize) -> StreamKey {
        StreamKey { key, id: key as u64 }
    }

    #[test]
    fn gathers_frames_per_stream_and_reports_each() {
        let Ok(mut s) = BatchSender::new() else {
            eprintln!("SKIPPED: io_uring unavailable");
            return;
        };
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (b, mut b_peer) = UnixStream::pair().unwrap();
        let frames: [&[u8]; 3] = [b"one ", b"two ", b"three"];
        // SAFETY (all `add`s here): the frames outlive the `submit` that follows.
        unsafe {
            s.add(key(1), a.as_raw_fd(), frames.iter().copied());
            s.add(key(2), b.as_raw_fd(), frames[..1].iter().copied());
        }
        let mut got = Vec::new();
        s.submit(|sk, offered, res| got.push((sk.key, offered, res)));
        got.sort_by_key(|g| g.0);
        assert_eq!(got, vec![(1, 13, Ok(13)), (2, 4, Ok(4))]);
        let mut buf = [0u8; 32];
        let n = a_peer.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"one two three");
        let n = b_peer.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"one ");
    }

    #[test]
    fn full_socket_answers_eagain_at_once_and_closed_peer_an_error() {
        let Ok(mut s) = BatchSender::new() else {
            eprintln!("SKIPPED: io_uring unavailable");
            return;
        };
        let (a, _a_peer) = UnixStream::pair().unwrap();
        let big = vec![b'x'; 64 * 1024];
        // Nobody reads: the socket fills, and a send must then fail with EAGAIN instead of
        // waiting for room (which would block the core inside submit forever).
        let mut last = Ok(0);
        for _ in 0..1000 {
            unsafe { s.add(key(1), a.as_raw_fd(), std::iter::once(big.as_slice())) };
            s.submit(|_, _, res| last = res);
            if last == Err(libc::EAGAIN) {
                break;
            }
        }
        assert_eq!(last, Err(libc::EAGAIN));

        let (b, b_peer) = UnixStream::pair().unwrap();
        drop(b_peer);
        unsafe { s.add(key(2), b.as_raw_fd(), std::iter::once(&b"gone"[..])) };
        s.submit(|_, _, res| last = res);
        assert_eq!(last, Err(libc::EPIPE));
    }
}
