//! Per-core subscriber table: a slab of streams, the topic index, and local fan-out.

use crate::event::{Event, EventId, StreamKey};
use crate::frames::{FrameBatch, MAX_IOVECS};
use crate::gzip::HEARTBEAT_GZIP;
use crate::metrics::CoreStats;
use crate::sender::BatchSender;
use crate::sse::{Frame, Wire, HEARTBEAT_CHUNK, HEARTBEAT_RAW, LAST_CHUNK};
use bytes::Bytes;
use monoio::io::{AsyncWriteRent, OwnedWriteHalf};
use monoio::net::TcpStream;
use slab::Slab;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::rc::Weak;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

/// Frames smaller than this are copied once per core on arrival: every clone then touches a
/// core-local refcount instead of one atomic shared (and bounced) between all cores.
const LOCAL_COPY_MAX: usize = 16 * 1024;

/// Queue slots a drained stream keeps (more are freed, see `Subscriber::trim`).
const QUEUE_KEEP: usize = 32;

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
    /// Frames with their conflation tag (`NO_TAG`: never dropped by `--slow-consumer latest`).
    queue: VecDeque<(Bytes, u64)>,
    /// Queued plus in-flight bytes.
    pending_bytes: usize,
    /// Bytes the backlog writer holds (being written); the rest of `pending_bytes` is queued
    /// behind them and bounded by --max-queued-bytes.
    writer_bytes: usize,
    state: StreamState,
    topics: Vec<(Rc<str>, usize)>,
    /// Its token's `sub`, and its slot in the user index (targeted events find it there).
    user: Option<(Rc<str>, usize)>,
    fd: RawFd,
    wire: Wire,
    /// Events up to this id were covered by the stream's replay (or gap notice): the mailbox
    /// may still hold some of them, and they are skipped here; that is what keeps the
    /// hand-over free of gaps and duplicates. For a live-only stream: the newest id when it opened.
    live_after: EventId,
    /// Waiting in the batch window (`Hub::held`) for its write.
    held: bool,
    /// Listed in `Hub::dirty`: has frames for the next `flush`.
    dirty: bool,
    /// A backlog writer task has a write in flight: frames must wait for it (order).
    writing: bool,
    /// Waiting for its replay from the cluster's history: nothing is sent, live events queue.
    paused: bool,
    /// The write half, lent to the backlog writer while the socket is full. Dropped (FIN) when
    /// the stream leaves the slab.
    wr: Option<OwnedWriteHalf<TcpStream>>,
}

/// Tag of frames that are not events (opening, heartbeat, replay, retry).
const NO_TAG: u64 = 0;

/// What to do with a subscriber whose queue passes --max-queued-bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SlowPolicy {
    /// Close it; it reconnects and resumes from history.
    Disconnect,
    /// Keep only the newest pending event per topic (a ticker's stale quotes are worthless).
    Latest,
}

/// Result of queueing one frame.
#[derive(PartialEq, Eq)]
enum Queued {
    Yes,
    /// Queued after dropping this many older frames (`latest`).
    Conflated(u64),
    /// The subscriber was too slow and is being closed.
    Dropped,
    /// The stream is closing; nothing queued.
    Closed,
}

pub struct Hub {
    subs: Slab<Subscriber>,
    topics: HashMap<Rc<str>, Slab<usize>>,
    /// Streams by their token's `sub`: a targeted event costs its recipients' streams, not all
    /// the streams of its topics.
    users: HashMap<Rc<str>, Slab<usize>>,
    scratch: Vec<usize>,
    next_id: u64,
    limits: HubLimits,
    /// Streams with frames held for the batch window; released together by `release_held`.
    held: Vec<StreamKey>,
    flusher: Option<Waker>,
    /// Streams with frames for the next `flush`.
    dirty: VecDeque<StreamKey>,
    /// Scratch iovec array for `flush` (reused; IOV_MAX entries at most).
    iovecs: Vec<libc::iovec>,
    /// This hub, for the backlog writer tasks it spawns.
    me: Weak<RefCell<Hub>>,
    /// io_uring batch sends (`--send`); `None`: one `sendmsg` per stream.
    sender: Option<BatchSender>,
    /// Sends issued and backlogs started, for `/metrics` (published after each flush).
    pub sends: u64,
    pub backlogs: u64,
    /// Bytes handed to the kernel for streams (all kinds of send).
    pub bytes_out: u64,
    /// Streams with `Wire::Gzip` (the broker compresses frames only while there are some).
    gzip_subs: usize,
}

/// Per-stream bounds and batching, from the flags.
#[derive(Clone, Copy, Debug)]
pub struct HubLimits {
    pub max_queued: usize,
    pub slow: SlowPolicy,
    /// Hold writes for the batch window (`--batch-window` > 0).
    pub windowed: bool,
    /// Frames per sendmsg, and pending frames that end a stream's window early.
    pub batch_max: usize,
}

