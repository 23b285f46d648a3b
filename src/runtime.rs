//! One core's thread: its own monoio runtime, SO_REUSEPORT listener, accept loop, heartbeat
//! timer, and the mailbox loop that fans events out to this core's streams, then its drain.

use crate::broker::Broker;
use crate::config::{Config, DriverChoice};
use crate::conn;
use crate::event::{CoreMsg, Event};
use crate::mailbox::MailboxReceiver;
use crate::metrics::Shared;
use crate::sender::{BatchSender, SendChoice};
use crate::sse::retry_frame;
use crate::worker::{Worker, ENQUEUE_SLICE};
use monoio::io::Canceller;
use monoio::net::{ListenerOpts, TcpListener};
use monoio::time::{Instant, MissedTickBehavior, TimeDriver};
use monoio::{FusionRuntime, IoUringDriver, LegacyDriver, RuntimeBuilder};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Once};
use std::task::Poll;
use std::time::Duration;

/// Pause after accept fails for lack of file descriptors (EMFILE returns at once, forever).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);
/// Listen backlog: connection storms (reconnects after a restart) queue here.
const BACKLOG: i32 = 4096;

type Runtime = FusionRuntime<TimeDriver<IoUringDriver>, TimeDriver<LegacyDriver>>;

/// Lets every other ready task run once. monoio 0.2.4 has no `yield_now`, and a task that
/// wakes itself during its own poll is put at the front of the queue (it would starve the
/// others), so the wake comes from a freshly spawned task instead, which runs at the back.
pub(crate) async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        let waker = cx.waker().clone();
        monoio::spawn(async move { waker.wake() });
        Poll::Pending
    })
    .await
}

/// `--spin`: before the core sleeps, keep running its other tasks and looking at the mailbox
/// for a while, so an event or request that comes soon finds the core awake (no cross-CPU
/// wake-up). Each turn goes through the runtime, which submits and reaps io_uring work
/// (monoio's "cold path"), so sockets are served while spinning. Costs CPU while idle.
async fn spin(mailbox: &MailboxReceiver<CoreMsg>, period: Duration) {
    let until = std::time::Instant::now() + period;
    while mailbox.is_empty() && std::time::Instant::now() < until {
        yield_now().await;
    }
}

static FALLBACK_LOGGED: Once = Once::new();

/// Builds the runtime for `--driver`; `auto` tries io_uring, then epoll.
/// (monoio's FusionDriver does not fall back when io_uring fails to build, so this does.)
fn build_runtime(choice: DriverChoice, entries: u32) -> std::io::Result<(Runtime, &'static str)> {
    let uring =
        || RuntimeBuilder::<IoUringDriver>::new().with_entries(entries).enable_timer().build().map(Runtime::from);
    let epoll = || RuntimeBuilder::<LegacyDriver>::new().enable_timer().build().map(Runtime::from);
    match choice {
        DriverChoice::Uring => uring().map(|rt| (rt, "io_uring")),
        DriverChoice::Epoll => epoll().map(|rt| (rt, "epoll")),
        DriverChoice::Auto => match uring() {
            Ok(rt) => Ok((rt, "io_uring")),
            Err(e) => {
                FALLBACK_LOGGED.call_once(|| log::warn!("io_uring unavailable ({e}); falling back to epoll"));
                epoll().map(|rt| (rt, "epoll"))
            }
        },
    }
}

/// Everything one core needs at start.
pub struct CoreStart {
    pub index: usize,
    pub cfg: Arc<Config>,
    pub shared: Arc<Shared>,
    pub broker: Arc<Broker>,
    pub mailbox: MailboxReceiver<CoreMsg>,
    pub addr: SocketAddr,
    /// Reports the bound address (or the error) once the listener is up.
    pub ready: mpsc::Sender<std::io::Result<SocketAddr>>,
}

pub fn spawn_core(start: CoreStart) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("ringcast-core-{}", start.index)).spawn(move || run_thread(start))
}

