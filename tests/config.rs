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
