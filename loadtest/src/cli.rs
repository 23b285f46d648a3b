//! Command line interface.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::Parser;

/// wrk-style Server-Sent Events load generator.
///
/// Opens N subscriber streams, publishes timestamped events at a fixed rate
/// (`--rate`) or flat out (`--burst`), and reports publish->receive latency
/// percentiles, delivery (loss / duplicates) and, with `--server-pid`, the
/// server's CPU time per delivered event and memory per connection.
#[derive(Parser, Debug, Clone)]
#[command(name = "ringcast-loadtest", version, about, long_about = None)]
pub struct Args {
    /// Server address: `http://HOST:PORT`, `HOST:PORT` or `HOST` (port 80).
    #[arg(value_name = "TARGET", default_value = "http://127.0.0.1:8080")]
    pub target: String,

    /// Number of subscriber connections.
    #[arg(short = 'c', long, default_value_t = 100)]
    pub subscribers: usize,

    /// Number of topics; subscriber i listens on topic i % topics and the
    /// publishers spread events round-robin over all topics.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,

    /// Topic names are `<prefix><index>`.
    #[arg(long, default_value = "lt")]
    pub topic_prefix: String,

    /// Subscribe request target; `{topic}` is replaced by the topic name
    /// (nchan example: `/sub/{topic}`).
    #[arg(long, default_value = "/events?topic={topic}")]
    pub sub_path: String,

    /// Publish to this server instead of TARGET (another node of a cluster: measures the
    /// publish -> receive path across nodes).
    #[arg(long, value_name = "TARGET")]
    pub publish_to: Option<String>,

    /// Publish request target; `{topic}` is replaced by the topic name
    /// (nchan example: `/pub/{topic}`).
    #[arg(long, default_value = "/publish?topic={topic}")]
    pub pub_path: String,

    /// Subscribe with HTTP/1.0 (servers then answer with a plain, non-chunked stream).
    #[arg(long)]
    pub http10: bool,

    /// Send `Last-Event-ID: ID` with every subscribe request, so each stream first gets the
    /// events the server retained after ID (replayed events count like live ones).
    #[arg(long, value_name = "ID")]
    pub last_event_id: Option<String>,

    /// Replay (resume storm) benchmark: publish K events before any subscriber connects, then
    /// connect all subscribers at once with `Last-Event-ID` set to the event published just
    /// before them, and time until every stream has all K replayed from the server's history
    /// (ringcast: run it with `--history` >= K).
    #[arg(long, value_name = "K", conflicts_with_all = ["rate", "burst"])]
    pub replay: Option<u64>,

    /// Internal (replay mode): events each stream must receive, per topic index.
    #[arg(long, hide = true, value_delimiter = ',')]
    pub replay_expect: Option<Vec<u64>>,

    /// Publish this many events per second in total for --duration (default mode,
    /// 100/s). Publishing stops at the end of --duration even when behind schedule.
    #[arg(short = 'r', long, conflicts_with = "burst")]
    pub rate: Option<f64>,

    /// How long to publish in rate mode.
    #[arg(short = 'd', long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Publish this many events as fast as possible instead of at a rate.
    #[arg(short = 'b', long)]
    pub burst: Option<u64>,

    /// Size of each event's data in bytes (timestamp + sequence + padding).
    #[arg(short = 's', long, default_value_t = 64)]
    pub size: usize,

    /// Number of keep-alive publisher connections.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub publishers: usize,

    /// Requests a publisher writes before reading the responses in --burst mode
    /// (1 = no HTTP pipelining).
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,

    /// Unanswered publish requests one publisher may have outstanding in rate mode. Rate mode
    /// is open-loop (like wrk2): events go out on schedule without waiting for earlier answers.
    #[arg(long, default_value_t = 1_000)]
    pub max_in_flight: usize,

    /// Publisher connect / response timeout; a publisher that hits it stops publishing.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub publish_timeout: Duration,

