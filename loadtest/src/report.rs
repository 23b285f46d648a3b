//! The final report: a serializable summary and its text rendering.

use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::Summary;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    /// `rate` or `burst`.
    pub mode: &'static str,
    pub rate: Option<f64>,
    pub duration_s: Option<f64>,
    pub burst: Option<u64>,
    pub size: usize,
    pub subscribers: usize,
    pub topics: usize,
    pub publishers: usize,
    pub processes: usize,
    /// Subscriber threads per process.
    pub threads: usize,
    pub connect: ConnectReport,
    pub publish: PublishReport,
    pub delivery: DeliveryReport,
    /// Publish -> receive latency.
    pub latency: Summary,
    pub server: Option<ServerReport>,
    /// CPU seconds used by the load generator (all its processes).
    pub loadtest_cpu_s: f64,
    /// Errors in total (connect failures + disconnects + publish errors).
    pub errors: u64,
    /// The first subscriber error, else the first publisher error.
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    /// Subscribers that got a `200` response head.
    pub connected: u64,
    /// Streams still open when publishing started (the basis of `expected`).
    pub open_at_publish: u64,
    pub failed: u64,
    /// Wall time of the connect phase.
    pub seconds: f64,
    /// Per subscriber: socket creation -> response head.
    pub time: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    /// Events the server accepted (2xx).
    pub published: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub rate: f64,
    /// Request -> response round trip.
    pub rtt: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryReport {
    /// Sum over connected subscribers of the events published on their topic.
    pub expected: u64,
    /// Distinct events received (per subscriber, by sequence number).
    pub delivered: u64,
    pub delivered_pct: f64,
    pub lost: u64,
    pub duplicates: u64,
    /// Events whose data was not produced by this run.
    pub foreign: u64,
    /// Streams that ended after connecting.
    pub disconnects: u64,
    /// From the first publish to the last delivery (or the end of the grace period).
    pub seconds: f64,
    /// Delivered events per second over `seconds`.
    pub rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerReport {
    pub pid: u32,
    /// Server CPU (utime + stime) from the first publish to the end of delivery.
    pub cpu_s: f64,
    pub cpu_us_per_event: Option<f64>,
    /// Average server CPU utilisation over that window (100 = one core).
    pub cpu_pct: f64,
    pub rss_before_bytes: u64,
    pub rss_after_connect_bytes: u64,
    pub rss_per_connection_bytes: Option<f64>,
}

fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2}s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{us:.0}us")
    }
}

fn fmt_summary(s: &Summary) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {}, n={})",
        fmt_us(s.p50_us),
        fmt_us(s.p90_us),
        fmt_us(s.p99_us),
        fmt_us(s.p999_us),
        fmt_us(s.max_us),
        fmt_us(s.mean_us),
        s.count
    )
}

impl Report {
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let mode = match (self.mode, self.rate, self.duration_s, self.burst) {
            ("rate", Some(r), Some(d), _) => format!("rate {r}/s for {d}s"),
            (_, _, _, Some(b)) => format!("burst of {b}"),
            _ => self.mode.to_string(),
        };
        let _ = writeln!(
            o,
            "{} subscribers on {} topic(s) at {} ({} process(es) x {} thread(s)); {}, {} B events, {} publisher(s)",
            self.subscribers, self.topics, self.target, self.processes, self.threads, mode, self.size, self.publishers
        );
        let c = &self.connect;
        let _ = writeln!(
            o,
            "connect:   {} connected ({} open at first publish), {} failed in {:.2}s; per connection {}",
            c.connected,
            c.open_at_publish,
            c.failed,
            c.seconds,
            fmt_summary(&c.time)
        );
        let p = &self.publish;
        let _ = writeln!(
            o,
            "publish:   {} events in {:.2}s ({:.1}/s), {} errors; round trip p50 {} p99 {}",
            p.published,
            p.seconds,
            p.rate,
            p.errors,
            fmt_us(p.rtt.p50_us),
            fmt_us(p.rtt.p99_us)
        );
        let d = &self.delivery;
        let _ = writeln!(
            o,
            "delivered: {} / {} ({:.3}%), lost {}, duplicates {}, foreign {}, disconnects {}; {:.0} events/s",
            d.delivered, d.expected, d.delivered_pct, d.lost, d.duplicates, d.foreign, d.disconnects, d.rate
        );
        let _ = writeln!(o, "latency:   {}", fmt_summary(&self.latency));
        if let Some(s) = &self.server {
            let per_event = s.cpu_us_per_event.map_or("n/a".to_string(), |v| format!("{v:.3}us"));
            let per_conn = s.rss_per_connection_bytes.map_or("n/a".to_string(), |v| format!("{v:.0} B"));
            let _ = writeln!(
                o,
                "server:    pid {} cpu {:.2}s ({:.0}%), {} per delivered event; RSS {:.1} MiB -> {:.1} MiB, {} per connection",
                s.pid,
                s.cpu_s,
                s.cpu_pct,
                per_event,
                s.rss_before_bytes as f64 / 1048576.0,
                s.rss_after_connect_bytes as f64 / 1048576.0,
                per_conn
            );
        }
        let _ = writeln!(o, "loadtest:  cpu {:.2}s", self.loadtest_cpu_s);
        if self.errors > 0 {
            let _ = writeln!(o, "errors:    {} (first: {})", self.errors, self.first_error.as_deref().unwrap_or("?"));
            if let (Some(e), true) = (&self.publish.first_error, self.publish.first_error != self.first_error) {
                let _ = writeln!(o, "           first publish error: {e}");
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_units() {
        assert_eq!(fmt_us(12.4), "12us");
        assert_eq!(fmt_us(1500.0), "1.50ms");
        assert_eq!(fmt_us(2_500_000.0), "2.50s");
    }
}
