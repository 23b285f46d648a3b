//! Several nodes through Redis. One Redis Function numbers an event cluster-wide, appends it to
//! its topics' Streams (and to one stream of every event, for catching up) and publishes it on
//! the relay channel, in one atomic call; every node, the publishing one too, delivers what the
//! relay brings, so a subscriber sees each event once, in id order, whichever node it is on.
//!
//! Two threads per node, so a Redis round trip never blocks a core:
//! - `ringcast-redis` takes publish batches from the cores and sends all that are waiting as one
//!   pipeline of FCALLs (one round trip for many publishes), then answers each batch;
//! - `ringcast-relay` has a pub/sub connection of its own, read at once (Redis drops a
//!   subscriber 32 MB behind) and handed to the broker in order; after a reconnect it catches up
//!   from the stream of every event, so nothing published meanwhile is missed.
//!
//! Redis unreachable (at start or later): publishes are numbered and delivered locally and
//! answered `"degraded": true` (they are not replayed to Redis later), `/health` says degraded,
//! and both threads reconnect with capped, jittered backoff, one log line per state change.

use crate::broker::{Broker, Full};
use crate::event::{EventId, Publish};
use crate::publish::{validate_topics, validate_users};
use crate::sse::valid_event_name;
use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

/// The Redis Function library (loaded with `FUNCTION LOAD REPLACE` at start). Version 4:
/// `FCALL ringcast_version 0` returns it. `ringcast_publish 0 <topics> <data> [event] [after]
/// [maxlen ttl-ms all-maxlen] [users] [tag]`: topics comma-separated; users (targeted delivery: only
/// those users' streams get the event) comma-separated, empty for everyone; `after` is an id the new one must follow
/// (a node passes the newest id it knows, so ids keep increasing after it published alone while
/// Redis was away); nodes pass the retention too, other callers get what nodes stored.
pub const LIBRARY: &str = r#"#!lua name=ringcast
local P = 'ringcast:'

local function valid_topic(t)
  return #t >= 1 and #t <= 256 and string.match(t, '^[%w%._%-:/]+$') ~= nil
end

local function next_id(after_ms, after_seq)
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local last = redis.call('HMGET', P .. 'last', 'ms', 'seq')
  local fresh = not last[1]
  local lms, lseq = tonumber(last[1]) or 0, tonumber(last[2]) or 0
  if after_ms > lms or (after_ms == lms and after_seq > lseq) then
    lms, lseq = after_ms, after_seq
  end
  local seq = 0
  if ms <= lms then
    ms = lms
    seq = lseq + 1
  end
  local id = string.format('%d-%d', ms, seq)
  redis.call('HSET', P .. 'last', 'ms', ms, 'seq', seq)
  if fresh then
    -- The first id of this data set: history before it is not here (Redis started empty).
    redis.call('HSET', P .. 'last', 'since', id)
  end
  return id, ms, seq
end

