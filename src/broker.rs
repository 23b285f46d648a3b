//! The broker thread: assigns event ids, encodes each frame once, hands it to every core.

use crate::mailbox::MailboxSender;
use crate::metrics::Shared;
use crate::sse::{encode_event, EventId, Frame};
use crossbeam_channel::Receiver;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Messages handled per wake-up before the cores are notified (bounds added latency).
const BATCH: usize = 256;

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
    Event(Arc<Event>),
    Published { ticket: usize, id: EventId },
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
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.next_at(now_ms)
    }
}

pub struct Broker {
    pub rx: Receiver<BrokerMsg>,
    pub cores: Vec<MailboxSender<CoreMsg>>,
    pub shared: Arc<Shared>,
}

impl Broker {
    pub fn run(self) {
        let mut clock = IdClock::default();
        while let Ok(first) = self.rx.recv() {
            let mut next = Some(first);
            let mut handled = 0;
            while let Some(msg) = next {
                match msg {
                    BrokerMsg::Publish { core, ticket, publish } => {
                        let id = clock.next_id();
                        let frame = encode_event(id, publish.event.as_deref(), &publish.data);
                        let event = Arc::new(Event { id, topics: publish.topics.into_boxed_slice(), frame });
                        for mailbox in &self.cores {
                            let _ = mailbox.push(CoreMsg::Event(event.clone()));
                        }
                        let _ = self.cores[core].push(CoreMsg::Published { ticket, id });
                        self.shared.events_published.fetch_add(1, Ordering::Relaxed);
                    }
                    BrokerMsg::Shutdown => {
                        self.notify_all();
                        return;
                    }
                }
                handled += 1;
                next = if handled < BATCH { self.rx.try_recv().ok() } else { None };
            }
            self.notify_all();
        }
    }

    fn notify_all(&self) {
        for mailbox in &self.cores {
            mailbox.notify();
        }
    }
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