fn run_thread(start: CoreStart) {
    if start.cfg.pin_cores {
        if let Err(e) = monoio::utils::bind_to_cpu_set([start.index]) {
            log::warn!("core {}: could not pin to CPU {}: {e}", start.index, start.index);
        }
    }
    if !start.cfg.sched_slice.is_zero() {
        match ask_slice(start.cfg.sched_slice) {
            // Said once: every core gets the same answer (a seccomp profile, say).
            Err(e) if start.index == 0 => log::warn!(
                "--sched-slice: cannot ask for {:?} scheduler slices ({e}); the cores keep the kernel's \
                 default (--sched-slice 0 silences this)",
                start.cfg.sched_slice
            ),
            _ => {}
        }
    }
    let (mut rt, driver) = match build_runtime(start.cfg.driver, start.cfg.uring_entries) {
        Ok(built) => built,
        Err(e) => {
            let why = format!("cannot start the {:?} I/O driver: {e}", start.cfg.driver);
            let _ = start.ready.send(Err(std::io::Error::new(e.kind(), why)));
            return;
        }
    };
    if start.index == 0 {
        log::info!("I/O driver: {driver}");
    }
    rt.block_on(async move {
        let opts = ListenerOpts::new().reuse_port(true).backlog(BACKLOG);
        let listener = match TcpListener::bind_with_config(start.addr, &opts) {
            Ok(l) => l,
            Err(e) => {
                let why = format!("cannot listen on {}: {e}", start.addr);
                let _ = start.ready.send(Err(std::io::Error::new(e.kind(), why)));
                return;
            }
        };
        let sender = match (start.cfg.send, driver) {
            (SendChoice::Sendmsg, _) | (SendChoice::Auto, "epoll") => None,
            (choice, _) => match BatchSender::new() {
                Ok(s) => Some(s),
                Err(e) if choice == SendChoice::Auto => {
                    log::warn!("core {}: io_uring send ring: {e}; sending with sendmsg", start.index);
                    None
                }
                Err(e) => {
                    let why = format!("--send uring: cannot build the io_uring send ring: {e}");
                    let _ = start.ready.send(Err(std::io::Error::new(e.kind(), why)));
                    return;
                }
            },
        };
        if start.index == 0 {
            log::info!("stream sends: {}", if sender.is_some() { "io_uring batches" } else { "sendmsg" });
        }
        let _ = start.ready.send(listener.local_addr());
        let worker = Worker::new(start.index, start.cfg, start.shared, start.broker);
        if let Some(sender) = sender {
            worker.hub.borrow_mut().set_sender(sender);
        }
        run_core(worker, listener, start.mailbox).await;
    });
}

/// `--sched-slice`: asks for this thread's scheduler slice (EEVDF's custom slice, Linux 6.12+;
/// earlier kernels accept the call and ignore the length). Under CPU contention a woken task
/// with a shorter slice than the running one preempts it, so a core that a publisher's request
/// wakes answers within microseconds instead of after another thread's whole slice.
fn ask_slice(slice: std::time::Duration) -> std::io::Result<()> {
    // struct sched_attr, SCHED_ATTR_SIZE_VER0 (48 bytes); libc has no binding for it.
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    // Keep the thread's policy and nice value: the call must change nothing but the slice.
    let nice = {
        // getpriority returns -1 for nice -1 as well as for errors: errno tells them apart.
        unsafe { *libc::__errno_location() = 0 };
        let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        if n == -1 && std::io::Error::last_os_error().raw_os_error() != Some(0) {
            return Err(std::io::Error::last_os_error());
        }
        n
    };
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The policy comes with SCHED_RESET_ON_FORK or-ed in when that flag is set; keep it set.
    let reset_on_fork = policy & libc::SCHED_RESET_ON_FORK != 0;
    let policy = policy & !libc::SCHED_RESET_ON_FORK;
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return Ok(()); // a real-time or idle policy was chosen on purpose: leave it alone
    }
    const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: policy as u32,
        flags: if reset_on_fork { SCHED_FLAG_RESET_ON_FORK } else { 0 },
        nice,
        priority: 0,
        runtime: slice.as_nanos() as u64,
        deadline: 0,
        period: 0,
    };
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

