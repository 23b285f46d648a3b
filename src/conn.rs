//! One connection: read requests (pipelined, keep-alive), route them, or become an event stream.

use crate::access::{Grant, StreamPermit};
use crate::broker::{replay_frames, Full};
use crate::cluster::{Cluster, HistoryFrom};
use crate::event::{EventId, Publish, StreamKey};
use crate::gzip;
use crate::history::{Replay, ReplayFrom};
use crate::http::{
    parse_request, put_chunk, write_response, write_stream_head, BodyKind, ChunkedDecoder, HttpError, Method, Request,
};
use crate::metrics::Shared;
use crate::publish::{parse_publish, validate_topics};
use crate::sse::{encode_notice, retry_frame, Wire, LAST_CHUNK, OPENING_SSE};
use crate::worker::Worker;
use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, Splitable};
use monoio::net::TcpStream;
use monoio::time::Instant;
use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// First read size for a request: a browser's `GET /events` head is well under 1 KiB, and every
/// connection pays for this buffer until it becomes a stream. Grows for bigger requests.
const READ_CHUNK: usize = 1024;
/// A stream's close watcher reads into this many bytes (swallows stray client bytes).
const WATCH_BUF: usize = 64;

/// Runs a connection so that a panic ends only this connection, never the core's runtime
/// (monoio 0.2.4 lets a task's panic unwind out of `block_on`).
pub async fn serve_guarded(worker: Rc<Worker>, stream: TcpStream, over_limit: bool, peer: IpAddr) {
    let count = ConnectionCount(worker.shared.clone(), worker.index);
    if CatchUnwind(serve(worker, stream, over_limit, peer, count)).await.is_err() {
        log::error!("a connection task panicked; the connection was closed");
    }
}

/// The connection's place in the open-connection counts (all cores, and its core's own; only
/// that core's thread changes the latter).
struct ConnectionCount(Arc<Shared>, usize);

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        let core = &self.0.cores[self.1].connections;
        core.store(core.load(Ordering::Relaxed).saturating_sub(1), Ordering::Relaxed);
    }
}

struct CatchUnwind<F>(F);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning; the inner future is never moved out of `self`.
        let inner = unsafe { self.map_unchecked_mut(|s| &mut s.0) };
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

enum ReadError {
    Closed,
    Timeout,
}

/// Reads more bytes into `buf` (appending), flushing pending responses first.
async fn fill(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    deadline: Instant,
) -> Result<(), ReadError> {
    if !out.is_empty() && !flush(stream, out).await {
        return Err(ReadError::Closed);
    }
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK.max(buf.len()));
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let owned = std::mem::take(buf);
    match monoio::time::timeout_at(deadline, stream.read(owned.slice_mut(len..cap))).await {
        Ok((res, slice)) => {
            *buf = slice.into_inner();
            match res {
                Ok(0) | Err(_) => Err(ReadError::Closed),
                Ok(_) => Ok(()),
            }
        }
        Err(_) => Err(ReadError::Timeout),
    }
}

