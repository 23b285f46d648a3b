//! Process-wide counters (each written by one owner, read by `/metrics`) and their rendering.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Counters of one core; only that core writes them (a plain load and store, never a locked
/// read-modify-write), and `/metrics`, `/health` and the dashboard read them.
#[derive(Default)]
pub struct CoreStats {
    /// Its accept loop is running (`/health` is 503 when no core's is).
    pub accepting: std::sync::atomic::AtomicBool,
    /// Open connections accepted by this core, and all it ever accepted.
    pub connections: AtomicUsize,
    pub accepted: AtomicU64,
    /// Stream bytes handed to the kernel.
    pub bytes_out: AtomicU64,
    /// Publish -> write latency: from the broker stamping an event to this core having handed
    /// it to the kernel for all its streams (see `runtime`), per `WRITE_BUCKETS_US` bucket.
    pub write_buckets: [AtomicU64; WRITE_BUCKETS_US.len() + 1],
    pub write_ns: AtomicU64,
    /// This core's most-subscribed topics, refreshed once a second while the dashboard is
    /// watched (the one lock here, taken once a second by two threads).
    pub top_topics: Mutex<Vec<(Box<str>, usize)>>,
    pub subscribers: AtomicUsize,
    pub gzip_subscribers: AtomicUsize,
    pub topics: AtomicUsize,
    pub slow_disconnects: AtomicU64,
    pub shed: AtomicU64,
    pub frames_queued: AtomicU64,
    pub conflated: AtomicU64,
    /// Stream sends issued (sendmsg calls or io_uring SENDMSGs); frames_queued / sends is the
    /// batching factor.
    pub sends: AtomicU64,
    /// Times a stream's socket was full and its backlog writer took over.
    pub backlogs: AtomicU64,
    /// Publish handling time (request parsed -> answer ready to send), per bucket of
    /// `PUBLISH_BUCKETS_US` (the last one: slower), and the sum in nanoseconds.
    pub publish_buckets: [AtomicU64; PUBLISH_BUCKETS_US.len() + 1],
    pub publish_ns: AtomicU64,
    /// Publishes that found the core queues full and waited for room (back-pressure).
    pub publish_waits: AtomicU64,
    /// Publishes refused: no or a wrong key (401), an address not allowed (403).
    pub refused_unauthorized: AtomicU64,
    pub refused_forbidden: AtomicU64,
}

/// Upper bounds (microseconds) of the publish -> write histogram buckets.
pub const WRITE_BUCKETS_US: [u64; 16] =
    [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000];

/// Adds to a counter only its owner writes.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Upper bounds (microseconds) of the publish-time histogram buckets.
pub const PUBLISH_BUCKETS_US: [u64; 12] = [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000];

