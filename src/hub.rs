//! Per-core subscriber table: a slab of streams, the topic index, and local fan-out.

use crate::broker::Event;
use crate::frames::FrameBatch;
use crate::metrics::CoreStats;
use crate::sse::{Frame, HEARTBEAT_CHUNK, HEARTBEAT_RAW, LAST_CHUNK};
use bytes::Bytes;
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

/// Frames smaller than this are copied once per core on arrival: every clone then touches a
/// core-local refcount instead of one atomic shared (and bounced) between all cores.
const LOCAL_COPY_MAX: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamState {
    Open,
    /// Write what is queued (ending with `retry:` and the last chunk), then close.
    Closing,
    /// Close now, discarding the queue.
    Dead,
}

pub struct Subscriber {
    /// Unique per core for the life of the process (slab keys are reused).
    id: u64,
    queue: VecDeque<Bytes>,
    /// Queued plus in-flight bytes, bounded by --max-queued-bytes.
    pending_bytes: usize,
    waker: Option<Waker>,
    state: StreamState,
    topics: Vec<(Rc<str>, usize)>,
    fd: RawFd,
    chunked: bool,
    /// False while a replay is on its way from the broker: live events that reach this core
    /// before the replay are part of it (the broker handles messages in order), so they are
    /// skipped here; that is what keeps the hand-over free of gaps and duplicates.
    live: bool,
}

/// Identifies one stream: slab key plus the id that guards against key reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamKey {
    pub key: usize,
    pub id: u64,
}

pub struct Hub {
    subs: Slab<Subscriber>,
    topics: HashMap<Rc<str>, Slab<usize>>,
    scratch: Vec<usize>,
    next_id: u64,
    max_queued: usize,
}

