//! The core stream/publish behaviour under each I/O driver: `--driver epoll`, `uring`, `auto`.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};
use support::{metric, parse_id, post_request, publish_id, Server, SseStream};

/// True when the kernel refuses io_uring to this process (`kernel.io_uring_disabled=2`).
fn uring_disabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").map(|s| s.trim() == "2").unwrap_or(false)
}

/// The core subset of stream/publish behaviour against a running server.
fn core_checks(server: &Server, label: &str) {
    let what = |s: &str| format!("{label}: {s}");

    // Stream head and opening chunk.
    let mut s = SseStream::open(server.addr, "/events?topic=d1&topic=d2").expect("open");
    s.head.assert_status(200, &what("stream"));
    assert_eq!(s.head.header("content-type"), Some("text/event-stream; charset=utf-8"));
    assert!(s.head.is_chunked());
    let first = s.next_chunk().unwrap().expect("opening chunk");
    assert_eq!(first, b"retry: 2000\n:ok\n", "{}", what("opening chunk"));

    // Multi-line, named event.
    let resp =
        support::publish_request(server.addr, "/publish?topic=d1&event=note", Some("text/plain"), b"a\r\nb\rc\nd");
    resp.assert_status(200, &what("publish"));
    let id = publish_id(&resp);
    let chunk = String::from_utf8(s.expect_chunk(&what("event"))).unwrap();
    assert_eq!(chunk, format!("id: {id}\nevent: note\ndata: a\ndata: b\ndata: c\ndata: d\n\n"));

    // One publish to both subscribed topics arrives once.
    let resp = support::publish_request(server.addr, "/publish?topic=d1&topic=d2", Some("text/plain"), b"both");
    let both = publish_id(&resp);
    let marker = server.publish("d2", "marker");
    assert_eq!(s.expect_event(&what("both")).id.as_deref(), Some(both.as_str()));
    assert_eq!(s.expect_event(&what("marker")).id.as_deref(), Some(marker.as_str()));

    // Three pipelined publishes answered in order; the stream sees them in order.
    let mut batch = Vec::new();
    for i in 0..3 {
        batch.extend_from_slice(&post_request(
            "/publish?topic=d2",
            Some("application/json"),
            format!(r#"{{"topic":"d2","data":{{"n":{i}}}}}"#).as_bytes(),
        ));
    }
    let mut conn = server.connect();
    conn.send(&batch);
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let r = conn.read_response().unwrap();
            r.assert_status(200, &what(&format!("pipelined {i}")));
            publish_id(&r)
        })
        .collect();
    assert!(parse_id(&ids[0]) < parse_id(&ids[1]) && parse_id(&ids[1]) < parse_id(&ids[2]));
    for (i, id) in ids.iter().enumerate() {
        let ev = s.expect_event(&what("pipelined event"));
        assert_eq!(ev.id.as_deref(), Some(id.as_str()));
        assert_eq!(ev.data, format!(r#"{{"n":{i}}}"#));
    }

    // An error answer closes its connection and leaves the stream working.
    let resp = server.get("/nope");
    resp.assert_status(404, &what("404"));
    resp.assert_content_length(&what("404"));
    let after = server.publish("d1", "after error");
    assert_eq!(s.expect_event(&what("after error")).id.as_deref(), Some(after.as_str()));

    // Many streams spread across both cores all receive an event.
    let mut many: Vec<SseStream> = (0..20).map(|_| server.subscribe(&["wide"])).collect();
    let wide = server.publish("wide", "to all");
    for (i, m) in many.iter_mut().enumerate() {
        assert_eq!(m.expect_event(&what(&format!("wide {i}"))).id.as_deref(), Some(wide.as_str()));
    }

    // Every delivery went out in some send, and no send carried frames nobody queued.
    let m = server.metrics();
    let (sends, frames) = (metric(&m, "ringcast_stream_sends_total"), metric(&m, "ringcast_frames_queued_total"));
    assert!(sends >= 20.0, "{label}: {sends} sends for 20 streams' event");
    assert!(frames >= 26.0, "{label}: frames queued {frames}");
    assert_eq!(metric(&m, "ringcast_stream_backlogs_total"), 0.0, "{label}: nobody is slow here");

    // Closing streams removes them.
    drop(many);
    drop(s);
    server.wait_for_metric("ringcast_subscribers", Duration::from_secs(10), |v| v == 0.0);
}

fn run_core_checks(args: &[&str]) {
    let server = Server::start(args);
    core_checks(&server, &args.join(" "));
}

#[test]
fn epoll_driver() {
    run_core_checks(&["--driver", "epoll", "--cores", "2"]);
}

#[test]
fn uring_driver() {
    if uring_disabled() {
        eprintln!("SKIPPED: kernel.io_uring_disabled=2; --driver uring cannot run here");
        return;
    }
    run_core_checks(&["--driver", "uring", "--cores", "2"]);
}

#[test]
fn auto_driver() {
    run_core_checks(&["--driver", "auto", "--cores", "2"]);
}

#[test]
fn batched_writes_keep_events_whole_and_ordered() {
    run_core_checks(&["--batch-window", "20ms", "--cores", "2"]);
}

#[test]
fn sendmsg_sends() {
    run_core_checks(&["--send", "sendmsg", "--cores", "2"]);
}

#[test]
fn uring_sends_on_the_epoll_driver() {
    if uring_disabled() {
        eprintln!("SKIPPED: kernel.io_uring_disabled=2; --send uring cannot run here");
        return;
    }
    run_core_checks(&["--send", "uring", "--driver", "epoll", "--cores", "2"]);
}

#[test]
fn unbatched_writes_keep_events_whole_and_ordered() {
    // --batch-max 1: every frame its own broker batch and its own sendmsg.
    run_core_checks(&["--batch-max", "1", "--cores", "2"]);
}

#[test]
fn auto_falls_back_to_epoll_when_the_ring_cannot_be_built() {
    // 65536 entries is refused by the kernel (EINVAL), so io_uring cannot be built.
    let server = Server::start(&["--driver", "auto", "--uring-entries", "65536", "--log-level", "info"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.stderr_log().contains("falling back to epoll") {
        assert!(Instant::now() < deadline, "no fallback log line; stderr:\n{}", server.stderr_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    core_checks(&server, "auto fallback to epoll");
}

#[test]
fn uring_driver_that_cannot_be_built_exits_1() {
    let mut child = support::command()
        .args(["--listen", "127.0.0.1:0", "--driver", "uring", "--uring-entries", "65536"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
            panic!("--driver uring with an unbuildable ring kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(1), "exit status {status}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"), "it started listening");
}