/// Ends both directions of a socket at once: a pending read returns 0 and a pending write
/// fails, on io_uring and epoll alike, so a kicked stream's tasks finish promptly.
fn kick(fd: RawFd) {
    // SAFETY: the fd belongs to a stream whose halves are alive while it is in the slab.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

impl Subscriber {
    /// Bytes queued behind what is being written (the backlog writer's batch, else the frame
    /// at the front of the queue): the part that --max-queued-bytes bounds.
    fn behind(&self) -> usize {
        let head = if self.writing { self.writer_bytes } else { self.queue.front().map_or(0, |(f, _)| f.len()) };
        self.pending_bytes.saturating_sub(head)
    }

    /// Whether queueing `incoming` makes the stream too far behind. One event behind what is
    /// being written never does, however large and however slowly the socket takes it: a
    /// stream is cut only for a second one past the bound.
    fn over_bound(&self, incoming: usize, max_queued: usize) -> bool {
        let behind = self.behind();
        behind > 0 && behind + incoming > max_queued
    }

    /// Queues a frame within the byte bound (without waking the writer).
    fn enqueue(&mut self, frame: Bytes, tag: u64, max_queued: usize, policy: SlowPolicy) -> Queued {
        if self.state != StreamState::Open {
            return Queued::Closed;
        }
        let mut conflated = 0;
        if self.over_bound(frame.len(), max_queued) {
            if policy == SlowPolicy::Latest && tag != NO_TAG {
                conflated = self.conflate(tag);
            }
            if self.over_bound(frame.len(), max_queued) {
                self.kill();
                return Queued::Dropped;
            }
        }
        self.pending_bytes += frame.len();
        self.queue.push_back((frame, tag));
        if conflated > 0 {
            Queued::Conflated(conflated)
        } else {
            Queued::Yes
        }
    }

    /// One nonblocking gather-send of the queue (see `Hub::flush`). A backlog left by a full
    /// socket goes to a writer task (which waits for room); a drained closing stream is shut.
    /// `max_frames` bounds the frames one sendmsg carries (`--batch-max`).
    /// Returns the sendmsg calls made, whether a backlog writer started, and the bytes sent.
    fn send_now(
        &mut self,
        iovecs: &mut Vec<libc::iovec>,
        hub: &Weak<RefCell<Hub>>,
        key: usize,
        max_frames: usize,
    ) -> (u64, bool, u64) {
        if self.writing || self.paused || self.state == StreamState::Dead {
            return (0, false, 0);
        }
        let mut calls = 0;
        let mut bytes = 0u64;
        while !self.queue.is_empty() {
            calls += 1;
            iovecs.clear();
            let mut offered = 0;
            for (frame, _) in self.queue.iter().take(max_frames) {
                iovecs.push(libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() });
                offered += frame.len();
            }
            // SAFETY: msghdr is plain data; every iovec points into a `Bytes` held by the queue,
            // which is not touched until sendmsg returns.
            let sent = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iovecs.as_mut_ptr();
                msg.msg_iovlen = iovecs.len() as _;
                libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if sent < 0 {
                let err = std::io::Error::last_os_error().raw_os_error();
                if !matches!(err, Some(libc::EAGAIN | libc::EINTR)) {
                    // The peer is gone (EPIPE, ECONNRESET...): the close watcher removes it.
                    self.kill();
                    return (calls, false, bytes);
                }
                break;
            }
            bytes += sent as u64;
            self.consume(sent as usize);
            if (sent as usize) < offered {
                break; // socket buffer full
            }
        }
        (calls, self.after_send(hub, key), bytes)
    }

    /// After the nonblocking sends: a backlog left by a full socket goes to a writer task
    /// (which waits for room); a drained closing stream is shut.
    /// Returns whether a backlog writer started.
    fn after_send(&mut self, hub: &Weak<RefCell<Hub>>, key: usize) -> bool {
        self.trim();
        if !self.queue.is_empty() {
            if let (Some(wr), Some(hub)) = (self.wr.take(), hub.upgrade()) {
                self.writing = true;
                monoio::spawn(write_backlog(hub, StreamKey { key, id: self.id }, wr));
                return true;
            }
        } else if self.state == StreamState::Closing {
            kick(self.fd); // FIN after the queued bytes; the close watcher then removes it
        }
        false
    }

    /// Close now: drop the queue and shut the socket (ends the close watcher's read).
    fn kill(&mut self) {
        self.state = StreamState::Dead;
        self.queue.clear();
        kick(self.fd);
    }

    /// Gives back a drained queue's buffer once a burst made it large: a stream that caught up
    /// holds a few slots again, not the high-water mark of every burst it ever saw.
    fn trim(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > QUEUE_KEEP {
            self.queue = VecDeque::new();
        }
    }

    /// Drops `n` sent bytes from the front of the queue.
    fn consume(&mut self, mut n: usize) {
        self.pending_bytes = self.pending_bytes.saturating_sub(n);
        // Whole frames first (empty ones too, so a queue of them cannot stall a send loop).
        while let Some((front, tag)) = self.queue.front_mut() {
            if front.len() <= n {
                n -= front.len();
                self.queue.pop_front();
            } else {
                if n > 0 {
                    let _ = front.split_to(n);
                    // Half on the wire: it must be finished, never conflated away.
                    *tag = NO_TAG;
                }
                break;
            }
        }
    }

    /// Drops every queued event superseded by a newer one of the same tag, and those of
    /// `incoming` (a newer one is being queued); returns how many were dropped.
    fn conflate(&mut self, incoming: u64) -> u64 {
        let mut seen: Vec<u64> = vec![incoming];
        let mut kept: VecDeque<(Bytes, u64)> = VecDeque::with_capacity(self.queue.len());
        let mut dropped_bytes = 0;
        let mut dropped = 0;
        while let Some((frame, tag)) = self.queue.pop_back() {
            if tag != NO_TAG && seen.contains(&tag) {
                dropped_bytes += frame.len();
                dropped += 1;
            } else {
                if tag != NO_TAG {
                    seen.push(tag);
                }
                kept.push_front((frame, tag));
            }
        }
        self.queue = kept;
        self.pending_bytes -= dropped_bytes;
        dropped
    }
}