/// Writes and clears `out`; false when the peer is gone. Answers are small and the socket
/// almost always has room: they leave at once with one nonblocking `send`, not at the
/// runtime's next io_uring submit (which a fan-out slice on this core can hold back).
async fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> bool {
    // SAFETY: `out` is valid for `out.len()` bytes; no other write is in flight on this socket.
    let sent = unsafe {
        libc::send(stream.as_raw_fd(), out.as_ptr().cast(), out.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if sent >= 0 {
        out.drain(..sent as usize);
        if out.is_empty() {
            return true;
        }
    }
    let (res, mut written) = stream.write_all(std::mem::take(out)).await;
    written.clear();
    *out = written;
    res.is_ok()
}

/// Writes an error response (with its CORS lines) and closes.
async fn fail(stream: &mut TcpStream, out: &mut Vec<u8>, err: HttpError, cors: &str) {
    err.write_response(out, cors);
    flush(stream, out).await;
}

/// Most publishes one connection gathers before they are published together, and most bytes
/// of data (a single publish may be larger: it is then published alone).
const MAX_GATHER: usize = 1024;
const MAX_GATHER_BYTES: usize = 4 << 20;

/// Publishes read but not yet handed to the broker: a client's pipelined publishes go
/// together (one lock, one batch every core takes in one pass), then are answered in order.
#[derive(Default)]
struct Pending {
    publishes: Vec<Publish>,
    /// Per publish: keep the connection open after its answer; when its request was parsed;
    /// its CORS lines.
    answers: Vec<(bool, std::time::Instant, Cow<'static, str>)>,
    ids: Vec<EventId>,
    /// Data bytes of `publishes`.
    bytes: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.publishes.is_empty()
    }

    fn push(&mut self, publish: Publish, keep_alive: bool, parsed: std::time::Instant, cors: Cow<'static, str>) {
        self.bytes += publish.data.len();
        self.publishes.push(publish);
        self.answers.push((keep_alive, parsed, cors));
    }
}

/// Publishes what is pending and writes the answers, in request order, into `out`. With
/// Redis the ids come from the cluster (one pipelined round trip for every batch waiting);
/// without it, or while Redis is unreachable, from this node (answered `"degraded": true`).
/// While some queue is full the publishers wait (back-pressure); false when it stayed full for
/// --header-timeout: they got one 503 and the connection must close.
async fn resolve(worker: &Worker, pending: &mut Pending, out: &mut Vec<u8>) -> bool {
    if pending.is_empty() {
        return true;
    }
    let deadline = Instant::now() + worker.cfg.header_timeout;
    let published = publish_batch(worker, &mut pending.publishes, &mut pending.ids, deadline).await;
    pending.bytes = pending.publishes.iter().map(|p| p.data.len()).sum();
    let Ok(degraded) = published else {
        return busy(pending, out);
    };
    for (id, (keep_alive, parsed, cors)) in pending.ids.drain(..).zip(pending.answers.drain(..)) {
        // On the stack: an answer per publish allocates nothing. Two u64s and the words fit
        // in 80 bytes (66 at most).
        let mut json = [0u8; 80];
        let len = {
            let mut cursor = &mut json[..];
            let suffix = if degraded { "\",\"degraded\":true}" } else { "\"}" };
            let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{{\"id\":\"{id}{suffix}"));
            80 - cursor.len()
        };
        write_response(out, 200, "OK", "application/json", &json[..len], keep_alive, &cors);
        worker.stats().record_publish(parsed.elapsed());
    }
    true
}

/// Numbers and queues `publishes` (emptied), their ids appended to `ids` in order: through
/// Redis when configured and up, else on this node (`Ok(true)`: degraded). While some queue is
/// full it waits (back-pressure), in line behind this core's earlier waiters (`RoomLine`);
/// `Err` when it stayed full until `deadline`.
pub async fn publish_batch(
    worker: &Worker,
    publishes: &mut Vec<Publish>,
    ids: &mut Vec<EventId>,
    deadline: Instant,
) -> Result<bool, Full> {
    let mut place = None;
    let count_wait = |n: usize| worker.stats().publish_waits.fetch_add(n as u64, Ordering::Relaxed);
    let mut waited = false;
    if !worker.room.is_empty() {
        count_wait(publishes.len());
        waited = true;
        let joined = worker.room.join();
        // Each waiter keeps its own deadline (behind a Redis retry or the dashboard's demo,
        // a later place can have an earlier one).
        if monoio::time::timeout_at(deadline, joined.first()).await.is_err() {
            return Err(Full);
        }
        place = Some(joined);
    }
    let mut via_redis = worker.shared.cluster.get().is_some();
    loop {
        let taken = match worker.shared.cluster.get() {
            Some(cluster) if via_redis && cluster.up() => {
                cluster.submit(std::mem::take(publishes)).map(Some).map_err(|back| *publishes = back)
            }
            _ => worker.broker.publish(publishes, ids).map(|()| None).map_err(|Full| ()),
        };
        match taken {
            Ok(None) => return Ok(worker.shared.cluster.get().is_some()),
            Ok(Some(reply)) => {
                // Taken: the next in line may try while this one waits for Redis's answer.
                drop(place.take());
                match reply.wait().await {
                    Ok(numbered) => {
                        ids.extend(numbered);
                        return Ok(false);
                    }
                    // Redis went away meanwhile: number them here (degraded).
                    Err(back) => {
                        *publishes = back;
                        via_redis = false;
                        continue;
                    }
                }
            }
            Err(()) if Instant::now() >= deadline => return Err(Full),
            Err(()) => {}
        }
        if !waited {
            count_wait(publishes.len());
            waited = true;
        }
        let waiting = place.get_or_insert_with(|| worker.room.join());
        if waiting.is_first() {
            wait_for_room(worker).await;
        } else if monoio::time::timeout_at(deadline, waiting.first()).await.is_err() {
            return Err(Full);
        }
    }
}

/// Waits before a publisher tries a full queue again. monoio fires timers only when a core
/// parks, and a core working through a fan-out backlog does not park until the backlog is
/// gone: a publisher asleep on a timer there waited for all of it (seconds under sustained
/// overload, past wrk's 2 s timeout) while newer requests took the room. On a busy core the
/// publisher tries again on each of the core's turns instead (one per send slice); on an idle
/// core (another core's queue is the full one) it sleeps.
async fn wait_for_room(worker: &Worker) {
    if worker.waiting.get() {
        // The zero sleep fires when the runtime next parks, at the next 1 ms tick: with the
        // core idle, a 1 ms poll of the other cores' queues; during the core's timer break, the
        // same park that ends the break (a longer sleep would outlast it). A core that makes
        // room in its mailbox signals sooner.
        worker.shared.room[worker.index].wait(monoio::time::sleep(Duration::ZERO)).await;
    } else {
        crate::runtime::yield_now().await;
    }
}

/// The publishers waited too long for room: one 503 for them all; the connection closes.
fn busy(pending: &mut Pending, out: &mut Vec<u8>) -> bool {
    let cors = pending.answers.first().map(|a| a.2.clone()).unwrap_or_default();
    pending.publishes.clear();
    pending.bytes = 0;
    pending.answers.clear();
    pending.ids.clear();
    HttpError::Unavailable.write_response(out, &cors);
    false
}

/// Answers what is pending, then the error (with `cors`), and closes.
async fn resolve_then_fail(
    worker: &Worker,
    pending: &mut Pending,
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    e: HttpError,
    cors: &str,
) {
    if resolve(worker, pending, out).await {
        e.write_response(out, cors);
    }
    flush(stream, out).await;
}

/// Appends what the socket already holds without waiting (more pipelined requests);
/// false when nothing was there.
fn read_ready(stream: &TcpStream, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK.max(buf.len()));
    }
    let spare = buf.spare_capacity_mut();
    // SAFETY: recv writes at most `spare.len()` bytes into the buffer's spare capacity; only
    // that many are then marked initialised. No monoio read is in flight on this socket here.
    unsafe {
        let n = libc::recv(stream.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT);
        if n <= 0 {
            return false;
        }
        buf.set_len(buf.len() + n as usize);
    }
    true
}

