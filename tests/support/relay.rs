//! A TCP relay between a client and a server that a test can cut: every relayed connection is
//! shut down and new ones wait until `resume` (a network cut, without touching either side).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Failure bound for one relayed connection waiting for the end of a cut.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct RelayState {
    /// While set, no connection is forwarded: new ones wait, existing ones were shut down.
    cut: bool,
    /// The relay is being dropped.
    closed: bool,
    /// Both sockets of every forwarded connection (shut down by `cut`).
    open: Vec<TcpStream>,
    /// What each client sent, in accept order (the first 16 KiB of it).
    sent: Vec<Arc<Mutex<Vec<u8>>>>,
}

pub struct Relay {
    pub addr: SocketAddr,
    state: Arc<(Mutex<RelayState>, Condvar)>,
}

impl Relay {
    pub fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().unwrap();
        let state: Arc<(Mutex<RelayState>, Condvar)> = Arc::default();
        let st = Arc::clone(&state);
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.0.lock().unwrap().closed {
                    return;
                }
                let Ok(client) = conn else { continue };
                let st = Arc::clone(&st);
                thread::spawn(move || forward(client, upstream, st));
            }
        });
        Relay { addr, state }
    }

    /// Shuts down every relayed connection and holds new ones until `resume`.
    pub fn cut(&self) {
        let mut st = self.state.0.lock().unwrap();
        st.cut = true;
        for s in st.open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn resume(&self) {
        self.state.0.lock().unwrap().cut = false;
        self.state.1.notify_all();
    }

    /// Request heads of every `GET /events` the relay forwarded, in order (a connection may
    /// carry several requests: the page's first stream request reuses the `/health` one).
    pub fn event_requests(&self) -> Vec<String> {
        let st = self.state.0.lock().unwrap();
        let mut heads = Vec::new();
        for sent in &st.sent {
            let bytes = String::from_utf8_lossy(&sent.lock().unwrap()).into_owned();
            // The browser sends only GETs here: no bodies between the heads.
            heads.extend(bytes.split("\r\n\r\n").filter(|h| h.starts_with("GET /events")).map(str::to_string));
        }
        heads
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        {
            let mut st = self.state.0.lock().unwrap();
            st.closed = true;
            for s in st.open.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        self.state.1.notify_all();
        // Wakes the accept loop so it sees `closed`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// One relayed connection: waits out a cut, then copies both ways until either side ends.
fn forward(client: TcpStream, upstream: SocketAddr, st: Arc<(Mutex<RelayState>, Condvar)>) {
    let sent = Arc::new(Mutex::new(Vec::new()));
    {
        let (lock, cvar) = &*st;
        let mut guard = lock.lock().unwrap();
        guard.sent.push(Arc::clone(&sent));
        let deadline = Instant::now() + HOLD_TIMEOUT;
        while guard.cut && !guard.closed && Instant::now() < deadline {
            guard = cvar.wait_timeout(guard, Duration::from_millis(500)).unwrap().0;
        }
        if guard.cut || guard.closed {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        // Registered under the lock: a cut from now on shuts this connection down.
        guard.open.push(client.try_clone().expect("clone client socket"));
    }
    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(10)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    {
        let mut guard = st.0.lock().unwrap();
        if guard.cut || guard.closed {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        guard.open.push(server.try_clone().expect("clone server socket"));
    }
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    thread::spawn(move || pump(c2, s2, Some(sent)));
    pump(server, client, None);
}

/// Copies `from` -> `to` (recording into `record`), then shuts both down.
fn pump(mut from: TcpStream, mut to: TcpStream, record: Option<Arc<Mutex<Vec<u8>>>>) {
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(rec) = &record {
            let mut rec = rec.lock().unwrap();
            let room = (16384usize).saturating_sub(rec.len());
            rec.extend_from_slice(&buf[..n.min(room)]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
