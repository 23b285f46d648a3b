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
    /// Streams still open when publishing started (the basis of `expected`); not in replay mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_at_publish: Option<u64>,
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

impl PublishReport {
    /// What the publishers did over `seconds` of publishing.
    pub fn of(published: &crate::publisher::PubResult, seconds: f64) -> PublishReport {
        PublishReport {
            published: published.published(),
            errors: published.errors,
            first_error: published.first_error.clone(),
            seconds,
            rate: published.published() as f64 / seconds.max(1e-9),
            rtt: Summary::of(&published.rtt),
        }
    }
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
    /// Server CPU (utime + stime) over the measured window: from the first publish to the end
    /// of delivery; in replay mode from the first connect to the last replayed event.
    pub cpu_s: f64,
    pub cpu_us_per_event: Option<f64>,
    /// Average server CPU utilisation over that window (100 = one core).
    pub cpu_pct: f64,
    /// Times the server's threads went to sleep (and so were woken) over that window, per
    /// publish: at light load, the thread wake-ups each event costs.
    pub wakeups_per_publish: Option<f64>,
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
        self.connect.write_text(&mut o);
        self.publish.write_text(&mut o);
        let d = &self.delivery;
        let _ = writeln!(
            o,
            "delivered: {} / {} ({:.3}%), lost {}, duplicates {}, foreign {}, disconnects {}; {:.0} events/s",
            d.delivered, d.expected, d.delivered_pct, d.lost, d.duplicates, d.foreign, d.disconnects, d.rate
        );
        let _ = writeln!(o, "latency:   {}", fmt_summary(&self.latency));
        if let Some(s) = &self.server {
            s.write_text(&mut o, "delivered");
        }
        write_tail(&mut o, self.loadtest_cpu_s, self.errors, &self.first_error, &self.publish);
        o
    }
}

impl ConnectReport {
    fn write_text(&self, o: &mut String) {
        let open = self.open_at_publish.map(|n| format!(" ({n} open at first publish)")).unwrap_or_default();
        let _ = writeln!(
            o,
            "connect:   {} connected{open}, {} failed in {:.2}s; per connection {}",
            self.connected,
            self.failed,
            self.seconds,
            fmt_summary(&self.time)
        );
    }
}

impl PublishReport {
    fn write_text(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "publish:   {} events in {:.2}s ({:.1}/s), {} errors; round trip p50 {} p99 {}",
            self.published,
            self.seconds,
            self.rate,
            self.errors,
            fmt_us(self.rtt.p50_us),
            fmt_us(self.rtt.p99_us)
        );
    }
}

impl ServerReport {
    /// `what`: the events the CPU is divided by ("delivered", "replayed").
    fn write_text(&self, o: &mut String, what: &str) {
        let per_event = self.cpu_us_per_event.map_or("n/a".to_string(), |v| format!("{v:.3}us"));
        let per_conn = self.rss_per_connection_bytes.map_or("n/a".to_string(), |v| format!("{v:.0} B"));
        let wakeups =
            self.wakeups_per_publish.map_or(String::new(), |v| format!(", {v:.2} thread wake-ups per publish"));
        let _ = writeln!(
            o,
            "server:    pid {} cpu {:.2}s ({:.0}%), {} per {what} event{wakeups}; RSS {:.1} MiB -> {:.1} MiB, {} per connection",
            self.pid,
            self.cpu_s,
            self.cpu_pct,
            per_event,
            self.rss_before_bytes as f64 / 1048576.0,
            self.rss_after_connect_bytes as f64 / 1048576.0,
            per_conn
        );
    }
}

/// The load generator's CPU and the errors, common to both reports.
fn write_tail(o: &mut String, cpu_s: f64, errors: u64, first_error: &Option<String>, publish: &PublishReport) {
    let _ = writeln!(o, "loadtest:  cpu {cpu_s:.2}s");
    if errors > 0 {
        let _ = writeln!(o, "errors:    {errors} (first: {})", first_error.as_deref().unwrap_or("?"));
        if let (Some(e), true) = (&publish.first_error, &publish.first_error != first_error) {
            let _ = writeln!(o, "           first publish error: {e}");
        }
    }
}

