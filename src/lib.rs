//! ringcast: a thread-per-core Server-Sent Events pub/sub server on monoio.
//!
//! Layout (one line per module, what it owns):
//! - `config`   every flag and env var, with defaults and their reasons
//! - `server`   start-up and shutdown: broker and core threads, signals, drain
//! - `worker`   one core: monoio runtime, SO_REUSEPORT listener, accept, heartbeat, mailbox loop
//! - `conn`     one connection: requests (pipelined, keep-alive), routing, stream writer
//! - `http`     request parsing (httparse), chunked bodies, response heads, status mapping
//! - `publish`  `POST /publish` bodies (raw, JSON, form) and topic validation
//! - `sse`      event-stream framing, encoded once per event as a shared chunk
//! - `hub`      per-core slab of streams, topic index, local fan-out, bounded queues
//! - `gzip`     gzip streams: one shared deflate segment per event, stored blocks for small ones
//! - `sender`   batched stream sends: one io_uring SENDMSG per stream, a flush per submit
//! - `frames`   zero-copy vectored writes of shared frames (`FrameBatch`)
//! - `mailbox`  broker -> core channel with a coalesced cross-thread wake-up
//! - `broker`   the broker thread: event ids, encoding, fan-out to cores
//! - `history`  retained events per topic: resume after an id, last N, the gap signal
//! - `metrics`  process-wide counters and `/metrics` text

pub mod broker;
pub mod config;
pub mod conn;
pub mod frames;
pub mod gzip;
pub mod history;
pub mod http;
pub mod hub;
pub mod mailbox;
pub mod metrics;
pub mod publish;
pub mod sender;
pub mod server;
pub mod sse;
pub mod worker;
