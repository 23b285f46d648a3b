//! gzip event streams (docs/CONTRACT.md, "gzip streams"): negotiation and wire format over raw
//! TCP, and whole streams decoded by independent inflaters: `curl --compressed` (libcurl's zlib)
//! and `tests/python/gzip_client.py` (Python's zlib, one chunk at a time).
//!
//! Needs `curl` and `python3` on PATH (scripts/test.sh installs them); when missing, the tests
//! that use them FAIL with a message saying so.

mod support;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use support::{show, Server, SseStream, IO_TIMEOUT};

const TOPIC: &str = "g";
/// The decoded opening lines of every stream.
const OPENING: &str = "retry: 2000\n:ok\n";
/// Heartbeats would interleave with the exact texts compared below; these tests run for seconds.
const SERVER_ARGS: [&str; 2] = ["--heartbeat", "60s"];
const HOW_TO_FIX: &str = "run scripts/test.sh once (it installs curl and python3)";

// ---------------------------------------------------------------------------------------------
// Payloads and expected frames
// ---------------------------------------------------------------------------------------------

/// Event `i` of a mixed run: even ones small (under --gzip-min-bytes, some multi-line), odd ones
/// about 8 KiB of JSON-ish text (compressible, deflated), some of those multi-line too.
fn payload(i: usize) -> String {
    if i % 2 == 0 {
        if i % 4 == 0 {
            format!("small {i}: first line\nsmall {i}: second line {{\"n\":{i}}}")
        } else {
            format!("small {i} \u{e9}t\u{e9} \u{1f600}")
        }
    } else {
        large(i)
    }
}

/// About 8 KiB of JSON rows; rows are separate lines when `i % 4 == 3`.
fn large(i: usize) -> String {
    let sep = if i % 4 == 3 { "\n" } else { "," };
    let mut rows = Vec::new();
    let mut len = 0;
    let mut k = 0;
    while len < 8 * 1024 {
        let row = format!(
            "{{\"event\":{i},\"row\":{k},\"sym\":\"EURUSD\",\"bid\":1.{:04},\"ask\":1.{:04},\"venue\":\"LDN\"}}",
            (i * 31 + k * 7) % 10_000,
            (i * 37 + k * 11) % 10_000
        );
        len += row.len() + 1;
        rows.push(row);
        k += 1;
    }
    rows.join(sep)
}

/// The plain SSE frame the contract specifies for an event without a name.
fn frame(id: &str, data: &str) -> String {
    let mut f = format!("id: {id}\n");
    for line in data.split('\n') {
        f.push_str("data: ");
        f.push_str(line);
        f.push('\n');
    }
    f.push('\n');
    f
}

/// Publishes event `i` of the mixed run; returns (id, data).
fn publish_mixed(server: &Server, i: usize) -> (String, String) {
    let data = payload(i);
    let id = server.publish(TOPIC, &data);
    (id, data)
}

// ---------------------------------------------------------------------------------------------
// Raw TCP streams
// ---------------------------------------------------------------------------------------------

/// `GET /events?topic=g` with an optional `Accept-Encoding`; body chunks are not parsed as SSE.
fn open_stream(server: &Server, accept_encoding: Option<&str>) -> (SseStream, String) {
    let mut req = format!("GET /events?topic={TOPIC} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n");
    if let Some(ae) = accept_encoding {
        req.push_str(&format!("Accept-Encoding: {ae}\r\n"));
    }
    req.push_str("\r\n");
    let s = SseStream::open_with(server.addr, &req).unwrap_or_else(|e| panic!("{req:?}: {e}"));
    s.head.assert_status(200, &req);
    assert!(s.head.is_chunked(), "{req:?}: stream is not chunked: {}", s.head.describe());
    (s.without_parsing(), req)
}

