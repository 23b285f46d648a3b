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
}

/// One published event as every core sees it: the frame is shared, never re-encoded.
#[derive(Debug)]
pub struct Event {
    pub id: EventId,
    pub topics: Box<[Box<str>]>,
    pub frame: Frame,
}

pub enum CoreMsg {
    /// Events in id order, one message per publishing batch, shared by all cores.
    Events(Arc<[Arc<Event>]>),
    Shutdown,
}

/// Identifies one stream: slab key plus the id that guards against key reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamKey {
    pub key: usize,
    pub id: u64,
}
