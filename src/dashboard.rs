//! The embedded dashboard: the page at `GET /` and `/dashboard`, the stats it shows (one
//! `event: stats` a second on the internal topic `$stats`, streamed at `/dashboard/stats`), and
//! the `--demo` stock ticker it plays.
//!
//! Stats cost nothing while nobody watches: the chores thread builds them only while some
//! dashboard stream is open, and cores list their top topics only when a stats message comes.

use crate::broker::Broker;
use crate::event::Publish;
use crate::metrics::{Shared, WRITE_BUCKETS_US};
use crate::sse::encode_notice;
use crate::worker::Worker;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The page: one self-contained file (no CDN, no build step).
pub const PAGE: &str = include_str!("dashboard.html");
/// Internal topic of the stats stream (`$` cannot be published to: see `sse::valid_topic`).
pub const STATS_TOPIC: &str = "$stats";
/// Topics listed, most subscribed first.
pub const TOP_TOPICS: usize = 10;
/// The demo's symbols; topic `demo.<symbol>`, event `quote`.
pub const DEMO_SYMBOLS: [(&str, f64); 6] =
    [("AAPL", 189.0), ("MSFT", 415.0), ("GOOG", 171.0), ("AMZN", 183.0), ("NVDA", 121.0), ("TSLA", 246.0)];
/// How often the demo publishes (a few quotes each time).
const DEMO_EVERY: Duration = Duration::from_millis(200);

/// Builds the stats messages, remembering the last second's latency buckets (the page shows
/// the latency of the last second, not since start).
pub struct StatsTicker {
    prev_write: Vec<u64>,
    demo: bool,
}

impl StatsTicker {
    pub fn new(demo: bool) -> Self {
        StatsTicker { prev_write: vec![0; WRITE_BUCKETS_US.len() + 1], demo }
    }

    /// One stats message for every core, while someone watches (the chores thread, each second).
    pub fn tick(&mut self, shared: &Shared, broker: &Broker, draining: bool) {
        if shared.stats_viewers.load(Ordering::Relaxed) == 0 {
            return;
        }
        let frame = encode_notice("stats", &self.stats(shared, draining).to_string());
        broker.notice(STATS_TOPIC, &frame);
    }

    fn stats(&mut self, shared: &Shared, draining: bool) -> serde_json::Value {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let cores: Vec<serde_json::Value> = shared
            .cores
            .iter()
            .enumerate()
            .map(|(i, c)| {
                serde_json::json!({
                    "core": i,
                    "connections": c.connections.load(Ordering::Relaxed),
                    "subscribers": c.subscribers.load(Ordering::Relaxed),
                    "delivered_total": load(&c.frames_queued),
                    "sends_total": load(&c.sends),
                    "bytes_out_total": load(&c.bytes_out),
                })
            })
            .collect();
        // Latency of the last second, from the bucket counts that grew since the last message.
        let now: Vec<u64> = (0..=WRITE_BUCKETS_US.len())
            .map(|i| shared.cores.iter().map(|c| load(&c.write_buckets[i])).sum())
            .collect();
        let delta: Vec<u64> = now.iter().zip(&self.prev_write).map(|(n, p)| n.saturating_sub(*p)).collect();
        self.prev_write = now;
        // Topics with the most streams, summed over cores (each core lists its own top ones).
        let mut topics: Vec<(Box<str>, usize)> = Vec::new();
        for core in &shared.cores {
            for (name, count) in core.top_topics.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                match topics.iter_mut().find(|(n, _)| n == name) {
                    Some((_, total)) => *total += count,
                    None => topics.push((name.clone(), *count)),
                }
            }
        }
        topics.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        topics.truncate(TOP_TOPICS);
        let sum = |f: fn(&crate::metrics::CoreStats) -> u64| shared.cores.iter().map(f).sum::<u64>();
        serde_json::json!({
            "ts": crate::broker::now_ms(),
            "node": shared.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": shared.started.elapsed().as_secs(),
            "status": shared.status(draining),
            "redis": shared.redis_state(),
            "connections": shared.connections.load(Ordering::Relaxed),
            "subscribers": sum(|c| c.subscribers.load(Ordering::Relaxed) as u64),
            "topics_count": sum(|c| c.topics.load(Ordering::Relaxed) as u64),
            "published_total": shared.events_published.load(Ordering::Relaxed),
            "delivered_total": sum(|c| c.frames_queued.load(Ordering::Relaxed)),
            "bytes_out_total": sum(|c| c.bytes_out.load(Ordering::Relaxed)),
            "history_events": shared.retained_events.load(Ordering::Relaxed),
            "cores": cores,
            "latency_us": percentiles(&delta),
            "topics": topics.iter().map(|(t, n)| serde_json::json!({"topic": t, "subscribers": n})).collect::<Vec<_>>(),
            "demo": self.demo,
        })
    }
}

