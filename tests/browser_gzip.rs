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

use std::process::Command;
use std::time::Duration;
use support::browser::{check_prerequisites, chromium_path, repo_root, run_bounded};
use support::{Server, SseStream};

/// The script bounds itself at 30 s; this is the backstop if node itself wedges.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// What Chromium's network stack sends on http:// requests.
const CHROMIUM_ACCEPT_ENCODING: &str = "gzip, deflate, br, zstd";

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