fn mark_dirty(dirty: &mut VecDeque<StreamKey>, sub: &mut Subscriber, key: usize) {
    if !sub.dirty {
        sub.dirty = true;
        dirty.push_back(StreamKey { key, id: sub.id });
    }
}

/// Conflation tag of an event: its topic set (the first topic for the common single-topic case).
fn topic_tag(topics: &[Box<str>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    topics.hash(&mut h);
    h.finish() | 1
}

impl Hub {
    pub fn new(limits: HubLimits) -> Rc<RefCell<Hub>> {
        Rc::new_cyclic(|me| RefCell::new(Hub::detached(limits, me.clone())))
    }

    fn detached(limits: HubLimits, me: Weak<RefCell<Hub>>) -> Hub {
        Hub {
            me,
            subs: Slab::new(),
            topics: HashMap::new(),
            users: HashMap::new(),
            scratch: Vec::new(),
            next_id: 0,
            limits,
            held: Vec::new(),
            flusher: None,
            dirty: VecDeque::new(),
            iovecs: Vec::new(),
            gzip_subs: 0,
            sender: None,
            sends: 0,
            backlogs: 0,
            bytes_out: 0,
        }
    }

    /// Sends of every later flush go through `sender`'s io_uring batches.
    pub fn set_sender(&mut self, sender: BatchSender) {
        self.sender = Some(sender);
    }

    /// Copies the send counters into the core's `/metrics` counters.
    pub fn publish_io_counts(&self, stats: &CoreStats) {
        stats.sends.store(self.sends, Ordering::Relaxed);
        stats.backlogs.store(self.backlogs, Ordering::Relaxed);
        stats.bytes_out.store(self.bytes_out, Ordering::Relaxed);
    }

    pub fn subscribers(&self) -> usize {
        self.subs.len()
    }

    fn publish_counts(&self, stats: &CoreStats) {
        stats.subscribers.store(self.subs.len(), Ordering::Relaxed);
        stats.gzip_subscribers.store(self.gzip_subs, Ordering::Relaxed);
        stats.topics.store(self.topics.len(), Ordering::Relaxed);
    }

    /// Adds a stream; `first` is queued before any event (the opening `retry:` and comment).
    /// It gets the events with ids after `live_after` (see `Subscriber::live_after`).
    #[allow(clippy::too_many_arguments)]
    pub fn subscribe(
        &mut self,
        topics: &[Box<str>],
        user: Option<Rc<str>>,
        fd: RawFd,
        wr: Option<OwnedWriteHalf<TcpStream>>,
        wire: Wire,
        live_after: EventId,
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
        let user = user.map(|name| {
            let slot = self.users.entry(name.clone()).or_default().insert(key);
            (name, slot)
        });
        let mut queue = VecDeque::new();
        let pending_bytes = first.len();
        queue.push_back((first, NO_TAG));
        entry.insert(Subscriber {
            id,
            queue,
            pending_bytes,
            writer_bytes: 0,
            state: StreamState::Open,
            topics: slots,
            user,
            fd,
            wire,
            live_after,
            held: false,
            dirty: false,
            writing: false,
            paused: false,
            wr,
        });
        self.gzip_subs += usize::from(wire == Wire::Gzip);
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
        self.gzip_subs -= usize::from(sub.wire == Wire::Gzip);
        for (topic, slot) in sub.topics {
            if let Some(set) = self.topics.get_mut(&*topic) {
                set.try_remove(slot);
                if set.is_empty() {
                    self.topics.remove(&*topic);
                }
            }
        }
        if let Some((user, slot)) = sub.user {
            if let Some(set) = self.users.get_mut(&*user) {
                set.try_remove(slot);
                if set.is_empty() {
                    self.users.remove(&*user);
                }
            }
        }
        self.publish_counts(stats);
    }

    /// Fans one event out to this core's subscribers of its topics, once per subscriber.
    /// Returns the streams it looked at (the work done, for the core's slicing).
    pub fn publish(&mut self, event: &Event, stats: &CoreStats) -> usize {
        let Hub { subs, topics, users, scratch, limits, held, flusher, dirty, .. } = self;
        scratch.clear();
        match &event.users {
            // Targeted: the recipients' streams that take one of its topics (each stream has
            // one user and the names are distinct, so no stream comes twice).
            Some(names) => {
                for name in names.iter() {
                    if let Some(set) = users.get(&**name) {
                        scratch.extend(set.iter().map(|(_, &key)| key).filter(|&key| {
                            subs[key].topics.iter().any(|(t, _)| event.topics.iter().any(|e| **e == **t))
                        }));
                    }
                }
            }
            None => {
                for topic in event.topics.iter() {
                    if let Some(set) = topics.get(&**topic) {
                        scratch.extend(set.iter().map(|(_, &key)| key));
                    }
                }
            }
        }
        if scratch.is_empty() {
            return 0;
        }
        if event.users.is_none() && event.topics.len() > 1 {
            scratch.sort_unstable();
            scratch.dedup();
        }
        let frame = local_frame(&event.frame);
        let tag = if limits.slow == SlowPolicy::Latest { topic_tag(&event.topics) } else { NO_TAG };
        let (mut delivered, mut dropped, mut conflated) = (0u64, 0u64, 0u64);
        for &key in scratch.iter() {
            let sub = &mut subs[key];
            if event.id <= sub.live_after {
                continue;
            }
            let bytes = frame.for_stream(sub.wire);
            match sub.enqueue(bytes, tag, limits.max_queued, limits.slow) {
                Queued::Closed => continue,
                Queued::Dropped => {
                    dropped += 1;
                    continue;
                }
                Queued::Conflated(n) => conflated += n,
                Queued::Yes => {}
            }
            delivered += 1;
            if !limits.windowed || sub.queue.len() >= limits.batch_max {
                mark_dirty(dirty, sub, key);
            } else if !sub.held {
                sub.held = true;
                if held.is_empty() {
                    if let Some(w) = flusher.take() {
                        w.wake();
                    }
                }
                held.push(StreamKey { key, id: sub.id });
            }
        }
        stats.frames_queued.fetch_add(delivered, Ordering::Relaxed);
        if dropped > 0 {
            stats.slow_disconnects.fetch_add(dropped, Ordering::Relaxed);
        }
        if conflated > 0 {
            stats.conflated.fetch_add(conflated, Ordering::Relaxed);
        }
        scratch.len()
    }

    /// Empties every queue without sending and returns the frames dropped (benches: fan-out
    /// cost without the socket cost).
    #[doc(hidden)]
    pub fn discard_queued(&mut self) -> usize {
        let mut n = 0;
        // Only the streams that got frames (the dirty list), so a targeted event's bench pays
        // for its recipients, not for every stream.
        for sk in self.dirty.drain(..) {
            if let Some(sub) = self.subs.get_mut(sk.key) {
                n += sub.queue.len();
                sub.queue.clear();
                sub.pending_bytes = 0;
                sub.dirty = false;
            }
        }
        n
    }

    /// Ready when some stream holds frames for the batch window.
    pub fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.held.is_empty() {
            self.flusher = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// The batch window ended: every held stream is marked for the next flush.
    pub fn release_held(&mut self) {
        for sk in std::mem::take(&mut self.held) {
            if let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) {
                sub.held = false;
                mark_dirty(&mut self.dirty, sub, sk.key);
            }
        }
    }

    /// Sends what dirty streams have queued, directly: one nonblocking `sendmsg` per stream
    /// gathers all its pending frames (the shared `Bytes`, no copy). This is the hot path: no
    /// task wake-up, no future, one syscall per stream per core wake-up. Only a stream whose
    /// socket is full (EAGAIN or a short send) wakes its writer task, which waits for room.
    pub fn flush(&mut self) {
        while self.flush_some(usize::MAX) {}
    }

    /// True when no stream waits for a flush.
    pub fn flushed(&self) -> bool {
        self.dirty.is_empty()
    }

    /// `flush` for at most `streams` streams, oldest first; true when some remain. Between
    /// slices a core reads its mailbox and runs its other tasks, so a long fan-out neither
    /// delays publishers' requests nor holds back newer events: a stream still waiting in this
    /// pass takes them in the same send, and one already sent waits at the back.
    pub fn flush_some(&mut self, streams: usize) -> bool {
        if self.sender.is_some() {
            self.flush_batched(streams);
        } else {
            let Hub { subs, dirty, iovecs, me, limits, sends, backlogs, bytes_out, .. } = self;
            let max_frames = limits.batch_max.clamp(1, MAX_IOVECS);
            for _ in 0..streams {
                let Some(sk) = dirty.pop_front() else { break };
                if let Some(sub) = subs.get_mut(sk.key).filter(|s| s.id == sk.id) {
                    sub.dirty = false;
                    let (calls, backlog, bytes) = sub.send_now(iovecs, me, sk.key, max_frames);
                    *sends += calls;
                    *backlogs += u64::from(backlog);
                    *bytes_out += bytes;
                }
            }
        }
        !self.dirty.is_empty()
    }

    /// `flush_some` through io_uring: one `SENDMSG` per dirty stream, up to a ring's worth per
    /// `io_uring_enter`. A stream with more frames than one send carries goes to the back.
    fn flush_batched(&mut self, streams: usize) {
        let Hub { subs, dirty, me, limits, sender, sends, backlogs, bytes_out, .. } = self;
        let sender = sender.as_mut().expect("checked by flush_some");
        let max_frames = limits.batch_max.clamp(1, MAX_IOVECS);
        for _ in 0..streams {
            let Some(sk) = dirty.pop_front() else { break };
            // Frames stay in their queues (and alive) until the submit below returns: `sent`
            // only runs inside `submit`.
            let Some(sub) = subs.get_mut(sk.key).filter(|s| s.id == sk.id) else { continue };
            sub.dirty = false;
            if sub.writing || sub.paused || sub.state == StreamState::Dead {
                continue;
            }
            if sub.queue.is_empty() {
                *backlogs += u64::from(sub.after_send(me, sk.key));
                continue;
            }
            let frames = sub.queue.len().min(max_frames);
            if sender.is_full(frames) {
                sender.submit(|sk, offered, res| sent(subs, me, dirty, (sends, backlogs, bytes_out), sk, offered, res));
            }
            let sub = subs.get_mut(sk.key).expect("looked up above");
            // SAFETY: the frames are `Bytes` in this stream's queue; nothing touches the queue
            // until the `submit` below (or the one above, on the next turn) returns, and `sent`
            // only runs inside `submit`, after the kernel is done with the batch.
            unsafe { sender.add(sk, sub.fd, sub.queue.iter().take(frames).map(|(f, _)| f.as_ref())) };
        }
        sender.submit(|sk, offered, res| sent(subs, me, dirty, (sends, backlogs, bytes_out), sk, offered, res));
    }

    /// `flush` for one stream (its opening bytes, or a replay outside the mailbox loop).
    /// Sends it directly (one `sendmsg`), leaving every other stream to the mailbox loop.
    pub fn flush_one(&mut self, sk: StreamKey) {
        let Hub { subs, iovecs, me, limits, sends, backlogs, bytes_out, .. } = self;
        if let Some(sub) = subs.get_mut(sk.key).filter(|s| s.id == sk.id) {
            let (calls, backlog, bytes) = sub.send_now(iovecs, me, sk.key, limits.batch_max.clamp(1, MAX_IOVECS));
            *sends += calls;
            *backlogs += u64::from(backlog);
            *bytes_out += bytes;
        }
    }

    /// Queues what the broker replayed for a stream. Replayed bytes are bounded by the
    /// history, not by --max-queued-bytes (a resume must not look like a slow consumer), so
    /// they are queued without counting against that bound.
    pub fn replay(&mut self, sk: StreamKey, frames: &[Frame]) {
        let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) else { return };
        if sub.state != StreamState::Open {
            return;
        }
        for frame in frames {
            sub.queue.push_back((frame.for_stream(sub.wire), NO_TAG));
        }
        mark_dirty(&mut self.dirty, sub, sk.key);
    }

    /// Holds a new stream's sends until `resume` brings its replay (live events queue meanwhile).
    pub fn pause(&mut self, sk: StreamKey) {
        if let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) {
            sub.paused = true;
        }
    }

    /// Puts a paused stream's replay between its opening bytes and the live events queued
    /// meanwhile, and lets it send.
    pub fn resume(&mut self, sk: StreamKey, frames: &[Frame]) {
        let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) else { return };
        sub.paused = false;
        if sub.state == StreamState::Open {
            // Nothing was sent while paused: the opening bytes are still at the front.
            let at = sub.queue.len().min(1);
            for (i, frame) in frames.iter().enumerate() {
                sub.queue.insert(at + i, (frame.for_stream(sub.wire), NO_TAG));
            }
        }
        mark_dirty(&mut self.dirty, sub, sk.key);
    }

    /// Queues the shared heartbeat comment on every open stream and marks them for the next
    /// flush.
    pub fn heartbeat(&mut self, stats: &CoreStats) {
        let mut dropped = 0;
        for (key, sub) in self.subs.iter_mut() {
            let beat = match sub.wire {
                Wire::Chunked => HEARTBEAT_CHUNK,
                Wire::Raw => HEARTBEAT_RAW,
                Wire::Gzip => HEARTBEAT_GZIP,
            };
            match sub.enqueue(Bytes::from_static(beat), NO_TAG, self.limits.max_queued, self.limits.slow) {
                Queued::Dropped => dropped += 1,
                Queued::Closed => {}
                _ => mark_dirty(&mut self.dirty, sub, key),
            }
        }
        if dropped > 0 {
            stats.slow_disconnects.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Queues a frame that is not a numbered event (the dashboard's stats) for every stream of
    /// `topic`, whatever its `live_after`; such topics cannot be published to.
    pub fn notice(&mut self, topic: &str, frame: &Frame, stats: &CoreStats) {
        let Some(set) = self.topics.get(topic) else { return };
        let keys: Vec<usize> = set.iter().map(|(_, &key)| key).collect();
        self.queue_notice(keys, frame, stats);
    }

    /// Queues `frame` for every open event stream (not the dashboard's `$` streams).
    pub fn notice_all(&mut self, frame: &Frame, stats: &CoreStats) {
        let keys: Vec<usize> = self
            .subs
            .iter()
            .filter(|(_, sub)| sub.state == StreamState::Open && !sub.topics.iter().all(|(t, _)| t.starts_with('$')))
            .map(|(key, _)| key)
            .collect();
        self.queue_notice(keys, frame, stats);
    }

    /// `notice` and `notice_all`: the frame on each of `keys`, counting the streams it made
    /// too slow. (Once a second or rarer: the key list costs nothing that matters.)
    fn queue_notice(&mut self, keys: Vec<usize>, frame: &Frame, stats: &CoreStats) {
        let Hub { subs, limits, dirty, .. } = self;
        let mut dropped = 0;
        for key in keys {
            let sub = &mut subs[key];
            match sub.enqueue(frame.for_stream(sub.wire), NO_TAG, limits.max_queued, limits.slow) {
                Queued::Dropped => dropped += 1,
                Queued::Closed => {}
                _ => mark_dirty(dirty, sub, key),
            }
        }
        if dropped > 0 {
            stats.slow_disconnects.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// The `n` topics with the most streams on this core (internal `$` topics left out).
    pub fn top_topics(&self, n: usize) -> Vec<(Box<str>, usize)> {
        let mut all: Vec<(&Rc<str>, usize)> = self
            .topics
            .iter()
            .filter(|(name, _)| !name.starts_with('$'))
            .map(|(name, set)| (name, set.len()))
            .collect();
        if all.len() > n {
            all.select_nth_unstable_by(n, |a, b| b.1.cmp(&a.1));
            all.truncate(n);
        }
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        all.into_iter().map(|(name, count)| (Box::from(&**name), count)).collect()
    }

    /// The streams still open (a staged drain closes them a share at a time).
    pub fn open_streams(&self) -> Vec<StreamKey> {
        self.subs
            .iter()
            .filter(|(_, sub)| sub.state == StreamState::Open)
            .map(|(key, sub)| StreamKey { key, id: sub.id })
            .collect()
    }

    /// Queues `retry:` (from `retry`) and the end of the stream for each of `streams` still
    /// open; each is shut once its queue is sent (`send_now` / `write_backlog`). The caller
    /// flushes.
    pub fn close_streams(&mut self, streams: &[StreamKey], mut retry: impl FnMut() -> Frame) {
        for sk in streams {
            let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) else { continue };
            if sub.state != StreamState::Open {
                continue;
            }
            let frame = retry();
            sub.queue.push_back((frame.for_stream(sub.wire), NO_TAG));
            if sub.wire != Wire::Raw {
                sub.queue.push_back((Bytes::from_static(LAST_CHUNK), NO_TAG));
            }
            sub.state = StreamState::Closing;
            mark_dirty(&mut self.dirty, sub, sk.key);
        }
    }

    /// Sends `frames` to one stream, then ends it (e.g. `ringcast-expired` at its token's exp).
    pub fn close_one(&mut self, sk: StreamKey, frames: &[Frame]) {
        let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) else { return };
        if sub.state != StreamState::Open {
            return;
        }
        for frame in frames {
            sub.queue.push_back((frame.for_stream(sub.wire), NO_TAG));
        }
        if sub.wire != Wire::Raw {
            sub.queue.push_back((Bytes::from_static(LAST_CHUNK), NO_TAG));
        }
        sub.state = StreamState::Closing;
        mark_dirty(&mut self.dirty, sub, sk.key);
        self.flush_one(sk);
    }

    /// Closes every stream now (end of the drain period).
    pub fn kill_all(&mut self) {
        for (_, sub) in self.subs.iter_mut() {
            sub.kill();
        }
    }

    /// Moves queued frames into the backlog writer's `batch`; false when there is nothing
    /// more to write (or the stream is gone or dead).
    fn take_backlog(&mut self, sk: StreamKey, batch: &mut FrameBatch) -> bool {
        let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) else { return false };
        if sub.state == StreamState::Dead || sub.queue.is_empty() {
            return false;
        }
        while !batch.is_full() {
            let Some((frame, _)) = sub.queue.pop_front() else { break };
            sub.writer_bytes += frame.len();
            batch.push(frame);
        }
        sub.trim();
        true
    }

    /// The backlog writer is done: the write half comes back, direct sends resume.
    fn writer_done(&mut self, sk: StreamKey, wr: OwnedWriteHalf<TcpStream>, failed: bool) {
        let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) else { return };
        sub.wr = Some(wr);
        sub.writing = false;
        sub.writer_bytes = 0;
        if failed {
            sub.kill();
        } else if sub.state == StreamState::Closing && sub.queue.is_empty() {
            kick(sub.fd);
        }
    }

    /// The writer's batch of `n` bytes left the process: it no longer counts against the
    /// queue bound.
    fn written(&mut self, sk: StreamKey, n: usize) {
        self.bytes_out += n as u64;
        if let Some(sub) = self.subs.get_mut(sk.key).filter(|s| s.id == sk.id) {
            sub.pending_bytes = sub.pending_bytes.saturating_sub(n);
            sub.writer_bytes = sub.writer_bytes.saturating_sub(n);
        }
    }
}

