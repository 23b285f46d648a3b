//! Helpers shared by the headless-Chromium tests (tests/browser*.rs): prerequisites, child
//! processes with bounded runs.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const HOW_TO_FIX: &str = "run scripts/test.sh once (it installs Debian's chromium and runs \
                          `npm ci` in tests/browser), then re-run this test";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn chromium_path() -> PathBuf {
    std::env::var_os("CHROMIUM_PATH").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Panics (fails the test) with a clear message when a prerequisite is missing.
pub fn check_prerequisites(browser_dir: &Path) {
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
pub fn drain<R: Read + Send + 'static>(pipe: R) -> (Arc<Mutex<String>>, thread::JoinHandle<()>) {
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
pub fn run_bounded(mut cmd: Command, limit: Duration) -> (Option<ExitStatus>, String, String) {
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