async fn run_core(worker: Rc<Worker>, listener: TcpListener, mailbox: MailboxReceiver<CoreMsg>) {
    let mut canceller = Some(Canceller::new());
    let mut accept =
        Some(monoio::spawn(accept_loop(worker.clone(), listener, canceller.as_ref().expect("set above").handle())));
    monoio::spawn(heartbeat_loop(worker.clone()));
    if worker.cfg.demo && worker.index == 0 {
        monoio::spawn(crate::dashboard::demo_loop(worker.clone()));
    }
    if !worker.cfg.batch_window.is_zero() {
        monoio::spawn(batch_window_loop(worker.clone()));
    }

    // Events taken from the mailbox since the streams were last all sent. While a pass over the
    // dirty streams is under way, at most `--batch-max` of them are taken: later ones wait in
    // the mailbox (a pointer each, shared by all cores) rather than on every stream's queue
    // (40 bytes per stream each), so a burst costs memory per event, not per delivery; a full
    // mailbox holds publishers back (see `Broker::publish`).
    let pass_limit = worker.cfg.batch_max.max(1);
    let mut pass_events = 0;
    // When the broker stamped each event of this pass that had streams here: once the pass has
    // handed everything to the kernel, their publish -> write latency is known.
    let mut pass_stamps: Vec<std::time::Instant> = Vec::with_capacity(pass_limit);
    // When the loop last let the runtime park (see `TIMER_BREAK`).
    let mut rested = std::time::Instant::now();
    // A batch taken from the mailbox and how far into it this core has got.
    let mut taken: Option<(Arc<[Arc<Event>]>, usize)> = None;
    // Once Shutdown came: the streams still to close, a share at a time. Events keep flowing
    // to the streams not closed yet meanwhile.
    let mut drain: Option<Drain> = None;
    loop {
        if let Some(plan) = &mut drain {
            if plan.step(&worker) {
                return;
            }
        }
        if taken.is_none() && worker.hub.borrow().flushed() {
            pass_events = 0;
            if !pass_stamps.is_empty() {
                let now = std::time::Instant::now();
                for stamped in pass_stamps.drain(..) {
                    worker.stats().record_write(now.saturating_duration_since(stamped));
                }
            }
            if !worker.cfg.spin.is_zero() {
                spin(&mailbox, worker.cfg.spin).await;
            }
            worker.waiting.set(true);
            if mailbox.is_empty() {
                // The runtime will park now (unless some request keeps it busy): a rest. With
                // more events waiting, `ready` returns at once and the work goes on.
                rested = std::time::Instant::now();
            }
            match drain {
                None => mailbox.ready().await,
                Some(_) => {
                    let _ = monoio::time::timeout(DRAIN_TICK, mailbox.ready()).await;
                }
            }
            worker.waiting.set(false);
        }
        let mut work = 0;
        while work < ENQUEUE_SLICE {
            let (events, next) = match taken.take() {
                Some(batch) => batch,
                None if pass_events >= pass_limit => break,
                None => match (mailbox.is_full(), mailbox.try_recv()) {
                    (was_full, Some(CoreMsg::Events(events))) => {
                        if was_full {
                            // Room again: every core's first waiting publisher may try now.
                            worker.shared.room.iter().for_each(|room| room.signal());
                        }
                        pass_events += events.len();
                        (events, 0)
                    }
                    (_, Some(CoreMsg::Notice(topic, frame))) => {
                        let mut hub = worker.hub.borrow_mut();
                        hub.notice(topic, &frame, worker.stats());
                        if topic == crate::dashboard::STATS_TOPIC {
                            // Someone watches the dashboard: its next message lists top topics.
                            let top = hub.top_topics(crate::dashboard::TOP_TOPICS);
                            *worker.stats().top_topics.lock().unwrap_or_else(|p| p.into_inner()) = top;
                        }
                        continue;
                    }
                    (_, Some(CoreMsg::Gap(frame))) => {
                        worker.hub.borrow_mut().notice_all(&frame, worker.stats());
                        continue;
                    }
                    (_, Some(CoreMsg::Shutdown)) => {
                        if drain.is_none() {
                            // The loop waits here (for the accept task, which may be in a
                            // timer backoff): publishers waiting for room must sleep, not spin,
                            // or the runtime would never park and that timer never fire.
                            worker.waiting.set(true);
                            drain = Some(Drain::start(&worker, canceller.take(), accept.take()).await);
                            worker.waiting.set(false);
                        }
                        continue;
                    }
                    (_, None) => break,
                },
            };
            let mut hub = worker.hub.borrow_mut();
            let mut i = next;
            while i < events.len() && work < ENQUEUE_SLICE {
                let streams = hub.publish(&events[i], worker.stats());
                if streams > 0 {
                    pass_stamps.push(events[i].stamped);
                }
                work += 1 + streams;
                i += 1;
            }
            if i < events.len() {
                taken = Some((events, i));
            }
        }
        let more = worker.flush_slice();
        // More already in the mailbox counts as busy too: the loop would otherwise go straight
        // on without ever letting this core's requests, or its timers, have a turn.
        if more || taken.is_some() || work >= ENQUEUE_SLICE || !mailbox.is_empty() {
            // A slice of a long fan-out is done: let requests (publishers waiting for their
            // answers), accepts and timers run, then take what the mailbox got meanwhile
            // before the next slice. Events published meanwhile join the sends still pending
            // in this pass: that is what batches waiting publishers' events.
            if rested.elapsed() >= TIMER_BREAK {
                // Publishers waiting for room sleep meanwhile (see `wait_for_room`), so the
                // runtime runs dry, parks and fires what is due.
                worker.waiting.set(true);
                monoio::time::sleep(Duration::ZERO).await;
                worker.waiting.set(false);
                rested = std::time::Instant::now();
            } else {
                yield_now().await;
            }
        }
    }
}

