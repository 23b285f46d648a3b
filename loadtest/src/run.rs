//! The coordinator: connects the subscribers (in this process or in child
//! processes), publishes, waits for delivery and builds the report.

use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::{Args, PublishMode, Target};
use crate::net::own_cpu_seconds;
use crate::procstat::{self, ProcSample};
use crate::publisher::{PubConfig, Publishers};
use crate::report::{ConnectReport, DeliveryReport, PublishReport, Report, ServerReport};
use crate::shard::{ChildShard, Shard};
use crate::stats::{self, Counters, Progress, ShardResult, Summary};
use crate::subscriber::{subscribe_request, SubConfig, SubscriberGroup};

const POLL: Duration = Duration::from_millis(20);

/// Subscriber configuration shared by the parent and its children.
pub fn sub_config(args: &Args, target: &Target, processes: usize, threads_per_process: usize) -> SubConfig {
    let requests = (0..args.topics)
        .map(|t| {
            let path = args.sub_path.replace("{topic}", &args.topic_name(t));
            subscribe_request(&path, &target.host_header, args.http10, args.last_event_id.as_deref())
        })
        .collect();
    let source = if args.no_bind || !target.addr.is_ipv4() {
        None
    } else if args.source_addrs > 0 {
        Some((args.source_base, args.source_addrs))
    } else if target.is_loopback() {
        Some((args.source_base, args.subscribers.div_ceil(25_000).max(1) as u32))
    } else {
        None
    };
    let threads = (processes * threads_per_process).max(1);
    SubConfig {
        target: target.addr,
        requests,
        publishers: args.publishers,
        source,
        inflight_per_thread: args.connect_concurrency.div_ceil(threads).max(1),
        expect_by_topic: args.replay_expect.clone(),
    }
}

/// Publisher configuration for `mode` over all topics.
pub fn pub_config(args: &Args, target: &Target, mode: PublishMode) -> PubConfig {
    PubConfig {
        target: target.addr,
        host_header: target.host_header.clone(),
        paths: (0..args.topics).map(|t| args.pub_path.replace("{topic}", &args.topic_name(t))).collect(),
        size: args.size,
        mode,
        publishers: args.publishers,
        pipeline: if matches!(mode, PublishMode::Burst { .. }) { args.pipeline } else { 1 },
        max_in_flight: args.max_in_flight,
        timeout: args.publish_timeout,
    }
}

/// Starts the subscribers: in this process, or spread over child processes that are
/// given `raw_args` (plus their range).
pub fn start_shards(
    args: &Args,
    raw_args: &[OsString],
    cfg: SubConfig,
    processes: usize,
    threads: usize,
) -> Result<Vec<Shard>, String> {
    if processes == 1 {
        let group = SubscriberGroup::start(cfg, 0..args.subscribers, threads)
            .map_err(|e| format!("starting subscribers: {e}"))?;
        return Ok(vec![Shard::Local(group)]);
    }
    let per = args.subscribers.div_ceil(processes);
    (0..processes)
        .map(|p| {
            let range = p * per..((p + 1) * per).min(args.subscribers);
            ChildShard::spawn(raw_args, range, threads)
                .map(Shard::Child)
                .map_err(|e| format!("starting child process: {e}"))
        })
        .collect()
}

/// How the subscribers are split: (processes, threads per process).
pub fn layout(args: &Args) -> (usize, usize) {
    let processes = args.subscribers.div_ceil(args.max_per_process).max(1);
    let threads = args.total_threads().div_ceil(processes).max(1);
    (processes, threads)
}

/// Prints one progress line per second on stderr.
pub struct Ticker {
    quiet: bool,
    start: Instant,
    last: Instant,
    last_received: u64,
    last_published: u64,
}

impl Ticker {
    pub fn new(quiet: bool) -> Ticker {
        let now = Instant::now();
        Ticker { quiet, start: now, last: now, last_received: 0, last_published: 0 }
    }

