//! Real-browser check: headless Chromium's `EventSource` against the real `ringcast` binary.
//!
//! Starts `ringcast --listen 127.0.0.1:0 --cores 2`, reads its port from the stdout line
//! `ringcast listening on 127.0.0.1:PORT`, then runs
//! `node tests/browser/eventsource.mjs http://127.0.0.1:PORT` (playwright-core driving Debian's
//! `/usr/bin/chromium`) and asserts it exits 0. See that script for what it checks.
//!
//! Needs Debian's `chromium`, `node`, and `tests/browser/node_modules`; `scripts/test.sh`
//! installs them. When any is missing this test FAILS (it never passes silently).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long the server may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// The script bounds itself at 30 s; this is the backstop if node itself wedges.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

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

/// The server under test; killed (and reaped) on drop.
struct Server {
    child: Child,
    port: u16,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
}

impl Server {
    fn start() -> Server {
        let bin = env!("CARGO_BIN_EXE_ringcast");
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--cores", "2"])
            .env("RINGCAST_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));

        let (stderr, _) = drain(child.stderr.take().unwrap());
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<u16>();
        {
            let out = child.stdout.take().unwrap();
            let stdout = Arc::clone(&stdout);
            thread::spawn(move || {
                let mut r = BufReader::new(out);
                let mut line = String::new();
                let mut sent = false;
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            stdout.lock().unwrap().push_str(&line);
                            if !sent {
                                if let Some(port) = parse_listening(&line) {
                                    let _ = tx.send(port);
                                    sent = true;
                                }
                            }
                        }
                    }
                }
            });
        }

        let mut server = Server { child, port: 0, stderr, stdout };
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(port) => server.port = port,
            Err(_) => {
                let status = server.child.try_wait().ok().flatten();
                panic!(
                    "ringcast did not print `ringcast listening on 127.0.0.1:PORT` within {:?} \
                     (exit status: {status:?})\n--- server stdout ---\n{}\n--- server stderr ---\n{}",
                    STARTUP_TIMEOUT,
                    server.stdout.lock().unwrap(),
                    server.stderr.lock().unwrap()
                );
            }
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ringcast listening on 127.0.0.1:PORT` -> PORT.
fn parse_listening(line: &str) -> Option<u16> {
    let addr = line.trim().strip_prefix("ringcast listening on ")?;
    addr.rsplit_once(':')?.1.parse().ok()
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
fn parses_listening_line() {
    assert_eq!(parse_listening("ringcast listening on 127.0.0.1:40123\n"), Some(40123));
    assert_eq!(parse_listening("something else"), None);
}

#[test]
fn chromium_eventsource_receives_published_events() {
    let root = repo_root();
    let browser_dir = root.join("tests").join("browser");
    check_prerequisites(&browser_dir);

    let server = Server::start();
    let base = format!("http://127.0.0.1:{}", server.port);

    let mut cmd = Command::new("node");
    cmd.current_dir(&root).arg(browser_dir.join("eventsource.mjs")).arg(&base).env("CHROMIUM_PATH", chromium_path());
    let (status, out, err) = run_bounded(cmd, SCRIPT_TIMEOUT);

    let ok = matches!(status, Some(s) if s.success());
    if !ok {
        // Stop the server first so its stderr is complete.
        let (stderr, stdout) = (Arc::clone(&server.stderr), Arc::clone(&server.stdout));
        drop(server);
        thread::sleep(Duration::from_millis(200));
        let server_stderr = stderr.lock().unwrap().clone();
        let server_stdout = stdout.lock().unwrap().clone();
        panic!(
            "browser EventSource test failed against {base}: {}\n\
             --- node stdout ---\n{out}\n--- node stderr ---\n{err}\n\
             --- server stdout ---\n{server_stdout}\n--- server stderr ---\n{server_stderr}",
            match status {
                Some(s) => format!("node exited with {s}"),
                None => format!("node still running after {SCRIPT_TIMEOUT:?}; killed"),
            }
        );
    }
    print!("{out}");
}
