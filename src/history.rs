//! Retained events per topic (held by the broker, under its lock): resume after an id, replay the
//! last N, and tell a client when it cannot be vouched for (the gap signal).

use crate::event::{Event, EventId};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Where a new stream starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayFrom {
    /// Live events only.
    Live,
    /// Resume: every retained event after this id (`Last-Event-ID` / `lastEventId`).
    After(EventId),
    /// A resume id that cannot be parsed: a gap, then everything retained.
    Unknown(String),
    /// `?history=N`: the last N events across the stream's topics.
    Last(usize),
}

#[derive(Default)]
struct TopicHistory {
    events: VecDeque<Arc<Event>>,
    /// Newest id dropped from this topic; a resume from before it has missed events.
    evicted_upto: Option<EventId>,
}

/// What a stream receives before going live.
#[derive(Debug, Default)]
pub struct Replay {
    /// Topics whose history cannot vouch for the client's id, with the oldest id still held.
    pub gap: Option<Gap>,
    pub events: Vec<Arc<Event>>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Gap {
    pub topics: Vec<Box<str>>,
    pub oldest: Option<EventId>,
}

/// Memory a retained event costs beyond its frame and topic names (the `Arc<Event>`, queue
/// slots, allocator rounding): ~390 B of RSS measured per 100-byte event (docs/BENCHMARKS.md §5).
const EVENT_OVERHEAD: usize = 400;

pub struct History {
    topics: HashMap<Box<str>, TopicHistory>,
    /// Estimated memory of the events in `order` (see `cost`), bounded by `max_bytes`.
    bytes: usize,
    max_bytes: usize,
    /// Every retained event in id order, for the process-wide bound.
    order: VecDeque<Arc<Event>>,
    /// (topic, event) entries held, bounded by `max_entries`.
    entries: usize,
    max_entries: usize,
    max_per_topic: usize,
    ttl_ms: u64,
    /// Ids before this were issued by an earlier process (or never): nothing is known of them.
    first_id: EventId,
    /// Newest id dropped from a topic that was then forgotten (it held nothing newer): a topic
    /// created later starts from here, so a resume from before it still sees the gap.
    forgotten_upto: Option<EventId>,
}

impl History {
    pub fn new(max_per_topic: usize, max_entries: usize, ttl_ms: u64, first_id: EventId) -> Self {
        History {
            topics: HashMap::new(),
            bytes: 0,
            max_bytes: usize::MAX,
            order: VecDeque::new(),
            entries: 0,
            max_entries,
            max_per_topic,
            ttl_ms,
            first_id,
            forgotten_upto: None,
        }
    }

    /// Bounds the retained events' memory too (`--history-max-bytes`): oldest first beyond it.
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Estimated bytes retained.
    pub fn retained_bytes(&self) -> usize {
        self.bytes
    }

    pub fn enabled(&self) -> bool {
        self.max_per_topic > 0 && self.ttl_ms > 0
    }

    /// Retains a new event on each of its topics, evicting the oldest past the per-topic bound.
    pub fn record(&mut self, event: &Arc<Event>) {
        if !self.enabled() {
            return;
        }
        for topic in event.topics.iter() {
            let entry = match self.topics.get_mut(&**topic) {
                Some(entry) => entry,
                None => self
                    .topics
                    .entry(topic.clone())
                    .or_insert(TopicHistory { events: VecDeque::new(), evicted_upto: self.forgotten_upto }),
            };
            entry.events.push_back(event.clone());
            self.entries += 1;
            if entry.events.len() > self.max_per_topic {
                let old = entry.events.pop_front().map(|e| e.id);
                entry.evicted_upto = old.max(entry.evicted_upto);
                self.entries -= 1;
            }
        }
        self.order.push_back(event.clone());
        self.bytes += cost(event);
        // Publishing to ever new topics, or large events, must not grow memory without bound.
        while self.entries > self.max_entries || self.bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else { break };
            self.bytes -= cost(&oldest);
            for topic in oldest.topics.iter() {
                if let Some(entry) = self.topics.get_mut(&**topic) {
                    if entry.events.front().is_some_and(|e| e.id == oldest.id) {
                        entry.events.pop_front();
                        entry.evicted_upto = Some(oldest.id).max(entry.evicted_upto);
                        self.entries -= 1;
                    }
                }
            }
        }
        self.trim_order();
    }

    /// Drops from `order` the events no topic holds any more (evicted per topic).
    fn trim_order(&mut self) {
        while let Some(front) = self.order.front() {
            let held = front.topics.iter().any(|t| {
                self.topics.get(&**t).is_some_and(|entry| entry.events.front().is_some_and(|e| e.id <= front.id))
            });
            if held {
                break;
            }
            if let Some(gone) = self.order.pop_front() {
                self.bytes -= cost(&gone);
            }
        }
    }

