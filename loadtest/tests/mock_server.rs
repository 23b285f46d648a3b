//! End-to-end runs of the load generator against a small in-process SSE
//! server (thread per connection), so the tool is tested without ringcast:
//! chunked and plain streams, several topics and publishers, pipelining, and
//! the multi-process mode.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

type Subscribers = Arc<Mutex<HashMap<String, Vec<(TcpStream, bool)>>>>;

/// Starts the mock server; returns its address.
///
/// `GET /events?topic=T` or `GET /sub/T` subscribes (chunked for HTTP/1.1,
/// plain for HTTP/1.0); `POST /publish?topic=T` or `POST /pub/T` publishes the body.
/// With `split_events`, each event is written as several chunks. Publishes to a topic whose
/// name starts with `slow` are answered 100 ms late (after the event went out).
fn start_mock(split_events: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let subs: Subscribers = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let subs = subs.clone();
            std::thread::spawn(move || serve(stream, subs, split_events));
        }
    });
    addr
}

fn topic_of(target: &str) -> Option<String> {
    if let Some(q) = target.split_once("?topic=") {
        return Some(q.1.split('&').next().unwrap().to_string());
    }
    target.strip_prefix("/sub/").or_else(|| target.strip_prefix("/pub/")).map(str::to_string)
}

