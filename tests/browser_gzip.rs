//! Real-browser gzip stream: headless Chromium's `EventSource` on a `Content-Encoding: gzip`
//! event stream receives a small multi-line event and a large (~8 KiB, deflated) one intact.
//!
//! First a raw request here with Chromium's `Accept-Encoding` must get a gzip stream; then
//! `node tests/browser/gzip.mjs http://127.0.0.1:PORT` (playwright-core driving Debian's
//! `/usr/bin/chromium`) must exit 0; it checks that the page's own `/events` response carried
//! `Content-Encoding: gzip` and that every event arrived intact. See that script for the steps.
//!
//! Needs Debian's `chromium`, `node`, and `tests/browser/node_modules`; `scripts/test.sh`
//! installs them. When any is missing this test FAILS (it never passes silently).

mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use support::{Server, SseStream};

/// The script bounds itself at 30 s; this is the backstop if node itself wedges.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// What Chromium's network stack sends on http:// requests.
const CHROMIUM_ACCEPT_ENCODING: &str = "gzip, deflate, br, zstd";

const HOW_TO_FIX: &str = "run scripts/test.sh once (it installs Debian's chromium and runs \
                          `npm ci` in tests/browser), then re-run this test";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chromium_path() -> PathBuf {
    std::env::var_os("CHROMIUM_PATH").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Panics (fails the test) with a clear message when a prerequisite is missing.
fn check_prerequisites(browser_dir: &Path) {
    let mut missing = Vec::new();
    let chromium = chromium_path();
    if !chromium.exists() {
        missing.push(format!("{} (Debian package `chromium`)", chromium.display()));
    }
    match Command::new("node").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        _ => missing.push("`node` on PATH (Node.js >= 20)".to_string()),
    }
    let pw = browser_dir.join("node_modules").join("playwright-core");
    if !pw.exists() {
        missing.push(format!("{} (npm ci in tests/browser)", pw.display()));
    }
    assert!(missing.is_empty(), "browser test prerequisites missing: {}.\n=> {HOW_TO_FIX}", missing.join(", "));
}

/// Collects everything a child writes on one pipe, on a thread.
fn drain<R: Read + Send + 'static>(pipe: R) -> (Arc<Mutex<String>>, thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = Arc::clone(&buf);
    let h = thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => b.lock().unwrap().push_str(&line),
            }
        }
    });
    (buf, h)
}

/// Runs a command to completion with a wall-clock bound; returns (status, stdout, stderr).
fn run_bounded(mut cmd: Command, limit: Duration) -> (Option<ExitStatus>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}\n=> {HOW_TO_FIX}"));
    let (out, out_h) = drain(child.stdout.take().unwrap());
    let (err, err_h) = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait on node") {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    // Chromium children may hold the pipes a moment longer; don't wait on them forever.
    let join_deadline = Instant::now() + Duration::from_secs(5);
    for h in [out_h, err_h] {
        while !h.is_finished() && Instant::now() < join_deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
    let out = out.lock().unwrap().clone();
    let err = err.lock().unwrap().clone();
    (status, out, err)
}

#[test]
fn chromium_eventsource_on_a_gzip_stream() {
    let root = repo_root();
    let browser_dir = root.join("tests").join("browser");
    check_prerequisites(&browser_dir);

    let server = Server::start(&["--cores", "2"]);

    // What Chromium asks for gets a gzip stream (the script checks the page's own response too).
    let req = format!(
        "GET /events?topic=gzbrowser HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\
         Accept-Encoding: {CHROMIUM_ACCEPT_ENCODING}\r\n\r\n",
        server.addr
    );
    let mut s = SseStream::open_with(server.addr, &req).unwrap_or_else(|e| panic!("{req:?}: {e}")).without_parsing();
    s.head.assert_status(200, &req);
    assert_eq!(s.head.header("content-encoding"), Some("gzip"), "{req:?}: {}", s.head.describe());
    assert!(s.head.is_chunked(), "{req:?}: {}", s.head.describe());
    let first = s.expect_chunk("opening chunk");
    assert!(first.starts_with(&[0x1f, 0x8b, 0x08]), "{req:?}: opening chunk does not start with the gzip magic");
    drop(s);

    let base = format!("http://{}", server.addr);
    let mut cmd = Command::new("node");
    cmd.current_dir(&root).arg(browser_dir.join("gzip.mjs")).arg(&base).env("CHROMIUM_PATH", chromium_path());
    let (status, out, err) = run_bounded(cmd, SCRIPT_TIMEOUT);
    let ok = matches!(status, Some(s) if s.success());
    assert!(
        ok,
        "browser gzip test failed against {base}: {}\n--- node stdout ---\n{out}\n--- node stderr ---\n{err}",
        match status {
            Some(s) => format!("node exited with {s}"),
            None => format!("node still running after {SCRIPT_TIMEOUT:?}; killed"),
        }
    );
    print!("{out}");
}