local function publish(keys, args)
  local topics_arg, data, event, after = args[1], args[2], args[3] or '', args[4] or ''
  if topics_arg == nil or data == nil then
    return redis.error_reply('ringcast_publish: topics and data expected')
  end
  local topics = {}
  for topic in string.gmatch(topics_arg, '[^,]+') do
    if not valid_topic(topic) then
      return redis.error_reply('ringcast_publish: bad topic ' .. topic)
    end
    topics[#topics + 1] = topic
  end
  if #topics == 0 or #topics > 64 then
    return redis.error_reply('ringcast_publish: 1 to 64 topics expected')
  end
  if #event > 256 or string.find(event, '[\r\n%z]') then
    return redis.error_reply('ringcast_publish: bad event name')
  end
  local users = {}
  for user in string.gmatch(args[8] or '', '[^,]+') do
    if #user > 256 or string.find(user, '[%s%c]') then
      return redis.error_reply('ringcast_publish: bad user name')
    end
    users[#users + 1] = user
  end
  if #users > 1000 then
    return redis.error_reply('ringcast_publish: at most 1000 users')
  end
  local ulist = table.concat(users, ',')
  local ams, aseq = string.match(after, '^(%d+)-(%d+)$')
  local id, ms, seq = next_id(tonumber(ams) or 0, tonumber(aseq) or 0)
  -- Retention: nodes pass it (one read less per call); other callers get what nodes stored.
  local maxlen, ttl, all_maxlen = tonumber(args[5]), tonumber(args[6]), tonumber(args[7])
  if not (maxlen and ttl and all_maxlen) then
    local cfg = redis.call('HMGET', P .. 'config', 'maxlen', 'ttl_ms', 'all_maxlen')
    maxlen, ttl, all_maxlen = tonumber(cfg[1]) or 1000, tonumber(cfg[2]) or 0, tonumber(cfg[3]) or 100000
  end
  local list = table.concat(topics, ' ')
  -- maxlen 0: no per-topic history (--history 0 or --history-ttl 0).
  for _, topic in ipairs(maxlen > 0 and topics or {}) do
    local key = P .. 's:' .. topic
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, id, 'e', event, 'd', data, 't', list, 'u', ulist)
    -- By age at most once per millisecond (the first id of each): trimming is a scan.
    if ttl > 0 then
      if seq == 0 then
        redis.call('XTRIM', key, 'MINID', '~', string.format('%d-0', ms - ttl))
      end
      -- A topic nobody publishes to any more goes once all it holds is older than the TTL.
      redis.call('PEXPIRE', key, ttl)
    end
  end
  -- A node's tag for this call (argument 9): after a pipeline that failed midway the node
  -- finds which of its calls ran, and answers them, rather than publishing them twice.
  local tag = args[9] or ''
  if tag ~= '' then
    redis.call('XADD', P .. 'all', 'MAXLEN', '~', all_maxlen, id, 'e', event, 'd', data, 't', list, 'u', ulist, 'n', tag)
  else
    redis.call('XADD', P .. 'all', 'MAXLEN', '~', all_maxlen, id, 'e', event, 'd', data, 't', list, 'u', ulist)
  end
  redis.call('PUBLISH', P .. 'relay', id .. '\n' .. event .. '\n' .. list .. '\n' .. ulist .. '\n' .. data)
  return id
end

redis.register_function('ringcast_publish', publish)
redis.register_function('ringcast_version', function() return 4 end)
"#;

const RELAY_CHANNEL: &str = "ringcast:relay";
const ALL_STREAM: &str = "ringcast:all";
/// Publish batches waiting for the Redis thread; beyond it publishers wait (then 503).
const SUBMIT_QUEUE: usize = 4096;
/// Publish batches sent in one pipeline (one round trip).
const PIPELINE_BATCHES: usize = 256;
/// Reconnect backoff: doubles from the first to the cap, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Connect and I/O timeouts for Redis calls (a hung Redis must not hold publishers forever).
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle publishing connection is checked (PING) this often.
const PING_EVERY: Duration = Duration::from_secs(1);
/// The relay thread looks at the shutdown flag this often while no message comes.
const RELAY_POLL: Duration = Duration::from_millis(200);
/// Events read per XRANGE while catching up after a reconnect.
const CATCH_UP_COUNT: usize = 1000;

/// Settings the Redis Function reads (the last node to start writes them).
#[derive(Clone, Debug)]
pub struct RetentionConfig {
    pub per_topic: usize,
    pub ttl_ms: u64,
    pub all: usize,
}

/// What a publish batch comes back as: its ids, or the publishes themselves when Redis could
/// not take them (they are then published locally, degraded).
type Outcome = Result<Vec<EventId>, Vec<Publish>>;

/// The answer to one request to a Redis thread, filled there and awaited by a core's task.
pub struct Slot<T> {
    value: Mutex<Option<T>>,
    waker: AtomicWaker,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot { value: Mutex::new(None), waker: AtomicWaker::new() }
    }
}

impl<T> Slot<T> {
    fn fill(&self, value: T) {
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
        self.waker.wake();
    }

    /// Resolves once the Redis thread has answered.
    pub async fn wait(&self) -> T {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            match self.value.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(value) => Poll::Ready(value),
                None => Poll::Pending,
            }
        })
        .await
    }
}

pub type Reply = Slot<Outcome>;

struct Submission {
    publishes: Vec<Publish>,
    reply: Arc<Reply>,
}

/// What a stream asks the cluster's history for when this node's cannot vouch for it.
#[derive(Clone, Debug)]
pub enum HistoryFrom {
    /// Every event after this id (a resume, possibly from another node).
    After(EventId),
    /// The last N events (`?history=N` on a node that has fewer).
    Last(usize),
}

/// Events from Redis's per-topic streams, in id order, none after the request's `upto`.
pub struct HistoryAnswer {
    pub events: Vec<(EventId, Publish)>,
    /// Redis holds everything after the id (false: some was trimmed or predates its data).
    pub vouched: bool,
}

/// `None`: Redis could not answer (the stream gets what this node has, with its gap notice).
pub type HistorySlot = Slot<Option<HistoryAnswer>>;

struct HistoryRequest {
    topics: Vec<Box<str>>,
    from: HistoryFrom,
    upto: EventId,
    slot: Arc<HistorySlot>,
}

/// A node's link to Redis, shared by its cores.
pub struct Cluster {
    submit: Sender<Submission>,
    history: Sender<HistoryRequest>,
    /// Both Redis connections (publishing and relay) are up.
    publisher_up: AtomicBool,
    relay_up: AtomicBool,
    pub reconnects: AtomicU64,
    pub node_id: String,
    /// Tags this process's publish calls (`<token>.<pipeline>.<index>`), unique across nodes
    /// and restarts: see `reconcile`.
    token: u64,
    stop: AtomicBool,
    state_log: Mutex<bool>,
}