/// The report of a replay (`--replay K`) run.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub target: String,
    /// Always `replay`.
    pub mode: &'static str,
    /// Events published before the subscribers connect (K).
    pub events: u64,
    pub size: usize,
    pub subscribers: usize,
    pub topics: usize,
    pub publishers: usize,
    pub processes: usize,
    /// Subscriber threads per process.
    pub threads: usize,
    /// The `Last-Event-ID` every subscriber sent: the id of the event published just before the K.
    pub last_event_id: String,
    pub publish: PublishReport,
    pub connect: ConnectReport,
    pub replay: ReplayDelivery,
    pub server: Option<ServerReport>,
    /// CPU seconds used by the load generator (all its processes).
    pub loadtest_cpu_s: f64,
    /// Errors in total (connect failures + disconnects + publish errors).
    pub errors: u64,
    /// The first subscriber error, else the first publisher error.
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayDelivery {
    /// Sum over connected subscribers of the events published on their topic.
    pub expected: u64,
    /// Distinct events received (per subscriber, by sequence number).
    pub delivered: u64,
    pub delivered_pct: f64,
    pub lost: u64,
    pub duplicates: u64,
    /// Events that arrived after a skipped sequence number (out of order or missing).
    pub gaps: u64,
    /// Events whose data was not published by this run (e.g. a `ringcast-gap` notice).
    pub foreign: u64,
    /// Streams that ended after connecting.
    pub disconnects: u64,
    /// Every subscriber got every expected event exactly once and in order, and nothing else.
    pub verified: bool,
    /// Subscribers that received all the events expected on their topic.
    pub complete_subscribers: u64,
    /// From the first connect to the last subscriber's last replayed event (or the end of
    /// the wait when some never completed).
    pub seconds: f64,
    /// Delivered events per second over `seconds`.
    pub rate: f64,
    /// Bytes the subscribers read (response heads, chunk framing, events).
    pub bytes: u64,
    pub bytes_per_s: f64,
    /// Per complete subscriber: socket creation -> last expected event.
    pub time: Summary,
}

impl ReplayReport {
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "replay of {} events ({} B) to {} subscribers on {} topic(s) at {} ({} process(es) x {} thread(s)), \
             resuming after {}",
            self.events,
            self.size,
            self.subscribers,
            self.topics,
            self.target,
            self.processes,
            self.threads,
            self.last_event_id
        );
        self.publish.write_text(&mut o);
        self.connect.write_text(&mut o);
        let r = &self.replay;
        let _ = writeln!(
            o,
            "replayed:  {} / {} ({:.3}%), lost {}, duplicates {}, gaps {}, foreign {}, disconnects {}; {}",
            r.delivered,
            r.expected,
            r.delivered_pct,
            r.lost,
            r.duplicates,
            r.gaps,
            r.foreign,
            r.disconnects,
            if r.verified { "every event once, in order" } else { "NOT VERIFIED" }
        );
        let _ = writeln!(
            o,
            "storm:     {}/{} subscribers complete in {}: {:.0} events/s, {:.1} MiB/s ({} B read)",
            r.complete_subscribers,
            self.subscribers,
            fmt_us(r.seconds * 1e6),
            r.rate,
            r.bytes_per_s / 1048576.0,
            r.bytes
        );
        let _ = writeln!(o, "complete:  per subscriber (connect -> last event) {}", fmt_summary(&r.time));
        if r.foreign > 0 && r.lost > 0 {
            let _ = writeln!(
                o,
                "hint:      foreign events with lost ones usually mean a ringcast-gap notice: \
                 the server retains fewer than {} events per topic (--history)",
                self.events
            );
        }
        if let Some(s) = &self.server {
            s.write_text(&mut o, "replayed");
        }
        write_tail(&mut o, self.loadtest_cpu_s, self.errors, &self.first_error, &self.publish);
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