impl CoreStats {
    /// Counts a refused request by its kind (those without a counter of their own are not).
    pub fn count_refusal(&self, err: &crate::http::HttpError) {
        let counter = match err {
            crate::http::HttpError::Unauthorized => &self.refused_unauthorized,
            crate::http::HttpError::Forbidden(_) => &self.refused_forbidden,
            _ => return,
        };
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Counts one publish that took `took`. Only the owning core writes its counters, so a
    /// plain load and store suffice (no locked read-modify-write on the publish path).
    pub fn record_publish(&self, took: std::time::Duration) {
        let us = took.as_micros() as u64;
        let bucket = PUBLISH_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(PUBLISH_BUCKETS_US.len());
        bump(&self.publish_buckets[bucket], 1);
        bump(&self.publish_ns, took.as_nanos() as u64);
    }

    /// Counts one event this core finished writing `took` after the broker stamped it.
    pub fn record_write(&self, took: std::time::Duration) {
        let us = took.as_micros() as u64;
        let bucket = WRITE_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(WRITE_BUCKETS_US.len());
        bump(&self.write_buckets[bucket], 1);
        bump(&self.write_ns, took.as_nanos() as u64);
    }

    /// Publishes this core answered.
    pub fn publishes(&self) -> u64 {
        self.publish_buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// State shared by all threads: touched per connection or per publish, never per frame.
pub struct Shared {
    pub started: std::time::Instant,
    pub node_id: String,
    /// Token verification (`--jwt-secret` / `--jwt-public-key`), when configured.
    pub jwt: Option<crate::access::Jwt>,
    /// Per client address limits, shared by every core.
    pub limits: std::sync::Arc<crate::access::ClientLimits>,
    /// The link to Redis (`--redis`), set once at start.
    pub cluster: std::sync::OnceLock<std::sync::Arc<crate::cluster::Cluster>>,
    pub connections: AtomicUsize,
    pub max_connections: usize,
    pub events_published: AtomicU64,
    /// Times the relay found events trimmed from Redis before this node could catch up on
    /// them (every stream then got `ringcast-gap`).
    pub relay_gaps: AtomicU64,
    /// Set at SIGTERM/SIGINT: `/health` answers 503 from then on (--drain-delay before the
    /// cores start closing streams).
    pub draining: std::sync::atomic::AtomicBool,
    /// Open dashboard stats streams (stats are gathered only while someone watches).
    pub stats_viewers: AtomicUsize,
    /// Frame bytes the broker deflated for gzip streams, and what they became.
    pub gzip_in: AtomicU64,
    pub gzip_out: AtomicU64,
    /// Written by the broker's chores thread once a second.
    pub retained_events: AtomicUsize,
    pub retained_bytes: AtomicUsize,
    pub cores: Vec<CoreStats>,
    /// Per core: wakes its first waiting publisher when some core's mailbox has room again.
    pub room: Vec<crate::mailbox::RoomSignal>,
}

impl Shared {
    pub fn new(
        cores: usize,
        max_connections: usize,
        node_id: String,
        limits: std::sync::Arc<crate::access::ClientLimits>,
        jwt: Option<crate::access::Jwt>,
    ) -> Self {
        Shared {
            started: std::time::Instant::now(),
            node_id,
            limits,
            jwt,
            cluster: std::sync::OnceLock::new(),
            connections: AtomicUsize::new(0),
            max_connections,
            events_published: AtomicU64::new(0),
            relay_gaps: AtomicU64::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            stats_viewers: AtomicUsize::new(0),
            gzip_in: AtomicU64::new(0),
            gzip_out: AtomicU64::new(0),
            retained_events: AtomicUsize::new(0),
            retained_bytes: AtomicUsize::new(0),
            cores: (0..cores).map(|_| CoreStats::default()).collect(),
            room: (0..cores).map(|_| Default::default()).collect(),
        }
    }

    /// `/health`: `ok`, `degraded` (Redis configured and unreachable; still serving) or
    /// `draining` (answered 503 by the caller, so a load balancer stops sending clients here).
    pub fn health(&self, draining: bool) -> String {
        self.health_json(draining).to_string()
    }

    pub fn status(&self, draining: bool) -> &'static str {
        match self.cluster.get() {
            _ if draining => "draining",
            _ if !self.accepting() => "unavailable",
            Some(cluster) if !cluster.up() => "degraded",
            _ => "ok",
        }
    }

    pub fn redis_state(&self) -> Option<&'static str> {
        self.cluster.get().map(|c| if c.up() { "up" } else { "down" })
    }

    fn health_json(&self, draining: bool) -> serde_json::Value {
        let status = self.status(draining);
        let redis = self.redis_state();
        serde_json::json!({
            "status": status,
            "node": self.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "cores": self.cores.len(),
            "connections": self.connections.load(Ordering::Relaxed),
            "subscribers": self.cores.iter().map(|c| c.subscribers.load(Ordering::Relaxed)).sum::<usize>(),
            "redis": redis,
        })
    }

    /// Whether some core accepts connections (false: `/health` answers 503).
    pub fn accepting(&self) -> bool {
        self.cores.iter().any(|c| c.accepting.load(Ordering::Relaxed))
    }

    /// Whether any core has a gzip stream (the broker then compresses new frames once).
    pub fn any_gzip(&self) -> bool {
        self.cores.iter().any(|c| c.gzip_subscribers.load(Ordering::Relaxed) > 0)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let sum_usize = |f: fn(&CoreStats) -> &AtomicUsize| -> usize {
            self.cores.iter().map(|c| f(c).load(Ordering::Relaxed)).sum()
        };
        let sum_u64 =
            |f: fn(&CoreStats) -> &AtomicU64| -> u64 { self.cores.iter().map(|c| f(c).load(Ordering::Relaxed)).sum() };
        let mut out = String::with_capacity(1024);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        };
        metric(
            "ringcast_connections",
            "gauge",
            "Open TCP connections.",
            self.connections.load(Ordering::Relaxed) as u64,
        );
        metric("ringcast_max_connections", "gauge", "Connection limit.", self.max_connections as u64);
        metric("ringcast_subscribers", "gauge", "Open event streams.", sum_usize(|c| &c.subscribers) as u64);
        metric(
            "ringcast_gzip_subscribers",
            "gauge",
            "Open gzip-encoded event streams.",
            sum_usize(|c| &c.gzip_subscribers) as u64,
        );
        metric("ringcast_topics", "gauge", "Topic index entries, summed over cores.", sum_usize(|c| &c.topics) as u64);
        metric(
            "ringcast_events_published_total",
            "counter",
            "Events published.",
            self.events_published.load(Ordering::Relaxed),
        );
        metric(
            "ringcast_history_events",
            "gauge",
            "Events retained for resume (each shared by its topics).",
            self.retained_events.load(Ordering::Relaxed) as u64,
        );
        metric(
            "ringcast_history_bytes",
            "gauge",
            "Estimated memory of retained events (bounded by --history-max-bytes).",
            self.retained_bytes.load(Ordering::Relaxed) as u64,
        );
        metric(
            "ringcast_frames_queued_total",
            "counter",
            "Frames queued to streams (deliveries).",
            sum_u64(|c| &c.frames_queued),
        );
        metric(
            "ringcast_stream_sends_total",
            "counter",
            "Sends to streams (sendmsg calls or io_uring SENDMSGs); frames queued per send is the batching factor.",
            sum_u64(|c| &c.sends),
        );
        metric(
            "ringcast_stream_backlogs_total",
            "counter",
            "Times a stream's socket was full and its frames waited for room.",
            sum_u64(|c| &c.backlogs),
        );
        metric(
            "ringcast_publish_waits_total",
            "counter",
            "Publishes that found the core queues (or, with Redis, its submit queue) full and waited for room (back-pressure).",
            sum_u64(|c| &c.publish_waits),
        );
        metric(
            "ringcast_slow_consumer_disconnects_total",
            "counter",
            "Streams closed because their queue passed --max-queued-bytes.",
            sum_u64(|c| &c.slow_disconnects),
        );
        metric(
            "ringcast_conflated_events_total",
            "counter",
            "Pending events dropped for a newer one on the same topic (--slow-consumer latest).",
            sum_u64(|c| &c.conflated),
        );
        metric(
            "ringcast_connections_shed_total",
            "counter",
            "Requests answered with retry or 503 at the connection limit.",
            sum_u64(|c| &c.shed),
        );
        metric("ringcast_rss_bytes", "gauge", "Resident set size.", rss_bytes());
        if let Some(cluster) = self.cluster.get() {
            metric("ringcast_redis_up", "gauge", "1 when both Redis connections are up.", u64::from(cluster.up()));
            metric(
                "ringcast_redis_reconnects_total",
                "counter",
                "Times a Redis connection was lost.",
                cluster.reconnects.load(Ordering::Relaxed),
            );
            metric(
                "ringcast_relay_gaps_total",
                "counter",
                "Catch-ups that found events already trimmed from Redis (streams got ringcast-gap).",
                self.relay_gaps.load(Ordering::Relaxed),
            );
        }
        let _ = write!(
            out,
            "# HELP ringcast_node_info This node's name.\n# TYPE ringcast_node_info gauge\nringcast_node_info{{node=\"{}\"}} 1\n",
            self.node_id.replace(['\\', '"', '\n'], "_")
        );
        let refused =
            |f: fn(&CoreStats) -> &AtomicU64| -> u64 { self.cores.iter().map(|c| f(c).load(Ordering::Relaxed)).sum() };
        let _ = write!(
            out,
            "# HELP ringcast_publish_refused_total Publishes refused, by reason.\n\
             # TYPE ringcast_publish_refused_total counter\n\
             ringcast_publish_refused_total{{reason=\"unauthorized\"}} {}\n\
             ringcast_publish_refused_total{{reason=\"forbidden\"}} {}\n",
            refused(|c| &c.refused_unauthorized),
            refused(|c| &c.refused_forbidden)
        );
        let by_ip = |r: crate::access::Refusal| self.limits.refused[r as usize].load(Ordering::Relaxed);
        let _ = write!(
            out,
            "# HELP ringcast_client_limit_refused_total Requests refused by a per-client-address limit.\n\
             # TYPE ringcast_client_limit_refused_total counter\n\
             ringcast_client_limit_refused_total{{limit=\"streams_per_ip\"}} {}\n\
             ringcast_client_limit_refused_total{{limit=\"new_streams_per_ip\"}} {}\n\
             ringcast_client_limit_refused_total{{limit=\"publishes_per_ip\"}} {}\n",
            by_ip(crate::access::Refusal::StreamsPerIp),
            by_ip(crate::access::Refusal::NewStreamsPerIp),
            by_ip(crate::access::Refusal::PublishesPerIp)
        );
        let gzip_in = self.gzip_in.load(Ordering::Relaxed);
        let gzip_out = self.gzip_out.load(Ordering::Relaxed);
        let _ = write!(
            out,
            "# HELP ringcast_gzip_bytes_total Event frame bytes deflated once for gzip streams (in), and the result (out).\n\
             # TYPE ringcast_gzip_bytes_total counter\n\
             ringcast_gzip_bytes_total{{dir=\"in\"}} {gzip_in}\n\
             ringcast_gzip_bytes_total{{dir=\"out\"}} {gzip_out}\n\
             # HELP ringcast_gzip_ratio Deflated size over frame size, over all gzip frames so far (1 before any).\n\
             # TYPE ringcast_gzip_ratio gauge\n\
             ringcast_gzip_ratio {}\n",
            if gzip_in == 0 { 1.0 } else { gzip_out as f64 / gzip_in as f64 }
        );
        RefusalLog::render(self, &mut out);
        self.render_per_core(&mut out);
        self.render_histogram(
            &mut out,
            "ringcast_publish_seconds",
            "Publish handling time on the server: request parsed to answer sent.",
            &PUBLISH_BUCKETS_US,
            |c, i| c.publish_buckets[i].load(Ordering::Relaxed),
            |c| c.publish_ns.load(Ordering::Relaxed),
        );
        self.render_histogram(
            &mut out,
            "ringcast_publish_to_write_seconds",
            "Time from the broker stamping an event to a core having handed it to the kernel for all its streams (one count per event per core that had streams for it).",
            &WRITE_BUCKETS_US,
            |c, i| c.write_buckets[i].load(Ordering::Relaxed),
            |c| c.write_ns.load(Ordering::Relaxed),
        );
        out
    }

