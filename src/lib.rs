//! ringcast: a thread-per-core Server-Sent Events pub/sub server on monoio.
//!
//! Layout (one line per module, what it owns):
//! - `config`   every flag and env var, with defaults and their reasons
//! - `access`   who may publish: the publish key, the addresses allowed without one
//! - `server`   start-up and shutdown: the broker, its chores thread, core threads, signals, drain
//! - `runtime`  one core's thread: monoio runtime, SO_REUSEPORT listener, accept, heartbeat,
//!   the mailbox loop (sliced fan-out), drain
//! - `worker`   what one core's tasks share: config, counters, hub, broker handle, slicing
//! - `conn`     one connection: requests (pipelined, keep-alive), routing, stream writer
//! - `http`     request parsing (httparse), chunked bodies, response heads, status mapping
//! - `publish`  `POST /publish` bodies (raw, JSON, form) and topic validation
//! - `sse`      event-stream framing, encoded once per event as a shared chunk
//! - `hub`      per-core slab of streams, topic index, local fan-out, bounded queues
//! - `gzip`     gzip streams: one shared deflate segment per event, stored blocks for small ones
//! - `sender`   batched stream sends: one io_uring SENDMSG per stream, a flush per submit
//! - `frames`   zero-copy vectored writes of shared frames (`FrameBatch`)
//! - `mailbox`  events -> one core, a channel with a coalesced cross-thread wake-up
//! - `broker`   event ids, history, each frame encoded once, hand-off to every core; shared
//!   state under one short lock, run by the core that parsed the publish
//! - `cluster`  several nodes through Redis: the Redis Function, pipelined FCALLs, the relay
//! - `history`  retained events per topic: resume after an id, last N, the gap signal
//! - `metrics`  counters (per core, gathered on scrape), `/metrics` text, `/health`
//! - `dashboard` the embedded page at `/`, its stats stream (`$stats`), the `--demo` ticker
//! - `event`    the shared vocabulary: an event and its id, a publish, a stream's key, core
//!   messages (below every module on the publish path, so imports run one way)

pub mod access;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod dashboard;
pub mod event;
pub mod frames;
pub mod gzip;
pub mod history;
pub mod http;
pub mod hub;
pub mod mailbox;
pub mod metrics;
pub mod publish;
pub mod runtime;
pub mod sender;
pub mod server;
pub mod sse;
pub mod worker;
