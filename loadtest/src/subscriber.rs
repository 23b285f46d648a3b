//! Subscriber connections: each thread runs an edge-triggered epoll loop over
//! its share of nonblocking sockets, parses the streams and records latency.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use hdrhistogram::Histogram;

use crate::net::{self, Epoll, EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP};
use crate::sse::{StreamEvent, StreamParser};
use crate::stats::{self, AtomicCounters, Counters, Progress, ShardResult};

/// What every subscriber thread needs to know.
#[derive(Debug, Clone)]
pub struct SubConfig {
    pub target: SocketAddr,
    /// The complete GET request for each topic index.
    pub requests: Vec<Vec<u8>>,
    /// Number of publishers (sequence numbers are tracked per publisher).
    pub publishers: usize,
    /// Source addresses: the first and how many consecutive ones to rotate over.
    pub source: Option<(Ipv4Addr, u32)>,
    /// Connection attempts in flight per thread.
    pub inflight_per_thread: usize,
    /// Replay mode: events each stream must receive, per topic index; a stream that has
    /// them all records its completion time.
    pub expect_by_topic: Option<Vec<u64>>,
}

impl SubConfig {
    /// Topic index of global subscriber `g`.
    pub fn topic_of(&self, g: usize) -> usize {
        g % self.requests.len()
    }

    /// Events a stream on topic index `topic` must receive before it counts as complete.
    fn expected_on(&self, topic: usize) -> Option<u64> {
        self.expect_by_topic.as_ref().map(|e| e.get(topic).copied().unwrap_or(0))
    }

    /// Source address of global subscriber `g`.
    pub fn source_of(&self, g: usize) -> Option<Ipv4Addr> {
        self.source
            .map(|(base, count)| Ipv4Addr::from(u32::from(base).wrapping_add((g % count.max(1) as usize) as u32)))
    }
}

/// Builds the subscribe request for one topic path; `last_event_id` resumes the stream
/// (`Last-Event-ID` header, as an EventSource sends on reconnect).
pub fn subscribe_request(path: &str, host: &str, http10: bool, last_event_id: Option<&str>) -> Vec<u8> {
    let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
    let resume = last_event_id.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
    format!(
        "GET {path} {version}\r\nHost: {host}\r\nAccept: text/event-stream\r\n\
         Cache-Control: no-cache\r\n{resume}User-Agent: ringcast-loadtest\r\n\r\n"
    )
    .into_bytes()
}

/// State shared by a group's threads and its owner.
struct Shared {
    stop: AtomicBool,
    cutoff: AtomicBool,
    counters: AtomicCounters,
    threads_connect_done: AtomicUsize,
    threads: usize,
    open_by_topic: Vec<AtomicU64>,
    /// CLOCK_MONOTONIC ns when the first connect started (`u64::MAX` until then).
    first_connect_ns: AtomicU64,
    /// CLOCK_MONOTONIC ns of the latest stream completion (replay mode).
    last_complete_ns: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn open_by_topic(&self) -> Vec<u64> {
        self.open_by_topic.iter().map(|a| a.load(Ordering::Relaxed)).collect()
    }

    fn note_error(&self, msg: impl FnOnce() -> String) {
        let mut slot = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(msg());
        }
    }
}

struct ThreadResult {
    latency: Histogram<u64>,
    connect: Histogram<u64>,
    complete: Histogram<u64>,
}

/// A set of subscriber threads holding one process's share of the subscribers.
pub struct SubscriberGroup {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<io::Result<ThreadResult>>>,
}

