//! Every flag (and its `RINGCAST_<NAME>` env var), with defaults and the reason for each.

use crate::sender::SendChoice;
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DriverChoice {
    /// io_uring, falling back to epoll (one log line says so) where it cannot be built.
    Auto,
    /// io_uring only; start-up fails where it is unavailable.
    Uring,
    /// epoll (monoio's legacy driver).
    Epoll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// ringcast: a thread-per-core Server-Sent Events pub/sub server.
#[derive(Clone, Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// Settings file (TOML) with the flags' names as keys (`max-body = 1048576`,
    /// `cors-origin = ["https://a.example"]`, `demo = true`). A flag overrides its env var,
    /// which overrides the file.
    #[arg(long, env = "RINGCAST_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Address to listen on; port 0 picks a free port shared by every core.
    #[arg(long, env = "RINGCAST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Worker threads (one monoio runtime and one SO_REUSEPORT listener each); default: all CPUs.
    #[arg(long, env = "RINGCAST_CORES")]
    pub cores: Option<usize>,

    /// Pin worker i to CPU i (a failure to pin is a warning).
    #[arg(long, env = "RINGCAST_PIN_CORES")]
    pub pin_cores: bool,

    /// I/O driver.
    #[arg(long, env = "RINGCAST_DRIVER", value_enum, default_value = "auto")]
    pub driver: DriverChoice,

    /// How each core sends to its streams: `auto` submits one io_uring SENDMSG per stream,
    /// a whole flush per syscall, where the core runs io_uring (else `sendmsg`); `uring` does
    /// so on every core and fails at start-up where it cannot; `sendmsg` makes one syscall per
    /// stream.
    #[arg(long, env = "RINGCAST_SEND", value_enum, default_value_t = SendChoice::Auto)]
    pub send: SendChoice,

    /// io_uring submission queue entries per core (monoio: 256..=32768; a ring that cannot be
    /// built with this size makes `--driver auto` fall back to epoll).
    #[arg(long, env = "RINGCAST_URING_ENTRIES", default_value_t = 1024)]
    pub uring_entries: u32,

    /// Open connections of every kind, all cores together; default: the open-file limit less 256.
    #[arg(long, env = "RINGCAST_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Comment line sent to every stream this often (proxies and load balancers cut idle streams at 60 s).
    #[arg(long, env = "RINGCAST_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// A client must send a whole request head (and each later read of its body) within this.
    #[arg(long, env = "RINGCAST_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// A request body must arrive whole within this from the end of its head (408 beyond), so
    /// byte-at-a-time or stalled uploads cannot pin connections; default: --header-timeout.
    #[arg(long, env = "RINGCAST_BODY_TIMEOUT", value_parser = parse_duration)]
    pub body_timeout: Option<Duration>,

    /// Largest request head in bytes (431 beyond).
    #[arg(long, env = "RINGCAST_MAX_HEAD_BYTES", default_value_t = 8192)]
    pub max_head_bytes: usize,

    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "RINGCAST_MAX_BODY", default_value_t = 1 << 20)]
    pub max_body: usize,

    /// Topics one stream may subscribe to.
    #[arg(long, env = "RINGCAST_MAX_TOPICS", default_value_t = 64)]
    pub max_topics: usize,

    /// Bytes queued for one stream behind what is being written to it, past which that
    /// subscriber is too slow (see --slow-consumer). Must be at least --max-body; the default
    /// leaves room for several of the largest events (queued frames are shared by every stream,
    /// so this bounds a stream's lag more than its memory).
    #[arg(long, env = "RINGCAST_MAX_QUEUED_BYTES", default_value_t = 4 << 20)]
    pub max_queued_bytes: usize,

    /// Hold each stream's writes this long after its first pending frame, so more frames share
    /// one writev (0: write as soon as the core runs; e.g. 1ms trades latency for fewer writes).
    #[arg(long, env = "RINGCAST_BATCH_WINDOW", default_value = "0", value_parser = parse_duration)]
    pub batch_window: Duration,

    /// Events per broker-to-core batch, frames one write to a stream may carry, events a core
    /// takes from its mailbox while a pass over its streams is under way, and frames pending on
    /// one stream that end its batch window early (1: no batching at all).
    #[arg(long, env = "RINGCAST_BATCH_MAX", default_value_t = 256)]
    pub batch_max: usize,

    /// Publishing batches (a connection's pipelined publishes go together) a core's mailbox
    /// holds: when delivery falls this far behind, publishers wait their turn for room
    /// (back-pressure; 503 after --header-timeout). Bounds what a burst holds in memory.
    #[arg(long, env = "RINGCAST_CORE_QUEUE", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(4..=1_048_576))]
    pub core_queue: u32,

    /// Events whose frame reaches this many bytes are deflated once for all gzip streams;
    /// smaller ones travel as stored blocks (compression would not pay).
    #[arg(long, env = "RINGCAST_GZIP_MIN_BYTES", default_value_t = 1024)]
    pub gzip_min_bytes: usize,

    /// Never gzip streams, even when clients send `Accept-Encoding: gzip`.
    #[arg(long, env = "RINGCAST_NO_GZIP")]
    pub no_gzip: bool,

    /// Events retained per topic for resume and `?history=N` (0 disables history).
    #[arg(long, env = "RINGCAST_HISTORY", default_value_t = 1000)]
    pub history: usize,

    /// Retained (topic, event) entries across all topics; the oldest go first beyond it.
    #[arg(long, env = "RINGCAST_HISTORY_MAX_ENTRIES", default_value_t = 1_000_000)]
    pub history_max_entries: usize,

    /// Estimated memory of retained history, all topics together; the oldest events go first
    /// beyond it (an event costs its frame plus ~400 bytes; see docs/BENCHMARKS.md §5).
    #[arg(long, env = "RINGCAST_HISTORY_MAX_BYTES", default_value_t = 256 << 20)]
    pub history_max_bytes: usize,

    /// Retained events older than this are dropped (0 disables history).
    #[arg(long, env = "RINGCAST_HISTORY_TTL", default_value = "1h", value_parser = parse_duration)]
    pub history_ttl: Duration,

    /// A subscriber past --max-queued-bytes: `disconnect` it (it reconnects and resumes), or keep
    /// only the `latest` pending event per topic (counted in ringcast_conflated_events_total).
    #[arg(long, env = "RINGCAST_SLOW_CONSUMER", value_enum, default_value = "disconnect")]
    pub slow_consumer: crate::hub::SlowPolicy,

    /// Before a core sleeps, keep it awake this long (running its tasks, looking at its mailbox)
    /// so an event or request arriving soon needs no cross-CPU wake-up: lower latency for
    /// CPU burnt while idle (e.g. 50us for latency-first deployments; 0: sleep at once).
    #[arg(long, env = "RINGCAST_SPIN", default_value = "0", value_parser = parse_duration)]
    pub spin: Duration,

    /// Ask Linux (6.12 or later; older kernels ignore it) for scheduler slices this short on the
    /// core threads. A core that wakes for a publisher's request or an event then preempts a
    /// thread on a longer slice instead of waiting out that thread's slice (1.4 ms and more),
    /// which is what a busy host's tail latency is made of; a core that keeps running is
    /// preempted sooner in turn. 100us to 100ms; 0 keeps the kernel's default.
    #[arg(long, env = "RINGCAST_SCHED_SLICE", default_value = "100us", value_parser = parse_duration)]
    pub sched_slice: Duration,

    /// A shared secret that `POST /publish` must present as `Authorization: Bearer <key>`
    /// (401 otherwise). Without it, publishing needs no credential but is taken only from
    /// --publish-from addresses.
    #[arg(long, env = "RINGCAST_PUBLISH_KEY", hide_env_values = true)]
    pub publish_key: Option<String>,

    /// Addresses (CIDR, comma-separated) that may publish without --publish-key: loopback by
    /// default, so a node reachable from the internet is not an open relay by accident. Behind
    /// a proxy on the same host every client looks local: set --publish-key there.
    #[arg(long, env = "RINGCAST_PUBLISH_FROM", value_delimiter = ',', default_value = "127.0.0.0/8,::1/128")]
    pub publish_from: Vec<crate::access::Cidr>,

    /// Anyone who can reach the port may publish (no key, any address).
    #[arg(long, env = "RINGCAST_PUBLISH_OPEN")]
    pub publish_open: bool,

    /// HS256 secret for subscriber and publisher tokens (JWT). With it (or --jwt-public-key) a
    /// stream needs a token whose `subscribe` patterns cover its topics, and a publish a token
    /// whose `publish` patterns do (or the --publish-key).
    #[arg(long, env = "RINGCAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file of an RS256 (RSA) or ES256 (P-256) public key for tokens.
    #[arg(long, env = "RINGCAST_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// Cookie that may carry the token (EventSource cannot send headers; `?token=` works too).
    #[arg(long, env = "RINGCAST_JWT_COOKIE", default_value = "ringcast_token")]
    pub jwt_cookie: String,

    /// Web origins whose pages may read streams and publish answers (comma-separated or
    /// repeated), echoed with `Access-Control-Allow-Credentials: true`; `*` (default): any page,
    /// without credentials. Other origins get no CORS headers.
    #[arg(long, env = "RINGCAST_CORS_ORIGIN", value_delimiter = ',', default_value = "*")]
    pub cors_origin: Vec<String>,

    /// Open streams one client address may hold (0: no limit). Past it a stream request gets
    /// `200` with a long jittered `retry:` and is closed (a 429 would stop EventSource for good).
    #[arg(long, env = "RINGCAST_MAX_STREAMS_PER_IP", default_value_t = 0)]
    pub max_streams_per_ip: usize,

    /// New streams per second one client address may open, a token bucket holding a second's
    /// worth (0: no limit). Refused like --max-streams-per-ip.
    #[arg(long, env = "RINGCAST_NEW_STREAMS_PER_IP", default_value_t = 0.0)]
    pub new_streams_per_ip: f64,

    /// Publishes per second one client address may make, a token bucket holding a second's
    /// worth (0: no limit); past it `429` with `Retry-After`.
    #[arg(long, env = "RINGCAST_PUBLISHES_PER_IP", default_value_t = 0.0)]
    pub publishes_per_ip: f64,

    /// Proxies (CIDR, comma-separated) whose `X-Forwarded-For` / `X-Real-IP` name the client
    /// for the per-IP limits; from any other peer those headers are ignored.
    #[arg(long, env = "RINGCAST_TRUST_PROXY", value_delimiter = ',')]
    pub trust_proxy: Vec<crate::access::Cidr>,

    /// Redis for several nodes (`redis://host:port/db`): cluster-wide ids and history, events
    /// relayed between nodes, `FCALL ringcast_publish` for other services. Without it the node
    /// runs alone.
    #[arg(long, env = "RINGCAST_REDIS")]
    pub redis: Option<String>,

    /// This node's name in logs, `/health` and `/metrics`; default: host name and process id.
    #[arg(long, env = "RINGCAST_NODE_ID")]
    pub node_id: Option<String>,

    /// Drain, first stage: for this long after SIGTERM/SIGINT `/health` answers 503 while
    /// everything else goes on, so a load balancer stops sending new clients here before any
    /// stream closes.
    #[arg(long, env = "RINGCAST_DRAIN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// Drain, second stage: open streams are closed (each told to come back after a jittered
    /// `retry:`) spread evenly over this window, so their clients do not reconnect to the other
    /// nodes in one storm. 0 closes them all at once.
    #[arg(long, env = "RINGCAST_DRAIN_SPREAD", default_value = "0s", value_parser = parse_duration)]
    pub drain_spread: Duration,

    /// Longest drain (after --drain-delay) before the process exits anyway.
    #[arg(long, env = "RINGCAST_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Publish random stock quotes on `demo.AAPL`, `demo.MSFT`, ... (event `quote`), a few
    /// every 200 ms: the dashboard's live ticker, and something to subscribe to at once.
    #[arg(long, env = "RINGCAST_DEMO")]
    pub demo: bool,

    /// Do not serve the dashboard (`GET /`, `/dashboard`, `/dashboard/stats` answer 404).
    #[arg(long, env = "RINGCAST_NO_DASHBOARD")]
    pub no_dashboard: bool,

    /// Log lines as human text, or one JSON object per line (`ts`, `level`, `target`, `msg`).
    #[arg(long, env = "RINGCAST_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,

    /// Log level: error, warn, info, debug, trace.
    #[arg(long, env = "RINGCAST_LOG_LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,
}

