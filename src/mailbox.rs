//! One mailbox per core: a bounded crossbeam channel plus a coalesced cross-thread wake-up.
//! Publishing cores (through the broker) send events; the owning core reads them.
//!
//! Why this wake-up: crossbeam has no async receive, and a monoio task can only be woken from
//! another thread with monoio's `sync` feature. The receiving core registers its task waker in an
//! `AtomicWaker`; a sender wakes it only when the `notified` flag flips false -> true, so a burst
//! of messages costs one wake (monoio then writes its eventfd only if the runtime is parked).
//! No timer, no polling delay, no spinning: an idle core sleeps in io_uring/epoll until woken.

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

#[derive(Default)]
struct Signal {
    waker: AtomicWaker,
    notified: AtomicBool,
}

pub struct MailboxSender<T> {
    tx: Sender<T>,
    signal: Arc<Signal>,
}

impl<T> Clone for MailboxSender<T> {
    fn clone(&self) -> Self {
        MailboxSender { tx: self.tx.clone(), signal: self.signal.clone() }
    }
}

pub struct MailboxReceiver<T> {
    rx: Receiver<T>,
    signal: Arc<Signal>,
}

pub fn mailbox<T>(capacity: usize) -> (MailboxSender<T>, MailboxReceiver<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let signal = Arc::new(Signal::default());
    (MailboxSender { tx, signal: signal.clone() }, MailboxReceiver { rx, signal })
}

impl<T> MailboxSender<T> {
    /// Queues without waking; call `notify` once after a batch. Blocks while the mailbox is full.
    pub fn push(&self, msg: T) -> Result<(), T> {
        self.tx.send(msg).map_err(|e| e.into_inner())
    }

    /// Wakes the receiving core unless a wake is already on its way.
    pub fn notify(&self) {
        if !self.signal.notified.swap(true, Ordering::AcqRel) {
            self.signal.waker.wake();
        }
    }

    /// Queues without waking or blocking; the message comes back when the mailbox is full.
    pub fn try_push(&self, msg: T) -> Result<(), T> {
        self.tx.try_send(msg).map_err(|e| e.into_inner())
    }

    /// Full for events and notices: the last slot stays free for the one `Shutdown` message,
    /// which is sent without the broker's lock (see `Broker::shutdown`).
    pub fn is_full(&self) -> bool {
        self.tx.len() + 1 >= self.tx.capacity().unwrap_or(usize::MAX)
    }

    /// `push` then `notify`.
    pub fn send(&self, msg: T) -> Result<(), T> {
        self.push(msg)?;
        self.notify();
        Ok(())
    }
}

/// Lets a core's first waiting publisher know that some core made room in its mailbox, so it
/// tries again at once instead of at its core's next 1 ms timer tick (a busy core's own
/// waiters try on each of its turns: without this, they took nearly all the room).
#[derive(Default)]
pub struct RoomSignal {
    waker: AtomicWaker,
    wanted: AtomicBool,
}

impl RoomSignal {
    /// Wakes the waiting publisher, if one asked.
    pub fn signal(&self) {
        if self.wanted.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Resolves at the `fallback` or when `signal` comes, whichever is first.
    pub async fn wait(&self, fallback: impl std::future::Future<Output = ()>) {
        let mut fallback = std::pin::pin!(fallback);
        let mut armed = false;
        poll_fn(|cx| {
            if armed && !self.wanted.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            if fallback.as_mut().poll(cx).is_ready() {
                self.wanted.store(false, Ordering::Release);
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // After registering: a signal from here on finds the waker.
            self.wanted.store(true, Ordering::Release);
            armed = true;
            Poll::Pending
        })
        .await
    }
}

impl<T> MailboxReceiver<T> {
    /// As `MailboxSender::is_full`: publishers are being held back.
    pub fn is_full(&self) -> bool {
        self.rx.len() + 1 >= self.rx.capacity().unwrap_or(usize::MAX)
    }

    /// Resolves when at least one message is waiting.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            self.signal.waker.register(cx.waker());
            // Clear before looking, so a send that lands after the look wakes us again.
            self.signal.notified.store(false, Ordering::SeqCst);
            if self.rx.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    pub fn try_recv(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

/// A waker that counts its wakes, for tests of wake-ups here and in `worker`.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Wakes(pub std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl std::task::Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Waker};

    #[test]
    fn room_signal_wakes_the_waiter_and_only_when_asked() {
        let signal = RoomSignal::default();
        signal.signal(); // nobody waits: nothing to wake, nothing remembered
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait = std::pin::pin!(signal.wait(std::future::pending()));
        assert!(wait.as_mut().poll(&mut cx).is_pending(), "an old signal must not count");
        assert!(wait.as_mut().poll(&mut cx).is_pending(), "woken by nothing: still waiting");
        signal.signal();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(wait.as_mut().poll(&mut cx).is_ready());
        signal.signal(); // the waiter is gone: no wake
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);

        // The fallback ends the wait too, and leaves no request behind.
        let mut ready = std::pin::pin!(signal.wait(std::future::ready(())));
        assert!(ready.as_mut().poll(&mut cx).is_ready());
        signal.signal();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }
}
