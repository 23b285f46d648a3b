//! Replay mode (`--replay K`): what it costs the server to replay history to resuming
//! subscribers.
//!
//! 1. An *anchor* event is published to the first topic; the id in its publish answer is the
//!    `Last-Event-ID` every subscriber will send: the last event a reconnecting client saw.
//! 2. K events are published over the topics while no subscriber is connected.
//! 3. All subscribers connect at once with that `Last-Event-ID`. Each must receive the events
//!    published on its topic, from the server's history, every sequence number once and in
//!    order. A subscriber is complete when it has them all; the storm time runs from the
//!    first connect to the last subscriber's last event.

use std::ffi::OsString;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::{Args, PublishMode, Target};
use crate::net::own_cpu_seconds;
use crate::publisher::{PubConfig, PubResult, Publishers};
use crate::report::{ConnectReport, PublishReport, ReplayDelivery, ReplayReport};
use crate::run::{self, ServerSamples, Ticker};
use crate::stats::{self, ShardResult, Summary};

/// Progress is polled this often (the completion times themselves are exact).
const POLL: Duration = Duration::from_millis(5);

/// Publishes as configured and waits for the publishers to finish.
fn publish(cfg: PubConfig) -> Result<PubResult, String> {
    let publishers =
        Publishers::start(cfg, Arc::new(AtomicBool::new(false))).map_err(|e| format!("starting publishers: {e}"))?;
    Ok(publishers.join())
}

/// Publishes the anchor event (one event, first topic, one connection) and returns its id.
fn publish_anchor(args: &Args, target: &Target) -> Result<String, String> {
    let mut cfg = run::pub_config(args, target, PublishMode::Burst { count: 1 });
    cfg.paths.truncate(1);
    cfg.publishers = 1;
    cfg.pipeline = 1;
    let anchor = publish(cfg)?;
    if anchor.published() == 0 {
        return Err(format!(
            "publishing the anchor event failed: {}",
            anchor.first_error.as_deref().unwrap_or("no answer")
        ));
    }
    anchor.first_id.ok_or_else(|| {
        "the publish answer carried no event id (expected {\"id\":\"...\"}); --replay needs a server that \
         answers publishes with the event id, as ringcast does"
            .to_string()
    })
}

/// Events the subscribers must receive in total: each gets what was published on its topic.
fn expected_total(subscribers: usize, published_by_topic: &[u64]) -> u64 {
    (0..subscribers).map(|i| published_by_topic[i % published_by_topic.len()]).sum()
}

