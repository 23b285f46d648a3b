//! The vocabulary the publish path shares, below every module that uses it: an event and its
//! id, a publish, a stream's key, and the messages to a core. Imports run one way: publish ->
//! broker -> core (mailbox, hub) -> socket, each importing this.

use crate::sse::Frame;
use std::sync::Arc;

pub use crate::sse::EventId;

/// A validated publish, built by the core that parsed the request.
#[derive(Debug)]
pub struct Publish {
    pub topics: Vec<Box<str>>,
    pub event: Option<Box<str>>,
    pub data: String,
    /// Targeted delivery: only streams whose token `sub` is one of these get it (empty: every
    /// stream of the topics).
    pub users: Vec<Box<str>>,
}

/// One published event as every core sees it: the frame is shared, never re-encoded.
#[derive(Debug)]
pub struct Event {
    pub id: EventId,
    pub topics: Box<[Box<str>]>,
    pub frame: Frame,
    /// Targeted delivery (see `Publish::users`); `None` for an event to everyone.
    pub users: Option<Box<[Box<str>]>>,
    /// When the broker encoded it: the start of the publish -> write latency.
    pub stamped: std::time::Instant,
}

impl Event {
    pub fn new(id: EventId, topics: Box<[Box<str>]>, frame: Frame, users: Vec<Box<str>>) -> Event {
        let users = if users.is_empty() { None } else { Some(users.into_boxed_slice()) };
        Event { id, topics, frame, users, stamped: std::time::Instant::now() }
    }

    /// Whether a stream of user `user` (its token's `sub`; `None` without one) may get it.
    pub fn reaches(&self, user: Option<&str>) -> bool {
        match (&self.users, user) {
            (None, _) => true,
            (Some(users), Some(user)) => users.iter().any(|u| &**u == user),
            (Some(_), None) => false,
        }
    }
}

pub enum CoreMsg {
    /// Events in id order, one message per publishing batch, shared by all cores.
    Events(Arc<[Arc<Event>]>),
    /// A frame that is not a numbered event, for the streams of one internal topic (the
    /// dashboard's stats, `$stats`).
    Notice(&'static str, crate::sse::Frame),
    /// A notice for every event stream on the core (`ringcast-gap` when the relay lost events
    /// it cannot recover), in order with the events around it.
    Gap(crate::sse::Frame),
    Shutdown,
}

/// Identifies one stream: slab key plus the id that guards against key reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamKey {
    pub key: usize,
    pub id: u64,
}
