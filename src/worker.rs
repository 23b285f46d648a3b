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
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
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

/// This core's publishers waiting for room in the full core queues, in arrival order. Only the
/// first tries again; the others sleep until they are first. A publisher that comes while some
/// wait takes its place behind them instead of trying, so the room that appears goes to them in
/// turn (without it, whoever tried at the right moment won, and a waiter could lose for a
/// long time: wrk -c100 saw p99 of hundreds of ms at p50 of 8 ms).
#[derive(Default)]
pub struct RoomLine {
    next: Cell<u64>,
    places: RefCell<VecDeque<(u64, Option<Waker>)>>,
}

impl RoomLine {
    pub fn is_empty(&self) -> bool {
        self.places.borrow().is_empty()
    }

    /// Takes the last place.
    pub fn join(&self) -> Place<'_> {
        let ticket = self.next.get();
        self.next.set(ticket + 1);
        self.places.borrow_mut().push_back((ticket, None));
        Place { line: self, ticket }
    }

    fn is_first(&self, ticket: u64) -> bool {
        self.places.borrow().front().is_some_and(|(first, _)| *first == ticket)
    }

    fn leave(&self, ticket: u64) {
        let next = {
            let mut places = self.places.borrow_mut();
            let Some(at) = places.iter().position(|(t, _)| *t == ticket) else { return };
            places.remove(at);
            if at == 0 {
                places.front_mut().and_then(|(_, w)| w.take())
            } else {
                None
            }
        };
        // Woken outside the borrow: a waker may run code that looks at the line.
        if let Some(waker) = next {
            waker.wake();
        }
    }
}

/// A publisher's place in its core's `RoomLine`; leaving it (drop) lets the next one try.
pub struct Place<'a> {
    line: &'a RoomLine,
    ticket: u64,
}

impl Place<'_> {
    /// Returns when this publisher is first in line (at once if it already is).
    pub async fn first(&self) {
        poll_fn(|cx| {
            if self.line.is_first(self.ticket) {
                return Poll::Ready(());
            }
            let mut places = self.line.places.borrow_mut();
            if let Some((_, waker)) = places.iter_mut().find(|(t, _)| *t == self.ticket) {
                *waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    pub fn is_first(&self) -> bool {
        self.line.is_first(self.ticket)
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.line.leave(self.ticket);
    }
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
    /// The core's loop is waiting (for its mailbox, nothing to send; or for the runtime to park,
    /// see `TIMER_BREAK`): the runtime will park, so timers will fire. While the loop works
    /// through a pass they do not (see `wait_for_room`).
    pub waiting: Cell<bool>,
    /// Publishers waiting for room in the core queues (see `RoomLine`).
    pub room: RoomLine,
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
            room: RoomLine::default(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::Wakes;
    use std::future::Future;
    use std::sync::atomic::Ordering;
    use std::task::Context;

    fn poll_first(place: &Place<'_>, wakes: &Arc<Wakes>) -> bool {
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        std::pin::pin!(place.first()).poll(&mut cx).is_ready()
    }

    #[test]
    fn room_line_serves_publishers_in_arrival_order() {
        let line = RoomLine::default();
        assert!(line.is_empty());
        let (a, b, c) = (line.join(), line.join(), line.join());
        let (wb, wc) = (Arc::new(Wakes::default()), Arc::new(Wakes::default()));
        assert!(a.is_first() && !b.is_first() && !c.is_first());
        assert!(poll_first(&a, &Arc::new(Wakes::default())), "the first goes at once");
        assert!(!poll_first(&b, &wb) && !poll_first(&c, &wc), "the others sleep");

        // The first got through: only the next one is woken, and it is first now.
        drop(a);
        assert_eq!((wb.0.load(Ordering::SeqCst), wc.0.load(Ordering::SeqCst)), (1, 0));
        assert!(poll_first(&b, &wb) && !poll_first(&c, &wc));

        // A newcomer queues behind those waiting; one that leaves from the middle (its
        // connection went away) wakes no one and keeps nobody back.
        let d = line.join();
        assert!(!d.is_first());
        drop(c);
        assert_eq!(wc.0.load(Ordering::SeqCst), 0);
        let wd = Arc::new(Wakes::default());
        assert!(!poll_first(&d, &wd));
        drop(b);
        assert_eq!(wd.0.load(Ordering::SeqCst), 1);
        assert!(d.is_first() && poll_first(&d, &wd));
        drop(d);
        assert!(line.is_empty());
    }
}