/// The scheduler slices Linux accepts for a thread (`sched_attr.sched_runtime`).
const SLICE_MIN: Duration = Duration::from_micros(100);
const SLICE_MAX: Duration = Duration::from_millis(100);

impl Config {
    /// The settings from `args` (the command line), the environment and `--config`'s file,
    /// in that order of precedence. Exits with clap's message on bad flags or `--help`.
    pub fn load(args: Vec<std::ffi::OsString>) -> Result<Config, String> {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Config::command().get_matches_from(args.clone());
        let Some(path) = matches.get_one::<std::path::PathBuf>("config") else {
            return Config::from_arg_matches(&matches).map_err(|e| e.to_string());
        };
        let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
        let extra = file_args(&text, &matches).map_err(|e| format!("--config {}: {e}", path.display()))?;
        // The file's settings go in as flags, only for those neither a flag nor env gave.
        let mut args = args;
        args.extend(extra.into_iter().map(Into::into));
        let matches = Config::command().try_get_matches_from(args).map_err(|e| {
            format!("--config {}: {}", path.display(), e.to_string().lines().next().unwrap_or_default())
        })?;
        Config::from_arg_matches(&matches).map_err(|e| e.to_string())
    }

    /// The effective settings for the log, secrets hidden.
    pub fn redacted(&self) -> String {
        let mut shown = self.clone();
        let hide = |s: &mut Option<String>| {
            if s.is_some() {
                *s = Some("<hidden>".into());
            }
        };
        hide(&mut shown.jwt_secret);
        hide(&mut shown.publish_key);
        // A Redis URL may carry a password.
        if let Some(url) = &mut shown.redis {
            if let Some((scheme, rest)) = url.split_once("://") {
                if let Some((_, host)) = rest.rsplit_once('@') {
                    *url = format!("{scheme}://<hidden>@{host}");
                }
            }
        }
        format!("{shown:?}")
    }