    pub fn tick(&mut self, phase: &str, c: &Counters, subscribers: usize, published: u64, pub_errors: u64) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        if self.quiet || dt < 1.0 {
            return;
        }
        let recv_rate = (c.received - self.last_received) as f64 / dt;
        let pub_rate = (published - self.last_published) as f64 / dt;
        eprintln!(
            "[{:6.1}s] {:<8} connected {}/{}  recv {:.0} ev/s ({} total)  pub {:.0} ev/s ({} total)  errors {}",
            now.duration_since(self.start).as_secs_f64(),
            phase,
            c.connected - c.disconnected.min(c.connected),
            subscribers,
            recv_rate,
            c.received,
            pub_rate,
            published,
            c.errors() + pub_errors
        );
        self.last = now;
        self.last_received = c.received;
        self.last_published = published;
    }
}

pub fn total_progress(shards: &[Shard]) -> Progress {
    let mut total = Progress { connect_done: true, ..Progress::default() };
    for s in shards {
        let p = s.progress();
        total.counters.add(&p.counters);
        total.connect_done &= p.connect_done;
        stats::add_by_topic(&mut total.open_by_topic, &p.open_by_topic);
    }
    total
}

/// The summed sample of every `--server-pid` (None when none was given).
pub fn sample_server(pids: &[u32]) -> Result<Option<ProcSample>, String> {
    let mut total: Option<ProcSample> = None;
    for &pid in pids {
        let s = procstat::sample(pid).map_err(|e| format!("--server-pid {pid}: {e}"))?;
        let t = total.get_or_insert(ProcSample { cpu_seconds: 0.0, rss_bytes: 0, sleeps: 0 });
        t.cpu_seconds += s.cpu_seconds;
        t.rss_bytes += s.rss_bytes;
        t.sleeps += s.sleeps;
    }
    Ok(total)
}

/// Samples of the server (all `--server-pid`s summed) at the points a report needs.
pub struct ServerSamples {
    /// Before the first connect.
    pub before: Option<ProcSample>,
    /// Once the subscribers are connected.
    pub connected: Option<ProcSample>,
    /// Start and end of the measured window.
    pub start: Option<ProcSample>,
    pub end: Option<ProcSample>,
}

/// Server CPU over the measured window per event, wake-ups per publish, and RSS per connection.
pub fn server_report(
    pids: &[u32],
    s: ServerSamples,
    events: u64,
    published: u64,
    seconds: f64,
    connections: u64,
) -> Option<ServerReport> {
    let (pid, before, after_connect, start, end) = (pids.first()?, s.before?, s.connected?, s.start?, s.end?);
    let cpu = (end.cpu_seconds - start.cpu_seconds).max(0.0);
    Some(ServerReport {
        pid: *pid,
        cpu_s: cpu,
        cpu_us_per_event: (events > 0).then(|| cpu * 1e6 / events as f64),
        cpu_pct: cpu * 100.0 / seconds.max(1e-9),
        wakeups_per_publish: (published > 0).then(|| end.sleeps.saturating_sub(start.sleeps) as f64 / published as f64),
        rss_before_bytes: before.rss_bytes,
        rss_after_connect_bytes: after_connect.rss_bytes,
        rss_per_connection_bytes: (connections > 0)
            .then(|| (after_connect.rss_bytes as f64 - before.rss_bytes as f64) / connections as f64),
    })
}