/// p50/p90/p99/max of one second's publish -> write latencies, each the upper bound of the
/// bucket it falls in (microseconds; past the last bound: twice the last bound).
fn percentiles(buckets: &[u64]) -> serde_json::Value {
    let count: u64 = buckets.iter().sum();
    let bound = |i: usize| WRITE_BUCKETS_US.get(i).copied().unwrap_or(WRITE_BUCKETS_US[WRITE_BUCKETS_US.len() - 1] * 2);
    let at = |q: f64| -> u64 {
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bound(i);
            }
        }
        0
    };
    if count == 0 {
        return serde_json::json!({ "count": 0, "p50": null, "p90": null, "p99": null, "max": null });
    }
    let max = buckets.iter().rposition(|&n| n > 0).map_or(0, bound);
    serde_json::json!({ "count": count, "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": max })
}

/// `--demo`: random quotes on `demo.<symbol>`, published like any HTTP publish (through Redis
/// when configured), a few every `DEMO_EVERY`. Runs on core 0 until the drain.
pub async fn demo_loop(worker: std::rc::Rc<Worker>) {
    let mut prices: Vec<f64> = DEMO_SYMBOLS.iter().map(|(_, p)| *p).collect();
    let mut ticks = monoio::time::interval(DEMO_EVERY);
    let (mut publishes, mut ids) = (Vec::new(), Vec::new());
    loop {
        ticks.tick().await;
        if worker.draining.get() {
            return;
        }
        let count = 1 + worker.jitter(0, 3) as usize;
        for _ in 0..count {
            let i = worker.jitter(0, DEMO_SYMBOLS.len() as u64) as usize;
            let (symbol, open) = DEMO_SYMBOLS[i];
            // A small random walk, in basis points, pulled back towards the opening price.
            let step = (worker.jitter(0, 41) as f64 - 20.0) / 10_000.0;
            let pull = (open - prices[i]) / open * 0.02;
            prices[i] = (prices[i] * (1.0 + step + pull) * 100.0).round() / 100.0;
            let change = prices[i] - open;
            let data = serde_json::json!({
                "symbol": symbol,
                "price": prices[i],
                "change": (change * 100.0).round() / 100.0,
                "change_pct": (change / open * 10_000.0).round() / 100.0,
                "volume": worker.jitter(100, 5_000),
                "ts": crate::broker::now_ms(),
            });
            publishes.push(Publish {
                topics: vec![format!("demo.{symbol}").into()],
                event: Some("quote".into()),
                data: data.to_string(),
                users: Vec::new(),
            });
        }
        let deadline = monoio::time::Instant::now() + DEMO_EVERY;
        if crate::conn::publish_batch(&worker, &mut publishes, &mut ids, deadline).await.is_err() {
            publishes.clear(); // the server is saturated: the demo skips a beat
        }
        ids.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_from_buckets() {
        let mut buckets = vec![0u64; WRITE_BUCKETS_US.len() + 1];
        assert_eq!(percentiles(&buckets)["count"], 0);
        buckets[1] = 90; // <= 25 us
        buckets[4] = 9; // <= 250 us
        buckets[WRITE_BUCKETS_US.len()] = 1; // past 1 s
        let p = percentiles(&buckets);
        assert_eq!((p["count"].as_u64(), p["p50"].as_u64(), p["p90"].as_u64()), (Some(100), Some(25), Some(25)));
        assert_eq!(p["p99"].as_u64(), Some(250));
        assert_eq!(p["max"].as_u64(), Some(2_000_000));
    }
}