    /// Drops events older than the TTL; a topic left with no events is forgotten entirely.
    pub fn expire(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.ttl_ms);
        let mut dropped = 0;
        let mut forgotten = self.forgotten_upto;
        self.topics.retain(|_, entry| {
            while entry.events.front().is_some_and(|e| e.id.ms < horizon) {
                let old = entry.events.pop_front().map(|e| e.id);
                entry.evicted_upto = old.max(entry.evicted_upto);
                dropped += 1;
            }
            if entry.events.is_empty() {
                forgotten = forgotten.max(entry.evicted_upto);
                return false;
            }
            true
        });
        self.forgotten_upto = forgotten;
        self.entries -= dropped;
        self.trim_order();
    }

    /// Retained (topic, event) entries; each event's frame is held once, however many topics.
    pub fn retained(&self) -> usize {
        self.entries
    }

    /// What a stream on `topics` gets before live events. `last_issued` is the newest id so far.
    pub fn replay(&self, topics: &[Box<str>], from: &ReplayFrom, last_issued: EventId, now_ms: u64) -> Replay {
        match from {
            ReplayFrom::Live => Replay::default(),
            ReplayFrom::Last(n) => {
                let mut events = self.collect(topics, |entry| {
                    let len = entry.events.len();
                    len.saturating_sub(*n)..len
                });
                let skip = events.len().saturating_sub(*n);
                events.drain(..skip);
                Replay { gap: None, events }
            }
            ReplayFrom::Unknown(_) => self.with_gap(topics.to_vec(), topics),
            ReplayFrom::After(id) => {
                if !self.enabled() || *id < self.first_id || *id > last_issued {
                    return self.with_gap(topics.to_vec(), topics);
                }
                let horizon = now_ms.saturating_sub(self.ttl_ms);
                let gap_topics: Vec<Box<str>> = topics
                    .iter()
                    .filter(|t| match self.topics.get(&***t) {
                        Some(entry) => entry.evicted_upto.is_some_and(|e| e > *id),
                        // Forgotten topics held only events older than the TTL horizon.
                        None => id.ms < horizon,
                    })
                    .cloned()
                    .collect();
                let events = self.collect(topics, |entry| {
                    let start = entry.events.partition_point(|e| e.id <= *id);
                    start..entry.events.len()
                });
                let gap =
                    (!gap_topics.is_empty()).then(|| Gap { oldest: self.oldest(&gap_topics), topics: gap_topics });
                Replay { gap, events }
            }
        }
    }

    fn with_gap(&self, gap_topics: Vec<Box<str>>, topics: &[Box<str>]) -> Replay {
        let events = self.collect(topics, |entry| 0..entry.events.len());
        Replay { gap: Some(Gap { oldest: self.oldest(&gap_topics), topics: gap_topics }), events }
    }

    fn oldest(&self, topics: &[Box<str>]) -> Option<EventId> {
        topics.iter().filter_map(|t| self.topics.get(&**t)?.events.front().map(|e| e.id)).min()
    }

    /// The selected range of each topic, merged in id order; an event on several topics once.
    fn collect(&self, topics: &[Box<str>], range: impl Fn(&TopicHistory) -> std::ops::Range<usize>) -> Vec<Arc<Event>> {
        let mut events: Vec<Arc<Event>> = Vec::new();
        for topic in topics {
            if let Some(entry) = self.topics.get(&**topic) {
                events.extend(entry.events.range(range(entry)).cloned());
            }
        }
        if topics.len() > 1 {
            events.sort_unstable_by_key(|e| e.id);
            events.dedup_by_key(|e| e.id);
        }
        events
    }
}

/// What retaining `event` costs in memory (estimated; its frame is shared with the live path).
fn cost(event: &Event) -> usize {
    event.frame.memory() + event.topics.iter().map(|t| t.len()).sum::<usize>() + EVENT_OVERHEAD
}

#[cfg(test)]
mod tests {
    #[test]
    fn global_bound_evicts_oldest_across_topics() {
        let mut h = History::new(100, 3, 3_600_000, EventId { ms: 0, seq: 0 });
        for (ms, topic) in [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")] {
            h.record(&ev(ms, &[topic]));
        }
        assert_eq!(h.retained(), 3);
        assert_eq!(h.order.len(), 3);
        let last = EventId { ms: 5, seq: 0 };
        let r = h.replay(&t(&["a", "c", "e"]), &ReplayFrom::After(EventId { ms: 0, seq: 0 }), last, 6);
        assert_eq!(ids(&r), vec![3, 5]);
        assert_eq!(r.gap.unwrap().topics, t(&["a"]));
    }

