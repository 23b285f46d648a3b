//! What one core's tasks share (never across threads): its config and counters, its hub of
//! streams, the broker handle, the drain flag, and how it slices long fan-outs.

use crate::access::{Cors, PublishAccess};
use crate::broker::Broker;
use crate::config::Config;
use crate::event::{Event, EventId, Publish};
use crate::hub::{Hub, HubLimits};
use crate::metrics::{CoreStats, Shared};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Deliveries queued (events x their streams) before the core sends a slice and lets its other
/// tasks run: queueing costs 10-30 ns a delivery, so this is well under 100 us.
pub const ENQUEUE_SLICE: usize = 2048;
/// What one slice of sends should take. Between slices the core answers publishers, accepts
/// and reads (monoio reaps io_uring completions only between task rounds): with publishers
/// that wait for each answer, the slice is their round trip, and the shorter it is the more
/// events they get in while the pass goes on, all sharing its sends (measured with 1,000
/// subscribers: 256-stream slices of ~1.3 ms gave 0.46 M deliveries/s, 8-stream slices
/// 4.8 M/s; docs/BENCHMARKS.md §7). A send's cost varies by host, so the slice size adapts.
const SLICE_TARGET: Duration = Duration::from_micros(50);
/// Bounds of the adaptive slice, in streams.
const SLICE_MIN: usize = 4;
const SLICE_MAX: usize = 1024;
/// Bytes of frames one core keeps of the events it read back from Redis for replays.
const REPLAY_CACHE_BYTES: usize = 8 << 20;

/// Events read back from Redis for replays on this core, newest last, within
/// `REPLAY_CACHE_BYTES`: a resume storm on a node that cannot vouch from memory (it just
/// started) shares one encoded frame per event, not one per stream.
#[derive(Default)]
struct ReplayCache {
    events: HashMap<EventId, Arc<Event>>,
    order: VecDeque<EventId>,
    bytes: usize,
}

/// Per-core state shared by this core's tasks (never across threads).
pub struct Worker {
    pub index: usize,
    pub cfg: Arc<Config>,
    pub shared: Arc<Shared>,
    pub hub: Rc<RefCell<Hub>>,
    pub broker: Arc<Broker>,
    pub access: PublishAccess,
    pub cors: Cors,
    pub draining: Cell<bool>,
    /// The core's loop is waiting for its mailbox (nothing to send): the runtime will park,
    /// so its timers will fire. While it works through a pass they do not (see `wait_for_room`).
    pub waiting: Cell<bool>,
    rng: Cell<u64>,
    /// Streams per slice of sends (adapts to `SLICE_TARGET`).
    slice: Cell<usize>,
    replayed: RefCell<ReplayCache>,
}

impl Worker {
    pub fn new(index: usize, cfg: Arc<Config>, shared: Arc<Shared>, broker: Arc<Broker>) -> Rc<Worker> {
        let seed = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Rc::new(Worker {
            index,
            hub: Hub::new(HubLimits {
                max_queued: cfg.max_queued_bytes,
                slow: cfg.slow_consumer,
                windowed: !cfg.batch_window.is_zero(),
                batch_max: cfg.batch_max.max(1),
            }),
            access: PublishAccess::new(&cfg),
            cors: Cors::new(&cfg),
            cfg,
            shared,
            broker,
            draining: Cell::new(false),
            waiting: Cell::new(false),
            rng: Cell::new(seed | 1),
            slice: Cell::new(16),
            replayed: RefCell::new(ReplayCache::default()),
        })
    }

    pub fn stats(&self) -> &CoreStats {
        &self.shared.cores[self.index]
    }

    /// A value in `lo..hi` (xorshift; spreads reconnects, nothing more).
    pub fn jitter(&self, lo: u64, hi: u64) -> u64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        lo + x % (hi - lo).max(1)
    }

    /// An event read back from Redis for a replay, encoded once per core while it is cached
    /// (with its gzip chunk when gzip streams exist).
    pub fn replayed_event(&self, id: EventId, publish: Publish) -> Arc<Event> {
        let mut cache = self.replayed.borrow_mut();
        if let Some(event) = cache.events.get(&id) {
            if event.frame.gzip_len().is_some() || !self.shared.any_gzip() {
                return event.clone();
            }
        }
        let event = self.broker.encode(id, publish);
        let size = event.frame.memory();
        if let Some(old) = cache.events.insert(id, event.clone()) {
            cache.bytes -= old.frame.memory(); // re-encoded with its gzip chunk
        } else {
            cache.order.push_back(id);
        }
        cache.bytes += size;
        while cache.bytes > REPLAY_CACHE_BYTES {
            let Some(oldest) = cache.order.pop_front() else { break };
            if let Some(gone) = cache.events.remove(&oldest) {
                cache.bytes -= gone.frame.memory();
            }
        }
        event
    }

    /// Sends one slice of what is pending; true when more remains.
    pub fn flush_slice(&self) -> bool {
        let mut hub = self.hub.borrow_mut();
        let streams = self.slice.get();
        let started = std::time::Instant::now();
        let more = hub.flush_some(streams);
        if more {
            // A whole slice went out: size the next one to take about SLICE_TARGET.
            let took = started.elapsed().as_nanos().max(1) as usize;
            // At most doubling: a slice that went fast (sockets with room, small frames) must not
            // size one that meets full sockets or big batches.
            let next = (streams * SLICE_TARGET.as_nanos() as usize / took).min(streams * 2);
            self.slice.set(next.clamp(SLICE_MIN, SLICE_MAX));
        }
        hub.publish_io_counts(self.stats());
        more
    }
}