    /// Subscriber threads in total (each runs its own epoll loop); default: CPUs.
    #[arg(short = 't', long)]
    pub threads: Option<usize>,

    /// Subscribers per process; above this the work is spread over child processes.
    #[arg(long, default_value_t = 19_000)]
    pub max_per_process: usize,

    /// Connection attempts in flight at once (over all threads and processes).
    #[arg(long, default_value_t = 1_000)]
    pub connect_concurrency: usize,

    /// Give up on subscribers not connected after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Pause between "all connected" and the first publish.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub settle: Duration,

    /// After the last publish, wait at most this long for stragglers.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Number of source addresses to bind subscriber sockets to
    /// (`--source-base`, +1, ...); 0 = automatic (one per 25,000 subscribers when
    /// the target is on loopback, none otherwise).
    #[arg(long, default_value_t = 0)]
    pub source_addrs: u32,

    /// First source address for subscriber sockets.
    #[arg(long, default_value = "127.0.0.2")]
    pub source_base: Ipv4Addr,

    /// Never bind subscriber sockets to a source address.
    #[arg(long, conflicts_with = "source_addrs")]
    pub no_bind: bool,

    /// PID(s) of the server, comma-separated (e.g. nginx's workers): report their summed CPU
    /// time per delivered event and RSS per connection.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,

    /// Print one JSON object on stdout instead of the text report.
    #[arg(long)]
    pub json: bool,

    /// No progress lines on stderr.
    #[arg(short = 'q', long)]
    pub quiet: bool,

    /// Internal: run as a child process holding subscribers START..START+COUNT.
    #[arg(long, hide = true, value_name = "START:COUNT")]
    pub child_range: Option<String>,

    /// Internal: subscriber threads of a child process.
    #[arg(long, hide = true)]
    pub child_threads: Option<usize>,
}

/// How events are published.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PublishMode {
    /// `rate` events per second in total for `duration`.
    Rate { rate: f64, duration: Duration },
    /// `count` events in total, as fast as possible.
    Burst { count: u64 },
}

impl Args {
    pub fn publish_mode(&self) -> PublishMode {
        match (self.burst, self.rate) {
            (Some(count), _) => PublishMode::Burst { count },
            (None, Some(rate)) => PublishMode::Rate { rate, duration: self.duration },
            (None, None) => PublishMode::Rate { rate: 100.0, duration: self.duration },
        }
    }

    /// Checks option combinations that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.topics == 0 {
            return Err("--topics must be at least 1".into());
        }
        if self.publishers == 0 {
            return Err("--publishers must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return Err("--max-in-flight must be at least 1".into());
        }
        if self.pipeline == 0 {
            return Err("--pipeline must be at least 1".into());
        }
        if self.max_per_process == 0 {
            return Err("--max-per-process must be at least 1".into());
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err("--rate must be a positive number".into());
            }
        }
        if self.threads == Some(0) {
            return Err("--threads must be at least 1".into());
        }
        if let Some(id) = &self.last_event_id {
            if self.replay.is_some() {
                return Err("--replay sets the Last-Event-ID itself; drop --last-event-id".into());
            }
            if id.bytes().any(|b| b < b' ' || b == 0x7f) {
                return Err("--last-event-id must not contain control bytes".into());
            }
        }
        if self.replay == Some(0) {
            return Err("--replay must be at least 1".into());
        }
        for (name, path) in [("--sub-path", &self.sub_path), ("--pub-path", &self.pub_path)] {
            if !path.starts_with('/') {
                return Err(format!("{name} must start with '/'"));
            }
            if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(format!("{name} must not contain spaces or control bytes"));
            }
        }
        Ok(())
    }

    /// Total subscriber threads.
    pub fn total_threads(&self) -> usize {
        self.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    pub fn topic_name(&self, index: usize) -> String {
        format!("{}{}", self.topic_prefix, index)
    }
}

