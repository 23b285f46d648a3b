//! The broker: event ids, history, each frame encoded once, and its hand-off to every core.
//!
//! Shared state behind one short lock, run on the thread of the core that parsed the publish:
//! a publish is numbered, retained and queued for every core in one step, and answered at once.
//! Why not a broker thread (as before): each publish crossed threads twice (core -> broker ->
//! cores, about 27 us per cross-CPU wake-up on the 2-vCPU VM), and a waiting publisher's answer
//! came back through the core's mailbox, behind its fan-out work, so with publishers that wait
//! for each answer no second event arrived during a fan-out pass and every event went out alone
//! (docs/BENCHMARKS.md §7). Ids reach every core in order because they are handed out and queued
//! under the same lock. The `ringcast-broker` thread now only runs chores (history TTL).

use crate::event::{CoreMsg, Event, EventId, Publish};
use crate::history::{Gap, History, Replay, ReplayFrom};
use crate::mailbox::MailboxSender;
use crate::metrics::Shared;
use crate::sse::{encode_event, encode_notice, Frame};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// Ids `<unix-ms>-<seq>`: strictly increasing even if the wall clock steps back.
#[derive(Default)]
pub struct IdClock {
    last: EventId,
}

impl IdClock {
    pub fn next_at(&mut self, now_ms: u64) -> EventId {
        self.last = if now_ms > self.last.ms {
            EventId { ms: now_ms, seq: 0 }
        } else {
            EventId { ms: self.last.ms, seq: self.last.seq + 1 }
        };
        self.last
    }

    pub fn next_id(&mut self) -> EventId {
        self.next_at(now_ms())
    }

    pub fn last(&self) -> EventId {
        self.last
    }

