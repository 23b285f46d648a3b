//! Flags and their `RINGCAST_*` environment twins; bad values stop the process.

mod support;

use std::time::{Duration, Instant};
use support::Server;

#[test]
fn environment_sets_a_flag_and_the_flag_wins() {
    let server = Server::start_with_env(&[], &[("RINGCAST_MAX_TOPICS", "1")]);
    let resp = server.get("/events?topic=a&topic=b");
    resp.assert_status(400, "2 topics with RINGCAST_MAX_TOPICS=1");

    let server = Server::start_with_env(&["--max-topics", "2"], &[("RINGCAST_MAX_TOPICS", "1")]);
    let mut s = server.subscribe(&["a", "b"]);
    server.publish("b", "flag over env");
    assert_eq!(s.expect_event("flag wins").data, "flag over env");
}

#[test]
fn single_core_serves() {
    let server = Server::start(&["--cores", "1"]);
    let mut s = server.subscribe(&["one"]);
    let id = server.publish("one", "single core");
    assert_eq!(s.expect_event("one core").id.as_deref(), Some(id.as_str()));
}

#[test]
fn invalid_flag_values_exit_nonzero() {
    for args in [
        &["--heartbeat", "soon"][..],
        &["--max-connections", "many"][..],
        &["--driver", "kqueue"][..],
        &["--no-such-flag"][..],
        &["--sched-slice", "50us"][..],
        &["--sched-slice", "1s"][..],
    ] {
        let mut child = support::command()
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ringcast {args:?} kept running");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().unwrap();
        assert!(!status.success(), "ringcast {args:?} exited 0");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"), "ringcast {args:?} started listening");
        assert!(!out.stderr.is_empty(), "ringcast {args:?} exited without saying why");
    }
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let server = Server::start(&["--log-format", "json", "--log-level", "info"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = server.stderr_log();
        if log.contains("I/O driver") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["msg"].as_str().is_some_and(|m| m.starts_with("I/O driver"))), "{log}");
    assert!(lines.iter().all(|l| l["level"].is_string() && l["ts"].is_string() && l["target"].is_string()));
}

/// `--config ringcast.toml`: the flags' names as keys; a flag overrides the environment, which
/// overrides the file; an unknown key stops the process with a message naming it.
#[test]
fn settings_file_under_env_and_flags() {
    let dir = std::env::temp_dir().join(format!("ringcast-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ringcast.toml");
    std::fs::write(&file, "max-topics = 1\nheartbeat = \"1h\"\ncors-origin = [\"https://app.example\"]\n").unwrap();
    let path = file.to_str().unwrap();

    let server = Server::start(&["--config", path]);
    server.get("/events?topic=a&topic=b").assert_status(400, "2 topics with max-topics = 1 in the file");
    let resp = server.get("/health");
    assert_eq!(resp.header("access-control-allow-origin"), None, "cors-origin list from the file");

    let server = Server::start_with_env(&["--config", path], &[("RINGCAST_MAX_TOPICS", "2")]);
    let _two = server.subscribe(&["a", "b"]);
    server.get("/events?topic=a&topic=b&topic=c").assert_status(400, "env (2) over the file (1)");

    let server = Server::start_with_env(&["--config", path, "--max-topics", "3"], &[("RINGCAST_MAX_TOPICS", "2")]);
    let _three = server.subscribe(&["a", "b", "c"]);

    std::fs::write(&file, "max-topicz = 1\n").unwrap();
    let out = support::command().args(["--listen", "127.0.0.1:0", "--config", path]).output().unwrap();
    assert!(!out.status.success(), "an unknown setting was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown setting \"max-topicz\""), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The scheduler slice (`se.slice`, nanoseconds) of each thread of `pid`, by thread name, as
/// the kernel reports it; None where this kernel does not report slices (before 6.6, or
/// without CONFIG_SCHED_DEBUG).
fn slices(pid: u32) -> Option<Vec<(String, u64)>> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let name = std::fs::read_to_string(dir.join("comm")).ok()?.trim().to_string();
        let sched = std::fs::read_to_string(dir.join("sched")).ok()?;
        let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
        let value = line.rsplit(':').next()?.trim().parse::<f64>().ok()?;
        found.push((name, value as u64));
    }
    Some(found)
}

#[test]
fn core_threads_get_the_asked_scheduler_slice() {
    let server = Server::start(&["--cores", "2", "--sched-slice", "300us"]);
    let Some(threads) = slices(server.pid) else {
        eprintln!("this kernel does not report scheduler slices: nothing to check");
        return;
    };
    let cores: Vec<_> = threads.iter().filter(|(name, _)| name.starts_with("ringcast-core-")).collect();
    assert_eq!(cores.len(), 2, "{threads:?}");
    let custom_slices = std::fs::read_to_string("/proc/version")
        .ok()
        .and_then(|v| {
            let release = v.split_whitespace().nth(2)?.to_string();
            let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
            Some((parts.next()?, parts.next()?))
        })
        .is_some_and(|version| version >= (6, 12));
    if custom_slices {
        for (name, slice) in &cores {
            assert_eq!(*slice, 300_000, "{name} did not get the asked slice: {threads:?}");
        }
        // Only the cores ask: the other threads keep the kernel's default.
        // (Threads the kernel makes for a core, such as io_uring's workers, may inherit it.)
        let others: Vec<_> = threads
            .iter()
            .filter(|(name, _)| name.starts_with("ringcast") && !name.starts_with("ringcast-core-"))
            .collect();
        assert!(!others.is_empty(), "{threads:?}");
        assert!(others.iter().all(|(_, slice)| *slice != 300_000), "{threads:?}");
    }
    // The server still serves with it.
    let mut stream = server.subscribe(&["s"]);
    let id = server.publish("s", "sliced");
    assert_eq!(stream.next_event().expect("the event").data, "sliced");
    assert!(!id.is_empty());

    // --sched-slice 0 leaves the kernel's default on every thread.
    let plain = Server::start(&["--cores", "2", "--sched-slice", "0"]);
    let threads = slices(plain.pid).expect("reported above");
    let default = threads[0].1;
    assert!(threads.iter().all(|(_, slice)| *slice == default), "{threads:?}");
}