impl SubscriberGroup {
    /// Starts `threads` threads connecting the global subscribers `range`.
    pub fn start(cfg: SubConfig, range: Range<usize>, threads: usize) -> io::Result<Self> {
        let threads = threads.clamp(1, range.len().max(1));
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            cutoff: AtomicBool::new(false),
            counters: AtomicCounters::default(),
            threads_connect_done: AtomicUsize::new(0),
            threads,
            open_by_topic: (0..cfg.requests.len()).map(|_| AtomicU64::new(0)).collect(),
            first_connect_ns: AtomicU64::new(u64::MAX),
            last_complete_ns: AtomicU64::new(0),
            first_error: Mutex::new(None),
        });
        let cfg = Arc::new(cfg);
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let members: Vec<usize> = range.clone().skip(t).step_by(threads).collect();
            let worker = Worker::new(cfg.clone(), shared.clone(), &members)?;
            let handle = std::thread::Builder::new().name(format!("sub-{t}")).spawn(move || worker.run())?;
            handles.push(handle);
        }
        Ok(SubscriberGroup { shared, handles })
    }

    pub fn progress(&self) -> Progress {
        let connect_done = self.shared.threads_connect_done.load(Ordering::Acquire) == self.shared.threads;
        Progress {
            counters: self.shared.counters.snapshot(),
            connect_done,
            open_by_topic: if connect_done { self.open_by_topic() } else { Vec::new() },
        }
    }

    /// Ends the connect phase: subscribers not connected by now count as failed.
    pub fn cutoff(&self) {
        self.shared.cutoff.store(true, Ordering::Release);
    }

    fn open_by_topic(&self) -> Vec<u64> {
        self.shared.open_by_topic()
    }

    /// Stops the threads, closes the connections and returns the results.
    pub fn finish(self) -> ShardResult {
        self.shared.stop.store(true, Ordering::Release);
        let mut latency = stats::new_histogram();
        let mut connect = stats::new_histogram();
        let mut complete = stats::new_histogram();
        for h in self.handles {
            match h.join() {
                Ok(Ok(r)) => {
                    stats::merge(&mut latency, &r.latency);
                    stats::merge(&mut connect, &r.connect);
                    stats::merge(&mut complete, &r.complete);
                }
                Ok(Err(e)) => self.shared.note_error(|| format!("subscriber thread: {e}")),
                Err(_) => self.shared.note_error(|| "subscriber thread panicked".into()),
            }
        }
        let first_error = self.shared.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        ShardResult {
            counters: self.shared.counters.snapshot(),
            open_by_topic: self.shared.open_by_topic(),
            latency: stats::to_pairs(&latency),
            connect: stats::to_pairs(&connect),
            complete: stats::to_pairs(&complete),
            first_connect_ns: match self.shared.first_connect_ns.load(Ordering::Acquire) {
                u64::MAX => 0,
                ns => ns,
            },
            last_complete_ns: self.shared.last_complete_ns.load(Ordering::Acquire),
            cpu_seconds: 0.0,
            first_error,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NotStarted,
    Connecting,
    Sending(usize),
    Streaming,
    Closed,
}

struct Conn {
    global: usize,
    topic: usize,
    state: State,
    /// Got a `200` head (counted as connected).
    connected: bool,
    fd: Option<OwnedFd>,
    parser: StreamParser,
    started_ns: u64,
    /// Next expected sequence number per publisher.
    next_seq: Box<[u64]>,
    /// Events counted as `unique` on this stream.
    unique: u64,
}

/// Why a connection is being closed.
enum Close {
    Error(String),
    /// Ended by the server (EOF or terminal chunk).
    Ended,
}

const READ_BUF: usize = 256 * 1024;
const EVENT_BATCH: usize = 1024;
const WAIT_MS: i32 = 20;

struct Worker {
    cfg: Arc<SubConfig>,
    shared: Arc<Shared>,
    epoll: Epoll,
    conns: Vec<Conn>,
    next_to_start: usize,
    inflight: usize,
    delta: Counters,
    latency: Histogram<u64>,
    connect: Histogram<u64>,
    complete: Histogram<u64>,
}

impl Worker {
    fn new(cfg: Arc<SubConfig>, shared: Arc<Shared>, members: &[usize]) -> io::Result<Worker> {
        let conns = members
            .iter()
            .map(|&g| Conn {
                global: g,
                topic: cfg.topic_of(g),
                state: State::NotStarted,
                connected: false,
                fd: None,
                parser: StreamParser::default(),
                started_ns: 0,
                next_seq: vec![0; cfg.publishers].into_boxed_slice(),
                unique: 0,
            })
            .collect();
        Ok(Worker {
            epoll: Epoll::new()?,
            cfg,
            shared,
            conns,
            next_to_start: 0,
            inflight: 0,
            delta: Counters::default(),
            latency: stats::new_histogram(),
            connect: stats::new_histogram(),
            complete: stats::new_histogram(),
        })
    }

    fn run(self) -> io::Result<ThreadResult> {
        let shared = self.shared.clone();
        let mut connect_done = false;
        let result = self.event_loop(&mut connect_done);
        if !connect_done {
            // Failed early: do not hold up the connect phase.
            shared.threads_connect_done.fetch_add(1, Ordering::AcqRel);
        }
        result
    }

    fn event_loop(mut self, connect_done: &mut bool) -> io::Result<ThreadResult> {
        let mut events: Vec<libc::epoll_event> = Vec::with_capacity(EVENT_BATCH);
        let mut buf = vec![0u8; READ_BUF];
        while !self.shared.stop.load(Ordering::Acquire) {
            if !*connect_done {
                if self.shared.cutoff.load(Ordering::Acquire) {
                    self.cut_off();
                } else {
                    self.start_connects();
                }
                if self.next_to_start == self.conns.len() && self.inflight == 0 {
                    *connect_done = true;
                    self.flush();
                    self.shared.threads_connect_done.fetch_add(1, Ordering::AcqRel);
                }
            }
            self.epoll.wait(&mut events, WAIT_MS)?;
            for ev in &events {
                let (idx, flags) = (ev.u64 as usize, ev.events);
                self.on_ready(idx, flags, &mut buf);
            }
            self.flush();
        }
        self.flush();
        Ok(ThreadResult { latency: self.latency, connect: self.connect, complete: self.complete })
    }

    fn flush(&mut self) {
        self.shared.counters.flush(&mut self.delta);
    }

    fn start_connects(&mut self) {
        while self.inflight < self.cfg.inflight_per_thread && self.next_to_start < self.conns.len() {
            let idx = self.next_to_start;
            self.next_to_start += 1;
            let conn = &mut self.conns[idx];
            conn.started_ns = net::mono_ns();
            if idx == 0 {
                self.shared.first_connect_ns.fetch_min(conn.started_ns, Ordering::AcqRel);
            }
            let src = self.cfg.source_of(conn.global);
            let result = net::start_connect(&self.cfg.target, src).and_then(|fd| {
                self.epoll.add(fd.as_raw_fd(), EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, idx as u64)?;
                Ok(fd)
            });
            self.inflight += 1;
            match result {
                Ok(fd) => {
                    conn.fd = Some(fd);
                    conn.state = State::Connecting;
                }
                Err(e) => self.close(idx, Close::Error(format!("connect: {e}"))),
            }
        }
    }

    /// Connect deadline: give up on everything not connected yet.
    fn cut_off(&mut self) {
        for idx in 0..self.conns.len() {
            let c = &self.conns[idx];
            match c.state {
                State::NotStarted => {
                    self.conns[idx].state = State::Closed;
                    self.delta.connect_failed += 1;
                    self.shared.note_error(|| "connect timeout".into());
                }
                State::Closed => {}
                _ if !c.connected => {
                    self.close(idx, Close::Error("connect timeout".into()));
                }
                _ => {}
            }
        }
        self.next_to_start = self.conns.len();
    }

    fn close(&mut self, idx: usize, why: Close) {
        let conn = &mut self.conns[idx];
        if conn.state == State::Closed {
            return;
        }
        conn.state = State::Closed;
        conn.fd = None;
        conn.parser = StreamParser::default();
        if conn.connected {
            self.delta.disconnected += 1;
            self.shared.open_by_topic[conn.topic].fetch_sub(1, Ordering::Relaxed);
        } else {
            self.inflight -= 1;
            self.delta.connect_failed += 1;
        }
        if let Close::Error(msg) = why {
            self.shared.note_error(|| msg);
        } else if !self.shared.stop.load(Ordering::Relaxed) {
            self.shared.note_error(|| "stream closed by the server".to_string());
        }
    }

    fn on_ready(&mut self, idx: usize, flags: u32, buf: &mut [u8]) {
        let Some(conn) = self.conns.get_mut(idx) else {
            return;
        };
        let Some(fd) = conn.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        if conn.state == State::Connecting {
            if flags & (EPOLLOUT | EPOLLERR | EPOLLHUP) == 0 {
                return;
            }
            if let Err(e) = net::take_socket_error(fd) {
                return self.close(idx, Close::Error(format!("connect: {e}")));
            }
            conn.state = State::Sending(0);
        }
        if let State::Sending(mut off) = conn.state {
            let req = &self.cfg.requests[conn.topic];
            while off < req.len() {
                match net::write(fd, &req[off..]) {
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.state = State::Sending(off);
                        return;
                    }
                    Err(e) => return self.close(idx, Close::Error(format!("send: {e}"))),
                }
            }
            conn.state = State::Streaming;
        }
        if conn.state == State::Streaming && flags & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR) != 0 {
            if let Err(why) = self.read_stream(idx, fd, flags, buf) {
                self.close(idx, why);
            }
        }
    }

    /// Reads until the socket is drained, feeding the parser.
    fn read_stream(&mut self, idx: usize, fd: i32, flags: u32, buf: &mut [u8]) -> Result<(), Close> {
        let must_drain = flags & (EPOLLRDHUP | EPOLLHUP | EPOLLERR) != 0;
        loop {
            let n = match net::read(fd, buf) {
                Ok(0) => return Err(Close::Ended),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Close::Error(format!("read: {e}"))),
            };
            let now = net::mono_ns();
            self.delta.bytes += n as u64;
            self.feed(idx, &buf[..n], now)?;
            if n < buf.len() && !must_drain {
                // A short read drained the socket; new data raises a new edge.
                return Ok(());
            }
        }
    }

    fn feed(&mut self, idx: usize, data: &[u8], now: u64) -> Result<(), Close> {
        let Worker { cfg, conns, delta, latency, connect, complete, shared, inflight, .. } = self;
        let conn = &mut conns[idx];
        let Conn { parser, next_seq, topic, started_ns, connected, unique, .. } = conn;
        let expected = cfg.expected_on(*topic);
        let mut outcome = Ok(());
        let res = parser.feed(data, &mut |ev| match ev {
            StreamEvent::Head { status: 200 } => {
                *connected = true;
                delta.connected += 1;
                *inflight -= 1;
                shared.open_by_topic[*topic].fetch_add(1, Ordering::Relaxed);
                stats::record(connect, now.saturating_sub(*started_ns));
                if expected == Some(0) {
                    // Nothing to replay on this topic: complete once connected.
                    mark_complete(delta, complete, shared, now, *started_ns);
                }
            }
            StreamEvent::Head { status } => {
                outcome = Err(Close::Error(format!("subscribe answered {status}")));
            }
            StreamEvent::Event(Some(p)) => match next_seq.get_mut(p.publisher as usize) {
                Some(next) => {
                    delta.received += 1;
                    if p.seq >= *next {
                        if p.seq > *next {
                            delta.gaps += 1;
                        }
                        delta.unique += 1;
                        *next = p.seq + 1;
                        *unique += 1;
                        if Some(*unique) == expected {
                            mark_complete(delta, complete, shared, now, *started_ns);
                        }
                    } else {
                        delta.duplicates += 1;
                    }
                    stats::record(latency, now.saturating_sub(p.t_ns));
                }
                None => delta.foreign += 1,
            },
            StreamEvent::Event(None) => delta.foreign += 1,
            StreamEvent::End => {
                if outcome.is_ok() {
                    outcome = Err(Close::Ended);
                }
            }
        });
        if let Err(e) = res {
            return Err(Close::Error(format!("parse: {e}")));
        }
        outcome
    }
}

/// A stream has received everything expected on its topic (replay mode).
fn mark_complete(delta: &mut Counters, hist: &mut Histogram<u64>, shared: &Shared, now: u64, started_ns: u64) {
    delta.completed += 1;
    stats::record(hist, now.saturating_sub(started_ns));
    shared.last_complete_ns.fetch_max(now, Ordering::AcqRel);
}
