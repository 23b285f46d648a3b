//! Start-up and shutdown: the broker, its chores thread and the core threads, the listening
//! address, signals, drain.

use crate::broker::{Broker, IdClock};
use crate::cluster::RetentionConfig;
use crate::config::Config;
use crate::event::CoreMsg;
use crate::history::History;
use crate::mailbox::{mailbox, MailboxSender};
use crate::metrics::Shared;
use crate::runtime::{spawn_core, CoreStart};
use std::io::{self, Write};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Events Redis keeps in the stream of every event (for nodes catching up after a reconnect).
const REDIS_ALL_MAX: usize = 100_000;
/// How often retained events are checked against --history-ttl.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// File descriptors kept free for answering over-limit clients and for the process itself.
const FD_RESERVE: usize = 256;

/// Runs the server until SIGTERM or SIGINT, then drains.
pub fn run(cfg: Config) -> io::Result<()> {
    cfg.check().map_err(io::Error::other)?;
    let signals = block_shutdown_signals()?;
    let nofile = raise_nofile_limit();
    let cores = cfg.core_count();
    let max_connections = cfg.max_connections.unwrap_or(nofile.saturating_sub(FD_RESERVE).max(16));
    let node_id = cfg.node_id.clone().unwrap_or_else(crate::cluster::default_node_id);
    let limits = Arc::new(crate::access::ClientLimits::new(&cfg));
    let jwt = crate::access::Jwt::new(&cfg).map_err(io::Error::other)?;
    let shared = Arc::new(Shared::new(cores, max_connections, node_id.clone(), limits, jwt));
    let cfg = Arc::new(cfg);

    let (senders, receivers): (Vec<MailboxSender<CoreMsg>>, Vec<_>) =
        (0..cores).map(|_| mailbox(cfg.core_queue as usize)).unzip();
    let first_id = IdClock::default().next_id();
    let history = History::new(cfg.history, cfg.history_max_entries, cfg.history_ttl.as_millis() as u64, first_id)
        .with_max_bytes(cfg.history_max_bytes);
    let broker = Arc::new(Broker::new(senders, shared.clone(), history, cfg.gzip_min_bytes));
    let mut redis_threads = Vec::new();
    if let Some(url) = &cfg.redis {
        let retention = RetentionConfig {
            // --history-ttl 0 turns history off here; Redis keeps none either then.
            per_topic: if cfg.history_ttl.is_zero() { 0 } else { cfg.history },
            ttl_ms: cfg.history_ttl.as_millis() as u64,
            all: cfg.history_max_entries.min(REDIS_ALL_MAX),
        };
        let (cluster, threads) = crate::cluster::start(url, node_id.clone(), retention, broker.clone())?;
        let _ = shared.cluster.set(cluster);
        redis_threads = threads;
    }
    let (stop_chores, chores_stopped) = mpsc::channel::<()>();
    let chores = {
        let (broker, shared) = (broker.clone(), shared.clone());
        let mut stats = (!cfg.no_dashboard).then(|| crate::dashboard::StatsTicker::new(cfg.demo));
        let mut refusals = crate::metrics::RefusalLog::default();
        std::thread::Builder::new().name("ringcast-broker".into()).spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = chores_stopped.recv_timeout(EXPIRE_EVERY) {
                broker.expire();
                refusals.tick(&shared);
                if let Some(stats) = &mut stats {
                    stats.tick(&shared, &broker, shared.draining.load(std::sync::atomic::Ordering::Relaxed));
                }
            }
        })?
    };

    // Core 0 binds first so that port 0 resolves to one port that the other cores share.
    let mut addr = cfg.listen;
    let mut threads = Vec::with_capacity(cores);
    for (index, mailbox) in receivers.into_iter().enumerate() {
        let (ready, bound) = mpsc::channel();
        let start =
            CoreStart { index, cfg: cfg.clone(), shared: shared.clone(), broker: broker.clone(), mailbox, addr, ready };
        threads.push(spawn_core(start)?);
        addr = bound
            .recv()
            .map_err(|_| io::Error::other(format!("core {index} stopped during start-up")))?
            .map_err(|e| io::Error::new(e.kind(), format!("core {index}: {e}")))?;
    }
    println!("ringcast listening on {addr}");
    if shared.jwt.is_some() {
        log::info!("tokens required: streams need `subscribe`, publishes `publish` claims (or --publish-key)");
    } else {
        log::info!("{}", crate::access::PublishAccess::new(&cfg).describe());
    }
    io::stdout().flush()?;
    log::info!(
        "node {node_id}: {cores} core(s), max {max_connections} connections, heartbeat {:?}, driver {:?}, {}",
        cfg.heartbeat,
        cfg.driver,
        if cfg.redis.is_some() { "Redis cluster" } else { "alone (no --redis)" }
    );

    let signal = wait_for_signal(&signals);
    shared.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    if !cfg.drain_delay.is_zero() {
        // Stage one: /health says 503 so load balancers stop sending clients; all else goes on.
        log::info!("{signal} received: /health answers 503; streams close in {:?}", cfg.drain_delay);
        std::thread::sleep(cfg.drain_delay);
    }
    log::info!(
        "{signal} received: draining streams (closes spread over {:?}, at most {:?})",
        cfg.drain_spread.min(cfg.drain_timeout),
        cfg.drain_timeout
    );
    broker.shutdown();
    for thread in threads {
        let _ = thread.join();
    }
    drop(stop_chores);
    let _ = chores.join();
    if let Some(cluster) = shared.cluster.get() {
        cluster.stop();
    }
    for thread in redis_threads {
        let _ = thread.join();
    }
    log::info!("drained; exiting");
    Ok(())
}

/// Blocks SIGINT and SIGTERM in this thread and every thread it starts, so that only
/// `wait_for_signal` sees them.
fn block_shutdown_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> &'static str {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid out-pointer.
        if unsafe { libc::sigwait(set, &mut sig) } == 0 {
            return if sig == libc::SIGTERM { "SIGTERM" } else { "SIGINT" };
        }
    }
}

/// Raises the soft open-file limit to the hard one; returns the limit in force.
fn raise_nofile_limit() -> usize {
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX).min(1 << 24)
    }
}