/// The non-final stored deflate block holding `data` (what a small event's gzip chunk is).
fn stored_block(data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(data.len()).expect("small frame");
    let mut out = vec![0x00];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// Asserts a response without gzip: no Content-Encoding and plain opening lines.
fn assert_plain(s: &mut SseStream, req: &str) {
    assert_eq!(s.head.header("content-encoding"), None, "{req:?}: {}", s.head.describe());
    let first = s.expect_chunk(&format!("{req:?} opening chunk"));
    assert_eq!(first, OPENING.as_bytes(), "{req:?}: opening chunk {:?}", show(&first));
}

#[test]
fn gzip_negotiation_and_wire_format() {
    let server = Server::start(&SERVER_ARGS);

    let (mut gz, req) = open_stream(&server, Some("gzip"));
    assert_eq!(gz.head.header("content-encoding"), Some("gzip"), "{req:?}: {}", gz.head.describe());
    let vary = gz.head.headers_named("vary").join(",");
    assert!(
        vary.split(',').any(|v| v.trim().eq_ignore_ascii_case("accept-encoding")),
        "{req:?}: no Vary: Accept-Encoding: {}",
        gz.head.describe()
    );
    assert!(
        gz.head.header("content-type").is_some_and(|v| v.starts_with("text/event-stream")),
        "{req:?}: {}",
        gz.head.describe()
    );
    let first = gz.expect_chunk("gzip opening chunk");
    assert!(first.len() > 10, "gzip opening chunk too short: {}", hex(&first));
    assert_eq!(&first[..3], &[0x1f, 0x8b, 0x08], "gzip opening chunk: {}", hex(&first[..first.len().min(32)]));

    let (mut plain, req) = open_stream(&server, None);
    assert_plain(&mut plain, &req);
    let (mut refused, req) = open_stream(&server, Some("gzip;q=0"));
    assert_plain(&mut refused, &req);
    let (mut other, req) = open_stream(&server, Some("br, zstd"));
    assert_plain(&mut other, &req);

    server.wait_for_metric("ringcast_subscribers", IO_TIMEOUT, |v| v == 4.0);

    // A small event: its gzip chunk is exactly one stored block of the plain frame.
    let id = server.publish(TOPIC, "hi");
    let want = frame(&id, "hi");
    for (s, what) in [(&mut plain, "plain"), (&mut refused, "gzip;q=0"), (&mut other, "br, zstd")] {
        let chunk = s.expect_chunk(what);
        assert_eq!(chunk, want.as_bytes(), "{what}: small event chunk {:?}", show(&chunk));
    }
    let chunk = gz.expect_chunk("gzip small event");
    assert_eq!(
        chunk,
        stored_block(want.as_bytes()),
        "gzip small event {want:?}: chunk is not one stored block of the frame: {}",
        hex(&chunk)
    );

    // A large compressible event: one deflated, sync-flushed, non-final segment.
    let data = large(1);
    let id = server.publish(TOPIC, &data);
    let want = frame(&id, &data);
    let chunk = plain.expect_chunk("plain large event");
    assert!(chunk == want.as_bytes(), "plain large event: got {:?}", show(&chunk));
    let chunk = gz.expect_chunk("gzip large event");
    assert!(
        chunk.len() < want.len() / 2,
        "gzip large event: {} bytes for a {}-byte compressible frame (not deflated?): {}",
        chunk.len(),
        want.len(),
        hex(&chunk[..chunk.len().min(32)])
    );
    assert_eq!(chunk[0] & 1, 0, "gzip large event: first block is final (BFINAL=1): {}", hex(&chunk[..8]));
    assert!(
        matches!((chunk[0] >> 1) & 3, 1 | 2),
        "gzip large event: first block type {} is not fixed/dynamic Huffman: {}",
        (chunk[0] >> 1) & 3,
        hex(&chunk[..8])
    );
    assert!(
        chunk.ends_with(&[0x00, 0x00, 0xff, 0xff]),
        "gzip large event: segment does not end with a sync flush: ...{}",
        hex(&chunk[chunk.len().saturating_sub(8)..])
    );
    for (s, what) in [(&mut refused, "gzip;q=0"), (&mut other, "br, zstd")] {
        let chunk = s.expect_chunk(what);
        assert!(chunk == want.as_bytes(), "{what}: large event chunk {:?}", show(&chunk));
    }
}

#[test]
fn gzip_subscribers_metric_counts_gzip_streams() {
    let server = Server::start(&SERVER_ARGS);
    let (gz, _) = open_stream(&server, Some("gzip"));
    let (_plain, _) = open_stream(&server, None);
    let (_refused, _) = open_stream(&server, Some("gzip;q=0"));
    server.wait_for_metric("ringcast_subscribers", IO_TIMEOUT, |v| v == 3.0);
    let m = server.metrics();
    assert!(
        m.contains_key("ringcast_gzip_subscribers"),
        "/metrics has no ringcast_gzip_subscribers (docs/CONTRACT.md, gzip streams); it has {:?}",
        m.keys().collect::<Vec<_>>()
    );
    server.wait_for_metric("ringcast_gzip_subscribers", IO_TIMEOUT, |v| v == 1.0);
    drop(gz);
    server.wait_for_metric("ringcast_subscribers", IO_TIMEOUT, |v| v == 2.0);
    server.wait_for_metric("ringcast_gzip_subscribers", IO_TIMEOUT, |v| v == 0.0);
}

#[test]
fn no_gzip_flag_sends_plain_frames() {
    let server = Server::start(&["--no-gzip", "--heartbeat", "60s"]);
    let (mut s, req) = open_stream(&server, Some("gzip, deflate, br, zstd"));
    assert_plain(&mut s, &req);
    server.wait_for_metric("ringcast_subscribers", IO_TIMEOUT, |v| v == 1.0);
    let data = large(3);
    let id = server.publish(TOPIC, &data);
    let chunk = s.expect_chunk("--no-gzip large event");
    assert!(chunk == frame(&id, &data).as_bytes(), "--no-gzip: got {:?}", show(&chunk));
}

// ---------------------------------------------------------------------------------------------
// Child processes (curl, python3)
// ---------------------------------------------------------------------------------------------

/// A child whose stdout arrives line by line (or raw, collected) on threads; killed on drop.
struct Proc {
    child: Child,
    what: String,
    lines: mpsc::Receiver<String>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}\n=> {HOW_TO_FIX}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        {
            let pipe = child.stdout.take().unwrap();
            let stdout = Arc::clone(&stdout);
            thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            stdout.lock().unwrap().extend_from_slice(&line);
                            let _ = tx.send(String::from_utf8_lossy(&line).trim_end_matches('\n').to_string());
                        }
                    }
                }
            });
        }
        {
            let mut pipe = child.stderr.take().unwrap();
            let stderr = Arc::clone(&stderr);
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        Proc { child, what, lines, stdout, stderr }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    fn stdout(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    /// The next stdout line, or a panic with the child's stderr (and exit status) on timeout/EOF.
    fn line(&mut self, waiting_for: &str) -> String {
        match self.lines.recv_timeout(IO_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                let status = self.wait(Duration::from_millis(500));
                panic!(
                    "{}: no stdout line while waiting for {waiting_for} ({e:?}); exit {status:?}; stderr:\n{}",
                    self.what,
                    self.stderr()
                )
            }
        }
    }

    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `python3 tests/python/gzip_client.py URL N`.
fn python_client(server: &Server, n: usize) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.current_dir(repo_root())
        .arg("tests/python/gzip_client.py")
        .arg(format!("http://{}/events?topic={TOPIC}", server.addr))
        .arg(n.to_string());
    Proc::spawn(cmd)
}

