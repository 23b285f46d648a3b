//! Process-wide counters (each written by one owner, read by `/metrics`) and their rendering.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Counters of one core; only that core writes them.
#[derive(Default)]
pub struct CoreStats {
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
    /// Publishes refused: no or a wrong key (401), an address not allowed (403).
    pub refused_unauthorized: AtomicU64,
    pub refused_forbidden: AtomicU64,
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
        let add = |c: &AtomicU64, n: u64| c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        add(&self.publish_buckets[bucket], 1);
        add(&self.publish_ns, took.as_nanos() as u64);
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
    /// Written by the broker's chores thread once a second.
    pub retained_events: AtomicUsize,
    pub retained_bytes: AtomicUsize,
    pub cores: Vec<CoreStats>,
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
            retained_events: AtomicUsize::new(0),
            retained_bytes: AtomicUsize::new(0),
            cores: (0..cores).map(|_| CoreStats::default()).collect(),
        }
    }

    /// `/health`: serving alone (`ok`), or with Redis configured and unreachable (`degraded`).
    /// `/health`: `ok`, `degraded` (Redis configured and unreachable; still serving) or
    /// `draining` (answered 503 by the caller, so a load balancer stops sending clients here).
    pub fn health(&self, draining: bool) -> String {
        let status = match self.cluster.get() {
            _ if draining => "draining",
            Some(cluster) if !cluster.up() => "degraded",
            _ => "ok",
        };
        let redis = self.cluster.get().map(|c| if c.up() { "up" } else { "down" });
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
        .to_string()
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
        self.render_publish_histogram(&mut out);
        out
    }
}

impl Shared {
    /// `ringcast_publish_seconds`: time from a publish request parsed to its answer ready to
    /// send (its nonblocking send follows at once), all cores together.
    fn render_publish_histogram(&self, out: &mut String) {
        let name = "ringcast_publish_seconds";
        let _ = write!(
            out,
            "# HELP {name} Publish handling time on the server: request parsed to answer sent.\n# TYPE {name} histogram\n"
        );
        let mut cumulative = 0u64;
        for (i, bound) in PUBLISH_BUCKETS_US.iter().map(|&us| Some(us)).chain([None]).enumerate() {
            cumulative += self.cores.iter().map(|c| c.publish_buckets[i].load(Ordering::Relaxed)).sum::<u64>();
            match bound {
                Some(us) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", us as f64 / 1e6);
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum_ns: u64 = self.cores.iter().map(|c| c.publish_ns.load(Ordering::Relaxed)).sum();
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {cumulative}", sum_ns as f64 / 1e9);
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
