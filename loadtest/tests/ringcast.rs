//! Runs the load generator against a real ringcast server.
//!
//! The server binary is `$RINGCAST_BIN` if set, else the newest of
//! `target/{release,debug}/ringcast` in the workspace; if neither exists it is
//! built with `cargo build -p ringcast` first. (A test cannot use
//! `CARGO_BIN_EXE_*` of another package.)

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::Value;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("loadtest/ is inside the workspace").to_path_buf()
}

fn server_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(locate_or_build_server).clone()
}

fn locate_or_build_server() -> PathBuf {
    if let Some(bin) = std::env::var_os("RINGCAST_BIN") {
        return PathBuf::from(bin);
    }
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let newest = |dir: &Path| -> Option<(SystemTime, PathBuf)> {
        ["release", "debug"]
            .iter()
            .map(|profile| dir.join(profile).join("ringcast"))
            .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
            .max_by_key(|(t, _)| *t)
    };
    if let Some((_, path)) = newest(&target_dir) {
        return path;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", "ringcast"])
        .current_dir(workspace_root())
        .status()
        .expect("run cargo build -p ringcast");
    assert!(status.success(), "cargo build -p ringcast failed");
    newest(&target_dir).expect("ringcast binary after cargo build").1
}

/// A running server, killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts the server with extra flags (e.g. `--history N`).
    fn start_with(extra: &[&str]) -> Server {
        let bin = server_binary();
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--cores", "2", "--log-level", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("ringcast listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("{} did not print its listening line", bin.display());
            }
        };
        Server { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn loadtest(server: &Server, extra: &[&str]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast-loadtest"));
    cmd.arg(format!("http://{}", server.addr)).args(["--json", "--quiet"]);
    if !extra.contains(&"--grace") {
        cmd.args(["--grace", "10s"]);
    }
    let out =
        cmd.args(["--server-pid", &server.pid().to_string()]).args(extra).output().expect("run ringcast-loadtest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadtest failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

fn assert_all_delivered(r: &Value, subscribers: u64, events: u64) {
    assert_eq!(r["subscribers"], subscribers, "{r}");
    assert_eq!(r["connect"]["connected"], subscribers, "{r}");
    assert_eq!(r["connect"]["failed"], 0, "{r}");
    assert_eq!(r["publish"]["published"], events, "{r}");
    assert_eq!(r["publish"]["errors"], 0, "{r}");
    let d = &r["delivery"];
    assert_eq!(d["expected"], subscribers * events, "{r}");
    assert_eq!(d["delivered"], subscribers * events, "{r}");
    assert_eq!(d["delivered_pct"], 100.0, "{r}");
    assert_eq!(d["lost"], 0, "{r}");
    assert_eq!(d["duplicates"], 0, "{r}");
    assert_eq!(d["foreign"], 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");

    let lat = &r["latency"];
    let f = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v} in {r}"));
    assert_eq!(lat["count"], subscribers * events, "{r}");
    assert!(f(&lat["min_us"]) > 0.0, "{r}");
    assert!(f(&lat["p50_us"]) <= f(&lat["p90_us"]), "{r}");
    assert!(f(&lat["p90_us"]) <= f(&lat["p99_us"]), "{r}");
    assert!(f(&lat["p99_us"]) <= f(&lat["p999_us"]), "{r}");
    assert!(f(&lat["p999_us"]) <= f(&lat["max_us"]), "{r}");
    // Same machine, loopback: nothing should take anywhere near 10 s.
    assert!(f(&lat["max_us"]) < 10e6, "{r}");

    assert_eq!(r["connect"]["time"]["count"], subscribers, "{r}");
    assert!(f(&r["connect"]["seconds"]) > 0.0, "{r}");

    let s = &r["server"];
    assert!(f(&s["cpu_s"]) >= 0.0, "{r}");
    assert!(f(&s["cpu_us_per_event"]) >= 0.0, "{r}");
    assert!(s["rss_before_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(s["rss_after_connect_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(s["rss_per_connection_bytes"].is_number(), "{r}");
}

#[test]
fn burst_to_200_subscribers_is_fully_delivered() {
    let server = Server::start();
    let r = loadtest(&server, &["-c", "200", "--burst", "200", "--threads", "2"]);
    assert_all_delivered(&r, 200, 200);
    assert_eq!(r["mode"], "burst");
}

#[test]
fn plain_http10_streams_several_topics_and_publishers() {
    let server = Server::start();
    let r = loadtest(
        &server,
        &["-c", "60", "--topics", "3", "--publishers", "2", "--burst", "60", "--http10", "--size", "512"],
    );
    // 20 subscribers per topic, 20 events per topic.
    assert_eq!(r["delivery"]["expected"], 60 * 20);
    assert_eq!(r["delivery"]["delivered"], 60 * 20, "{r}");
    assert_eq!(r["delivery"]["duplicates"], 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
}

#[test]
fn rate_mode_runs_for_the_duration() {
    let server = Server::start();
    let r = loadtest(&server, &["-c", "50", "--rate", "200", "--duration", "1s", "--size", "128"]);
    let published = r["publish"]["published"].as_u64().unwrap();
    // 200 on schedule; a loaded machine may fall behind (publishing stops at the end).
    assert!((100..=201).contains(&published), "{r}");
    assert_all_delivered(&r, 50, published);
    let secs = r["publish"]["seconds"].as_f64().unwrap();
    assert!((0.9..2.0).contains(&secs), "{r}");
}

/// A replay run in which every subscriber got all `events` of its topic, once and in order.
fn assert_all_replayed(r: &Value, subscribers: u64, events: u64, expected: u64) {
    assert_eq!(r["mode"], "replay", "{r}");
    assert_eq!(r["events"], events, "{r}");
    assert_eq!(r["subscribers"], subscribers, "{r}");
    assert_eq!(r["publish"]["published"], events, "{r}");
    assert_eq!(r["publish"]["errors"], 0, "{r}");
    assert_eq!(r["connect"]["connected"], subscribers, "{r}");
    assert_eq!(r["connect"]["failed"], 0, "{r}");
    let id = r["last_event_id"].as_str().unwrap_or_else(|| panic!("no last_event_id in {r}"));
    assert!(id.split_once('-').is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok()), "{r}");
    let p = &r["replay"];
    assert_eq!(p["expected"], expected, "{r}");
    assert_eq!(p["delivered"], expected, "{r}");
    assert_eq!(p["delivered_pct"], 100.0, "{r}");
    assert_eq!(p["lost"], 0, "{r}");
    assert_eq!(p["duplicates"], 0, "{r}");
    assert_eq!(p["gaps"], 0, "{r}");
    assert_eq!(p["foreign"], 0, "{r}");
    assert_eq!(p["disconnects"], 0, "{r}");
    assert_eq!(p["verified"], true, "{r}");
    assert_eq!(p["complete_subscribers"], subscribers, "{r}");
    assert_eq!(p["time"]["count"], subscribers, "{r}");
    let f = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v} in {r}"));
    assert!(f(&p["seconds"]) > 0.0 && f(&p["seconds"]) < 10.0, "{r}");
    assert!(f(&p["time"]["max_us"]) <= f(&p["seconds"]) * 1e6, "{r}");
    assert!(f(&p["rate"]) > 0.0, "{r}");
    // Every event is at least `--size` bytes of data on the wire.
    assert!(p["bytes"].as_u64().unwrap() > expected * 64, "{r}");
    assert!(f(&r["server"]["cpu_us_per_event"]) > 0.0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
}

#[test]
fn replay_storm_of_50_subscribers_gets_all_200_events() {
    let server = Server::start_with(&["--history", "500"]);
    let r = loadtest(&server, &["-c", "50", "--replay", "200", "--threads", "2"]);
    assert_all_replayed(&r, 50, 200, 50 * 200);
}

#[test]
fn replay_over_topics_publishers_and_child_processes() {
    let server = Server::start_with(&["--history", "500"]);
    let r = loadtest(
        &server,
        &["-c", "50", "--replay", "300", "--topics", "3", "-p", "2", "--pipeline", "8", "--max-per-process", "20"],
    );
    assert_eq!(r["processes"], 3, "{r}");
    // 17 + 17 + 16 subscribers on topics of 100 events each.
    assert_all_replayed(&r, 50, 300, 50 * 100);
}

#[test]
fn replay_beyond_history_is_not_verified() {
    // Only the newest 50 are retained: each stream gets a ringcast-gap notice, then those 50.
    let server = Server::start_with(&["--history", "50"]);
    let r = loadtest(&server, &["-c", "10", "--replay", "200", "--grace", "500ms"]);
    let p = &r["replay"];
    assert_eq!(p["verified"], false, "{r}");
    assert_eq!(p["delivered"], 10 * 50, "{r}");
    assert_eq!(p["lost"], 10 * 150, "{r}");
    assert_eq!(p["foreign"], 10, "{r}");
    assert_eq!(p["gaps"], 10, "{r}");
    assert_eq!(p["complete_subscribers"], 0, "{r}");
}

/// Publishes `body` to `topic` with a plain request; returns the event id from the answer.
fn publish_raw(server: &Server, topic: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(&server.addr).unwrap();
    write!(
        conn,
        "POST /publish?topic={topic} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or_else(|| panic!("no body in {answer:?}"));
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    v["id"].as_str().unwrap().to_string()
}

#[test]
fn last_event_id_resumes_normal_streams() {
    let server = Server::start();
    // Retained before the run: the first is the resume point, the three after it are replayed
    // to every stream (their data is not the loadtest's, so they count as foreign).
    let id = publish_raw(&server, "lt0", "before");
    for _ in 0..3 {
        publish_raw(&server, "lt0", "replayed");
    }
    let r = loadtest(&server, &["-c", "20", "--burst", "30", "--last-event-id", &id]);
    assert_eq!(r["delivery"]["delivered"], 20 * 30, "{r}");
    assert_eq!(r["delivery"]["duplicates"], 0, "{r}");
    assert_eq!(r["delivery"]["foreign"], 20 * 3, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
}
