//! What one core's tasks share (never across threads): its config and counters, its hub of
//! streams, the broker handle, the drain flag, and how it slices long fan-outs.

use crate::access::{Cors, PublishAccess};
use crate::broker::Broker;
use crate::config::Config;
use crate::hub::{Hub, HubLimits};
use crate::metrics::{CoreStats, Shared};
use std::cell::{Cell, RefCell};
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
    rng: Cell<u64>,
    /// Streams per slice of sends (adapts to `SLICE_TARGET`).
    slice: Cell<usize>,
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
            rng: Cell::new(seed | 1),
            slice: Cell::new(16),
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