/// One JSON line of the client's output.
fn client_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("client line is not JSON ({e}): {line:?}"))
}

/// A string member of a client line.
fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key:?} is not a string in {v}"))
}

/// A number member of a client line.
fn number(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key:?} is not a number in {v}"))
}

/// Reads the client's `head` and `open` lines and checks them.
fn python_opened(py: &mut Proc) {
    let head = client_line(&py.line("head line"));
    assert_eq!(text(&head, "type"), "head", "{head}");
    assert_eq!(number(&head, "status"), 200.0, "{head}");
    let headers = &head["headers"];
    assert_eq!(text(headers, "content-encoding"), "gzip", "{head}");
    assert!(text(headers, "vary").to_ascii_lowercase().contains("accept-encoding"), "{head}");
    let open = client_line(&py.line("open line"));
    assert_eq!(text(&open, "type"), "open", "{open}");
    assert_eq!(text(&open, "text"), OPENING, "decoded opening chunk");
}

/// The next `event` line: (id, data, chunk index).
fn python_event(py: &mut Proc, what: &str) -> (String, String, usize) {
    let line = py.line(what);
    let ev = client_line(&line);
    assert_eq!(text(&ev, "type"), "event", "{what}: {}", show(line.as_bytes()));
    assert!(ev["event"].is_null(), "{what}: unexpected event name in {}", show(line.as_bytes()));
    (text(&ev, "id").to_string(), text(&ev, "data").to_string(), number(&ev, "chunk") as usize)
}

/// Reads the `done` line and asserts exit 0.
fn python_done(py: &mut Proc, events: usize) {
    let done = client_line(&py.line("done line"));
    assert_eq!(text(&done, "type"), "done", "{done}");
    assert_eq!(number(&done, "events") as usize, events, "{done}");
    let status = py.wait(IO_TIMEOUT);
    assert!(matches!(status, Some(s) if s.success()), "{}: exit {status:?}; stderr:\n{}", py.what, py.stderr());
}

/// First difference between two texts, for failure messages.
fn first_difference(got: &str, want: &str) -> String {
    let at = got.bytes().zip(want.bytes()).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    let from = at.saturating_sub(80);
    format!(
        "got {} bytes, want {}; first difference at byte {at}:\n  got  ...{:?}\n  want ...{:?}",
        got.len(),
        want.len(),
        got.get(from..(at + 80).min(got.len())).unwrap_or("<not at a char boundary>"),
        want.get(from..(at + 80).min(want.len())).unwrap_or("<not at a char boundary>"),
    )
}

// ---------------------------------------------------------------------------------------------
// curl --compressed
// ---------------------------------------------------------------------------------------------