/// `count` holds this connection's place in the open-connection count until it closes.
async fn serve(worker: Rc<Worker>, mut stream: TcpStream, over_limit: bool, peer: IpAddr, count: ConnectionCount) {
    let cfg = worker.cfg.clone();
    let mut buf = BytesMut::new();
    let mut out: Vec<u8> = Vec::new();
    let mut pending = Pending::default();
    loop {
        let deadline = Instant::now() + cfg.header_timeout;
        let (req, parsed) = loop {
            match parse_request(&mut buf, cfg.max_head_bytes) {
                Ok(Some(req)) => break (req, std::time::Instant::now()),
                Ok(None) => {}
                Err(e) => {
                    let cors = worker.cors.headers(None);
                    return resolve_then_fail(&worker, &mut pending, &mut stream, &mut out, e, &cors).await;
                }
            }
            if !pending.is_empty() {
                // Gather every publish the client pipelined before publishing them together.
                if read_ready(&stream, &mut buf) {
                    continue;
                }
                if !resolve(&worker, &mut pending, &mut out).await {
                    flush(&mut stream, &mut out).await;
                    return;
                }
            }
            // Nothing of a next request yet (`fill` holds the buffer while it reads).
            let idle = buf.is_empty() && pending.is_empty();
            match fill(&mut stream, &mut buf, &mut out, deadline).await {
                Ok(()) => {}
                Err(ReadError::Closed) => return,
                // An idle keep-alive connection (no byte of a next request) is closed quietly, as
                // nginx does: an unasked 408 could be read as the answer to a request the
                // client sends at that moment. A request under way gets its 408.
                Err(ReadError::Timeout) if idle => {
                    flush(&mut stream, &mut out).await;
                    return;
                }
                Err(ReadError::Timeout) => {
                    return fail(&mut stream, &mut out, HttpError::Timeout, &worker.cors.headers(None)).await
                }
            }
        };

        let cors = worker.cors.headers(req.origin.as_deref());
        let client = worker.shared.limits.client_ip(peer, req.forwarded_for.as_deref(), req.real_ip.as_deref());
        // A publisher's token, when tokens are in use (checked against the topics below).
        let mut grant: Option<Grant> = None;
        if let Err(e) = check_route(&req, !worker.cfg.no_dashboard) {
            return resolve_then_fail(&worker, &mut pending, &mut stream, &mut out, e, &cors).await;
        }
        if req.path == "/publish" && req.method == Method::Post {
            // Before the body is read: a refused publisher does not get to upload it.
            match publish_grant(&worker, peer, &req) {
                Ok(g) => grant = g,
                Err(e) => {
                    worker.stats().count_refusal(&e);
                    return resolve_then_fail(&worker, &mut pending, &mut stream, &mut out, e, &cors).await;
                }
            }
            if worker.shared.limits.publish(client).is_err() {
                let e = HttpError::TooManyRequests;
                return resolve_then_fail(&worker, &mut pending, &mut stream, &mut out, e, &cors).await;
            }
        }
        if !body_in_buffer(&req, &buf) && !resolve(&worker, &mut pending, &mut out).await {
            flush(&mut stream, &mut out).await;
            return;
        }
        let body = match read_body(&mut stream, &mut buf, &mut out, &req, &cfg).await {
            Ok(body) => body,
            Err(Some(e)) => return resolve_then_fail(&worker, &mut pending, &mut stream, &mut out, e, &cors).await,
            Err(None) => return,
        };
        let keep_alive = req.keep_alive && !worker.draining.get() && !over_limit;

        if req.path == "/publish" && req.method == Method::Post && !over_limit {
            let parsed_publish = parse_publish(&req.query, req.content_type.as_deref(), &body, cfg.max_topics)
                .and_then(|p| match &grant {
                    Some(g) if !g.may_publish(&p.topics) => {
                        Err(HttpError::Forbidden("the token does not allow publishing to these topics"))
                    }
                    _ => Ok(p),
                });
            match parsed_publish {
                Ok(publish) => pending.push(publish, keep_alive, parsed, cors),
                Err(e) => return resolve_then_fail(&worker, &mut pending, &mut stream, &mut out, e, &cors).await,
            }
            // A client that pipelines without end still gets batches of bounded size (and
            // answers): what one connection holds unpublished stays bounded.
            let full = pending.publishes.len() >= MAX_GATHER || pending.bytes >= MAX_GATHER_BYTES;
            if full && !resolve(&worker, &mut pending, &mut out).await {
                flush(&mut stream, &mut out).await;
                return;
            }
            if !keep_alive {
                resolve(&worker, &mut pending, &mut out).await;
                flush(&mut stream, &mut out).await;
                return;
            }
            continue;
        }
        // Every other answer follows the publishes before it.
        if !resolve(&worker, &mut pending, &mut out).await {
            flush(&mut stream, &mut out).await;
            return;
        }

        if over_limit {
            worker.stats().shed.fetch_add(1, Ordering::Relaxed);
            if req.path == "/events" && req.method == Method::Get {
                let retry = worker.jitter(2000, 5000);
                return shed_stream(&mut stream, out, req.http11, &cors, retry).await;
            }
            return fail(&mut stream, &mut out, HttpError::Unavailable, &cors).await;
        }

        match (req.path.as_str(), req.method) {
            ("/events", Method::Get) => {
                // Bytes after a stream request are ignored; free the buffer for the stream's life.
                drop(buf);
                return stream_events(worker, stream, req, out, count, client, StreamKind::Topics).await;
            }
            ("/health", Method::Get) => {
                let draining = worker.draining.get() || worker.shared.draining.load(Ordering::Relaxed);
                let health = worker.shared.health(draining);
                let serving = !draining && worker.shared.accepting();
                let (code, text) = if serving { (200, "OK") } else { (503, "Service Unavailable") };
                write_response(&mut out, code, text, "application/json", health.as_bytes(), keep_alive, &cors)
            }
            ("/", Method::Get) | ("/dashboard", Method::Get) if !worker.cfg.no_dashboard => {
                let page = crate::dashboard::PAGE.as_bytes();
                write_response(&mut out, 200, "OK", "text/html; charset=utf-8", page, keep_alive, &cors);
            }
            ("/dashboard/stats", Method::Get) if !worker.cfg.no_dashboard => {
                drop(buf);
                return stream_events(worker, stream, req, out, count, client, StreamKind::Stats).await;
            }
            ("/metrics", Method::Get) => {
                let text = worker.shared.render();
                write_response(&mut out, 200, "OK", "text/plain; version=0.0.4", text.as_bytes(), keep_alive, &cors);
            }
            (_, Method::Options) => {
                // A preflight (e.g. a page's fetch POST /publish with a key): allowed origins
                // get the CORS answer, others only `Allow` (the browser then refuses).
                let allow = allowed_methods(&req.path).unwrap_or("OPTIONS");
                let preflight = if worker.cors.allows(req.origin.as_deref()) {
                    format!(
                        "{cors}Access-Control-Allow-Methods: {allow}\r\n\
                         Access-Control-Allow-Headers: Content-Type, Last-Event-ID, Authorization\r\n\
                         Access-Control-Max-Age: 600\r\n"
                    )
                } else {
                    cors.to_string()
                };
                let _ = std::io::Write::write_fmt(
                    &mut out,
                    format_args!("HTTP/1.1 204 No Content\r\nAllow: {allow}\r\n{preflight}Content-Length: 0\r\n\r\n"),
                );
            }
            _ => unreachable!("check_route admits only routed requests"),
        }
        if !keep_alive {
            flush(&mut stream, &mut out).await;
            return;
        }
    }
}