/// Writes a stream's backlog while its socket is full: io_uring (or epoll) waits for room,
/// so the core never blocks. Ends when the queue is empty and hands the write half back.
async fn write_backlog(hub: Rc<RefCell<Hub>>, sk: StreamKey, mut wr: OwnedWriteHalf<TcpStream>) {
    let mut batch = FrameBatch::new();
    loop {
        if !hub.borrow_mut().take_backlog(sk, &mut batch) {
            hub.borrow_mut().writer_done(sk, wr, false);
            return;
        }
        let total = batch.total_len();
        while !batch.is_empty() {
            let (res, back) = wr.writev(batch).await;
            batch = back;
            match res {
                Ok(n) if n > 0 => batch.advance(n),
                _ => {
                    hub.borrow_mut().writer_done(sk, wr, true);
                    return;
                }
            }
        }
        hub.borrow_mut().written(sk, total);
        batch.clear();
    }
}

/// One batched send's outcome for its stream (see `Hub::flush_batched`).
fn sent(
    subs: &mut Slab<Subscriber>,
    me: &Weak<RefCell<Hub>>,
    dirty: &mut VecDeque<StreamKey>,
    (sends, backlogs, bytes_out): (&mut u64, &mut u64, &mut u64),
    sk: StreamKey,
    offered: usize,
    res: Result<usize, i32>,
) {
    let Some(sub) = subs.get_mut(sk.key).filter(|s| s.id == sk.id) else { return };
    *sends += 1;
    match res {
        Ok(n) => {
            *bytes_out += n as u64;
            sub.consume(n);
            if n == offered && !sub.queue.is_empty() {
                mark_dirty(dirty, sub, sk.key); // more than one send carries: to the back
                return;
            }
        }
        Err(libc::EAGAIN | libc::EINTR) => {}
        // The peer is gone (EPIPE, ECONNRESET...): the close watcher removes it.
        Err(_) => return sub.kill(),
    }
    *backlogs += u64::from(sub.after_send(me, sk.key));
}