#[test]
fn curl_compressed_decodes_small_and_large_events() {
    const EVENTS: usize = 20;
    const MAX_TIME_S: u64 = 3;
    let server = Server::start(&SERVER_ARGS);
    let url = format!("http://{}/events?topic={TOPIC}", server.addr);
    let mut cmd = Command::new("curl");
    // -D -: the response head goes to stdout before the decoded body.
    cmd.args(["-sSN", "--compressed", "-D", "-", "--max-time", &MAX_TIME_S.to_string(), &url]);
    let started = Instant::now();
    let mut curl = Proc::spawn(cmd);
    server.wait_for_metric("ringcast_subscribers", IO_TIMEOUT, |v| v == 1.0);

    let mut want = String::from(OPENING);
    for i in 0..EVENTS {
        let (id, data) = publish_mixed(&server, i);
        want.push_str(&frame(&id, &data));
    }
    assert!(
        started.elapsed() < Duration::from_secs(MAX_TIME_S),
        "publishing took past curl's --max-time; the check below would be void"
    );

    // curl ends at --max-time with code 28: the stream stayed open and decoded without error
    // (a decoding failure is code 61, a stream ended by the server 0 or 18).
    let status = curl.wait(Duration::from_secs(MAX_TIME_S) + IO_TIMEOUT);
    let out = String::from_utf8(curl.stdout()).unwrap_or_else(|e| panic!("curl output is not UTF-8: {e}"));
    let (head, got) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("curl printed no response head: {out:?}"));
    // curl --compressed sent Accept-Encoding: deflate, gzip[, br, zstd]; it must have got gzip.
    let head_lc = head.to_ascii_lowercase();
    assert!(head_lc.starts_with("http/1.1 200"), "curl got {head:?}");
    assert!(head_lc.contains("\r\ncontent-encoding: gzip"), "curl's response was not gzip: {head:?}");
    assert!(
        matches!(status.and_then(|s| s.code()), Some(28)),
        "curl exit {status:?} (want 28, --max-time); stderr: {}\n{}",
        curl.stderr(),
        first_difference(got, &want)
    );
    assert!(
        got == want,
        "curl --compressed output differs from the published events: {}",
        first_difference(got, &want)
    );
}

// ---------------------------------------------------------------------------------------------
// Python zlib client, chunk by chunk
// ---------------------------------------------------------------------------------------------

#[test]
fn python_zlib_client_decodes_each_chunk_as_it_arrives() {
    const EVENTS: usize = 24;
    let server = Server::start(&SERVER_ARGS);
    let mut py = python_client(&server, EVENTS);
    python_opened(&mut py);

    // Lockstep: event i is published only after the client has printed event i-1, so every
    // event was decoded from the chunks received so far, long before the stream ends.
    let mut last_chunk = 0;
    for i in 0..EVENTS {
        let (id, data) = publish_mixed(&server, i);
        let (got_id, got_data, chunk) = python_event(&mut py, &format!("event {i}"));
        assert_eq!(got_id, id, "event {i}: id");
        assert!(
            got_data == data,
            "event {i} ({} bytes): decoded data differs: {}",
            data.len(),
            first_difference(&got_data, &data)
        );
        assert!(
            chunk > last_chunk,
            "event {i} completed in chunk {chunk}, after chunk {last_chunk}: not one per event"
        );
        last_chunk = chunk;
    }
    python_done(&mut py, EVENTS);
}

#[test]
fn two_gzip_subscribers_and_a_plain_one_get_the_same_events() {
    const EVENTS: usize = 12;
    let server = Server::start(&SERVER_ARGS);
    let mut a = python_client(&server, EVENTS);
    let mut b = python_client(&server, EVENTS);
    python_opened(&mut a);
    python_opened(&mut b);
    let (mut plain, req) = open_stream(&server, None);
    assert_plain(&mut plain, &req);
    server.wait_for_metric("ringcast_subscribers", IO_TIMEOUT, |v| v == 3.0);

    let published: Vec<(String, String)> = (0..EVENTS).map(|i| publish_mixed(&server, i)).collect();

    for (i, (id, data)) in published.iter().enumerate() {
        let chunk = plain.expect_chunk(&format!("plain subscriber, event {i}"));
        let want = frame(id, data);
        assert!(
            chunk == want.as_bytes(),
            "plain subscriber, event {i}: got {:?}, want {:?}",
            show(&chunk),
            show(want.as_bytes())
        );
    }
    for (py, name) in [(&mut a, "gzip subscriber A"), (&mut b, "gzip subscriber B")] {
        for (i, (id, data)) in published.iter().enumerate() {
            let (got_id, got_data, _) = python_event(py, &format!("{name}, event {i}"));
            assert_eq!(&got_id, id, "{name}, event {i}: id");
            assert!(&got_data == data, "{name}, event {i}: {}", first_difference(&got_data, data));
        }
        python_done(py, EVENTS);
    }
}