/// Who may publish this request: without tokens, --publish-key or the address list; with
/// tokens, the --publish-key or a token (its `publish` patterns are checked against the topics
/// once the body is read). 401 for a missing or bad credential, 403 for an address.
fn publish_grant(worker: &Worker, peer: IpAddr, req: &Request) -> Result<Option<Grant>, HttpError> {
    let Some(jwt) = &worker.shared.jwt else {
        return worker.access.check(peer, req.authorization.as_deref()).map(|()| None);
    };
    if worker.access.key_accepts(req.authorization.as_deref()) {
        return Ok(None);
    }
    let query_token = query_value(&req.query, "token");
    let token = jwt.token(req.authorization.as_deref(), query_token.as_deref(), req.cookie.as_deref());
    jwt.verify(token.ok_or(HttpError::Unauthorized)?).map(Some)
}

/// One query parameter's value (the first), percent-decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// Answers a stream request that cannot be served now with `200`, a `retry:` of `retry_ms` and
/// the end of the stream: any non-200 would make a browser's EventSource give up for good.
async fn shed_stream(stream: &mut TcpStream, mut out: Vec<u8>, http11: bool, cors: &str, retry_ms: u64) {
    write_stream_head(&mut out, http11, false, cors);
    put_chunk(&mut out, retry_frame(retry_ms).body().as_ref(), http11);
    if http11 {
        out.extend_from_slice(LAST_CHUNK);
    }
    flush(stream, &mut out).await;
}

