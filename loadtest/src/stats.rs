//! Counters, HDR histograms and their exchange between threads and processes.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Highest value a histogram tracks (ns); larger values are clamped.
const MAX_NS: u64 = 600_000_000_000;

/// A nanosecond histogram: 1 ns .. 10 min, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// Records `ns`, clamped into the histogram's range.
pub fn record(hist: &mut Histogram<u64>, ns: u64) {
    hist.saturating_record(ns.clamp(1, MAX_NS));
}

/// Compact form of a histogram: (value, count) per non-empty bucket.
pub fn to_pairs(hist: &Histogram<u64>) -> Vec<(u64, u64)> {
    hist.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

/// Adds the compact form produced by [`to_pairs`] into `hist`.
pub fn add_pairs(hist: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        hist.saturating_record_n(value.clamp(1, MAX_NS), count);
    }
}

/// Merges `from` into `into`.
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    into.add(from).expect("histograms share bounds");
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Summary {
    pub fn of(hist: &Histogram<u64>) -> Summary {
        if hist.is_empty() {
            return Summary::default();
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Summary {
            count: hist.len(),
            min_us: us(hist.min()),
            mean_us: hist.mean() / 1e3,
            p50_us: us(hist.value_at_quantile(0.50)),
            p90_us: us(hist.value_at_quantile(0.90)),
            p99_us: us(hist.value_at_quantile(0.99)),
            p999_us: us(hist.value_at_quantile(0.999)),
            max_us: us(hist.max()),
        }
    }
}

/// Subscriber-side counters (per thread, per process, or in total).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Streams that got a `200` response head.
    pub connected: u64,
    /// Subscribers that never got a `200` head (refused, error status, timeout, ...).
    pub connect_failed: u64,
    /// Streams that ended or failed after connecting.
    pub disconnected: u64,
    /// Events with our payload received (including duplicates).
    pub received: u64,
    /// Events with a sequence number not seen before on that stream.
    pub unique: u64,
    /// Events whose sequence number was at or below one already seen.
    pub duplicates: u64,
    /// Events whose data is not ours (or from an unknown publisher).
    pub foreign: u64,
    /// Events that arrived after a skipped sequence number (counted in `unique` too).
    #[serde(default)]
    pub gaps: u64,
    /// Bytes read from the subscriber sockets (response heads, framing and events).
    #[serde(default)]
    pub bytes: u64,
    /// Replay mode: streams that received every event expected on their topic.
    #[serde(default)]
    pub completed: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.connected += o.connected;
        self.connect_failed += o.connect_failed;
        self.disconnected += o.disconnected;
        self.received += o.received;
        self.unique += o.unique;
        self.duplicates += o.duplicates;
        self.foreign += o.foreign;
        self.gaps += o.gaps;
        self.bytes += o.bytes;
        self.completed += o.completed;
    }

    pub fn errors(&self) -> u64 {
        self.connect_failed + self.disconnected
    }
}

/// [`Counters`] shared between a subscriber group's threads.
#[derive(Debug, Default)]
pub struct AtomicCounters {
    connected: AtomicU64,
    connect_failed: AtomicU64,
    disconnected: AtomicU64,
    received: AtomicU64,
    unique: AtomicU64,
    duplicates: AtomicU64,
    foreign: AtomicU64,
    gaps: AtomicU64,
    bytes: AtomicU64,
    completed: AtomicU64,
}

impl AtomicCounters {
    /// Adds `delta` and resets it to zero.
    pub fn flush(&self, delta: &mut Counters) {
        let add = |a: &AtomicU64, v: u64| {
            if v != 0 {
                a.fetch_add(v, Ordering::Relaxed);
            }
        };
        add(&self.connected, delta.connected);
        add(&self.connect_failed, delta.connect_failed);
        add(&self.disconnected, delta.disconnected);
        add(&self.received, delta.received);
        add(&self.unique, delta.unique);
        add(&self.duplicates, delta.duplicates);
        add(&self.foreign, delta.foreign);
        add(&self.gaps, delta.gaps);
        add(&self.bytes, delta.bytes);
        add(&self.completed, delta.completed);
        *delta = Counters::default();
    }

    pub fn snapshot(&self) -> Counters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            connected: get(&self.connected),
            connect_failed: get(&self.connect_failed),
            disconnected: get(&self.disconnected),
            received: get(&self.received),
            unique: get(&self.unique),
            duplicates: get(&self.duplicates),
            foreign: get(&self.foreign),
            gaps: get(&self.gaps),
            bytes: get(&self.bytes),
            completed: get(&self.completed),
        }
    }
}

/// A live view of a group of subscribers (one process's share).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub counters: Counters,
    /// Every subscriber is connected or has failed: the connect phase is over.
    pub connect_done: bool,
    /// Open streams per topic index (filled once `connect_done`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_by_topic: Vec<u64>,
}