/// A resolved server address plus the `Host` header value to send.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host_header: String,
}

impl Target {
    pub fn parse(spec: &str) -> Result<Target, String> {
        let rest = if let Some(rest) = spec.strip_prefix("http://") {
            rest
        } else if spec.contains("://") {
            return Err(format!("{spec}: only http:// targets are supported"));
        } else {
            spec
        };
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            return Err(format!("{spec}: missing host"));
        }
        let has_port = if authority.starts_with('[') { authority.contains("]:") } else { authority.contains(':') };
        let with_port = if has_port { authority.to_string() } else { format!("{authority}:80") };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{spec}: {e}"))?
            .min_by_key(|a| !a.is_ipv4())
            .ok_or_else(|| format!("{spec}: no address"))?;
        Ok(Target { addr, host_header: authority.to_string() })
    }

    pub fn is_loopback(&self) -> bool {
        match self.addr.ip() {
            IpAddr::V4(ip) => ip.is_loopback(),
            IpAddr::V6(ip) => ip.is_loopback(),
        }
    }
}

/// Parses `250ms`, `2s`, `1m`, `1h` or a bare number of seconds (fractions allowed).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ns" => value / 1e9,
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses the hidden `--child-range START:COUNT`.
pub fn parse_child_range(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once(':').ok_or_else(|| format!("bad child range {s:?}"))?;
    let start = a.parse().map_err(|_| format!("bad child range {s:?}"))?;
    let count = b.parse().map_err(|_| format!("bad child range {s:?}"))?;
    Ok((start, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5parsecs").is_err());
    }

    #[test]
    fn targets() {
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.host_header, "127.0.0.1:8080");
        assert!(t.is_loopback());
        let t = Target::parse("127.0.0.1:9/ignored").unwrap();
        assert_eq!(t.addr.port(), 9);
        let t = Target::parse("http://127.0.0.1").unwrap();
        assert_eq!(t.addr.port(), 80);
        assert!(Target::parse("https://x").is_err());
    }

    #[test]
    fn modes_and_validation() {
        let a = Args::parse_from(["x", "--burst", "10"]);
        assert_eq!(a.publish_mode(), PublishMode::Burst { count: 10 });
        let a = Args::parse_from(["x", "--rate", "500", "-d", "2s"]);
        assert_eq!(a.publish_mode(), PublishMode::Rate { rate: 500.0, duration: Duration::from_secs(2) });
        assert!(a.validate().is_ok());
        assert!(Args::try_parse_from(["x", "--burst", "1", "--rate", "2"]).is_err());
        let a = Args::parse_from(["x", "--sub-path", "sub"]);
        assert!(a.validate().is_err());
        assert_eq!(parse_child_range("5:10").unwrap(), (5, 10));
    }

    #[test]
    fn replay_and_resume_options() {
        let a = Args::parse_from(["x", "--replay", "1000", "-c", "1"]);
        assert_eq!(a.replay, Some(1000));
        assert!(a.validate().is_ok());
        assert!(Args::try_parse_from(["x", "--replay", "1", "--burst", "2"]).is_err());
        assert!(Args::try_parse_from(["x", "--replay", "1", "--rate", "2"]).is_err());
        assert!(Args::parse_from(["x", "--replay", "0"]).validate().is_err());
        assert!(Args::parse_from(["x", "--replay", "5", "--last-event-id", "1-0"]).validate().is_err());
        let a = Args::parse_from(["x", "--burst", "5", "--last-event-id", "1700000000000-3"]);
        assert_eq!(a.last_event_id.as_deref(), Some("1700000000000-3"));
        assert!(a.validate().is_ok());
        assert!(Args::parse_from(["x", "--last-event-id", "1\r\nX: y"]).validate().is_err());
        let a = Args::parse_from(["x", "--replay-expect", "3,4"]);
        assert_eq!(a.replay_expect, Some(vec![3, 4]));
    }
}