/// Whether the request's whole body is already buffered (no read needed).
fn body_in_buffer(req: &Request, buf: &BytesMut) -> bool {
    match req.body {
        BodyKind::None => true,
        BodyKind::Length(n) => buf.len() >= n,
        BodyKind::Chunked => buf.windows(5).any(|w| w == b"0\r\n\r\n"),
    }
}

fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        "/events" | "/health" | "/metrics" | "/" | "/dashboard" | "/dashboard/stats" => Some("GET, OPTIONS"),
        "/publish" => Some("POST, OPTIONS"),
        "*" => Some("GET, POST, OPTIONS"),
        _ => None,
    }
}

/// 404 / 405 before any body is read.
fn check_route(req: &Request, dashboard: bool) -> Result<(), HttpError> {
    if !dashboard && matches!(req.path.as_str(), "/" | "/dashboard" | "/dashboard/stats") {
        return Err(HttpError::NotFound);
    }
    let allow = allowed_methods(&req.path).ok_or(HttpError::NotFound)?;
    let ok = match req.method {
        Method::Options => true,
        _ if req.path == "*" => false,
        Method::Get => allow.starts_with("GET"),
        Method::Post => allow.starts_with("POST"),
        Method::Head | Method::Other => false,
    };
    if ok {
        Ok(())
    } else {
        Err(HttpError::MethodNotAllowed(allow))
    }
}