fn serve(stream: TcpStream, subs: Subscribers, split_events: bool) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    let mut next_id = 0u64;
    let (answers, queued) = std::sync::mpsc::channel::<(Instant, String)>();
    let mut answer_out = out.try_clone().unwrap();
    std::thread::spawn(move || {
        for (due, resp) in queued {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if answer_out.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    });
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.trim().parse().unwrap();
                }
            }
        }
        let mut parts = request_line.split_whitespace();
        let (method, target, version) =
            (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let Some(topic) = topic_of(target) else {
            let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        match method {
            "GET" => {
                let chunked = version == "HTTP/1.1";
                let head = if chunked {
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nretry: 2000\n:ok\n\r\n"
                } else {
                    "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\nretry: 2000\n:ok\n"
                };
                let mut map = subs.lock().unwrap();
                if out.write_all(head.as_bytes()).is_ok() {
                    map.entry(topic).or_default().push((out.try_clone().unwrap(), chunked));
                }
                drop(map);
                // Hold the connection until the client closes it.
                let mut sink = [0u8; 256];
                while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
                return;
            }
            "POST" => {
                let mut body = vec![0u8; content_length];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                next_id += 1;
                let event = format!("id: {next_id}\nevent: lt\ndata: {}\n\n", String::from_utf8(body).unwrap());
                let mut map = subs.lock().unwrap();
                if let Some(list) = map.get_mut(&topic) {
                    list.retain_mut(|(s, chunked)| {
                        let bytes = event.as_bytes();
                        if !*chunked {
                            return s.write_all(bytes).is_ok();
                        }
                        let pieces: Vec<&[u8]> = if split_events { bytes.chunks(7).collect() } else { vec![bytes] };
                        let mut framed = Vec::new();
                        for p in pieces {
                            framed.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
                            framed.extend_from_slice(p);
                            framed.extend_from_slice(b"\r\n");
                        }
                        s.write_all(&framed).is_ok()
                    });
                }
                drop(map);
                let delay = if topic.starts_with("slow") { Duration::from_millis(100) } else { Duration::ZERO };
                let body = format!("{{\"id\":\"{next_id}\"}}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                // Answers leave in order from their own thread, each `delay` after its request.
                if answers.send((Instant::now() + delay, resp)).is_err() {
                    return;
                }
            }
            _ => {
                let _ =
                    out.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                return;
            }
        }
    }
}

fn loadtest(addr: SocketAddr, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast-loadtest"))
        .arg(format!("http://{addr}"))
        .args(["--json", "--quiet", "--grace", "10s", "--settle", "100ms"])
        .args(extra)
        .output()
        .expect("run ringcast-loadtest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadtest failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

fn assert_complete(r: &Value, subscribers: u64, events: u64) {
    assert_eq!(r["connect"]["connected"], subscribers, "{r}");
    assert_eq!(r["connect"]["failed"], 0, "{r}");
    assert_eq!(r["publish"]["published"], events, "{r}");
    assert_eq!(r["delivery"]["delivered"], r["delivery"]["expected"], "{r}");
    assert_eq!(r["delivery"]["duplicates"], 0, "{r}");
    assert_eq!(r["delivery"]["foreign"], 0, "{r}");
    assert_eq!(r["delivery"]["delivered_pct"], 100.0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    let lat = &r["latency"];
    assert_eq!(lat["count"], r["delivery"]["delivered"], "{r}");
    assert!(lat["p50_us"].as_f64().unwrap() > 0.0, "{r}");
    assert!(lat["p50_us"].as_f64() <= lat["p99_us"].as_f64(), "{r}");
    assert!(lat["p99_us"].as_f64() <= lat["max_us"].as_f64(), "{r}");
}

#[test]
fn chunked_burst_one_topic() {
    let addr = start_mock(false);
    let r = loadtest(addr, &["-c", "50", "--burst", "40", "--threads", "2"]);
    assert_complete(&r, 50, 40);
    assert_eq!(r["delivery"]["expected"], 50 * 40);
    assert_eq!(r["mode"], "burst");
    assert_eq!(r["processes"], 1);
}

#[test]
fn split_chunks_many_topics_and_publishers() {
    let addr = start_mock(true);
    let r = loadtest(
        addr,
        &["-c", "60", "--topics", "3", "--burst", "90", "--publishers", "3", "--pipeline", "4", "--size", "300"],
    );
    assert_complete(&r, 60, 90);
    // 20 subscribers per topic, 30 events per topic.
    assert_eq!(r["delivery"]["expected"], 60 * 30);
}

#[test]
fn plain_http10_stream_and_nchan_style_paths() {
    let addr = start_mock(false);
    let r = loadtest(
        addr,
        &["-c", "20", "--burst", "25", "--http10", "--sub-path", "/sub/{topic}", "--pub-path", "/pub/{topic}"],
    );
    assert_complete(&r, 20, 25);
}

#[test]
fn rate_mode_with_server_pid() {
    let addr = start_mock(false);
    // The mock runs inside this test process, so its pid is ours.
    let pid = std::process::id().to_string();
    let r = loadtest(addr, &["-c", "10", "--rate", "200", "--duration", "1s", "--server-pid", &pid]);
    let published = r["publish"]["published"].as_u64().unwrap();
    // 200 on schedule; a loaded machine may fall behind (publishing stops at the end).
    assert!((100..=201).contains(&published), "{r}");
    assert_complete(&r, 10, published);
    assert_eq!(r["mode"], "rate");
    let rate = r["publish"]["rate"].as_f64().unwrap();
    assert!(rate > 90.0 && rate < 250.0, "{r}");
    let server = &r["server"];
    assert!(server["cpu_s"].as_f64().unwrap() >= 0.0, "{r}");
    assert!(server["rss_before_bytes"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn rate_mode_is_open_loop_when_answers_are_slow() {
    // Every answer takes 100 ms: a publisher that waited for each answer would publish ~10
    // events in the second; open-loop it keeps the offered 100/s and the latency measured from
    // each event's scheduled time stays small because delivery itself is not delayed.
    let addr = start_mock(false);
    let r = loadtest(addr, &["-c", "5", "--rate", "100", "--duration", "1s", "--topic-prefix", "slow"]);
    let published = r["publish"]["published"].as_u64().unwrap();
    assert!(published >= 90, "publisher waited for answers: {r}");
    assert_complete(&r, 5, published);
    // Answers are 100 ms late, so the publish round trip shows it.
    assert!(r["publish"]["rtt"]["p50_us"].as_f64().unwrap() >= 100_000.0, "{r}");
}

#[test]
fn several_processes() {
    let addr = start_mock(false);
    let r = loadtest(addr, &["-c", "250", "--max-per-process", "100", "--burst", "20", "--threads", "3"]);
    assert_eq!(r["processes"], 3);
    assert_complete(&r, 250, 20);
    assert!(r["loadtest_cpu_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn refused_connections_are_counted() {
    // Nothing listens on this port once the listener is dropped.
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast-loadtest"))
        .arg(format!("http://{addr}"))
        .args(["--json", "-q", "-c", "5", "--burst", "3", "--grace", "100ms"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["connect"]["connected"], 0);
    assert_eq!(r["connect"]["failed"], 5);
    assert_eq!(r["publish"]["errors"], 3);
    assert!(r["first_error"].as_str().unwrap().contains("refused"), "{r}");
}

#[test]
fn connect_timeout_cuts_off_silent_servers() {
    // The kernel completes the handshakes (backlog), but nobody ever answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast-loadtest"))
        .arg(format!("http://{addr}"))
        .args(["--json", "-q", "-c", "4", "--burst", "1", "--grace", "100ms"])
        .args(["--connect-timeout", "500ms", "--publish-timeout", "1s"])
        .output()
        .unwrap();
    drop(listener);
    assert!(out.status.success());
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["connect"]["connected"], 0, "{r}");
    assert_eq!(r["connect"]["failed"], 4, "{r}");
    assert!(r["connect"]["seconds"].as_f64().unwrap() >= 0.5, "{r}");
    assert!(r["first_error"].as_str().unwrap().contains("timeout"), "{r}");
    assert_eq!(r["publish"]["errors"], 1, "{r}");
}

#[test]
fn replay_without_history_ends_after_grace_unverified() {
    // The mock answers publishes with an id but keeps no history: nothing is replayed.
    let addr = start_mock(false);
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast-loadtest"))
        .arg(format!("http://{addr}"))
        .args(["--json", "-q", "-c", "5", "--replay", "10", "--grace", "300ms"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["mode"], "replay", "{r}");
    assert_eq!(r["last_event_id"], "1", "{r}");
    assert_eq!(r["publish"]["published"], 10, "{r}");
    assert_eq!(r["connect"]["connected"], 5, "{r}");
    assert_eq!(r["replay"]["expected"], 50, "{r}");
    assert_eq!(r["replay"]["delivered"], 0, "{r}");
    assert_eq!(r["replay"]["complete_subscribers"], 0, "{r}");
    assert_eq!(r["replay"]["verified"], false, "{r}");
}
