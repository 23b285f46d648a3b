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

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use support::browser::{check_prerequisites, chromium_path, HOW_TO_FIX};
use support::relay::Relay;
use support::Server;

/// The script bounds itself at 45 s; this is the backstop if node itself wedges.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

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