    /// Settings that cannot work together, as a message for start-up.
    pub fn check(&self) -> Result<(), String> {
        if self.max_queued_bytes < self.max_body {
            return Err(format!(
                "--max-queued-bytes ({}) is smaller than --max-body ({}): a subscriber must be able to \
                 hold the largest event a publisher may send",
                self.max_queued_bytes, self.max_body
            ));
        }
        if !self.sched_slice.is_zero() && !(SLICE_MIN..=SLICE_MAX).contains(&self.sched_slice) {
            return Err(format!(
                "--sched-slice {:?} is out of range: Linux takes 100us to 100ms (0 keeps its default)",
                self.sched_slice
            ));
        }
        Ok(())
    }

    pub fn core_count(&self) -> usize {
        self.cores.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
    }
}

/// The flags a settings file stands for: one per key that no flag or env var set. Keys are
/// the flags' names (`max-body` or `max_body`); unknown keys are an error (a typo must not be
/// silently ignored).
fn file_args(text: &str, given: &clap::ArgMatches) -> Result<Vec<String>, String> {
    use clap::parser::ValueSource;
    use clap::CommandFactory;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.message().to_string())?;
    let command = Config::command();
    let mut args = Vec::new();
    for (key, value) in table {
        let id = key.replace('-', "_");
        let Some(arg) = command.get_arguments().find(|a| a.get_id() == id.as_str() && a.get_long().is_some()) else {
            return Err(format!("unknown setting {key:?}"));
        };
        if id == "config" {
            return Err("a settings file cannot name another".into());
        }
        if matches!(given.value_source(&id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let flag = format!("--{}", arg.get_long().expect("checked above"));
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => Err(format!("setting {key:?}: expected a string, number, boolean or list")),
            }
        };
        match &value {
            toml::Value::Boolean(true) => args.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    args.push(format!("{flag}={}", scalar(item)?));
                }
            }
            other => args.push(format!("{flag}={}", scalar(other)?)),
        }
    }
    Ok(args)
}

