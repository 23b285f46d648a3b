//! Real-browser resume: headless Chromium's `EventSource` loses its connection, reconnects by
//! itself with `Last-Event-ID`, and ringcast replays what it missed, once each, in order.
//!
//! The page reaches ringcast through a TCP relay in this test, so the test can cut the network
//! without restarting the server (a restart would change the port and lose the history):
//! `cut` shuts down every relayed connection and holds new ones (accepted, not forwarded) until
//! `resume`. `tests/browser/resume.mjs` drives Chromium and asks for the cut and the resume on
//! its stdout; see that script for the steps. Here we also check, from the bytes the relay
//! forwarded, that the browser's reconnect request carried `Last-Event-ID: <id of event 3>`.
//!
//! Needs Debian's `chromium`, `node`, and `tests/browser/node_modules` (`scripts/test.sh`
//! installs them). When any is missing this test FAILS (it never passes silently).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use support::browser::{check_prerequisites, chromium_path, HOW_TO_FIX};
use support::Server;

/// The script bounds itself at 45 s; this is the backstop if node itself wedges.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Failure bound for one relayed connection waiting for the end of a cut.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// A TCP relay that can cut the network
// ---------------------------------------------------------------------------------------------

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

struct Relay {
    addr: SocketAddr,
    state: Arc<(Mutex<RelayState>, Condvar)>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Relay {
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
    fn cut(&self) {
        let mut st = self.state.0.lock().unwrap();
        st.cut = true;
        for s in st.open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn resume(&self) {
        self.state.0.lock().unwrap().cut = false;
        self.state.1.notify_all();
    }

    /// Request heads of every `GET /events` the relay forwarded, in order (a connection may
    /// carry several requests: the page's first stream request reuses the `/health` one).
    fn event_requests(&self) -> Vec<String> {
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

// ---------------------------------------------------------------------------------------------
// The browser script
// ---------------------------------------------------------------------------------------------

/// The node child; killed on drop.
struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(script: &std::path::Path, relay: &str, server: &str) -> Node {
        let mut child = Command::new("node")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg(script)
            .arg(relay)
            .arg(server)
            .env("CHROMIUM_PATH", chromium_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node: {e}\n=> {HOW_TO_FIX}"));
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let e = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut e = e.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
        });
        Node { child, stdin, lines, stderr }
    }

    fn answer(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").and_then(|_| self.stdin.flush()).expect("write to node's stdin");
    }
}

#[test]
fn chromium_eventsource_resumes_after_a_network_cut() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests").join("browser");
    check_prerequisites(&browser_dir);

    let server = Server::start(&["--cores", "2"]);
    let relay = Relay::start(server.addr);
    let relay_base = format!("http://{}", relay.addr);
    let server_base = format!("http://{}", server.addr);
    let mut node = Node::start(&browser_dir.join("resume.mjs"), &relay_base, &server_base);

    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let mut out = Vec::new();
    let mut done_ids: Option<Vec<String>> = None;
    let mut cut_seen = false;
    let status = loop {
        match node.lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                match line.trim() {
                    "@@CUT" => {
                        relay.cut();
                        cut_seen = true;
                        node.answer("cut");
                    }
                    "@@RESUME" => {
                        relay.resume();
                        node.answer("resumed");
                    }
                    l if l.starts_with("@@DONE ") => {
                        done_ids = Some(l["@@DONE ".len()..].split_whitespace().map(str::to_string).collect());
                    }
                    _ => {}
                }
                out.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // stdout closed: node is exiting.
                let end = Instant::now() + Duration::from_secs(10);
                break loop {
                    if let Some(s) = node.child.try_wait().expect("wait on node") {
                        break Some(s);
                    }
                    if Instant::now() > end {
                        break None;
                    }
                    thread::sleep(Duration::from_millis(20));
                };
            }
        }
        if let Some(s) = node.child.try_wait().expect("wait on node") {
            // Collect what is still buffered.
            while let Ok(line) = node.lines.recv_timeout(Duration::from_millis(200)) {
                if let Some(rest) = line.trim().strip_prefix("@@DONE ") {
                    done_ids = Some(rest.split_whitespace().map(str::to_string).collect());
                }
                out.push(line);
            }
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
    };
    let report = || {
        format!(
            "--- node stdout ---\n{}\n--- node stderr ---\n{}\n--- relayed stream requests ---\n{:#?}",
            out.join("\n"),
            node.stderr.lock().unwrap(),
            relay.event_requests()
        )
    };
    match status {
        Some(s) if s.success() => {}
        Some(s) => panic!("browser resume test failed: node exited with {s}\n{}", report()),
        None => panic!("browser resume test: node still running after {SCRIPT_TIMEOUT:?}; killed\n{}", report()),
    }
    assert!(cut_seen, "the script never asked for the cut\n{}", report());
    let ids = done_ids.unwrap_or_else(|| panic!("the script passed without reporting its ids\n{}", report()));
    assert_eq!(ids.len(), 7, "{}", report());

    // The browser's own requests: the first without Last-Event-ID, the reconnect with the id
    // of the last event it had (event 3).
    let requests = relay.event_requests();
    assert_eq!(requests.len(), 2, "expected the first stream request and one reconnect\n{}", report());
    let last_event_id = |head: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("last-event-id"))
            .map(|(_, v)| v.trim().to_string())
    };
    assert_eq!(last_event_id(&requests[0]), None, "first request\n{}", report());
    assert_eq!(last_event_id(&requests[1]).as_deref(), Some(ids[2].as_str()), "reconnect request\n{}", report());
    print!("{}", out.join("\n"));
}
