//! Publishers: keep-alive connections POSTing timestamped events, at a fixed
//! rate or flat out.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::cli::PublishMode;
use crate::net::mono_ns;
use crate::sse::{parse_head, ChunkDecoder, Framing, Payload};
use crate::stats;

#[derive(Debug, Clone)]
pub struct PubConfig {
    pub target: SocketAddr,
    pub host_header: String,
    /// Publish request target per topic index.
    pub paths: Vec<String>,
    pub size: usize,
    pub mode: PublishMode,
    pub publishers: usize,
    pub pipeline: usize,
    /// Unanswered requests a rate-mode publisher may have outstanding.
    pub max_in_flight: usize,
    /// Connect / write / response timeout; a publisher that hits it stops.
    pub timeout: Duration,
}

/// What the publishers did.
#[derive(Debug, Clone)]
pub struct PubResult {
    /// Events accepted by the server (2xx), per topic index.
    pub published_by_topic: Vec<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Request -> response time (ns).
    pub rtt: Histogram<u64>,
    /// The event id the server answered to the earliest accepted publish
    /// (ringcast: `{"id":"<ms>-<seq>"}`), if its answer carried one.
    pub first_id: Option<String>,
}

impl PubResult {
    pub fn published(&self) -> u64 {
        self.published_by_topic.iter().sum()
    }
}

/// Live counters of all publishers.
#[derive(Debug, Default)]
pub struct PubProgress {
    pub published: AtomicU64,
    pub errors: AtomicU64,
}

/// Running publisher threads.
pub struct Publishers {
    handles: Vec<JoinHandle<PubResult>>,
    pub progress: Arc<PubProgress>,
    first_error: Arc<Mutex<Option<String>>>,
}

impl Publishers {
    /// Starts `cfg.publishers` threads; they all use `start_ns` as time zero.
    pub fn start(cfg: PubConfig, stop: Arc<AtomicBool>) -> io::Result<Publishers> {
        let cfg = Arc::new(cfg);
        let progress = Arc::new(PubProgress::default());
        let first_error = Arc::new(Mutex::new(None));
        let start_ns = mono_ns();
        let mut handles = Vec::new();
        for id in 0..cfg.publishers {
            let worker = PubWorker {
                id,
                cfg: cfg.clone(),
                stop: stop.clone(),
                progress: progress.clone(),
                first_error: first_error.clone(),
                conn: None,
                seq: vec![0; cfg.paths.len()],
                next_topic: id % cfg.paths.len(),
                gave_up: false,
                accepted_any: false,
                result: PubResult {
                    published_by_topic: vec![0; cfg.paths.len()],
                    errors: 0,
                    first_error: None,
                    rtt: stats::new_histogram(),
                    first_id: None,
                },
            };
            handles.push(std::thread::Builder::new().name(format!("pub-{id}")).spawn(move || worker.run(start_ns))?);
        }
        Ok(Publishers { handles, progress, first_error })
    }

    pub fn is_finished(&self) -> bool {
        self.handles.iter().all(|h| h.is_finished())
    }

    /// Waits for all publishers and merges their results.
    pub fn join(self) -> PubResult {
        let mut total: Option<PubResult> = None;
        for h in self.handles {
            let r = h.join().expect("publisher thread panicked");
            match &mut total {
                None => total = Some(r),
                Some(t) => {
                    stats::add_by_topic(&mut t.published_by_topic, &r.published_by_topic);
                    t.errors += r.errors;
                    stats::merge(&mut t.rtt, &r.rtt);
                    t.first_id = earliest_id(t.first_id.take(), r.first_id);
                }
            }
        }
        let mut total = total.expect("at least one publisher");
        total.first_error = self.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        total
    }
}

/// Longest publish answer whose body is kept (to read the event id).
const MAX_KEPT_BODY: u64 = 4096;

/// The `"id"` of a publish answer such as ringcast's `{"id":"1700000000000-0"}`.
pub fn parse_publish_id(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("id")?.as_str().map(str::to_string)
}

/// An id `<ms>-<seq>` as the number pair it is ordered by.
fn id_key(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The earlier of two event ids (ordered as `<ms>-<seq>` number pairs; else the first given).
fn earliest_id(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => match (id_key(&a), id_key(&b)) {
            (Some(ka), Some(kb)) if kb < ka => Some(b),
            _ => Some(a),
        },
        (a, b) => a.or(b),
    }
}

