//! Real-browser check: headless Chromium's `EventSource` against the real `ringcast` binary.
//!
//! Starts `ringcast --listen 127.0.0.1:0 --cores 2`, reads its port from the stdout line
//! `ringcast listening on 127.0.0.1:PORT`, then runs
//! `node tests/browser/eventsource.mjs http://127.0.0.1:PORT` (playwright-core driving Debian's
//! `/usr/bin/chromium`) and asserts it exits 0. See that script for what it checks.
//!
//! Needs Debian's `chromium`, `node`, and `tests/browser/node_modules`; `scripts/test.sh`
//! installs them. When any is missing this test FAILS (it never passes silently).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;
use support::browser::{check_prerequisites, chromium_path, drain, repo_root, run_bounded};

/// How long the server may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// The script bounds itself at 30 s; this is the backstop if node itself wedges.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

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