    #[test]
    fn byte_budget_evicts_oldest_first() {
        // Room for three events (ids 8-10 are a byte or two longer than id 1).
        let budget = 3 * cost(&ev(1, &["a"])) + 16;
        let mut h = History::new(100, 1000, 3_600_000, EventId { ms: 0, seq: 0 }).with_max_bytes(budget);
        for ms in 1..=10 {
            h.record(&ev(ms, &["a"]));
            assert!(h.retained_bytes() <= budget, "over budget after {ms}");
        }
        assert_eq!(h.retained(), 3);
        let r = h.replay(&t(&["a"]), &ReplayFrom::After(EventId { ms: 1, seq: 0 }), EventId { ms: 10, seq: 0 }, 11);
        assert_eq!(ids(&r), vec![8, 9, 10]);
        assert!(r.gap.is_some(), "evicted by the byte budget: the resume must see the gap");
        h.expire(3_600_000 + 20);
        assert_eq!((h.retained(), h.retained_bytes()), (0, 0), "expiry gives the bytes back");
    }

    use super::*;
    use crate::sse::encode_event;

    fn ev(ms: u64, topics: &[&str]) -> Arc<Event> {
        let id = EventId { ms, seq: 0 };
        Arc::new(Event::new(
            id,
            topics.iter().map(|t| Box::<str>::from(*t)).collect(),
            encode_event(id, None, "x"),
            Vec::new(),
        ))
    }

    fn ids(r: &Replay) -> Vec<u64> {
        r.events.iter().map(|e| e.id.ms).collect()
    }

    fn t(names: &[&str]) -> Vec<Box<str>> {
        names.iter().map(|n| Box::<str>::from(*n)).collect()
    }

    #[test]
    fn resume_merges_topics_in_order_once() {
        let mut h = History::new(10, 1000, 3_600_000, EventId { ms: 1, seq: 0 });
        for e in [ev(1, &["a"]), ev(2, &["b"]), ev(3, &["a", "b"]), ev(4, &["a"])] {
            h.record(&e);
        }
        let last = EventId { ms: 4, seq: 0 };
        let r = h.replay(&t(&["a", "b"]), &ReplayFrom::After(EventId { ms: 1, seq: 0 }), last, 5);
        assert_eq!(ids(&r), vec![2, 3, 4]);
        assert!(r.gap.is_none());
        let r = h.replay(&t(&["b"]), &ReplayFrom::After(last), last, 5);
        assert!(r.events.is_empty() && r.gap.is_none());
    }

    #[test]
    fn eviction_unknown_and_restart_ids_signal_a_gap() {
        let mut h = History::new(2, 1000, 3_600_000, EventId { ms: 10, seq: 0 });
        for ms in 10..15 {
            h.record(&ev(ms, &["a"]));
        }
        let last = EventId { ms: 14, seq: 0 };
        let r = h.replay(&t(&["a"]), &ReplayFrom::After(EventId { ms: 11, seq: 0 }), last, 20);
        assert_eq!(r.gap, Some(Gap { topics: t(&["a"]), oldest: Some(EventId { ms: 13, seq: 0 }) }));
        assert_eq!(ids(&r), vec![13, 14]);
        let r = h.replay(&t(&["a"]), &ReplayFrom::After(EventId { ms: 5, seq: 0 }), last, 20);
        assert!(r.gap.is_some(), "id from before this process");
        let r = h.replay(&t(&["a"]), &ReplayFrom::Unknown("junk".into()), last, 20);
        assert!(r.gap.is_some());
        assert_eq!(ids(&r), vec![13, 14]);
        let r = h.replay(&t(&["a"]), &ReplayFrom::After(EventId { ms: 13, seq: 0 }), last, 20);
        assert!(r.gap.is_none());
        assert_eq!(ids(&r), vec![14]);
    }

    #[test]
    fn last_n_and_ttl() {
        let mut h = History::new(100, 1000, 1000, EventId { ms: 0, seq: 0 });
        for ms in [100, 200, 1500, 1600] {
            h.record(&ev(ms, &[if ms % 200 == 0 { "a" } else { "b" }]));
        }
        let last = EventId { ms: 1600, seq: 0 };
        let r = h.replay(&t(&["a", "b"]), &ReplayFrom::Last(3), last, 1700);
        assert_eq!(ids(&r), vec![200, 1500, 1600]);
        h.expire(1650);
        assert_eq!(h.retained(), 2);
        // A topic emptied by the TTL and then refilled still knows what it lost.
        h.expire(2700);
        assert_eq!(h.retained(), 0);
        h.record(&ev(2800, &["a"]));
        let r =
            h.replay(&t(&["a"]), &ReplayFrom::After(EventId { ms: 1500, seq: 0 }), EventId { ms: 2800, seq: 0 }, 2800);
        assert!(r.gap.is_some(), "expired events before the refill");
        let r = h.replay(&t(&["a", "b"]), &ReplayFrom::After(EventId { ms: 100, seq: 0 }), last, 1650);
        assert!(r.gap.is_some());
    }
}