/// The whole request body. `Err(None)`: the client left.
async fn read_body(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    req: &Request,
    cfg: &crate::config::Config,
) -> Result<Bytes, Option<HttpError>> {
    // One deadline for the whole body, not per read: a trickle cannot extend it.
    let deadline = Instant::now() + cfg.body_timeout.unwrap_or(cfg.header_timeout);
    let timed_out = |e: ReadError| match e {
        ReadError::Closed => None,
        ReadError::Timeout => Some(HttpError::Timeout),
    };
    match req.body {
        BodyKind::None if req.method == Method::Post && req.content_length.is_none() => {
            Err(Some(HttpError::LengthRequired))
        }
        BodyKind::None => Ok(Bytes::new()),
        BodyKind::Length(n) if n > cfg.max_body => Err(Some(HttpError::PayloadTooLarge)),
        BodyKind::Length(n) => {
            if buf.capacity() < n {
                buf.reserve(n - buf.len());
            }
            while buf.len() < n {
                fill(stream, buf, out, deadline).await.map_err(timed_out)?;
            }
            Ok(buf.split_to(n).freeze())
        }
        BodyKind::Chunked => {
            let mut decoder = ChunkedDecoder::new(cfg.max_body);
            while !decoder.feed(buf).map_err(Some)? {
                fill(stream, buf, out, deadline).await.map_err(timed_out)?;
            }
            Ok(Bytes::from(decoder.into_body()))
        }
    }
}

/// What a stream carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    /// `GET /events`: published events of the requested topics.
    Topics,
    /// `GET /dashboard/stats`: the dashboard's stats, live only (no ids, no history).
    Stats,
}