/// monoio fires timers only when its runtime parks, and it parks only when no task is ready:
/// a core kept busy by a backlog would hold back every timer on it (heartbeats, header, body
/// and token timeouts, publishers sleeping for room) until the backlog is gone; a 100k-event
/// burst to 1,000 streams on one core stopped heartbeats for 5.8 s. So after this much busy
/// time the loop steps aside until the runtime has parked once: a zero sleep fires at the next
/// 1 ms tick, and the core serves its requests meanwhile (at most ~2 % of a busy core's time).
const TIMER_BREAK: Duration = Duration::from_millis(50);

/// How often a draining core closes its next share of streams and checks its deadline.
const DRAIN_TICK: Duration = Duration::from_millis(10);

/// A core's drain: stop accepting, then close the streams (each told when to come back)
/// spread over --drain-spread, and leave when they are gone or at --drain-timeout.
struct Drain {
    started: Instant,
    deadline: Instant,
    spread: Duration,
    streams: Vec<crate::event::StreamKey>,
    closed: usize,
}

impl Drain {
    async fn start(
        worker: &Rc<Worker>,
        canceller: Option<Canceller>,
        accept: Option<monoio::task::JoinHandle<()>>,
    ) -> Drain {
        worker.draining.set(true);
        if let Some(canceller) = canceller {
            let _ = canceller.cancel();
        }
        if let Some(accept) = accept {
            let _ = accept.await;
        }
        let started = Instant::now();
        Drain {
            started,
            deadline: started + worker.cfg.drain_timeout,
            spread: worker.cfg.drain_spread.min(worker.cfg.drain_timeout),
            streams: worker.hub.borrow().open_streams(),
            closed: 0,
        }
    }