impl Cluster {
    pub fn up(&self) -> bool {
        self.publisher_up.load(Ordering::Relaxed) && self.relay_up.load(Ordering::Relaxed)
    }

    /// Hands a batch to the Redis thread; the batch comes back when its queue is full.
    pub fn submit(&self, publishes: Vec<Publish>) -> Result<Arc<Reply>, Vec<Publish>> {
        let reply = Arc::new(Reply::default());
        match self.submit.try_send(Submission { publishes, reply: reply.clone() }) {
            Ok(()) => Ok(reply),
            Err(TrySendError::Full(s) | TrySendError::Disconnected(s)) => Err(s.publishes),
        }
    }

    /// Asks Redis's history for a new stream (events up to `upto`, the newest id this node has
    /// delivered: later ones reach the stream live); `None` when too many requests wait.
    pub fn history(&self, topics: Vec<Box<str>>, from: HistoryFrom, upto: EventId) -> Option<Arc<HistorySlot>> {
        let slot = Arc::new(HistorySlot::default());
        self.history.try_send(HistoryRequest { topics, from, upto, slot: slot.clone() }).ok()?;
        Some(slot)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// One log line per change of the whole link's state.
    fn log_state(&self) {
        let up = self.up();
        let mut logged = self.state_log.lock().unwrap_or_else(|p| p.into_inner());
        if *logged != up {
            *logged = up;
            if up {
                log::info!("node {}: Redis connected, cluster mode", self.node_id);
            } else {
                log::warn!("node {}: Redis unreachable, degraded (publishing locally)", self.node_id);
            }
        }
    }

    fn set(&self, flag: &AtomicBool, up: bool) {
        if flag.swap(up, Ordering::Relaxed) != up {
            if !up {
                self.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            self.log_state();
        }
    }
}

/// Starts the Redis and relay threads. The node serves at once, degraded until Redis answers.
pub fn start(
    url: &str,
    node_id: String,
    retention: RetentionConfig,
    broker: Arc<Broker>,
) -> std::io::Result<(Arc<Cluster>, Vec<std::thread::JoinHandle<()>>)> {
    let client = redis::Client::open(url).map_err(|e| std::io::Error::other(format!("--redis {url}: {e}")))?;
    let (tx, rx) = crossbeam_channel::bounded(SUBMIT_QUEUE);
    let (history_tx, history_rx) = crossbeam_channel::bounded(SUBMIT_QUEUE);
    let cluster = Arc::new(Cluster {
        submit: tx,
        history: history_tx,
        publisher_up: AtomicBool::new(false),
        relay_up: AtomicBool::new(false),
        reconnects: AtomicU64::new(0),
        node_id,
        token: {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
            nanos ^ (u64::from(std::process::id()) << 32)
        },
        stop: AtomicBool::new(false),
        state_log: Mutex::new(true),
    });
    // Until the first connection: degraded, said once.
    cluster.log_state();
    let publisher = {
        let (cluster, client, broker, retention) = (cluster.clone(), client.clone(), broker.clone(), retention.clone());
        std::thread::Builder::new()
            .name("ringcast-redis".into())
            .spawn(move || run_publisher(&cluster, &client, &retention, &broker, &rx))?
    };
    let history = {
        let (cluster, client) = (cluster.clone(), client.clone());
        std::thread::Builder::new()
            .name("ringcast-history".into())
            .spawn(move || run_history(&cluster, &client, &retention, &history_rx))?
    };
    let relay = {
        let cluster = cluster.clone();
        std::thread::Builder::new()
            .name("ringcast-relay".into())
            .spawn(move || run_relay(&cluster, &client, &broker))?
    };
    Ok((cluster, vec![publisher, relay, history]))
}

/// Capped exponential backoff with jitter.
struct Backoff {
    next: Duration,
    seed: u64,
}

impl Backoff {
    fn new() -> Backoff {
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Backoff { next: BACKOFF_FIRST, seed: seed | 1 }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    /// The pause before the next attempt: between half and all of the current step.
    fn pause(&mut self) -> Duration {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let step = self.next;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        step / 2 + Duration::from_nanos(self.seed % (step.as_nanos() as u64 / 2).max(1))
    }
}

/// Sleeps up to `total`, waking early when the node stops; false when it stopped.
fn pause(cluster: &Cluster, total: Duration) -> bool {
    let until = std::time::Instant::now() + total;
    while std::time::Instant::now() < until {
        if cluster.stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(until - std::time::Instant::now()));
    }
    !cluster.stop.load(Ordering::Relaxed)
}

fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let conn = client.get_connection_with_timeout(REDIS_TIMEOUT)?;
    conn.set_read_timeout(Some(REDIS_TIMEOUT))?;
    conn.set_write_timeout(Some(REDIS_TIMEOUT))?;
    Ok(conn)
}

/// Loads the function library and writes the retention settings.
fn prepare(conn: &mut redis::Connection, retention: &RetentionConfig) -> redis::RedisResult<()> {
    redis::cmd("FUNCTION").arg("LOAD").arg("REPLACE").arg(LIBRARY).query::<String>(conn)?;
    redis::cmd("HSET")
        .arg("ringcast:config")
        .arg("maxlen")
        .arg(retention.per_topic)
        .arg("ttl_ms")
        .arg(retention.ttl_ms)
        .arg("all_maxlen")
        .arg(retention.all.max(1))
        .query::<i64>(conn)?;
    Ok(())
}

fn run_publisher(
    cluster: &Cluster,
    client: &redis::Client,
    retention: &RetentionConfig,
    broker: &Broker,
    rx: &Receiver<Submission>,
) {
    let mut conn: Option<redis::Connection> = None;
    let mut backoff = Backoff::new();
    let mut retry_at = std::time::Instant::now();
    let mut batch: Vec<Submission> = Vec::new();
    let mut last_used = std::time::Instant::now();
    let mut seen_failures = 0;
    let mut tags: u64 = 0;
    while !cluster.stop.load(Ordering::Relaxed) {
        if conn.is_none() && std::time::Instant::now() >= retry_at {
            match connect(client).and_then(|mut c| prepare(&mut c, retention).map(|()| c)) {
                Ok(c) => {
                    conn = Some(c);
                    backoff.reset();
                    cluster.set(&cluster.publisher_up, true);
                }
                Err(e) => {
                    log::debug!("Redis (publishing): {e}");
                    cluster.set(&cluster.publisher_up, false);
                    retry_at = std::time::Instant::now() + backoff.pause();
                }
            }
        }
        let first = match rx.recv_timeout(RELAY_POLL) {
            Ok(s) => s,
            Err(RecvTimeoutError::Timeout) => {
                // Idle: make sure the connection still works, so a Redis restart is noticed
                // (and `/health` says so) before a publish finds a dead connection.
                if let Some(c) = conn.as_mut() {
                    if last_used.elapsed() >= PING_EVERY {
                        last_used = std::time::Instant::now();
                        if let Err(e) = redis::cmd("PING").query::<String>(c) {
                            log::debug!("Redis (publishing) ping: {e}");
                            conn = None;
                            cluster.set(&cluster.publisher_up, false);
                        }
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // A connection idle for a while, or older than a failure another connection of this
        // node saw, may have died with a Redis restart: check it before use (one round trip,
        // only then), and reconnect at once if it did, so no publish is sent where it is lost.
        if last_used.elapsed() >= RELAY_POLL || cluster.reconnects.load(Ordering::Relaxed) != seen_failures {
            seen_failures = cluster.reconnects.load(Ordering::Relaxed);
            if let Some(c) = conn.as_mut() {
                if redis::cmd("PING").query::<String>(c).is_err() {
                    conn = connect(client).and_then(|mut c| prepare(&mut c, retention).map(|()| c)).ok();
                    cluster.set(&cluster.publisher_up, conn.is_some());
                }
            }
        }
        last_used = std::time::Instant::now();
        batch.push(first);
        while batch.len() < PIPELINE_BATCHES {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let Some(c) = conn.as_mut() else {
            // Degraded: the cores publish these locally.
            for s in batch.drain(..) {
                s.reply.fill(Err(s.publishes));
            }
            continue;
        };
        let after = broker.last_id();
        tags += 1;
        let tag = format!("{:x}.{tags}", cluster.token);
        let sent = {
            let flat: Vec<&Publish> = batch.iter().flat_map(|s| s.publishes.iter()).collect();
            send_pipeline(c, &flat, &after, &tag, retention)
        };
        let ids = match sent {
            Ok(ids) => ids,
            Err(e) => {
                // Whether Redis ran some of them is unknown: reconnect, find which ran (their
                // tags are in `ringcast:all`), answer those, and send the rest again. Only if
                // Redis stays away are they published locally (degraded).
                log::debug!("Redis publish pipeline: {e}");
                conn = None;
                cluster.set(&cluster.publisher_up, false);
                let flat: Vec<&Publish> = batch.iter().flat_map(|s| s.publishes.iter()).collect();
                tags += 1;
                let retry_tag = format!("{:x}.{tags}", cluster.token);
                match reconcile(client, retention, &flat, &after, &tag, &retry_tag) {
                    Some((c, ids)) => {
                        if ids.len() == flat.len() {
                            conn = Some(c);
                            cluster.set(&cluster.publisher_up, true);
                            backoff.reset();
                        } else {
                            retry_at = std::time::Instant::now() + backoff.pause();
                        }
                        ids
                    }
                    None => {
                        retry_at = std::time::Instant::now() + backoff.pause();
                        Vec::new()
                    }
                }
            }
        };
        // Batches whose publishes all have an id are answered; any other goes local (degraded).
        let mut ids = ids.into_iter();
        for s in batch.drain(..) {
            let mine: Vec<EventId> = ids.by_ref().take(s.publishes.len()).collect();
            if mine.len() == s.publishes.len() {
                s.reply.fill(Ok(mine));
            } else {
                s.reply.fill(Err(s.publishes));
            }
        }
    }
}

/// One pipeline of `FCALL ringcast_publish`, one per publish, tagged `<tag>.<index>`; the ids
/// in order.
fn send_pipeline(
    conn: &mut redis::Connection,
    publishes: &[&Publish],
    after: &EventId,
    tag: &str,
    retention: &RetentionConfig,
) -> redis::RedisResult<Vec<EventId>> {
    let after = after.to_string();
    let mut pipe = redis::pipe();
    for (i, p) in publishes.iter().enumerate() {
        let topics: Vec<&str> = p.topics.iter().map(|t| &**t).collect();
        pipe.cmd("FCALL")
            .arg("ringcast_publish")
            .arg(0)
            .arg(topics.join(","))
            .arg(&p.data)
            .arg(p.event.as_deref().unwrap_or(""))
            .arg(&after)
            .arg(retention.per_topic)
            .arg(retention.ttl_ms)
            .arg(retention.all.max(1))
            .arg(p.users.join(","))
            .arg(format!("{tag}.{i}"));
    }
    let ids: Vec<String> = pipe.query(conn)?;
    // Cannot fail with this library; an id that does not parse is never answered.
    ids.iter()
        .map(|id| {
            id.parse().map_err(|_| {
                redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "bad id from ringcast_publish"))
            })
        })
        .collect()
}

/// How long a node tries to reach Redis again after a publish pipeline failed midway, before
/// it gives up on learning which calls ran (its publishers wait meanwhile).
const RECONCILE_WITHIN: Duration = Duration::from_secs(3);

/// After a failed pipeline tagged `tag`: reconnects (within `RECONCILE_WITHIN`), reads which of
/// its calls Redis ran from `ringcast:all` (a prefix: Redis runs one connection's commands in
/// order), and sends the others again (tagged `retry_tag`). The connection and the ids known,
/// in order (fewer than `publishes` when the second pipeline failed too); `None` when Redis
/// could not be reached.
fn reconcile(
    client: &redis::Client,
    retention: &RetentionConfig,
    publishes: &[&Publish],
    after: &EventId,
    tag: &str,
    retry_tag: &str,
) -> Option<(redis::Connection, Vec<EventId>)> {
    let deadline = std::time::Instant::now() + RECONCILE_WITHIN;
    let mut backoff = Backoff::new();
    let mut conn = loop {
        match connect(client).and_then(|mut c| prepare(&mut c, retention).map(|()| c)) {
            Ok(c) => break c,
            Err(_) if std::time::Instant::now() + BACKOFF_FIRST < deadline => std::thread::sleep(backoff.pause()),
            Err(_) => return None,
        }
    };
    let mut ran: Vec<Option<EventId>> = vec![None; publishes.len()];
    let mut from = format!("({after}");
    let prefix = format!("{tag}.");
    loop {
        let entries: redis::RedisResult<Vec<(String, Vec<Vec<u8>>)>> =
            redis::cmd("XRANGE").arg(ALL_STREAM).arg(&from).arg("+").arg("COUNT").arg(CATCH_UP_COUNT).query(&mut conn);
        let Ok(entries) = entries else { return None };
        for (id, fields) in &entries {
            let tagged = fields.chunks(2).find(|f| f[0] == b"n").and_then(|f| f.get(1));
            let index = tagged
                .and_then(|t| std::str::from_utf8(t).ok())
                .and_then(|t| t.strip_prefix(&prefix))
                .and_then(|i| i.parse::<usize>().ok());
            if let (Some(i), Ok(id)) = (index, id.parse()) {
                if let Some(slot) = ran.get_mut(i) {
                    *slot = Some(id);
                }
            }
        }
        match entries.last() {
            Some((last, _)) if entries.len() == CATCH_UP_COUNT => from = format!("({last}"),
            _ => break,
        }
    }
    let mut ids: Vec<EventId> = ran.iter().map_while(|id| *id).collect();
    log::info!("Redis publish pipeline failed midway: {} of {} publish(es) had run", ids.len(), publishes.len());
    if ids.len() < publishes.len() {
        let newest = ids.last().copied().unwrap_or(*after);
        match send_pipeline(&mut conn, &publishes[ids.len()..], &newest, retry_tag, retention) {
            Ok(more) => ids.extend(more),
            Err(e) => log::debug!("Redis publish pipeline (again): {e}"),
        }
    }
    Some((conn, ids))
}

fn run_relay(cluster: &Cluster, client: &redis::Client, broker: &Broker) {
    let mut backoff = Backoff::new();
    let mut first = true;
    while !cluster.stop.load(Ordering::Relaxed) {
        match relay_session(cluster, client, broker, &mut first, &mut backoff) {
            Ok(()) => return, // stopping
            Err(e) => {
                log::debug!("Redis relay: {e}");
                cluster.set(&cluster.relay_up, false);
                if !pause(cluster, backoff.pause()) {
                    return;
                }
            }
        }
    }
}

/// One relay connection's life: subscribe, catch up from the stream of every event after the
/// newest one delivered, then deliver what the channel brings until an error or shutdown.
fn relay_session(
    cluster: &Cluster,
    client: &redis::Client,
    broker: &Broker,
    first: &mut bool,
    backoff: &mut Backoff,
) -> redis::RedisResult<()> {
    let mut conn = connect(client)?;
    let rejoining = !*first;
    if *first {
        // A node that just started takes the events from now on (read before subscribing; the
        // catch-up below covers the events between this and the subscription).
        let last: Vec<Option<u64>> = redis::cmd("HMGET").arg("ringcast:last").arg("ms").arg("seq").query(&mut conn)?;
        if let [Some(ms), Some(seq)] = last[..] {
            broker.mark_relayed(EventId { ms, seq });
        }
        *first = false;
    }
    let mut reader = connect(client)?;
    let mut pubsub = reader.as_pubsub();
    pubsub.subscribe(RELAY_CHANNEL)?;
    pubsub.set_read_timeout(Some(RELAY_POLL))?;
    if rejoining {
        signal_trimmed(&mut conn, broker)?;
    }
    catch_up(&mut conn, broker)?;
    backoff.reset();
    cluster.set(&cluster.relay_up, true);
    loop {
        if cluster.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let msg = match pubsub.get_message() {
            Ok(msg) => msg,
            Err(e) if e.is_timeout() => continue,
            Err(e) => return Err(e),
        };
        let payload: Vec<u8> = msg.get_payload()?;
        match parse_relayed(&payload) {
            Some(event) => deliver(broker, &mut vec![event]),
            None => log::warn!("relay: dropped a malformed event ({} bytes)", payload.len()),
        }
    }
}

/// Answers history requests, one at a time, on a connection of its own (a resume storm then
/// waits here, not in front of publishes).
fn run_history(cluster: &Cluster, client: &redis::Client, retention: &RetentionConfig, rx: &Receiver<HistoryRequest>) {
    let mut conn: Option<redis::Connection> = None;
    let mut backoff = Backoff::new();
    let mut retry_at = std::time::Instant::now();
    while !cluster.stop.load(Ordering::Relaxed) {
        let request = match rx.recv_timeout(RELAY_POLL) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if conn.is_none() && std::time::Instant::now() >= retry_at {
            match connect(client) {
                Ok(c) => {
                    conn = Some(c);
                    backoff.reset();
                }
                Err(e) => {
                    log::debug!("Redis (history): {e}");
                    retry_at = std::time::Instant::now() + backoff.pause();
                }
            }
        }
        let answer = conn.as_mut().and_then(|c| match read_history(c, retention, &request) {
            Ok(answer) => Some(answer),
            Err(e) => {
                log::debug!("Redis history read: {e}");
                None
            }
        });
        if answer.is_none() {
            conn = None;
        }
        request.slot.fill(answer);
    }
}

type StreamEntries = Vec<(String, Vec<Vec<u8>>)>;

/// One round trip: the topics' oldest retained entries and lengths, the data set's first id,
/// and the events asked for.
fn read_history(
    conn: &mut redis::Connection,
    retention: &RetentionConfig,
    request: &HistoryRequest,
) -> redis::RedisResult<HistoryAnswer> {
    let upto = request.upto.to_string();
    let mut pipe = redis::pipe();
    pipe.cmd("HGET").arg("ringcast:last").arg("since");
    for topic in &request.topics {
        let key = format!("ringcast:s:{topic}");
        pipe.cmd("XRANGE").arg(&key).arg("-").arg("+").arg("COUNT").arg(1);
        pipe.cmd("XLEN").arg(&key);
        match request.from {
            HistoryFrom::After(id) => {
                pipe.cmd("XRANGE")
                    .arg(&key)
                    .arg(format!("({id}"))
                    .arg(&upto)
                    .arg("COUNT")
                    .arg(retention.per_topic.max(1));
            }
            HistoryFrom::Last(n) => {
                pipe.cmd("XREVRANGE").arg(&key).arg(&upto).arg("-").arg("COUNT").arg(n.max(1));
            }
        }
    }
    let mut replies = pipe.query::<Vec<redis::Value>>(conn)?.into_iter();
    let since: Option<String> = redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil))?;
    let since: Option<EventId> = since.and_then(|s| s.parse().ok());
    let mut vouched = since.is_some();
    let mut events: Vec<(EventId, Publish)> = Vec::new();
    let now = crate::broker::now_ms();
    for _ in &request.topics {
        let (Some(first), Some(len), Some(range)) = (replies.next(), replies.next(), replies.next()) else {
            return Err(redis::RedisError::from((redis::ErrorKind::Parse, "short pipeline reply")));
        };
        let first: StreamEntries = redis::from_redis_value(first)?;
        let len: usize = redis::from_redis_value(len)?;
        let range: StreamEntries = redis::from_redis_value(range)?;
        if let HistoryFrom::After(given) = request.from {
            // Trimmed past the id: by count (the stream is at its cap) or by age.
            let first_id = first.first().and_then(|(id, _)| id.parse::<EventId>().ok());
            let trimmed = first_id.is_some_and(|f| f > given)
                && (len >= retention.per_topic || (retention.ttl_ms > 0 && given.ms + retention.ttl_ms < now));
            if trimmed || since.is_some_and(|s| given < s) {
                vouched = false;
            }
        }
        for (id, fields) in range {
            match stream_entry(&id, &fields) {
                Some(event) => events.push(event),
                None => log::warn!("history: dropped malformed entry {id}"),
            }
        }
    }
    // An event on several of the topics is in each of their streams: once, in id order.
    events.sort_by_key(|(id, _)| *id);
    events.dedup_by_key(|(id, _)| *id);
    if let HistoryFrom::Last(n) = request.from {
        let skip = events.len().saturating_sub(n);
        events.drain(..skip);
        vouched = true;
    }
    Ok(HistoryAnswer { events, vouched })
}

/// Before a catch-up: when Redis already trimmed events newer than the last one this node
/// delivered (it was cut off for longer than `ringcast:all` holds), they are lost to its live
/// streams; each of them gets `event: ringcast-gap` first (`topics` null: any topic), so a page
/// knows to reload, like a resume that cannot be vouched for. Trimming takes the oldest first,
/// so while the last delivered event is still in the stream nothing after it is gone; once it
/// is gone and newer ones were added, some of those may be (exactly at the boundary this can
/// signal a gap that lost nothing). A data set that is gone altogether (a restart without
/// persistence: `since` is newer) is not signalled here, only on resume.
fn signal_trimmed(conn: &mut redis::Connection, broker: &Broker) -> redis::RedisResult<()> {
    let after = broker.relayed();
    let since: Option<String> = redis::cmd("HGET").arg("ringcast:last").arg("since").query(conn)?;
    if !since.and_then(|s| s.parse::<EventId>().ok()).is_some_and(|since| since <= after) {
        return Ok(());
    }
    let at: Vec<(String, Vec<Vec<u8>>)> =
        redis::cmd("XRANGE").arg(ALL_STREAM).arg(after.to_string()).arg(after.to_string()).query(conn)?;
    if !at.is_empty() {
        return Ok(());
    }
    let info: redis::RedisResult<redis::Value> = redis::cmd("XINFO").arg("STREAM").arg(ALL_STREAM).query(conn);
    let info = match info {
        Ok(info) => info,
        Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => return Err(e),
        Err(_) => return Ok(()), // no stream: nothing was added after it
    };
    // A map (RESP3) or a flat list of name, value pairs (RESP2).
    let mut info: std::collections::HashMap<String, redis::Value> = match info {
        redis::Value::Map(pairs) => {
            pairs.into_iter().filter_map(|(k, v)| Some((redis::from_redis_value::<String>(k).ok()?, v))).collect()
        }
        redis::Value::Array(items) => {
            let mut items = items.into_iter();
            let mut map = std::collections::HashMap::new();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                if let Ok(k) = redis::from_redis_value::<String>(k) {
                    map.insert(k, v);
                }
            }
            map
        }
        _ => return Ok(()),
    };
    let id = |v: Option<redis::Value>| -> Option<EventId> { redis::from_redis_value::<String>(v?).ok()?.parse().ok() };
    let Some(newest) = id(info.remove("last-generated-id")) else { return Ok(()) };
    if newest <= after {
        return Ok(());
    }
    let oldest = id(info.remove("first-entry").and_then(|v| match v {
        redis::Value::Array(mut entry) if !entry.is_empty() => Some(entry.swap_remove(0)),
        _ => None,
    }));
    log::warn!(
        "relay: events after {after} were trimmed from Redis before this node caught up: streams get ringcast-gap"
    );
    let data = serde_json::json!({
        "lastEventId": after.to_string(),
        "oldestRetained": oldest.map(|id| id.to_string()),
        "topics": null,
    });
    let frame = crate::sse::encode_notice("ringcast-gap", &data.to_string());
    while let Err(Full) = broker.gap(&frame) {
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Reads every event after the newest one delivered from the stream of all events, in order.
fn catch_up(conn: &mut redis::Connection, broker: &Broker) -> redis::RedisResult<()> {
    loop {
        let after = broker.relayed();
        type Entry = (String, Vec<Vec<u8>>);
        let entries: Vec<Entry> = redis::cmd("XRANGE")
            .arg(ALL_STREAM)
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(CATCH_UP_COUNT)
            .query(conn)?;
        let done = entries.len() < CATCH_UP_COUNT;
        let mut batch = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            match stream_entry(&id, &fields) {
                Some(event) => batch.push(event),
                None => log::warn!("relay catch-up: dropped malformed entry {id}"),
            }
        }
        if !batch.is_empty() {
            log::info!("relay: caught up {} event(s) published while disconnected", batch.len());
            deliver(broker, &mut batch);
        }
        if done {
            return Ok(());
        }
    }
}

/// Hands relayed events to the broker, waiting while a core's mailbox is full (this thread may
/// wait; Redis keeps up to 32 MB for it).
fn deliver(broker: &Broker, batch: &mut Vec<(EventId, Publish)>) {
    while let Err(Full) = broker.deliver(batch) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `<id>\n<event>\n<topic> <topic>...\n<user>,<user>...\n<data>` as the function publishes it.
fn parse_relayed(payload: &[u8]) -> Option<(EventId, Publish)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(5, '\n');
    let id = parts.next()?.parse().ok()?;
    let event = parts.next()?;
    let topics = parts.next()?;
    let users = parts.next()?;
    let data = parts.next()?;
    Some((id, make_publish(topics.split(' '), event, data, users)?))
}

/// An XRANGE entry: its id and fields `e` (event), `d` (data), `t` (topics), `u` (users).
fn stream_entry(id: &str, fields: &[Vec<u8>]) -> Option<(EventId, Publish)> {
    let id = id.parse().ok()?;
    let (mut event, mut data, mut topics, mut users) = (None, None, None, "");
    for pair in fields.chunks(2) {
        let [name, value] = pair else { return None };
        let value = std::str::from_utf8(value).ok()?;
        match name.as_slice() {
            b"e" => event = Some(value),
            b"d" => data = Some(value),
            b"t" => topics = Some(value),
            b"u" => users = value,
            _ => {}
        }
    }
    Some((id, make_publish(topics?.split(' '), event?, data?, users)?))
}

/// Checks a relayed event as a local publish would be checked (Redis may hold anything).
fn make_publish<'a>(topics: impl Iterator<Item = &'a str>, event: &str, data: &str, users: &str) -> Option<Publish> {
    let topics = validate_topics(topics, usize::MAX).ok()?;
    let event = match event {
        "" => None,
        name if valid_event_name(name) => Some(name.into()),
        _ => return None,
    };
    let users = validate_users(users.split(',').filter(|u| !u.is_empty()).map(str::to_owned).collect()).ok()?;
    Some(Publish { topics, event, data: data.to_string(), users })
}

/// Default node name: host name and process id.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}-{}", if host.is_empty() { "ringcast" } else { host }, std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_payload_round_trip() {
        let (id, p) = parse_relayed(b"1700000000000-3\nquote\na b\n\nline1\nline2").expect("parses");
        assert_eq!(id, EventId { ms: 1_700_000_000_000, seq: 3 });
        assert_eq!(p.topics, vec![Box::<str>::from("a"), "b".into()]);
        assert_eq!(p.event.as_deref(), Some("quote"));
        assert_eq!(p.data, "line1\nline2");
        assert!(p.users.is_empty());
        let (_, p) = parse_relayed(b"1-0\n\nt\n\n").expect("no event name, empty data");
        assert_eq!((p.event, p.data.as_str()), (None, ""));
        let (_, p) = parse_relayed(b"1-0\n\nt\nalice,bob\nx").expect("targeted");
        assert_eq!(p.users, vec![Box::<str>::from("alice"), "bob".into()]);
        assert!(parse_relayed(b"nonsense").is_none());
        assert!(parse_relayed(b"1-0\n\nbad topic!\n\nx").is_none());
        assert!(parse_relayed(b"1-0\nbad\revent\nt\n\nx").is_none());
        assert!(parse_relayed(b"1-0\n\nt\n\n\xff").is_none());
        assert!(parse_relayed(b"1-0\n\nt\nbad user\nx").is_none());
    }

    #[test]
    fn stream_entries_parse() {
        let fields: Vec<Vec<u8>> = [&b"e"[..], b"", b"d", b"hello", b"t", b"news"].iter().map(|f| f.to_vec()).collect();
        let (id, p) = stream_entry("5-1", &fields).expect("parses");
        assert_eq!((id, p.data.as_str()), (EventId { ms: 5, seq: 1 }, "hello"));
        assert!(stream_entry("5-1", &fields[..4]).is_none(), "no topics");
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::new();
        let pauses: Vec<Duration> = (0..12).map(|_| b.pause()).collect();
        assert!(pauses.iter().all(|p| *p >= BACKOFF_FIRST / 2 && *p <= BACKOFF_CAP));
        assert!(pauses[11] >= BACKOFF_CAP / 2);
        b.reset();
        assert!(b.pause() <= BACKOFF_FIRST);
    }
}