/// Everything a group of subscribers reports at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardResult {
    pub counters: Counters,
    /// Open streams per topic index at the end.
    pub open_by_topic: Vec<u64>,
    /// Publish->receive latency (ns), as [`to_pairs`].
    pub latency: Vec<(u64, u64)>,
    /// Connect (socket to response head) time (ns), as [`to_pairs`].
    pub connect: Vec<(u64, u64)>,
    /// Replay mode: socket creation -> last expected event, per completed stream (ns), as [`to_pairs`].
    #[serde(default)]
    pub complete: Vec<(u64, u64)>,
    /// CLOCK_MONOTONIC ns when the first connect started (0: none did).
    #[serde(default)]
    pub first_connect_ns: u64,
    /// Replay mode: CLOCK_MONOTONIC ns when the last stream completed (0: none did).
    #[serde(default)]
    pub last_complete_ns: u64,
    /// CPU seconds the process holding this group used (child processes only).
    pub cpu_seconds: f64,
    /// One error message, for diagnosis.
    pub first_error: Option<String>,
}

impl ShardResult {
    pub fn merge(&mut self, o: &ShardResult) {
        self.counters.add(&o.counters);
        add_by_topic(&mut self.open_by_topic, &o.open_by_topic);
        self.latency.extend_from_slice(&o.latency);
        self.connect.extend_from_slice(&o.connect);
        self.complete.extend_from_slice(&o.complete);
        self.last_complete_ns = self.last_complete_ns.max(o.last_complete_ns);
        self.first_connect_ns = match (self.first_connect_ns, o.first_connect_ns) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.cpu_seconds += o.cpu_seconds;
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
    }
}

/// Element-wise `into += from`, growing `into` as needed.
pub fn add_by_topic(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_roundtrip_and_merge() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for v in 1..=1000u64 {
            record(&mut a, v * 1_000);
            record(&mut b, v * 1_000_000);
        }
        record(&mut b, u64::MAX);
        record(&mut b, 0);

        // Through the compact form (what child processes send) ...
        let mut via_pairs = new_histogram();
        add_pairs(&mut via_pairs, &to_pairs(&a));
        add_pairs(&mut via_pairs, &to_pairs(&b));
        // ... equals a direct merge.
        let mut direct = a.clone();
        merge(&mut direct, &b);

        assert_eq!(via_pairs.len(), 2002);
        assert_eq!(direct.len(), 2002);
        for q in [0.0, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(via_pairs.value_at_quantile(q), direct.value_at_quantile(q), "q {q}");
        }
        assert_eq!(via_pairs.max(), direct.max());
        let s = Summary::of(&via_pairs);
        assert_eq!(s.count, 2002);
        // Half the values are in 1..1000 us, half in 1..1000 ms.
        assert!(s.p50_us >= 999.0 && s.p50_us <= 1001.0, "{s:?}");
        assert!(s.p99_us > 970_000.0 && s.p99_us < 1_000_000.0, "{s:?}");
        assert!(s.max_us >= 600_000_000.0 * 0.999);
        assert!((s.min_us - 0.001).abs() < 1e-9);
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(Summary::of(&new_histogram()), Summary::default());
    }

    #[test]
    fn counters_and_results_merge() {
        let shared = AtomicCounters::default();
        let mut d = Counters { connected: 2, received: 10, unique: 9, duplicates: 1, ..Counters::default() };
        shared.flush(&mut d);
        assert_eq!(d, Counters::default());
        let mut d2 = Counters { connect_failed: 1, disconnected: 1, ..Counters::default() };
        shared.flush(&mut d2);
        let snap = shared.snapshot();
        assert_eq!(snap.connected, 2);
        assert_eq!(snap.errors(), 2);

        let mut r = ShardResult { counters: snap, open_by_topic: vec![1, 1], ..ShardResult::default() };
        let other = ShardResult {
            counters: snap,
            open_by_topic: vec![1, 2, 3],
            first_error: Some("x".into()),
            cpu_seconds: 1.5,
            first_connect_ns: 50,
            last_complete_ns: 90,
            ..ShardResult::default()
        };
        r.merge(&other);
        assert_eq!(r.open_by_topic, vec![2, 3, 3]);
        assert_eq!((r.first_connect_ns, r.last_complete_ns), (50, 90));
        r.merge(&ShardResult { first_connect_ns: 40, last_complete_ns: 80, ..ShardResult::default() });
        r.merge(&ShardResult::default());
        assert_eq!((r.first_connect_ns, r.last_complete_ns), (40, 90));
        assert_eq!(r.counters.received, 20);
        assert_eq!(r.first_error.as_deref(), Some("x"));
        let json = serde_json::to_string(&r).unwrap();
        let back: ShardResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back.counters, r.counters);
        assert_eq!(back.cpu_seconds, 1.5);
    }
}