/// Turns the connection into an event stream until the client leaves, is too slow, or drain.
async fn stream_events(
    worker: Rc<Worker>,
    mut stream: TcpStream,
    req: Request,
    mut out: Vec<u8>,
    count: ConnectionCount,
    client: IpAddr,
    kind: StreamKind,
) {
    let mut names: Vec<String> = Vec::new();
    let mut query_resume = None;
    let mut history = 0usize;
    let mut end_marker = false;
    let mut query_token = None;
    for (k, v) in form_urlencoded::parse(req.query.as_bytes()) {
        match &*k {
            "topic" => names.push(v.into_owned()),
            "token" => query_token = Some(v.into_owned()),
            "lastEventId" => query_resume = Some(v.into_owned()),
            // A malformed count is no reason to refuse a stream: it means no history.
            "history" => history = v.parse().unwrap_or(0),
            "history-end" => end_marker = v == "1" || v == "true",
            _ => {}
        }
    }
    let cors = worker.cors.headers(req.origin.as_deref());
    // Over a per-address limit: come back much later (10-30 s), not in a storm.
    let permit = match worker.shared.limits.open_stream(client) {
        Ok(permit) => permit,
        Err(_) => {
            // Counted by the limiter under its own reason, not as a connection-limit shed.
            let retry = worker.jitter(10_000, 30_000);
            return shed_stream(&mut stream, out, req.http11, &cors, retry).await;
        }
    };
    let topics = match kind {
        StreamKind::Stats => {
            (history, end_marker, query_resume) = (0, false, None);
            vec![Box::from(crate::dashboard::STATS_TOPIC)]
        }
        StreamKind::Topics => match validate_topics(names.iter().map(String::as_str), worker.cfg.max_topics) {
            Ok(t) => t,
            Err(e) => return fail(&mut stream, &mut out, e, &cors).await,
        },
    };
    // With tokens: 401 for a missing, bad or expired one (EventSource then stops for good: the
    // page must get a new token), 403 for topics outside its `subscribe` patterns. The token's
    // `sub` is the user targeted events are addressed to. The dashboard's stats (topic names
    // included) need a token covering `$stats` (`*` does).
    let mut expires = None;
    let mut user: Option<Rc<str>> = None;
    if let Some(jwt) = &worker.shared.jwt {
        let token = jwt.token(req.authorization.as_deref(), query_token.as_deref(), req.cookie.as_deref());
        let grant = match token.ok_or(HttpError::Unauthorized).and_then(|t| jwt.verify(t)) {
            Ok(g) => g,
            Err(e) => return fail(&mut stream, &mut out, e, &cors).await,
        };
        if !grant.may_subscribe(&topics) {
            let e = HttpError::Forbidden("the token does not allow subscribing to these topics");
            return fail(&mut stream, &mut out, e, &cors).await;
        }
        expires = grant.exp.map(|exp| {
            let left = exp.saturating_sub(crate::broker::now_ms() / 1000);
            Instant::now() + Duration::from_secs(left)
        });
        user = grant.sub.map(Rc::from);
    }
    // The header is what EventSource sends on reconnect, newer than the page's query value.
    let resume = match kind {
        StreamKind::Stats => None,
        StreamKind::Topics => {
            req.last_event_id.clone().filter(|s| !s.is_empty()).or(query_resume.filter(|s| !s.is_empty()))
        }
    };
    let resume_text = resume.clone();
    let from = match resume {
        Some(text) => text.parse().map_or(ReplayFrom::Unknown(text), ReplayFrom::After),
        None if history > 0 => ReplayFrom::Last(history.min(worker.cfg.history)),
        None => ReplayFrom::Live,
    };
    let live = from == ReplayFrom::Live && !end_marker;
    let wire = match (req.http11, req.accepts_gzip && !worker.cfg.no_gzip) {
        (false, _) => Wire::Raw,
        (true, false) => Wire::Chunked,
        (true, true) => Wire::Gzip,
    };
    // Pipelined answers, the stream head and the opening lines leave in one write.
    write_stream_head(&mut out, wire != Wire::Raw, wire == Wire::Gzip, &cors);
    if wire == Wire::Gzip {
        out.extend_from_slice(&gzip::opening_chunk(OPENING_SSE));
    } else {
        put_chunk(&mut out, OPENING_SSE, wire == Wire::Chunked);
    }
    let first = Bytes::from(out);

    // What it missed, up to the newest id so far; later events reach it live (see
    // `Broker::replay`), so nothing is lost or doubled between the two. When this node's history
    // cannot vouch for it (it started after the id, or the id is older than its ring) and Redis
    // is there, the stream waits, paused, for Redis's history instead of a gap notice.
    let (local, live_after) = match live {
        true => (None, worker.broker.last_id()),
        false => {
            let (replay, last) = worker.broker.replay(&topics, &from);
            // In a cluster the client has seen everything up to its id, even one this node has
            // not been relayed yet (it read it on a faster node). Alone, an id from the future
            // is bogus (a clock that stepped back across a restart): gap notice, then live.
            let seen = match (&from, worker.shared.cluster.get()) {
                (ReplayFrom::After(id), Some(_)) => *id,
                _ => EventId::default(),
            };
            (Some(replay), last.max(seen))
        }
    };
    let ask = match (&local, &from, worker.shared.cluster.get()) {
        (Some(r), ReplayFrom::After(id), Some(c)) if c.up() && r.gap.is_some() => Some((c, HistoryFrom::After(*id))),
        (Some(r), ReplayFrom::Last(n), Some(c)) if c.up() && r.events.len() < *n => Some((c, HistoryFrom::Last(*n))),
        _ => None,
    };
    let fd = stream.as_raw_fd();
    let (rd, wr) = stream.into_split();
    let key =
        worker.hub.borrow_mut().subscribe(&topics, user.clone(), fd, Some(wr), wire, live_after, first, worker.stats());
    let stats_viewer = kind == StreamKind::Stats;
    if stats_viewer {
        worker.shared.stats_viewers.fetch_add(1, Ordering::Relaxed);
    }
    let mut replayed = Vec::new();
    if let Some(local) = local {
        let replay = match ask {
            Some((cluster, from)) => {
                worker.hub.borrow_mut().pause(key);
                cluster_history(&worker, cluster, topics, from, live_after, local).await
            }
            None => local,
        };
        let mut replay = replay;
        // Targeted events go to their users only, replayed as live.
        replay.events.retain(|e| e.reaches(user.as_deref()));
        replayed = replay_frames(replay, resume_text, end_marker);
    }
    {
        let mut hub = worker.hub.borrow_mut();
        hub.resume(key, &replayed);
        hub.flush_one(key);
    }
    // This task (and its request-parsing state) ends here: an idle stream costs only its hub
    // entry and the small close watcher; writes happen in `Hub::flush` or a backlog writer.
    let guard = StreamGuard { worker, key, _count: count, _permit: permit, stats_viewer };
    monoio::spawn(CatchUnwind(watch_close(guard, rd, expires)));
}