struct PubConn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl PubConn {
    fn open(addr: &SocketAddr, timeout: Duration) -> io::Result<PubConn> {
        let stream = TcpStream::connect_timeout(addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(PubConn { reader: BufReader::with_capacity(64 * 1024, stream.try_clone()?), writer: stream })
    }

    /// Reads one response; returns (status, connection must be closed, body). The body is
    /// kept only when `keep_body` and it is short and Content-Length framed.
    fn read_response(&mut self, keep_body: bool) -> io::Result<(u16, bool, Option<Vec<u8>>)> {
        let mut head = Vec::with_capacity(256);
        loop {
            let start = head.len();
            if self.reader.read_until(b'\n', &mut head)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the response"));
            }
            let line = &head[start..];
            if line == b"\r\n" || line == b"\n" {
                head.truncate(start);
                break;
            }
            if head.len() > 64 * 1024 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "response head too large"));
            }
        }
        let parsed = parse_head(&head).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let mut close = parsed.close;
        let mut body = None;
        match parsed.framing {
            Framing::Length(n) if keep_body && n <= MAX_KEPT_BODY => {
                let mut buf = vec![0; n as usize];
                self.reader.read_exact(&mut buf)?;
                body = Some(buf);
            }
            Framing::Length(n) => {
                io::copy(&mut (&mut self.reader).take(n), &mut io::sink())?;
            }
            Framing::Chunked => {
                let mut dec = ChunkDecoder::default();
                while !dec.is_done() {
                    let buf = self.reader.fill_buf()?;
                    if buf.is_empty() {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let used = dec
                        .feed(buf, &mut |_| {})
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    self.reader.consume(used);
                }
            }
            Framing::UntilClose => {
                io::copy(&mut self.reader, &mut io::sink())?;
                close = true;
            }
        }
        Ok((parsed.status, close, body))
    }
}

struct PubWorker {
    id: usize,
    cfg: Arc<PubConfig>,
    stop: Arc<AtomicBool>,
    progress: Arc<PubProgress>,
    first_error: Arc<Mutex<Option<String>>>,
    conn: Option<PubConn>,
    /// Next sequence number per topic.
    seq: Vec<u64>,
    next_topic: usize,
    /// The server stopped answering: publish nothing more.
    gave_up: bool,
    /// A publish was accepted (its answer was checked for the event id).
    accepted_any: bool,
    result: PubResult,
}

impl PubWorker {
    fn run(mut self, start_ns: u64) -> PubResult {
        let n = self.cfg.publishers as u64;
        match self.cfg.mode {
            PublishMode::Burst { count } => {
                let mine = count / n + u64::from((self.id as u64) < count % n);
                let mut done = 0;
                while done < mine && !self.gave_up && !self.stop.load(Ordering::Relaxed) {
                    let batch = (mine - done).min(self.cfg.pipeline as u64) as usize;
                    self.publish_batch(batch);
                    done += batch as u64;
                }
            }
            PublishMode::Rate { rate, duration } => self.run_rate(start_ns, rate, duration),
        }
        self.result
    }