    /// Later ids come after `id` (an id handed out elsewhere, by the cluster).
    pub fn advance_to(&mut self, id: EventId) {
        self.last = self.last.max(id);
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Some core's mailbox is full (that core is a mailbox's worth of batches behind): nothing was
/// published; the publisher waits and tries again (back-pressure), or gets 503 in the end.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

struct State {
    clock: IdClock,
    history: History,
    /// Newest id queued from the cluster relay.
    relayed: EventId,
}

pub struct Broker {
    state: Mutex<State>,
    cores: Vec<MailboxSender<CoreMsg>>,
    shared: Arc<Shared>,
    /// Events whose SSE bytes reach this size are deflated for gzip streams (smaller: stored).
    gzip_min_bytes: usize,
}

impl Broker {
    pub fn new(
        cores: Vec<MailboxSender<CoreMsg>>,
        shared: Arc<Shared>,
        history: History,
        gzip_min_bytes: usize,
    ) -> Self {
        let state = State { clock: IdClock::default(), history, relayed: EventId::default() };
        Broker { state: Mutex::new(state), cores, shared, gzip_min_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock panics on input; should it ever, the state is still consistent
        // event by event, so keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Numbers, retains and queues `batch` for every core as one message (so the events share
    /// each core's pass), appending their ids to `ids` in order, then wakes the cores.
    /// The frame is encoded under the lock: ids must reach the cores in order.
    pub fn publish(&self, batch: &mut Vec<Publish>, ids: &mut Vec<EventId>) -> Result<(), Full> {
        if batch.is_empty() {
            return Ok(());
        }
        let gzip = self.shared.any_gzip();
        let now = now_ms();
        {
            let mut state = self.lock();
            // Only the broker queues events, all under this lock: room seen here stays room.
            if self.cores.iter().any(|core| core.is_full()) {
                return Err(Full);
            }
            let mut events = Vec::with_capacity(batch.len());
            for publish in batch.drain(..) {
                let id = state.clock.next_at(now);
                ids.push(id);
                events.push(self.event(id, publish, gzip));
            }
            self.queue(&mut state, events);
        }
        self.notify();
        Ok(())
    }

    /// Queues events numbered by the cluster (the Redis relay), in their id order. Those not
    /// newer than the last one queued from there are dropped: a backfill that overlaps the live
    /// relay delivers nothing twice. Local ids continue after the newest cluster id.
    pub fn deliver(&self, batch: &mut Vec<(EventId, Publish)>) -> Result<(), Full> {
        let gzip = self.shared.any_gzip();
        {
            let mut state = self.lock();
            if self.cores.iter().any(|core| core.is_full()) {
                return Err(Full);
            }
            let mut events = Vec::with_capacity(batch.len());
            for (id, publish) in batch.drain(..) {
                if id <= state.relayed {
                    continue;
                }
                state.relayed = id;
                state.clock.advance_to(id);
                events.push(self.event(id, publish, gzip));
            }
            if events.is_empty() {
                return Ok(());
            }
            self.queue(&mut state, events);
        }
        self.notify();
        Ok(())
    }

    /// Takes `id` as delivered from the cluster (a node that starts takes the events after it).
    pub fn mark_relayed(&self, id: EventId) {
        let mut state = self.lock();
        state.relayed = state.relayed.max(id);
        state.clock.advance_to(id);
    }

    /// The newest id queued from the cluster relay (ids after it are still to come).
    pub fn relayed(&self) -> EventId {
        self.lock().relayed
    }

    fn event(&self, id: EventId, publish: Publish, gzip: bool) -> Arc<Event> {
        let mut frame = encode_event(id, publish.event.as_deref(), &publish.data);
        if gzip {
            frame = frame.with_gzip(self.gzip_min_bytes);
            if let Some(deflated) = frame.gzip_len() {
                self.shared.gzip_in.fetch_add(frame.chunk().len() as u64, Ordering::Relaxed);
                self.shared.gzip_out.fetch_add(deflated as u64, Ordering::Relaxed);
            }
        }
        Arc::new(Event::new(id, publish.topics.into_boxed_slice(), frame, publish.users))
    }

    /// Retains `events` and hands them to every core as one message (under the lock).
    fn queue(&self, state: &mut State, events: Vec<Arc<Event>>) {
        for event in &events {
            state.history.record(event);
        }
        self.shared.events_published.fetch_add(events.len() as u64, Ordering::Relaxed);
        let events: Arc<[Arc<Event>]> = events.into();
        for core in &self.cores {
            let _ = core.try_push(CoreMsg::Events(events.clone()));
        }
    }

    /// Wakes every core (outside the lock: a wake of a parked core is a syscall).
    fn notify(&self) {
        for core in &self.cores {
            core.notify();
        }
    }

    /// What a new stream on `topics` missed in this node's history, and the id up to which
    /// that covers: the stream takes live events after it, so the hand-over has no gap and no
    /// duplicate whatever the core's mailbox still holds.
    pub fn replay(&self, topics: &[Box<str>], from: &ReplayFrom) -> (Replay, EventId) {
        let state = self.lock();
        let last = state.clock.last();
        (state.history.replay(topics, from, last, now_ms()), last)
    }

    /// The newest id handed out: a live-only stream opened now takes the events after it (its
    /// core's mailbox may still hold older ones, published before the stream opened).
    pub fn last_id(&self) -> EventId {
        self.lock().clock.last()
    }

    /// An event numbered elsewhere (read back from the cluster's history), encoded for replay.
    pub fn encode(&self, id: EventId, publish: Publish) -> Arc<Event> {
        self.event(id, publish, self.shared.any_gzip())
    }

    /// Drops retained events past --history-ttl (the chores thread, once a second).
    pub fn expire(&self) {
        let mut state = self.lock();
        state.history.expire(now_ms());
        self.shared.retained_events.store(state.history.retained(), Ordering::Relaxed);
        self.shared.retained_bytes.store(state.history.retained_bytes(), Ordering::Relaxed);
    }

    /// Hands a notice (the dashboard's stats) to every core that has room for it. Under the
    /// lock, like events: `publish` counts on room it saw staying room until it queues.
    pub fn notice(&self, topic: &'static str, frame: &Frame) {
        {
            let _state = self.lock();
            for core in &self.cores {
                // A core that far behind skips this notice; nothing waits for it.
                if !core.is_full() {
                    let _ = core.try_push(CoreMsg::Notice(topic, frame.clone()));
                }
            }
        }
        self.notify();
    }

    /// Hands `frame` to every event stream on every core, in order with the events (under the
    /// lock, like them): the relay's catch-up found events trimmed before it could read them.
    pub fn gap(&self, frame: &Frame) -> Result<(), Full> {
        {
            let _state = self.lock();
            if self.cores.iter().any(|core| core.is_full()) {
                return Err(Full);
            }
            for core in &self.cores {
                let _ = core.try_push(CoreMsg::Gap(frame.clone()));
            }
        }
        self.shared.relay_gaps.fetch_add(1, Ordering::Relaxed);
        self.notify();
        Ok(())
    }

    /// Asks every core to drain and stop. Not under the lock: it takes the slot `is_full`
    /// keeps free, so events already checked for room still fit (blocks only if a second
    /// shutdown came, while cores keep reading).
    pub fn shutdown(&self) {
        for core in &self.cores {
            let _ = core.send(CoreMsg::Shutdown);
        }
    }
}

/// The gap notice, the replayed events (their original frames, ids included), the end marker.
pub fn replay_frames(replay: Replay, given: Option<String>, end_marker: bool) -> Vec<Frame> {
    let mut frames = Vec::with_capacity(replay.events.len() + 2);
    if let Some(Gap { topics, oldest }) = &replay.gap {
        let data = serde_json::json!({
            "lastEventId": given,
            "topics": topics,
            "oldestRetained": oldest.map(|id| id.to_string()),
        });
        frames.push(encode_notice("ringcast-gap", &data.to_string()));
    }
    let last = replay.events.last().map(|e| e.id.to_string());
    frames.extend(replay.events.iter().map(|e| e.frame.clone()));
    if end_marker {
        let data = serde_json::json!({ "lastEventId": last });
        frames.push(encode_notice("ringcast-history-end", &data.to_string()));
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_even_when_clock_steps_back() {
        let mut c = IdClock::default();
        let a = c.next_at(100);
        let b = c.next_at(100);
        let d = c.next_at(90);
        let e = c.next_at(101);
        assert!(a < b && b < d && d < e);
        assert_eq!(e, EventId { ms: 101, seq: 0 });
    }
}