    /// Per-core counters, labelled `core="i"` (gathered here; each core writes only its own).
    fn render_per_core(&self, out: &mut String) {
        type Get = fn(&CoreStats) -> u64;
        let series: [(&str, &str, &str, Get); 9] = [
            ("ringcast_core_connections", "gauge", "Open connections, by core.", |c| {
                c.connections.load(Ordering::Relaxed) as u64
            }),
            ("ringcast_core_connections_accepted_total", "counter", "Connections accepted, by core.", |c| {
                c.accepted.load(Ordering::Relaxed)
            }),
            ("ringcast_core_subscribers", "gauge", "Open event streams, by core.", |c| {
                c.subscribers.load(Ordering::Relaxed) as u64
            }),
            (
                "ringcast_core_events_published_total",
                "counter",
                "Publishes answered, by the core that parsed them.",
                |c| c.publishes(),
            ),
            ("ringcast_core_events_delivered_total", "counter", "Frames queued to streams, by core.", |c| {
                c.frames_queued.load(Ordering::Relaxed)
            }),
            (
                "ringcast_core_events_dropped_total",
                "counter",
                "Events dropped for a newer one (--slow-consumer latest), by core.",
                |c| c.conflated.load(Ordering::Relaxed),
            ),
            (
                "ringcast_core_slow_consumer_disconnects_total",
                "counter",
                "Streams closed for being too far behind, by core.",
                |c| c.slow_disconnects.load(Ordering::Relaxed),
            ),
            ("ringcast_core_bytes_out_total", "counter", "Stream bytes handed to the kernel, by core.", |c| {
                c.bytes_out.load(Ordering::Relaxed)
            }),
            ("ringcast_core_stream_sends_total", "counter", "Stream sends, by core.", |c| {
                c.sends.load(Ordering::Relaxed)
            }),
        ];
        for (name, kind, help, get) in series {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for (i, core) in self.cores.iter().enumerate() {
                let _ = writeln!(out, "{name}{{core=\"{i}\"}} {}", get(core));
            }
        }
    }
}

