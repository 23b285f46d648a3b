//! The broker thread: assigns event ids, encodes each frame once, hands it to every core.

use crate::history::{Gap, History, Replay, ReplayFrom};
use crate::hub::StreamKey;
use crate::mailbox::MailboxSender;
use crate::metrics::Shared;
use crate::sse::{encode_event, encode_notice, EventId, Frame};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often retained events are checked against --history-ttl.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// A validated publish, built by the core that parsed the request.
#[derive(Debug)]
pub struct Publish {
    pub topics: Vec<Box<str>>,
    pub event: Option<Box<str>>,
    pub data: String,
}

pub enum BrokerMsg {
    /// `ticket` is the publishing connection's slot on core `core`, answered with `Published`.
    Publish {
        core: usize,
        ticket: usize,
        publish: Publish,
    },
    /// A new stream on core `core` waits (not yet live) for what it missed.
    Replay {
        core: usize,
        key: StreamKey,
        topics: Vec<Box<str>>,
        from: ReplayFrom,
        /// The resume id as the client sent it (echoed in a gap notice).
        given: Option<String>,
        end_marker: bool,
    },
    Shutdown,
}

/// One published event as every core sees it: the frame is shared, never re-encoded.
#[derive(Debug)]
pub struct Event {
    pub id: EventId,
    pub topics: Box<[Box<str>]>,
    pub frame: Frame,
}

pub enum CoreMsg {
    /// Events in id order, one message per broker batch, shared by all cores.
    Events(Arc<[Arc<Event>]>),
    Published {
        ticket: usize,
        id: EventId,
    },
    /// Frames for one stream, then it goes live (see `Hub::replay`).
    Replay {
        key: StreamKey,
        frames: Vec<Frame>,
    },
    Shutdown,
}

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
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub struct Broker {
    pub rx: Receiver<BrokerMsg>,
    pub cores: Vec<MailboxSender<CoreMsg>>,
    pub shared: Arc<Shared>,
    pub history: History,
    /// Messages handled per broker wake-up before its batch goes to the cores.
    pub batch_max: usize,
    /// Events whose SSE bytes reach this size are deflated for gzip streams (smaller: stored).
    pub gzip_min_bytes: usize,
}

#[derive(Default)]
struct Batch {
    events: Vec<Arc<Event>>,
    acks: Vec<(usize, usize, EventId)>,
}

impl Broker {
    pub fn run(mut self) {
        let mut clock = IdClock::default();
        let mut next_expiry = Instant::now() + EXPIRE_EVERY;
        let mut batch = Batch::default();
        loop {
            let first = match self.rx.recv_timeout(EXPIRE_EVERY) {
                Ok(msg) => Some(msg),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if Instant::now() >= next_expiry {
                self.history.expire(now_ms());
                self.shared.retained_events.store(self.history.retained(), Ordering::Relaxed);
                next_expiry = Instant::now() + EXPIRE_EVERY;
            }
            let mut next = first;
            let mut handled = 0;
            while let Some(msg) = next {
                match msg {
                    BrokerMsg::Publish { core, ticket, publish } => {
                        let id = clock.next_id();
                        let mut frame = encode_event(id, publish.event.as_deref(), &publish.data);
                        if self.shared.any_gzip() {
                            frame = frame.with_gzip(self.gzip_min_bytes);
                        }
                        let event = Arc::new(Event { id, topics: publish.topics.into_boxed_slice(), frame });
                        self.history.record(&event);
                        batch.events.push(event);
                        batch.acks.push((core, ticket, id));
                        self.shared.events_published.fetch_add(1, Ordering::Relaxed);
                    }
                    BrokerMsg::Replay { core, key, topics, from, given, end_marker } => {
                        // Events handled before this request reach the core before its replay.
                        self.flush(&mut batch);
                        let replay = self.history.replay(&topics, &from, clock.last(), now_ms());
                        let frames = replay_frames(replay, given, end_marker);
                        let _ = self.cores[core].push(CoreMsg::Replay { key, frames });
                    }
                    BrokerMsg::Shutdown => {
                        self.flush(&mut batch);
                        self.notify_all();
                        return;
                    }
                }
                handled += 1;
                next = if handled < self.batch_max { self.rx.try_recv().ok() } else { None };
            }
            self.flush(&mut batch);
            self.notify_all();
        }
    }

    /// Sends the batch's events to every core as one message, then the publishers' answers.
    fn flush(&self, batch: &mut Batch) {
        if !batch.events.is_empty() {
            let events: Arc<[Arc<Event>]> = batch.events.drain(..).collect();
            for mailbox in &self.cores {
                let _ = mailbox.push(CoreMsg::Events(events.clone()));
            }
        }
        for (core, ticket, id) in batch.acks.drain(..) {
            let _ = self.cores[core].push(CoreMsg::Published { ticket, id });
        }
    }

    fn notify_all(&self) {
        for mailbox in &self.cores {
            mailbox.notify();
        }
    }
}

/// The gap notice, the replayed events (their original frames, ids included), the end marker.
fn replay_frames(replay: Replay, given: Option<String>, end_marker: bool) -> Vec<Frame> {
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
