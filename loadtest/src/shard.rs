//! A shard is one process's share of the subscribers: either a group of
//! threads in this process, or a child process (the same binary re-executed
//! with `--child-range`) that reports over a line protocol:
//!
//! * child -> parent (stdout): `progress <json Progress>` every 100 ms and
//!   `result <json ShardResult>` once at the end;
//! * parent -> child (stdin): `cutoff` (end the connect phase) and `stop`
//!   (close everything and report). EOF on stdin also means `stop`.

use std::io::{self, BufRead, BufReader, Write};
use std::ops::Range;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::net::own_cpu_seconds;
use crate::stats::{Progress, ShardResult};
use crate::subscriber::{SubConfig, SubscriberGroup};

pub enum Shard {
    Local(SubscriberGroup),
    Child(ChildShard),
}

impl Shard {
    pub fn progress(&self) -> Progress {
        match self {
            Shard::Local(g) => g.progress(),
            Shard::Child(c) => {
                let s = c.state.lock().unwrap_or_else(|e| e.into_inner());
                let mut p = s.progress.clone();
                // A child that died early must not hold up the connect phase.
                p.connect_done |= s.exited;
                p
            }
        }
    }

    pub fn cutoff(&mut self) {
        match self {
            Shard::Local(g) => g.cutoff(),
            Shard::Child(c) => c.send("cutoff"),
        }
    }

    /// Stops the subscribers and collects their results.
    pub fn finish(self) -> ShardResult {
        match self {
            Shard::Local(g) => g.finish(),
            Shard::Child(c) => c.finish(),
        }
    }
}

#[derive(Default)]
struct ChildState {
    progress: Progress,
    result: Option<ShardResult>,
    /// Its stdout closed (it exited or is about to).
    exited: bool,
}

/// A child process holding some subscribers.
pub struct ChildShard {
    child: Child,
    stdin: Option<ChildStdin>,
    state: Arc<Mutex<ChildState>>,
    reader: Option<JoinHandle<()>>,
    range: Range<usize>,
}

impl ChildShard {
    /// Re-executes this binary with `args` plus `--child-range`.
    pub fn spawn(args: &[std::ffi::OsString], range: Range<usize>, threads: usize) -> io::Result<ChildShard> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(args)
            .arg("--child-threads")
            .arg(threads.to_string())
            .arg("--child-range")
            .arg(format!("{}:{}", range.start, range.len()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let state = Arc::new(Mutex::new(ChildState::default()));
        let st = state.clone();
        let reader = std::thread::Builder::new().name("child-reader".into()).spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(json) = line.strip_prefix("progress ") {
                    if let Ok(p) = serde_json::from_str(json) {
                        s.progress = p;
                    }
                } else if let Some(json) = line.strip_prefix("result ") {
                    s.result = serde_json::from_str(json).ok();
                }
            }
        })?;
        Ok(ChildShard { stdin: child.stdin.take(), child, state, reader: Some(reader), range })
    }

    fn send(&mut self, cmd: &str) {
        if let Some(stdin) = &mut self.stdin {
            if writeln!(stdin, "{cmd}").and_then(|_| stdin.flush()).is_err() {
                self.stdin = None;
            }
        }
    }

    fn finish(mut self) -> ShardResult {
        self.send("stop");
        self.stdin = None;
        let status = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.result.take() {
            Some(r) => r,
            None => {
                // The child died: count what it last reported, all of it lost.
                let mut counters = s.progress.counters;
                counters.connect_failed = (self.range.len() as u64).saturating_sub(counters.connected);
                ShardResult {
                    counters,
                    first_error: Some(format!(
                        "child process for subscribers {}..{} failed: {}",
                        self.range.start,
                        self.range.end,
                        match status {
                            Ok(st) => st.to_string(),
                            Err(e) => e.to_string(),
                        }
                    )),
                    ..ShardResult::default()
                }
            }
        }
    }
}

/// Main loop of a child process: runs the group, reports on stdout, obeys stdin.
pub fn child_main(cfg: SubConfig, range: Range<usize>, threads: usize) -> io::Result<()> {
    let group = SubscriberGroup::start(cfg, range, threads)?;
    let commands = Arc::new(Mutex::new(Vec::<String>::new()));
    let cmds = commands.clone();
    std::thread::Builder::new().name("child-stdin".into()).spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            cmds.lock().unwrap_or_else(|e| e.into_inner()).push(line.trim().to_string());
        }
        cmds.lock().unwrap_or_else(|e| e.into_inner()).push("stop".into());
    })?;
    let stdout = io::stdout();
    loop {
        let pending: Vec<String> = std::mem::take(&mut *commands.lock().unwrap_or_else(|e| e.into_inner()));
        let mut stop = false;
        for cmd in pending {
            match cmd.as_str() {
                "cutoff" => group.cutoff(),
                "stop" => stop = true,
                _ => {}
            }
        }
        if stop {
            break;
        }
        let line = serde_json::to_string(&group.progress()).expect("serializable");
        let mut out = stdout.lock();
        writeln!(out, "progress {line}")?;
        out.flush()?;
        drop(out);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut result = group.finish();
    result.cpu_seconds = own_cpu_seconds();
    let mut out = stdout.lock();
    writeln!(out, "result {}", serde_json::to_string(&result).expect("serializable"))?;
    out.flush()
}