impl Shared {
    /// A histogram summed over the cores, from per-core buckets (`bucket(core, i)`, the last
    /// one past every bound) and sums in nanoseconds.
    fn render_histogram(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        bounds_us: &[u64],
        bucket: impl Fn(&CoreStats, usize) -> u64,
        sum_ns: impl Fn(&CoreStats) -> u64,
    ) {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cumulative = 0u64;
        for i in 0..=bounds_us.len() {
            cumulative += self.cores.iter().map(|c| bucket(c, i)).sum::<u64>();
            match bounds_us.get(i) {
                Some(&us) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", us as f64 / 1e6);
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum: u64 = self.cores.iter().map(&sum_ns).sum();
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {cumulative}", sum as f64 / 1e9);
    }
}

/// Log lines for refusals: one per kind at most every `REFUSAL_LOG_EVERY`, with the count since
/// the last one (a flood of refused clients must not become a flood of log lines). Read from
/// the counters by the chores thread; nothing on the request path.
#[derive(Default)]
pub struct RefusalLog {
    last: [u64; 7],
    logged: [Option<std::time::Instant>; 7],
}

pub const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl RefusalLog {
    const KINDS: [&'static str; 7] = [
        "requests shed at the connection limit (200 + retry for streams, 503 otherwise)",
        "streams refused by --max-streams-per-ip",
        "streams refused by --new-streams-per-ip",
        "publishes refused by --publishes-per-ip (429)",
        "publishes refused for a missing or bad key or token (401)",
        "publishes refused for their address or topics (403)",
        "streams closed for being too slow (--max-queued-bytes)",
    ];

    /// `reason` label of each kind in `ringcast_refused_total`.
    const REASONS: [&'static str; 7] = [
        "connection_limit",
        "streams_per_ip",
        "new_streams_per_ip",
        "publishes_per_ip",
        "unauthorized",
        "forbidden",
        "slow_consumer",
    ];

    /// Refusals so far, by kind (the order of `KINDS`).
    fn counts(shared: &Shared) -> [u64; 7] {
        let cores = |f: fn(&CoreStats) -> &AtomicU64| shared.cores.iter().map(|c| f(c).load(Ordering::Relaxed)).sum();
        let by_ip = |r: crate::access::Refusal| shared.limits.refused[r as usize].load(Ordering::Relaxed);
        [
            cores(|c| &c.shed),
            by_ip(crate::access::Refusal::StreamsPerIp),
            by_ip(crate::access::Refusal::NewStreamsPerIp),
            by_ip(crate::access::Refusal::PublishesPerIp),
            cores(|c| &c.refused_unauthorized),
            cores(|c| &c.refused_forbidden),
            cores(|c| &c.slow_disconnects),
        ]
    }

    /// `ringcast_refused_total{reason=...}`: every kind of refusal in one family.
    pub fn render(shared: &Shared, out: &mut String) {
        let _ = write!(
            out,
            "# HELP ringcast_refused_total Requests refused and streams closed, by reason.\n\
             # TYPE ringcast_refused_total counter\n"
        );
        for (reason, n) in Self::REASONS.iter().zip(Self::counts(shared)) {
            let _ = writeln!(out, "ringcast_refused_total{{reason=\"{reason}\"}} {n}");
        }
    }

    /// Logs the kinds whose counters grew, each at most once per `REFUSAL_LOG_EVERY`.
    pub fn tick(&mut self, shared: &Shared) {
        let now = Self::counts(shared);
        let at = std::time::Instant::now();
        for (i, kind) in Self::KINDS.iter().enumerate() {
            let grew = now[i].saturating_sub(self.last[i]);
            if grew == 0 || self.logged[i].is_some_and(|t| at.duration_since(t) < REFUSAL_LOG_EVERY) {
                continue;
            }
            log::warn!("{grew} {kind} since the last report");
            self.last[i] = now[i];
            self.logged[i] = Some(at);
        }
    }
}

/// Resident set size from /proc/self/statm (0 where unavailable).
pub fn rss_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    let pages: u64 = text.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}