    /// Open-loop publishing (like wrk2): each event is written at its scheduled time without
    /// waiting for earlier answers, which a reader thread collects in order; at most
    /// `cfg.max_in_flight` answers may be outstanding. Each event carries its scheduled time,
    /// so a server that stalls the publisher shows up as latency (no coordinated omission).
    fn run_rate(&mut self, start_ns: u64, rate: f64, duration: Duration) {
        let n = self.cfg.publishers as u64;
        // Each publisher sends every `interval`, staggered by id.
        let interval = n as f64 * 1e9 / rate;
        let offset = self.id as f64 * 1e9 / rate;
        let end = start_ns + duration.as_nanos() as u64;
        let topics = self.cfg.paths.len();
        let mut line: Option<RateLine> = None;
        let mut buf = Vec::with_capacity(self.cfg.size + 256);
        for k in 0u64.. {
            // Behind schedule, events go out back to back; nothing is sent after the end of the
            // duration.
            let due = start_ns + (offset + k as f64 * interval) as u64;
            let now = mono_ns();
            if due >= end || now >= end || self.gave_up || self.stop.load(Ordering::Relaxed) {
                break;
            }
            if due > now + 50_000 {
                std::thread::sleep(Duration::from_nanos(due - now));
            }
            if line.as_ref().is_some_and(|l| l.broken.load(Ordering::Relaxed)) {
                self.finish_line(line.take());
                if self.gave_up {
                    break;
                }
            }
            if line.is_none() {
                match RateLine::open(self) {
                    Ok(l) => line = Some(l),
                    Err(e) => {
                        self.error(1, || format!("publisher connect: {e}"));
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                }
            }
            let l = line.as_mut().expect("opened above");
            let topic = self.next_topic;
            self.next_topic = (self.next_topic + 1) % topics;
            let seq = self.seq[topic];
            self.seq[topic] += 1;
            buf.clear();
            self.write_request(topic, seq, due.min(mono_ns()), &mut buf);
            // Blocks while `max_in_flight` answers are outstanding.
            if l.queue.send((topic, mono_ns())).is_err() {
                self.finish_line(line.take());
                self.error(1, || "publish connection closed by the server".into());
                continue;
            }
            if let Err(e) = l.writer.write_all(&buf) {
                l.broken.store(true, Ordering::Relaxed);
                let _ = l.writer.shutdown(std::net::Shutdown::Both);
                self.error(0, || format!("publish write: {e}"));
            }
        }
        self.finish_line(line);
    }

    /// Closes the queue of an open-loop line, waits for its reader and merges what it counted.
    fn finish_line(&mut self, line: Option<RateLine>) {
        let Some(RateLine { writer, queue, reader, .. }) = line else { return };
        drop(queue);
        let got = reader.join().expect("publisher reader panicked");
        drop(writer);
        stats::add_by_topic(&mut self.result.published_by_topic, &got.published_by_topic);
        self.result.errors += got.errors;
        stats::merge(&mut self.result.rtt, &got.rtt);
        if self.result.first_id.is_none() {
            self.result.first_id = got.first_id;
        }
        if got.timed_out {
            self.gave_up = true;
        }
    }

    /// Appends one publish request for `topic` carrying (`t_ns`, `seq`) to `buf`.
    fn write_request(&self, topic: usize, seq: u64, t_ns: u64, buf: &mut Vec<u8>) {
        let mut body = Vec::with_capacity(self.cfg.size + 64);
        Payload { t_ns, seq, publisher: self.id as u32 }.write_padded(self.cfg.size, &mut body);
        write!(
            buf,
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            self.cfg.paths[topic],
            self.cfg.host_header,
            body.len()
        )
        .expect("write to Vec");
        buf.extend_from_slice(&body);
    }

    fn error(&mut self, count: u64, msg: impl FnOnce() -> String) {
        self.result.errors += count;
        self.progress.errors.fetch_add(count, Ordering::Relaxed);
        let mut slot = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(msg());
        }
    }