/// A core-local copy of a small frame (see `LOCAL_COPY_MAX`); large frames stay shared.
fn local_frame(frame: &Frame) -> Frame {
    if frame.chunk().len() <= LOCAL_COPY_MAX {
        frame.copied()
    } else {
        frame.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::encode_event;
    use std::sync::Arc;

    fn event(seq: u64, topics: &[&str], data: &str) -> Arc<Event> {
        let id = EventId { ms: 1, seq };
        Arc::new(Event::new(
            id,
            topics.iter().map(|t| Box::<str>::from(*t)).collect(),
            encode_event(id, None, data),
            Vec::new(),
        ))
    }

    fn hub(max_queued: usize, slow: SlowPolicy) -> Hub {
        Hub::detached(HubLimits { max_queued, slow, windowed: false, batch_max: 256 }, Weak::new())
    }

    fn queued(hub: &Hub, sk: StreamKey) -> Vec<String> {
        hub.subs[sk.key].queue.iter().skip(1).map(|(b, _)| String::from_utf8_lossy(b).into_owned()).collect()
    }

    fn topics(names: &[&str]) -> Vec<Box<str>> {
        names.iter().map(|t| Box::<str>::from(*t)).collect()
    }

    #[test]
    fn multi_topic_event_queued_once_and_unsubscribe_cleans_index() {
        let stats = CoreStats::default();
        let mut h = hub(1 << 20, SlowPolicy::Disconnect);
        let sk = h.subscribe(
            &topics(&["a", "b"]),
            None,
            -1,
            None,
            Wire::Chunked,
            EventId::default(),
            Bytes::from_static(b"open"),
            &stats,
        );
        h.publish(&event(1, &["a", "b"], "x"), &stats);
        h.publish(&event(2, &["c"], "y"), &stats);
        assert_eq!(queued(&h, sk).len(), 1);
        assert_eq!(stats.topics.load(Ordering::Relaxed), 2);
        h.unsubscribe(sk, &stats);
        assert_eq!((h.subs.len(), h.topics.len()), (0, 0));
    }

    #[test]
    fn empty_frames_never_stall_a_send() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        for batched in [false, true] {
            let stats = CoreStats::default();
            let mut h = hub(1 << 20, SlowPolicy::Disconnect);
            if batched {
                match BatchSender::new() {
                    Ok(sender) => h.set_sender(sender),
                    Err(_) => continue, // no io_uring here
                }
            }
            let (a, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
            // An empty opening frame, then an event: both must leave and the queue empty.
            let sk = h.subscribe(
                &topics(&["a"]),
                None,
                a.as_raw_fd(),
                None,
                Wire::Raw,
                EventId::default(),
                Bytes::new(),
                &stats,
            );
            h.flush();
            h.publish(&event(1, &["a"], "x"), &stats);
            h.flush();
            assert!(h.subs[sk.key].queue.is_empty(), "batched={batched}");
            let mut buf = [0u8; 64];
            let n = peer.read(&mut buf).unwrap();
            assert!(buf[..n].ends_with(b"data: x\n\n"), "batched={batched}: {:?}", &buf[..n]);
            assert!(h.sends >= 1);
        }
    }

    #[test]
    fn drained_queue_gives_back_a_burst_sized_buffer() {
        let stats = CoreStats::default();
        let mut h = hub(1 << 20, SlowPolicy::Disconnect);
        let sk = h.subscribe(&topics(&["a"]), None, -1, None, Wire::Chunked, EventId::default(), Bytes::new(), &stats);
        for seq in 0..500 {
            h.publish(&event(seq, &["a"], "x"), &stats);
        }
        assert!(h.subs[sk.key].queue.capacity() >= 500);
        let queued_bytes = h.subs[sk.key].pending_bytes;
        let mut batch = FrameBatch::new();
        let mut taken = 0;
        while h.take_backlog(sk, &mut batch) {
            taken += batch.total_len();
            batch.clear();
        }
        assert_eq!(taken, queued_bytes);
        assert!(h.subs[sk.key].queue.capacity() <= QUEUE_KEEP, "{}", h.subs[sk.key].queue.capacity());
    }

    #[test]
    fn slow_subscriber_is_dropped_or_conflated() {
        let stats = CoreStats::default();
        let mut h = hub(200, SlowPolicy::Disconnect);
        let sk = h.subscribe(&topics(&["a"]), None, -1, None, Wire::Chunked, EventId::default(), Bytes::new(), &stats);
        for seq in 0..20 {
            h.publish(&event(seq, &["a"], "0123456789"), &stats);
        }
        assert_eq!(h.subs[sk.key].state, StreamState::Dead);
        assert_eq!(stats.slow_disconnects.load(Ordering::Relaxed), 1);

        let mut h = hub(200, SlowPolicy::Latest);
        let sk =
            h.subscribe(&topics(&["a", "b"]), None, -1, None, Wire::Chunked, EventId::default(), Bytes::new(), &stats);
        for seq in 0..20 {
            h.publish(&event(seq, &[if seq % 2 == 0 { "a" } else { "b" }], "0123456789"), &stats);
        }
        assert_eq!(h.subs[sk.key].state, StreamState::Open);
        let q = queued(&h, sk);
        assert!(q.len() < 20 && q.iter().any(|f| f.contains("id: 1-19")) && q.iter().any(|f| f.contains("id: 1-18")));
        assert!(stats.conflated.load(Ordering::Relaxed) > 0);
        assert!(h.subs[sk.key].pending_bytes <= 200);
    }

    #[test]
    fn one_event_larger_than_the_bound_is_not_too_slow() {
        let stats = CoreStats::default();
        let mut h = hub(100, SlowPolicy::Disconnect);
        let sk = h.subscribe(&topics(&["a"]), None, -1, None, Wire::Chunked, EventId::default(), Bytes::new(), &stats);
        h.subs[sk.key].queue.clear(); // the opening frame was sent
        let big = "x".repeat(500);
        h.publish(&event(1, &["a"], &big), &stats);
        assert_eq!(h.subs[sk.key].state, StreamState::Open, "one event alone");
        h.publish(&event(2, &["a"], &big), &stats);
        assert_eq!(h.subs[sk.key].state, StreamState::Open, "one event behind the one being written");
        h.publish(&event(3, &["a"], "small"), &stats);
        assert_eq!(h.subs[sk.key].state, StreamState::Dead, "a second one past the bound");
        assert_eq!(stats.slow_disconnects.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn paused_stream_gets_its_replay_before_live_events() {
        let stats = CoreStats::default();
        let mut h = hub(1 << 20, SlowPolicy::Disconnect);
        let sk = h.subscribe(
            &topics(&["a"]),
            None,
            -1,
            None,
            Wire::Chunked,
            EventId { ms: 1, seq: 2 },
            Bytes::new(),
            &stats,
        );
        h.pause(sk);
        h.flush_one(sk); // sends nothing (fd -1 would fail and kill it otherwise)
        assert_eq!(h.subs[sk.key].state, StreamState::Open);
        h.publish(&event(3, &["a"], "live"), &stats);
        h.resume(sk, &[event(1, &["a"], "old1").frame.clone(), event(2, &["a"], "old2").frame.clone()]);
        let q = queued(&h, sk);
        assert_eq!(q.len(), 3);
        assert!(q[0].contains("old1") && q[1].contains("old2") && q[2].contains("live"), "{q:?}");
    }

    #[test]
    fn replay_gates_live_events() {
        let stats = CoreStats::default();
        let mut h = hub(1 << 20, SlowPolicy::Disconnect);
        let covered = EventId { ms: 1, seq: 1 };
        let sk = h.subscribe(&topics(&["a"]), None, -1, None, Wire::Chunked, covered, Bytes::new(), &stats);
        h.replay(sk, &[event(1, &["a"], "replayed").frame.clone()]);
        // Still in the mailbox when the stream opened: the replay has it already.
        h.publish(&event(1, &["a"], "covered by replay"), &stats);
        h.publish(&event(2, &["a"], "live"), &stats);
        let q = queued(&h, sk);
        assert_eq!(q.len(), 2);
        assert!(q[0].contains("replayed") && q[1].contains("live"));
    }
}