/// The cluster's history for a new stream (events up to `upto`), or, when Redis cannot answer,
/// what this node has (`local`, with its gap notice).
async fn cluster_history(
    worker: &Worker,
    cluster: &Cluster,
    topics: Vec<Box<str>>,
    from: HistoryFrom,
    upto: EventId,
    local: Replay,
) -> Replay {
    let Some(slot) = cluster.history(topics, from, upto) else { return local };
    match slot.wait().await {
        Some(answer) => Replay {
            gap: if answer.vouched { None } else { local.gap },
            events: answer.events.into_iter().map(|(id, publish)| worker.replayed_event(id, publish)).collect(),
        },
        None => local,
    }
}

/// Removes its stream from the hub when dropped (the watcher ended, or panicked).
struct StreamGuard {
    worker: Rc<Worker>,
    key: StreamKey,
    _count: ConnectionCount,
    /// The stream's place in its client address's count (`--max-streams-per-ip`).
    _permit: Option<StreamPermit>,
    /// A dashboard stats stream (counted in `Shared::stats_viewers`).
    stats_viewer: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.stats_viewer {
            self.worker.shared.stats_viewers.fetch_sub(1, Ordering::Relaxed);
        }
        if let Ok(mut hub) = self.worker.hub.try_borrow_mut() {
            hub.unsubscribe(self.key, self.worker.stats());
        }
    }
}

/// Keeps one small read pending so a client's close (FIN or RST) is seen at once; the server
/// closes a stream the same way, by shutting its socket, which ends this read.
/// At `expires` (the token's `exp`) the stream gets `event: ringcast-expired` and is ended: the
/// page knows to get a new token and reconnect.
async fn watch_close(guard: StreamGuard, mut rd: OwnedReadHalf<TcpStream>, mut expires: Option<Instant>) {
    let mut buf = Vec::with_capacity(WATCH_BUF);
    loop {
        let (res, back) = match expires {
            None => rd.read(buf).await,
            // Boxed: a timer future is 768 bytes (128-aligned), and inline it would make every
            // idle stream's task that large, token or not (1.3 KB more RSS per idle stream).
            Some(at) => match Box::pin(monoio::time::timeout_at(at, rd.read(buf))).await {
                Ok(done) => done,
                Err(_) => {
                    // The cancelled read kept its buffer; the stream ends after the notice.
                    expires = None;
                    let notice = encode_notice("ringcast-expired", r#"{"reason":"token expired"}"#);
                    guard.worker.hub.borrow_mut().close_one(guard.key, &[notice]);
                    buf = Vec::with_capacity(WATCH_BUF);
                    continue;
                }
            },
        };
        buf = back;
        match res {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    drop(guard); // leaves the hub (dropping the write half) before the read half closes the fd
}