/// `50us`, `250ms`, `2s`, `1m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("bad duration {text:?}"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "us" | "µs" => value / 1e6,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("bad duration unit in {text:?} (use us, ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {text:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("50us").unwrap(), Duration::from_micros(50));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    fn load(args: &[&str], file: &str) -> Result<Config, String> {
        let path =
            std::env::temp_dir().join(format!("ringcast-config-test-{}-{}.toml", std::process::id(), args.len()));
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<std::ffi::OsString> = vec!["ringcast".into(), "--config".into(), path.clone().into()];
        argv.extend(args.iter().map(Into::into));
        let cfg = Config::load(argv);
        let _ = std::fs::remove_file(path);
        cfg
    }

    #[test]
    fn settings_file_under_flags() {
        let file = "max-body = 4096\nheartbeat = \"3s\"\ndemo = true\ncors_origin = [\"https://a.example\", \"https://b.example\"]\nno-gzip = false\n";
        let cfg = load(&[], file).unwrap();
        assert_eq!((cfg.max_body, cfg.heartbeat, cfg.demo, cfg.no_gzip), (4096, Duration::from_secs(3), true, false));
        assert_eq!(cfg.cors_origin, vec!["https://a.example".to_string(), "https://b.example".into()]);
        // A flag wins over the file.
        let cfg = load(&["--max-body", "100"], file).unwrap();
        assert_eq!((cfg.max_body, cfg.heartbeat), (100, Duration::from_secs(3)));
        assert!(load(&[], "max-bodyy = 1\n").unwrap_err().contains("unknown setting"));
        assert!(load(&[], "max-body = \"lots\"\n").is_err());
        assert!(load(&[], "this is not toml").is_err());
    }

    #[test]
    fn redacted_hides_secrets() {
        let mut c = Config::parse_from(["ringcast", "--jwt-secret", "s3cret", "--redis", "redis://:pw@h:6379/0"]);
        c.publish_key = Some("k3y".into());
        let shown = c.redacted();
        assert!(!shown.contains("s3cret") && !shown.contains("k3y") && !shown.contains("pw@"), "{shown}");
        assert!(shown.contains("h:6379/0"), "{shown}");
    }

    #[test]
    fn defaults() {
        let c = Config::parse_from(["ringcast"]);
        assert_eq!(c.heartbeat, Duration::from_secs(15));
        assert_eq!(c.max_body, 1 << 20);
        assert_eq!(c.driver, DriverChoice::Auto);
    }
}