/// Runs a replay benchmark as the parent process.
pub fn run(args: &Args, raw_args: &[OsString]) -> Result<ReplayReport, String> {
    args.validate()?;
    let k = args.replay.ok_or("--replay K is required for replay mode")?;
    if args.subscribers == 0 {
        return Err("--subscribers must be at least 1".into());
    }
    let target = Target::parse(&args.target)?;
    let (processes, threads) = run::layout(args);

    // Publish phase: the anchor, then the K events to be replayed.
    let anchor_id = publish_anchor(args, &target)?;
    let pub_start = Instant::now();
    let published = publish(run::pub_config(args, &target, PublishMode::Burst { count: k }))?;
    let pub_seconds = pub_start.elapsed().as_secs_f64();

    // Every subscriber (here or in a child process) resumes after the anchor and knows
    // how many events to expect on its topic.
    let mut sub_args = args.clone();
    sub_args.last_event_id = Some(anchor_id.clone());
    sub_args.replay_expect = Some(published.published_by_topic.clone());
    let expect_list = published.published_by_topic.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let mut child_args = raw_args.to_vec();
    child_args.extend(["--last-event-id".into(), anchor_id.clone().into()]);
    child_args.extend(["--replay-expect".into(), expect_list.into()]);
    let cfg = run::sub_config(&sub_args, &target, processes, threads);

    // The storm: everyone connects at once; wait until all are complete, or nothing has
    // moved for --grace once the connect phase is over.
    let server_before = run::sample_server(&args.server_pid)?;
    let storm_start = Instant::now();
    let mut shards = run::start_shards(&sub_args, &child_args, cfg, processes, threads)?;
    let mut ticker = Ticker::new(args.quiet);
    let (mut cut, mut connect_seconds) = (false, None);
    let (mut last_moved, mut last_change) = ((0, 0), storm_start);
    loop {
        let p = run::total_progress(&shards);
        let c = &p.counters;
        if (c.unique, c.connected) != last_moved {
            last_moved = (c.unique, c.connected);
            last_change = Instant::now();
        }
        if p.connect_done && connect_seconds.is_none() {
            connect_seconds = Some(storm_start.elapsed().as_secs_f64());
        }
        if c.completed >= args.subscribers as u64 || (p.connect_done && last_change.elapsed() >= args.grace) {
            break;
        }
        if !cut && storm_start.elapsed() >= args.connect_timeout {
            shards.iter_mut().for_each(|s| s.cutoff());
            cut = true;
        }
        ticker.tick("replay", c, args.subscribers, published.published(), published.errors);
        std::thread::sleep(POLL);
    }
    let server_end = run::sample_server(&args.server_pid)?;
    let waited_seconds = last_change.duration_since(storm_start).as_secs_f64();

    let mut total = ShardResult::default();
    for shard in shards {
        total.merge(&shard.finish());
    }
    let c = total.counters;
    let all_complete = c.completed >= args.subscribers as u64;
    let seconds = if all_complete && total.first_connect_ns > 0 && total.last_complete_ns > total.first_connect_ns {
        (total.last_complete_ns - total.first_connect_ns) as f64 / 1e9
    } else {
        waited_seconds
    };
    let expected = expected_total(args.subscribers, &published.published_by_topic);
    let delivered = c.unique;
    let lost = expected.saturating_sub(delivered);
    let mut connect_hist = stats::new_histogram();
    stats::add_pairs(&mut connect_hist, &total.connect);
    let mut complete_hist = stats::new_histogram();
    stats::add_pairs(&mut complete_hist, &total.complete);

    let server = run::server_report(
        &args.server_pid,
        ServerSamples { before: server_before, connected: server_end, start: server_before, end: server_end },
        delivered,
        0, // nothing is published in replay mode
        seconds,
        c.connected,
    );
    Ok(ReplayReport {
        target: target.addr.to_string(),
        mode: "replay",
        events: k,
        size: args.size,
        subscribers: args.subscribers,
        topics: args.topics,
        publishers: args.publishers,
        processes,
        threads,
        last_event_id: anchor_id,
        publish: PublishReport::of(&published, pub_seconds),
        connect: ConnectReport {
            connected: c.connected,
            open_at_publish: None,
            failed: c.connect_failed,
            seconds: connect_seconds.unwrap_or(seconds),
            time: Summary::of(&connect_hist),
        },
        replay: ReplayDelivery {
            expected,
            delivered,
            delivered_pct: if expected == 0 { 100.0 } else { delivered as f64 * 100.0 / expected as f64 },
            lost,
            duplicates: c.duplicates,
            gaps: c.gaps,
            foreign: c.foreign,
            disconnects: c.disconnected,
            verified: all_complete
                && lost == 0
                && c.duplicates == 0
                && c.gaps == 0
                && c.foreign == 0
                && published.errors == 0,
            complete_subscribers: c.completed,
            seconds,
            rate: delivered as f64 / seconds.max(1e-9),
            bytes: c.bytes,
            bytes_per_s: c.bytes as f64 / seconds.max(1e-9),
            time: Summary::of(&complete_hist),
        },
        server,
        loadtest_cpu_s: own_cpu_seconds() + total.cpu_seconds,
        errors: c.errors() + published.errors,
        first_error: total.first_error.clone().or(published.first_error.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_follows_the_topics() {
        assert_eq!(expected_total(1, &[1000]), 1000);
        assert_eq!(expected_total(50, &[200]), 50 * 200);
        // Subscriber i is on topic i % 3: topics 0 and 1 get 3 subscribers, topic 2 gets 2.
        assert_eq!(expected_total(8, &[10, 20, 30]), 3 * 10 + 3 * 20 + 2 * 30);
    }
}