/// Runs the whole load test as the parent process.
pub fn run(args: &Args, raw_args: &[OsString]) -> Result<Report, String> {
    args.validate()?;
    if args.subscribers == 0 {
        return Err("--subscribers must be at least 1".into());
    }
    let target = Target::parse(&args.target)?;
    let (processes, threads) = layout(args);
    let cfg = sub_config(args, &target, processes, threads);
    let mut ticker = Ticker::new(args.quiet);

    // Connect phase.
    let server_before = sample_server(&args.server_pid)?;
    let connect_start = Instant::now();
    let mut shards = start_shards(args, raw_args, cfg, processes, threads)?;
    let mut cut = false;
    let connected = loop {
        let p = total_progress(&shards);
        ticker.tick("connect", &p.counters, args.subscribers, 0, 0);
        if p.connect_done {
            break p;
        }
        if !cut && connect_start.elapsed() >= args.connect_timeout {
            shards.iter_mut().for_each(Shard::cutoff);
            cut = true;
        }
        std::thread::sleep(POLL);
    };
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    let server_connected = sample_server(&args.server_pid)?;
    std::thread::sleep(args.settle);
    // Expected deliveries are based on the streams still open when publishing starts.
    let by_topic = total_progress(&shards).open_by_topic;

    // Publish phase.
    let mode = args.publish_mode();
    let pub_target = match &args.publish_to {
        Some(spec) => Target::parse(spec)?,
        None => target.clone(),
    };
    let pub_cfg = pub_config(args, &pub_target, mode);
    let server_pub_start = sample_server(&args.server_pid)?;
    let pub_start = Instant::now();
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publishers =
        Publishers::start(pub_cfg, stop_publishing.clone()).map_err(|e| format!("starting publishers: {e}"))?;
    let pub_progress = publishers.progress.clone();
    let mut last_unique = 0;
    let mut last_change = Duration::ZERO;
    while !publishers.is_finished() {
        let p = total_progress(&shards);
        if p.counters.unique != last_unique {
            last_unique = p.counters.unique;
            last_change = pub_start.elapsed();
        }
        ticker.tick(
            "publish",
            &p.counters,
            args.subscribers,
            pub_progress.published.load(Ordering::Relaxed),
            pub_progress.errors.load(Ordering::Relaxed),
        );
        std::thread::sleep(POLL);
    }
    let published = publishers.join();
    let pub_seconds = pub_start.elapsed().as_secs_f64();
    let expected: u64 = by_topic.iter().zip(&published.published_by_topic).map(|(subs, events)| subs * events).sum();

    // Wait for stragglers.
    let grace_start = Instant::now();
    loop {
        let p = total_progress(&shards);
        if p.counters.unique != last_unique {
            last_unique = p.counters.unique;
            last_change = pub_start.elapsed();
        }
        if p.counters.unique >= expected || grace_start.elapsed() >= args.grace {
            break;
        }
        ticker.tick("drain", &p.counters, args.subscribers, published.published(), published.errors);
        std::thread::sleep(POLL);
    }
    let server_end = sample_server(&args.server_pid)?;
    let delivery_seconds = last_change.as_secs_f64().max(pub_seconds);

    // Collect.
    let mut total = ShardResult::default();
    for shard in shards {
        total.merge(&shard.finish());
    }
    let mut latency = stats::new_histogram();
    stats::add_pairs(&mut latency, &total.latency);
    let mut connect_hist = stats::new_histogram();
    stats::add_pairs(&mut connect_hist, &total.connect);
    let c = total.counters;

    let server = server_report(
        &args.server_pid,
        ServerSamples { before: server_before, connected: server_connected, start: server_pub_start, end: server_end },
        c.unique,
        published.published(),
        delivery_seconds,
        connected.counters.connected,
    );

    let first_error = total.first_error.clone().or(published.first_error.clone());
    let (rate, duration_s, burst, mode_name) = match mode {
        PublishMode::Rate { rate, duration } => (Some(rate), Some(duration.as_secs_f64()), None, "rate"),
        PublishMode::Burst { count } => (None, None, Some(count), "burst"),
    };
    let delivered = c.unique;
    Ok(Report {
        target: target.addr.to_string(),
        mode: mode_name,
        rate,
        duration_s,
        burst,
        size: args.size,
        subscribers: args.subscribers,
        topics: args.topics,
        publishers: args.publishers,
        processes,
        threads,
        connect: ConnectReport {
            connected: connected.counters.connected,
            open_at_publish: Some(by_topic.iter().sum()),
            failed: c.connect_failed,
            seconds: connect_seconds,
            time: Summary::of(&connect_hist),
        },
        publish: PublishReport::of(&published, pub_seconds),
        delivery: DeliveryReport {
            expected,
            delivered,
            delivered_pct: if expected == 0 { 100.0 } else { delivered as f64 * 100.0 / expected as f64 },
            lost: expected.saturating_sub(delivered),
            duplicates: c.duplicates,
            foreign: c.foreign,
            disconnects: c.disconnected,
            seconds: delivery_seconds,
            rate: delivered as f64 / delivery_seconds.max(1e-9),
        },
        latency: Summary::of(&latency),
        server,
        loadtest_cpu_s: own_cpu_seconds() + total.cpu_seconds,
        errors: c.errors() + published.errors,
        first_error,
    })
}