    /// Closes the streams due by now; true when the drain is over (every stream gone, or the
    /// deadline passed: the rest are cut).
    fn step(&mut self, worker: &Worker) -> bool {
        let now = Instant::now();
        let due = match self.spread.as_nanos() {
            0 => self.streams.len(),
            spread => {
                let elapsed = now.saturating_duration_since(self.started).as_nanos().min(spread);
                (self.streams.len() as u128 * elapsed / spread) as usize
            }
        };
        if due > self.closed {
            // The retry is jittered too: the clients closed together come back spread out.
            let retry = || retry_frame(worker.jitter(1000, 5000));
            worker.hub.borrow_mut().close_streams(&self.streams[self.closed..due], retry);
            self.closed = due;
        }
        let mut all_closed = self.closed == self.streams.len();
        if all_closed && worker.hub.borrow().subscribers() > 0 {
            // Streams that opened after the drain began (their requests were already in).
            let late = worker.hub.borrow().open_streams();
            if !late.is_empty() {
                worker.hub.borrow_mut().close_streams(&late, || retry_frame(worker.jitter(1000, 5000)));
                all_closed = false;
            }
        }
        if (all_closed && worker.hub.borrow().subscribers() == 0) || now >= self.deadline {
            worker.hub.borrow_mut().kill_all();
            return true;
        }
        false
    }
}

async fn accept_loop(worker: Rc<Worker>, listener: TcpListener, cancel: monoio::io::CancelHandle) {
    /// Marks the core as accepting while the loop runs (however it ends).
    struct Accepting<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Accepting<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }
    worker.stats().accepting.store(true, Ordering::Relaxed);
    let _accepting = Accepting(&worker.stats().accepting);
    let (mut paused, mut last_logged): (u64, Option<std::time::Instant>) = (0, None);
    loop {
        match listener.cancelable_accept(cancel.clone()).await {
            Ok((stream, peer)) => {
                if worker.draining.get() {
                    break; // dropping the stream closes it: no fd leaks on a late accept
                }
                let _ = stream.set_nodelay(true);
                let open = worker.shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
                let stats = worker.stats();
                stats.accepted.store(stats.accepted.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                stats.connections.store(stats.connections.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                let over_limit = open > worker.shared.max_connections;
                monoio::spawn(conn::serve_guarded(worker.clone(), stream, over_limit, peer.ip()));
            }
            Err(_) if worker.draining.get() => break,
            Err(e) => match e.raw_os_error() {
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                    // Out of descriptors lasts: one line per 10 s per core, with the count.
                    paused += 1;
                    let due = match last_logged {
                        Some(t) => t.elapsed() >= crate::metrics::REFUSAL_LOG_EVERY,
                        None => true,
                    };
                    if due {
                        log::warn!("accept: {e}; pausing {ACCEPT_BACKOFF:?} ({paused} time(s) since the last line)");
                        last_logged = Some(std::time::Instant::now());
                        paused = 0;
                    }
                    monoio::time::sleep(ACCEPT_BACKOFF).await;
                }
                _ => log::debug!("accept: {e}"),
            },
        }
    }
}

/// One timer per core: streams that got frames wait out the window, then write together.
async fn batch_window_loop(worker: Rc<Worker>) {
    loop {
        poll_fn(|cx| worker.hub.borrow_mut().poll_held(cx)).await;
        monoio::time::sleep(worker.cfg.batch_window).await;
        worker.hub.borrow_mut().release_held();
        flush_in_slices(&worker).await;
    }
}

async fn heartbeat_loop(worker: Rc<Worker>) {
    let period = worker.cfg.heartbeat.max(Duration::from_millis(1));
    let mut ticks = monoio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        if worker.draining.get() {
            return;
        }
        worker.hub.borrow_mut().heartbeat(worker.stats());
        flush_in_slices(&worker).await;
    }
}

/// Sends what every dirty stream has, a slice at a time, letting the core's other tasks run
/// between slices (as the mailbox loop does).
async fn flush_in_slices(worker: &Rc<Worker>) {
    while worker.flush_slice() {
        yield_now().await;
    }
}