/// Ends both directions of a socket at once: a pending read returns 0 and a pending write
/// fails, on io_uring and epoll alike, so a kicked stream's tasks finish promptly.
fn kick(fd: RawFd) {
    // SAFETY: the fd belongs to a stream whose halves are alive while it is in the slab.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

impl Subscriber {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Queues a frame; returns true when the subscriber overflowed and was dropped.
    fn enqueue(&mut self, frame: Bytes, max_queued: usize) -> bool {
        if self.state != StreamState::Open {
            return false;
        }
        if self.pending_bytes + frame.len() > max_queued {
            self.state = StreamState::Dead;
            self.queue.clear();
            kick(self.fd);
            self.wake();
            return true;
        }
        self.pending_bytes += frame.len();
        self.queue.push_back(frame);
        self.wake();
        false
    }
}

impl Hub {
    pub fn new(max_queued: usize) -> Self {
        Hub { subs: Slab::new(), topics: HashMap::new(), scratch: Vec::new(), next_id: 0, max_queued }
    }

    pub fn subscribers(&self) -> usize {
        self.subs.len()
    }

    fn publish_counts(&self, stats: &CoreStats) {
        stats.subscribers.store(self.subs.len(), Ordering::Relaxed);
        stats.topics.store(self.topics.len(), Ordering::Relaxed);
    }

    /// Adds a stream; `first` is queued before any event (the opening `retry:` and comment).
    /// A stream that is not `live` gets events only after `replay`.
    pub fn subscribe(
        &mut self,
        topics: &[Box<str>],
        fd: RawFd,
        chunked: bool,
        live: bool,
        first: Bytes,
        stats: &CoreStats,
    ) -> StreamKey {
        self.next_id += 1;
        let id = self.next_id;
        let entry = self.subs.vacant_entry();
        let key = entry.key();
        let mut slots = Vec::with_capacity(topics.len());
        for topic in topics {
            let name = match self.topics.get_key_value(&**topic) {
                Some((name, _)) => name.clone(),
                None => Rc::from(&**topic),
            };
            let set = self.topics.entry(name.clone()).or_default();
            slots.push((name, set.insert(key)));
        }
        let mut queue = VecDeque::new();
        let pending_bytes = first.len();
        queue.push_back(first);
        entry.insert(Subscriber {
            id,
            queue,
            pending_bytes,
            waker: None,
            state: StreamState::Open,
            topics: slots,
            fd,
            chunked,
            live,
        });
        self.publish_counts(stats);
        StreamKey { key, id }
    }

    /// Removes a stream from the slab and the topic index.
    pub fn unsubscribe(&mut self, sk: StreamKey, stats: &CoreStats) {
        if !self.subs.get(sk.key).is_some_and(|s| s.id == sk.id) {
            return;
        }
        let sub = self.subs.remove(sk.key);
        kick(sub.fd);
        for (topic, slot) in sub.topics {
            if let Some(set) = self.topics.get_mut(&*topic) {
                set.try_remove(slot);
                if set.is_empty() {
                    self.topics.remove(&*topic);
                }
            }
        }
        self.publish_counts(stats);
    }

    /// Fans one event out to this core's subscribers of its topics, once per subscriber.
    pub fn publish(&mut self, event: &Event, stats: &CoreStats) {
        let Hub { subs, topics, scratch, max_queued, .. } = self;
        scratch.clear();
        for topic in event.topics.iter() {
            if let Some(set) = topics.get(&**topic) {
                scratch.extend(set.iter().map(|(_, &key)| key));
            }
        }
        if scratch.is_empty() {
            return;
        }
        if event.topics.len() > 1 {
            scratch.sort_unstable();
            scratch.dedup();
        }
        let frame = local_frame(&event.frame);
        let (mut delivered, mut dropped) = (0u64, 0u64);
        for &key in scratch.iter() {
            let sub = &mut subs[key];
            if !sub.live {
                continue;
            }
            let bytes = if sub.chunked { frame.chunk().clone() } else { frame.body() };
            if sub.enqueue(bytes, *max_queued) {
                dropped += 1;
            } else {
                delivered += 1;
            }
        }
        stats.frames_queued.fetch_add(delivered, Ordering::Relaxed);
        if dropped > 0 {
            stats.slow_disconnects.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Queues what the broker replayed for a stream and makes it live. Replayed bytes are
    /// bounded by the history, not by --max-queued-bytes (a resume must not look like a slow
    /// consumer), so they are queued without counting against that bound.
    pub fn replay(&mut self, sk: StreamKey, frames: &[Frame]) {
        let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) else { return };
        sub.live = true;
        if sub.state != StreamState::Open {
            return;
        }
        for frame in frames {
            sub.queue.push_back(frame.for_stream(sub.chunked));
        }
        sub.wake();
    }

    /// Queues the shared heartbeat comment on every open stream.
    pub fn heartbeat(&mut self, stats: &CoreStats) {
        let mut dropped = 0;
        for (_, sub) in self.subs.iter_mut() {
            let beat = if sub.chunked { HEARTBEAT_CHUNK } else { HEARTBEAT_RAW };
            if sub.enqueue(Bytes::from_static(beat), self.max_queued) {
                dropped += 1;
            }
        }
        if dropped > 0 {
            stats.slow_disconnects.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Drain: every open stream gets `retry:` (from `retry`), the last chunk, and is closed.
    pub fn close_all(&mut self, mut retry: impl FnMut() -> Frame) {
        for (_, sub) in self.subs.iter_mut() {
            if sub.state != StreamState::Open {
                continue;
            }
            let frame = retry();
            sub.queue.push_back(frame.for_stream(sub.chunked));
            if sub.chunked {
                sub.queue.push_back(Bytes::from_static(LAST_CHUNK));
            }
            sub.state = StreamState::Closing;
            sub.wake();
        }
    }

    /// Closes every stream now (end of the drain period).
    pub fn kill_all(&mut self) {
        for (_, sub) in self.subs.iter_mut() {
            sub.state = StreamState::Dead;
            sub.queue.clear();
            kick(sub.fd);
            sub.wake();
        }
    }

    /// The client went away (its read ended): close the stream now.
    pub fn mark_dead(&mut self, sk: StreamKey) {
        if let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) {
            sub.state = StreamState::Dead;
            sub.queue.clear();
            kick(sub.fd);
            sub.wake();
        }
    }

    /// Moves queued frames into `batch`. `Ready(true)`: something to write;
    /// `Ready(false)`: the stream is finished; `Pending`: nothing yet (waker stored).
    pub fn poll_frames(&mut self, sk: StreamKey, batch: &mut FrameBatch, cx: &mut Context<'_>) -> Poll<bool> {
        let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) else {
            return Poll::Ready(false);
        };
        if sub.state == StreamState::Dead {
            return Poll::Ready(false);
        }
        if sub.queue.is_empty() {
            if sub.state == StreamState::Closing {
                return Poll::Ready(false);
            }
            if !sub.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                sub.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        while !batch.is_full() {
            let Some(frame) = sub.queue.pop_front() else { break };
            batch.push(frame);
        }
        Poll::Ready(true)
    }

    /// A batch of `n` bytes left the process: it no longer counts against the queue bound.
    pub fn written(&mut self, sk: StreamKey, n: usize) {
        if let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) {
            sub.pending_bytes = sub.pending_bytes.saturating_sub(n);
        }
    }
}

/// A core-local copy of a small frame (see `LOCAL_COPY_MAX`); large frames stay shared.
fn local_frame(frame: &Frame) -> Frame {
    if frame.chunk().len() <= LOCAL_COPY_MAX {
        frame.copied()
    } else {
        frame.clone()
    }
}