    /// Writes `batch` requests back to back, then reads their responses.
    fn publish_batch(&mut self, batch: usize) {
        if self.conn.is_none() {
            match PubConn::open(&self.cfg.target, self.cfg.timeout) {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    self.error(batch as u64, || format!("publisher connect: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
            }
        }
        let topics = self.cfg.paths.len();
        let mut buf = Vec::with_capacity(batch * (self.cfg.size + 200));
        let mut sent_topics = Vec::with_capacity(batch);
        for _ in 0..batch {
            let topic = self.next_topic;
            self.next_topic = (self.next_topic + 1) % topics;
            let seq = self.seq[topic];
            self.seq[topic] += 1;
            self.write_request(topic, seq, mono_ns(), &mut buf);
            sent_topics.push(topic);
        }
        let sent_ns = mono_ns();
        let conn = self.conn.as_mut().expect("connected above");
        if let Err(e) = conn.writer.write_all(&buf) {
            self.conn = None;
            return self.error(batch as u64, || format!("publish write: {e}"));
        }
        for (i, &topic) in sent_topics.iter().enumerate() {
            let conn = self.conn.as_mut().expect("connected above");
            let want_id = !self.accepted_any;
            match conn.read_response(want_id) {
                Ok((status, close, body)) => {
                    stats::record(&mut self.result.rtt, mono_ns().saturating_sub(sent_ns));
                    if (200..300).contains(&status) {
                        if want_id {
                            self.accepted_any = true;
                            self.result.first_id = body.as_deref().and_then(parse_publish_id);
                        }
                        self.result.published_by_topic[topic] += 1;
                        self.progress.published.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.error(1, || format!("publish answered {status}"));
                    }
                    if close {
                        self.conn = None;
                        let left = (batch - i - 1) as u64;
                        if left > 0 {
                            self.error(left, || "publish connection closed by the server".into());
                        }
                        return;
                    }
                }
                Err(e) => {
                    self.conn = None;
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                        self.gave_up = true;
                        let secs = self.cfg.timeout.as_secs_f64();
                        return self.error((batch - i) as u64, || {
                            format!("publish response timed out after {secs}s; publisher stopped")
                        });
                    }
                    return self.error((batch - i) as u64, || format!("publish response: {e}"));
                }
            }
        }
    }
}

/// What an open-loop reader counted.
struct LineResult {
    published_by_topic: Vec<u64>,
    errors: u64,
    rtt: Histogram<u64>,
    first_id: Option<String>,
    /// The server stopped answering within the timeout.
    timed_out: bool,
}

/// One open-loop publisher connection: the writer half, the queue of (topic, sent at) of
/// unanswered requests, and the reader thread that answers them in order.
struct RateLine {
    writer: TcpStream,
    queue: std::sync::mpsc::SyncSender<(usize, u64)>,
    broken: Arc<AtomicBool>,
    reader: JoinHandle<LineResult>,
}

impl RateLine {
    fn open(w: &PubWorker) -> io::Result<RateLine> {
        let mut conn = PubConn::open(&w.cfg.target, w.cfg.timeout)?;
        let writer = conn.writer.try_clone()?;
        // The reader holds one request while it waits for its answer; the channel the rest.
        let (queue, answers) = std::sync::mpsc::sync_channel::<(usize, u64)>(w.cfg.max_in_flight - 1);
        let broken = Arc::new(AtomicBool::new(false));
        let (progress, first_error, topics) = (w.progress.clone(), w.first_error.clone(), w.cfg.paths.len());
        let (flag, timeout) = (broken.clone(), w.cfg.timeout);
        let mut want_id = !w.accepted_any;
        let reader = std::thread::Builder::new().name(format!("pub-{}-rx", w.id)).spawn(move || {
            let mut r = LineResult {
                published_by_topic: vec![0; topics],
                errors: 0,
                rtt: stats::new_histogram(),
                first_id: None,
                timed_out: false,
            };
            let fail = |r: &mut LineResult, msg: String| {
                r.errors += 1;
                progress.errors.fetch_add(1, Ordering::Relaxed);
                let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                if slot.is_none() {
                    *slot = Some(msg);
                }
            };
            let mut dead = false;
            // After a failure every request still queued counts as an error.
            for (topic, sent_ns) in answers.iter() {
                if dead {
                    fail(&mut r, "publish connection lost".into());
                    continue;
                }
                match conn.read_response(want_id) {
                    Ok((status, close, body)) => {
                        stats::record(&mut r.rtt, mono_ns().saturating_sub(sent_ns));
                        if (200..300).contains(&status) {
                            if want_id {
                                want_id = false;
                                r.first_id = body.as_deref().and_then(parse_publish_id);
                            }
                            r.published_by_topic[topic] += 1;
                            progress.published.fetch_add(1, Ordering::Relaxed);
                        } else {
                            fail(&mut r, format!("publish answered {status}"));
                        }
                        if close {
                            dead = true;
                        }
                    }
                    Err(e) => {
                        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                            r.timed_out = true;
                            let secs = timeout.as_secs_f64();
                            fail(&mut r, format!("publish response timed out after {secs}s; publisher stopped"));
                        } else {
                            fail(&mut r, format!("publish response: {e}"));
                        }
                        dead = true;
                    }
                }
                if dead {
                    flag.store(true, Ordering::Relaxed);
                    let _ = conn.writer.shutdown(std::net::Shutdown::Both);
                }
            }
            r
        })?;
        Ok(RateLine { writer, queue, broken, reader })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_ids() {
        assert_eq!(parse_publish_id(br#"{"id":"1700000000000-3"}"#).as_deref(), Some("1700000000000-3"));
        assert_eq!(parse_publish_id(b"OK"), None);
        assert_eq!(parse_publish_id(br#"{"id":7}"#), None);
        let (a, b) = (Some("5-10".to_string()), Some("5-9".to_string()));
        assert_eq!(earliest_id(a.clone(), b.clone()), b);
        assert_eq!(earliest_id(b.clone(), a.clone()), b);
        assert_eq!(earliest_id(Some("6-0".into()), a.clone()), a);
        assert_eq!(earliest_id(None, a.clone()), a);
        assert_eq!(earliest_id(Some("x".into()), a), Some("x".into()));
    }
}
