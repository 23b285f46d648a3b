//! Test support: starts the real `ringcast` binary and speaks raw HTTP/1.1 and SSE to it over TCP.
//!
//! Layout:
//! - `Server`: the child process guard (killed on drop), its address, pid, stderr log, signals.
//! - `Conn`: one client TCP connection with a read buffer; reads whole HTTP responses (pipelining).
//! - `Response`: status, headers and decoded body (Content-Length, chunked or read-to-close).
//! - `ChunkDecoder` / `SseParser`: push decoders for chunked framing and the event-stream format.
//! - `SseStream`: a blocking stream client built on both.
//! - `publish*`, `metrics`, `wait_for_metric`: small helpers over the endpoints.
//! - `redis::Redis`: a real redis-server on a free port (multi-node tests).
//! - `relay::Relay`: a TCP relay a test can cut (network cuts without touching either side).
//! - `nginx::Nginx`: real nginx running deploy/nginx.conf in front of two nodes.
#![allow(dead_code)]

pub mod browser;
pub mod nginx;
pub mod redis;
pub mod relay;

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Failure bound for any single read or write; never a pacing device.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Failure bound for the server to print its listening line (debug builds start slowly).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The stderr log kept per server; beyond this the log is truncated (the pipe is still drained).
const STDERR_KEEP: usize = 4 << 20;

// ---------------------------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------------------------

/// A running `ringcast` child; killed (SIGKILL) and reaped on drop unless it already exited.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
    stderr: Arc<Mutex<Vec<u8>>>,
    exit: Option<ExitStatus>,
}

impl Server {
    /// Starts the binary on `127.0.0.1:0` with `args` and waits for `ringcast listening on ...`.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// `start` with extra environment variables (e.g. `RINGCAST_HEARTBEAT`).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = command();
        cmd.envs(env.iter().copied())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ringcast binary");
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout pipe");
        let stderr_pipe = child.stderr.take().expect("stderr pipe");

        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let stderr = Arc::clone(&stderr);
            thread::spawn(move || drain_stderr(stderr_pipe, stderr));
        }
        let (tx, rx) = mpsc::channel::<String>();
        thread::spawn(move || {
            // Keeps reading stdout for the whole life of the child so the pipe never fills.
            let reader = BufReader::new(stdout);
            for line in reader.lines() {
                match line {
                    Ok(line) => {
                        let _ = tx.send(line);
                    }
                    Err(_) => break,
                }
            }
        });

        // The guard exists before we wait, so a panic below still kills the child.
        let mut server = Server { child, addr: "127.0.0.1:0".parse().unwrap(), pid, stderr, exit: None };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut stdout_seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("ringcast listening on ") {
                        server.addr = rest
                            .trim()
                            .parse()
                            .unwrap_or_else(|e| panic!("unparsable listening address {rest:?}: {e}"));
                        assert_eq!(server.addr.ip().to_string(), "127.0.0.1", "server printed {line:?}");
                        assert_ne!(server.addr.port(), 0, "server printed port 0: {line:?}");
                        return server;
                    }
                    stdout_seen.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    thread::sleep(Duration::from_millis(200));
                    panic!(
                        "ringcast {args:?} closed stdout without a listening line; exit {:?}; \
                         stdout {stdout_seen:?}; stderr:\n{}",
                        server.child.try_wait(),
                        server.stderr_log()
                    );
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                thread::sleep(Duration::from_millis(200));
                panic!(
                    "ringcast {args:?} exited early with {status}; stdout {stdout_seen:?}; \
                     stderr:\n{}",
                    server.stderr_log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "ringcast {args:?} printed no listening line within {START_TIMEOUT:?}; \
                     stdout {stdout_seen:?}; stderr:\n{}",
                    server.stderr_log()
                );
            }
        }
    }

    /// What the server has written to stderr so far (lossy UTF-8).
    pub fn stderr_log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Sends a signal by name (`TERM`, `INT`) with the `kill` utility.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.pid.to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{name} {} failed: {status}", self.pid);
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit {
            return Some(status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exit = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size of the server process from `/proc/PID/status`, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("read /proc/PID/status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
        let kib: u64 =
            line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().expect("VmRSS number");
        kib * 1024
    }

    /// Opens a client connection with the standard timeouts.
    pub fn connect(&self) -> Conn {
        Conn::connect(self.addr)
    }

    /// One request on a fresh connection, one response back.
    pub fn request(&self, raw: &[u8]) -> Response {
        let mut conn = self.connect();
        conn.send(raw);
        conn.read_response().unwrap_or_else(|e| panic!("no response to {:?}: {e}", show(raw)))
    }

    /// `GET path` on a fresh connection.
    pub fn get(&self, path: &str) -> Response {
        self.request(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
    }

    /// Publishes `data` as a raw body to one topic and returns the event id.
    pub fn publish(&self, topic: &str, data: &str) -> String {
        publish(self.addr, topic, data)
    }

    pub fn metrics(&self) -> HashMap<String, f64> {
        metrics(self.addr)
    }

    /// Polls `/metrics` until `name` satisfies `pred` or `timeout` passes (then panics).
    pub fn wait_for_metric(&self, name: &str, timeout: Duration, pred: impl Fn(f64) -> bool) -> f64 {
        wait_for_metric(self.addr, name, timeout, pred)
    }

    /// Opens a stream on `topics`, checks the 200 head and reads the opening chunk.
    pub fn subscribe(&self, topics: &[&str]) -> SseStream {
        SseStream::subscribe(self.addr, topics)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exit.is_none() {
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
        if thread::panicking() {
            let log = self.stderr_log();
            if !log.is_empty() {
                let tail = &log[log.len().saturating_sub(4000)..];
                eprintln!("---- ringcast (pid {}) stderr tail ----\n{tail}", self.pid);
            }
        }
    }
}

/// The binary with a clean `RINGCAST_*` environment and `warn` logging.
pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RINGCAST_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RINGCAST_LOG_LEVEL", "warn");
    cmd
}

fn drain_stderr(mut pipe: impl Read, log: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut log = log.lock().unwrap();
                if log.len() < STDERR_KEEP {
                    log.extend_from_slice(&buf[..n]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client connection and responses
// ---------------------------------------------------------------------------------------------

/// A client connection from a chosen loopback source address (e.g. 127.0.0.2).
pub fn connect_from(source: [u8; 4], to: SocketAddr) -> Conn {
    let SocketAddr::V4(to) = to else { panic!("IPv4 expected") };
    let sockaddr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_be_bytes(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls with initialised arguments; the fd goes to the TcpStream.
    let stream: TcpStream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let from = sockaddr(source, 0);
        assert_eq!(libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len), 0, "bind {source:?}");
        let dest = sockaddr(to.ip().octets(), to.port());
        assert_eq!(libc::connect(fd, (&dest as *const libc::sockaddr_in).cast(), len), 0, "connect");
        std::os::fd::FromRawFd::from_raw_fd(fd)
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    Conn::from_stream(stream)
}

/// One client connection with its own read buffer, so pipelined responses can be read in turn.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Conn { stream, buf: Vec::new() }
    }

    /// Wraps a stream the caller connected (e.g. from a chosen source address).
    pub fn from_stream(stream: TcpStream) -> Conn {
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let _ = stream.set_nodelay(true);
        Conn { stream, buf: Vec::new() }
    }

    /// Writes all of `bytes`; panics on error.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap_or_else(|e| panic!("write {} bytes: {e}", bytes.len()));
    }

    /// Writes `bytes`, returning the error instead of panicking (for peers that may hang up).
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 65536];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes whatever is buffered (used by stream readers after the head).
    fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Reads one response head (status line and headers).
    pub fn read_head(&mut self) -> io::Result<Response> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return parse_head(&head);
            }
            if self.buf.len() > 1 << 20 {
                return Err(invalid("response head over 1 MiB"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed before a full response head; got {:?}", show(&self.buf)),
                ));
            }
        }
    }

    /// Reads one whole response: head, then the body as framed (length, chunked or close).
    pub fn read_response(&mut self) -> io::Result<Response> {
        let mut resp = self.read_head()?;
        if resp.status < 200 || resp.status == 204 || resp.status == 304 {
            resp.framing = Framing::Empty;
            return Ok(resp);
        }
        if resp.is_chunked() {
            let mut dec = ChunkDecoder::default();
            let mut body = Vec::new();
            let mut pending = self.take_buffered();
            loop {
                for chunk in dec.push(&pending).map_err(invalid)? {
                    body.extend_from_slice(&chunk);
                }
                if dec.is_done() {
                    self.buf = dec.take_rest();
                    break;
                }
                if self.fill()? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a chunked body",
                    ));
                }
                pending = self.take_buffered();
            }
            resp.body = body;
            resp.framing = Framing::Chunked;
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.trim().parse().map_err(|_| invalid(format!("bad Content-Length {len:?}")))?;
            while self.buf.len() < len {
                if self.fill()? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("closed after {} of {len} body bytes", self.buf.len()),
                    ));
                }
            }
            resp.body = self.buf.drain(..len).collect();
            resp.framing = Framing::ContentLength;
        } else {
            resp.body = self.read_to_end()?;
            resp.framing = Framing::Close;
        }
        Ok(resp)
    }

    /// Reads everything until the peer closes (buffered bytes included).
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? != 0 {}
        Ok(self.take_buffered())
    }

    /// True if the peer has closed (EOF or reset) with no further bytes; false if bytes arrive.
    /// A read timeout is returned as an error: the peer neither closed nor sent anything.
    pub fn closed_by_peer(&mut self) -> io::Result<bool> {
        if !self.buf.is_empty() {
            return Ok(false);
        }
        match self.fill() {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Asserts that the server closes the connection with no further bytes.
    pub fn assert_closed(&mut self, what: &str) {
        match self.closed_by_peer() {
            Ok(true) => {}
            Ok(false) => panic!("{what}: expected the server to close, got more bytes {:?}", show(&self.buf)),
            Err(e) => panic!("{what}: expected the server to close, read failed: {e}"),
        }
    }

    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Only a head was read.
    HeadOnly,
    /// 1xx/204/304: no body by definition.
    Empty,
    ContentLength,
    Chunked,
    /// No length and not chunked: body ran until the server closed.
    Close,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    /// Header names lower-cased, values trimmed, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub framing: Framing,
}

impl Response {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// Every header with this name.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().filter(|(n, _)| *n == name).map(|(_, v)| v.as_str()).collect()
    }

    pub fn is_chunked(&self) -> bool {
        self.headers_named("transfer-encoding").iter().any(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    pub fn body_str(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap_or_else(|_| panic!("body is not UTF-8: {:?}", show(&self.body)))
    }

    /// Asserts the status, printing the whole response on mismatch.
    pub fn assert_status(&self, status: u16, what: &str) {
        assert_eq!(self.status, status, "{what}: got {}", self.describe());
    }

    /// Asserts the response is framed by a correct Content-Length.
    pub fn assert_content_length(&self, what: &str) {
        assert_eq!(
            self.framing,
            Framing::ContentLength,
            "{what}: expected a Content-Length framed body, got {}",
            self.describe()
        );
        let len: usize = self.header("content-length").unwrap().parse().unwrap();
        assert_eq!(len, self.body.len(), "{what}");
    }

    /// Asserts `Connection: close` is among the headers.
    pub fn assert_connection_close(&self, what: &str) {
        let conn = self.headers_named("connection");
        assert!(
            conn.iter().any(|v| v.eq_ignore_ascii_case("close")),
            "{what}: expected Connection: close, got {}",
            self.describe()
        );
    }

    pub fn describe(&self) -> String {
        format!("{} {} {} {:?} body {:?}", self.version, self.status, self.reason, self.headers, show(&self.body))
    }
}

fn parse_head(head: &[u8]) -> io::Result<Response> {
    let text =
        std::str::from_utf8(head).map_err(|_| invalid(format!("response head is not UTF-8: {:?}", show(head))))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("").to_string();
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("bad status line {status_line:?}")));
    }
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once(':').ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        if name.is_empty() || name.contains(' ') {
            return Err(invalid(format!("bad header name in {line:?}")));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Response { version, status, reason, headers, body: Vec::new(), framing: Framing::HeadOnly })
}

// ---------------------------------------------------------------------------------------------
// Chunked transfer decoding
// ---------------------------------------------------------------------------------------------

/// Push decoder for `Transfer-Encoding: chunked`; strict about CRLFs and hex sizes.
#[derive(Default)]
pub struct ChunkDecoder {
    buf: Vec<u8>,
    done: bool,
}

impl ChunkDecoder {
    /// Feeds bytes; returns the complete chunk payloads now available (in order).
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::new();
        if self.done {
            self.buf.extend_from_slice(data);
            return Ok(out);
        }
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        loop {
            let Some(line_end) = find(&self.buf[pos..], b"\r\n") else {
                if self.buf.len() - pos > 1024 {
                    return Err(format!("chunk size line too long: {:?}", show(&self.buf[pos..pos + 64])));
                }
                break;
            };
            let line = &self.buf[pos..pos + line_end];
            let size_text =
                std::str::from_utf8(line).map_err(|_| format!("chunk size line not ASCII: {:?}", show(line)))?;
            let size_text = size_text.split(';').next().unwrap().trim();
            let size =
                usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size line {:?}", show(line)))?;
            let data_start = pos + line_end + 2;
            if size == 0 {
                // Trailer section: zero or more header lines, then an empty line.
                let mut p = data_start;
                loop {
                    let Some(e) = find(&self.buf[p..], b"\r\n") else {
                        self.buf.drain(..pos);
                        return Ok(out);
                    };
                    p += e + 2;
                    if e == 0 {
                        break;
                    }
                }
                self.done = true;
                self.buf.drain(..p);
                return Ok(out);
            }
            if self.buf.len() < data_start + size + 2 {
                break;
            }
            if &self.buf[data_start + size..data_start + size + 2] != b"\r\n" {
                return Err(format!(
                    "chunk of {size} bytes not followed by CRLF: {:?}",
                    show(&self.buf[data_start..(data_start + size + 2).min(self.buf.len())])
                ));
            }
            out.push(self.buf[data_start..data_start + size].to_vec());
            pos = data_start + size + 2;
        }
        self.buf.drain(..pos);
        Ok(out)
    }

    /// True once the terminal `0\r\n\r\n` chunk has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Bytes after the terminal chunk (the next pipelined response).
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Bytes received but not yet forming a whole chunk.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Encodes `body` as chunked transfer coding, one chunk per element.
pub fn chunked_body(chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Event-stream parsing (WHATWG rules: CRLF, LF and CR all end a line)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    /// `data` lines joined with `\n`.
    pub data: String,
    /// How many `data` lines the event had.
    pub data_lines: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    /// A block closed by a blank line that carried an `id`, `event` or `data` field.
    Event(SseEvent),
    /// A line starting with `:`; the text after the colon.
    Comment(String),
    /// A `retry:` field value (raw text).
    Retry(String),
}

/// Push parser for the event-stream format.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    has_fields: bool,
    /// Blank lines that closed a block holding no id/event/data (phantom events in some clients).
    pub empty_blocks: usize,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseItem>, String> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut out)?,
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut out)?;
                }
                _ => self.line.push(b),
            }
        }
        Ok(out)
    }

    fn end_line(&mut self, out: &mut Vec<SseItem>) -> Result<(), String> {
        let line = String::from_utf8(std::mem::take(&mut self.line))
            .map_err(|e| format!("event-stream line is not UTF-8: {e}"))?;
        if line.is_empty() {
            if self.has_fields {
                out.push(SseItem::Event(SseEvent {
                    id: self.id.take(),
                    event: self.event.take(),
                    data_lines: self.data.len(),
                    data: std::mem::take(&mut self.data).join("\n"),
                }));
                self.has_fields = false;
            } else {
                self.empty_blocks += 1;
            }
            return Ok(());
        }
        if let Some(comment) = line.strip_prefix(':') {
            out.push(SseItem::Comment(comment.to_string()));
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "data" => {
                self.data.push(value.to_string());
                self.has_fields = true;
            }
            "event" => {
                self.event = Some(value.to_string());
                self.has_fields = true;
            }
            "id" => {
                self.id = Some(value.to_string());
                self.has_fields = true;
            }
            "retry" => out.push(SseItem::Retry(value.to_string())),
            other => return Err(format!("unexpected event-stream field {other:?} in {line:?}")),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Blocking SSE stream client
// ---------------------------------------------------------------------------------------------

/// How the stream body is framed: chunked (HTTP/1.1) or raw until close (HTTP/1.0).
enum BodyMode {
    Chunked(ChunkDecoder),
    Raw,
}

/// A blocking event-stream client over one connection.
pub struct SseStream {
    pub conn: Conn,
    pub head: Response,
    mode: BodyMode,
    parser: SseParser,
    chunks: VecDeque<Vec<u8>>,
    items: VecDeque<SseItem>,
    /// Set when the terminal chunk arrived (chunked) or the server closed (raw).
    ended: bool,
    /// Set when the connection closed (EOF or reset) without the terminal chunk.
    unclean_end: bool,
    /// Whether chunks are fed to the event parser (off for bulk readers that check raw chunks).
    parse: bool,
}

impl SseStream {
    /// Sends `GET path` (HTTP/1.1) and reads the response head; does not check the status.
    pub fn open(addr: SocketAddr, path: &str) -> io::Result<SseStream> {
        Self::open_with(addr, &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"))
    }

    /// Sends an arbitrary request and reads the head; the body is treated as an event stream.
    pub fn open_with(addr: SocketAddr, request: &str) -> io::Result<SseStream> {
        let mut conn = Conn::connect(addr);
        conn.send(request.as_bytes());
        Self::read_from(conn)
    }

    /// Reads a stream response from a connection whose request was already sent (pipelining).
    pub fn read_from(mut conn: Conn) -> io::Result<SseStream> {
        let head = conn.read_head()?;
        let mode = if head.is_chunked() { BodyMode::Chunked(ChunkDecoder::default()) } else { BodyMode::Raw };
        let mut stream = SseStream {
            conn,
            head,
            mode,
            parser: SseParser::default(),
            chunks: VecDeque::new(),
            items: VecDeque::new(),
            ended: false,
            unclean_end: false,
            parse: true,
        };
        let buffered = stream.conn.take_buffered();
        stream.feed(&buffered)?;
        Ok(stream)
    }

    /// Opens `/events?topic=..` and asserts a 200 stream whose opening chunk starts with `retry:`.
    /// Returns once the opening chunk is read, i.e. once the server has registered the stream.
    pub fn subscribe(addr: SocketAddr, topics: &[&str]) -> SseStream {
        let path = events_path(topics);
        let mut s = SseStream::open(addr, &path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        s.head.assert_status(200, &path);
        assert!(s.head.is_chunked(), "{path}: stream is not chunked: {:?}", s.head);
        let first = s
            .next_chunk()
            .unwrap_or_else(|e| panic!("{path}: no opening chunk: {e}"))
            .unwrap_or_else(|| panic!("{path}: stream ended before the opening chunk"));
        assert!(first.starts_with(b"retry:"), "{path}: opening chunk {:?} does not start with retry:", show(&first));
        s
    }

    fn feed(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.mode {
            BodyMode::Chunked(dec) => {
                let chunks = dec.push(bytes).map_err(invalid)?;
                self.chunks.extend(chunks);
                if dec.is_done() {
                    self.ended = true;
                }
            }
            BodyMode::Raw => {
                if !bytes.is_empty() {
                    self.chunks.push_back(bytes.to_vec());
                }
            }
        }
        Ok(())
    }

    /// The next body chunk (raw payload); `None` once the stream has ended.
    /// For HTTP/1.0 streams a "chunk" is whatever one read returned. The chunk still passes
    /// through the event parser (so line state and `parser()` stay true), but the items it
    /// yields are dropped: the chunk *is* what the caller consumed.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let chunk = self.read_chunk()?;
        if let (Some(chunk), true) = (&chunk, self.parse) {
            self.parser.push(chunk).map_err(invalid)?;
        }
        Ok(chunk)
    }

    fn read_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(chunk) = self.chunks.pop_front() {
                return Ok(Some(chunk));
            }
            if self.ended {
                return Ok(None);
            }
            let mut tmp = [0u8; 65536];
            let n = match self.conn.stream.read(&mut tmp) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.ended = true;
                    self.unclean_end = true;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.ended = true;
                if matches!(self.mode, BodyMode::Chunked(_)) {
                    self.unclean_end = true;
                }
                return Ok(None);
            }
            self.feed(&tmp[..n])?;
        }
    }

    /// The next parsed item (event, comment or retry); `None` once the stream has ended.
    pub fn next_item(&mut self) -> io::Result<Option<SseItem>> {
        loop {
            if let Some(item) = self.items.pop_front() {
                return Ok(Some(item));
            }
            let Some(chunk) = self.read_chunk()? else {
                return Ok(None);
            };
            let items = self.parser.push(&chunk).map_err(invalid)?;
            self.items.extend(items);
        }
    }

    /// The next event, skipping comments and retry lines; an error if the stream ends first.
    pub fn next_event(&mut self) -> io::Result<SseEvent> {
        loop {
            match self.next_item()? {
                Some(SseItem::Event(ev)) => return Ok(ev),
                Some(_) => {}
                None => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended while waiting for an event"))
                }
            }
        }
    }

    /// `next_event` that panics with context on error.
    pub fn expect_event(&mut self, what: &str) -> SseEvent {
        self.next_event().unwrap_or_else(|e| panic!("{what}: no event: {e}"))
    }

    /// Reads the next chunk, skipping heartbeat chunks (`:\n`); panics on end or error.
    pub fn expect_chunk(&mut self, what: &str) -> Vec<u8> {
        loop {
            match self.next_chunk() {
                Ok(Some(c)) if c == b":\n" => continue,
                Ok(Some(c)) => return c,
                Ok(None) => panic!("{what}: stream ended"),
                Err(e) => panic!("{what}: read failed: {e}"),
            }
        }
    }

    /// Stops feeding chunks to the event parser; only `next_chunk` is meaningful afterwards.
    pub fn without_parsing(mut self) -> SseStream {
        self.parse = false;
        self
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    /// True if the connection closed without the terminal chunk (or was reset).
    pub fn unclean_end(&self) -> bool {
        self.unclean_end
    }

    /// Parser statistics (e.g. blank lines that closed empty blocks).
    pub fn parser(&self) -> &SseParser {
        &self.parser
    }
}

/// `/events?topic=a&topic=b`.
pub fn events_path(topics: &[&str]) -> String {
    let query: Vec<String> = topics.iter().map(|t| format!("topic={}", pct(t))).collect();
    format!("/events?{}", query.join("&"))
}

// ---------------------------------------------------------------------------------------------
// Publish and metrics
// ---------------------------------------------------------------------------------------------

/// Builds a `POST` request with a Content-Length body.
pub fn post_request(path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n", body.len());
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str("\r\n");
    let mut req = req.into_bytes();
    req.extend_from_slice(body);
    req
}

/// `POST /publish?topic=..` with a raw `text/plain` body; asserts 200 and returns the id.
pub fn publish(addr: SocketAddr, topic: &str, data: &str) -> String {
    let path = format!("/publish?topic={}", pct(topic));
    let resp = publish_request(addr, &path, Some("text/plain"), data.as_bytes());
    resp.assert_status(200, &format!("publish to {topic}"));
    publish_id(&resp)
}

/// One publish request on a fresh connection; returns the response unchecked.
pub fn publish_request(addr: SocketAddr, path: &str, content_type: Option<&str>, body: &[u8]) -> Response {
    let mut conn = Conn::connect(addr);
    conn.send(&post_request(path, content_type, body));
    conn.read_response().unwrap_or_else(|e| panic!("publish {path}: no response: {e}"))
}

/// Extracts the id from a publish answer `{"id":"<ms>-<seq>"}` and checks its shape.
pub fn publish_id(resp: &Response) -> String {
    let body = resp.body_str();
    let id = json_string_field(&body, "id").unwrap_or_else(|| panic!("publish answer has no \"id\" string: {body:?}"));
    parse_id(&id);
    id
}

/// Finds `"key": "value"` in a flat JSON object (no escapes in the value).
pub fn json_string_field(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let start = json.find(&pat)? + pat.len();
    let rest = json[start..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].to_string())
}

/// Parses an event id `<unix-ms>-<seq>` into a pair that orders like the ids.
pub fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or_else(|| panic!("event id {id:?} is not <ms>-<seq>"));
    let ms: u64 = ms.parse().unwrap_or_else(|_| panic!("event id {id:?}: bad ms"));
    let seq: u64 = seq.parse().unwrap_or_else(|_| panic!("event id {id:?}: bad seq"));
    (ms, seq)
}

/// `GET /metrics`, parsed into `name` (with any `{labels}`) -> value.
pub fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let mut conn = Conn::connect(addr);
    conn.send(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let resp = conn.read_response().unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    resp.assert_status(200, "GET /metrics");
    parse_metrics(&resp.body_str())
}

pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            panic!("bad metrics line {line:?}");
        };
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad metric value in {line:?}")),
        };
        out.insert(name.to_string(), value);
    }
    out
}

/// The value of one metric; panics if it is missing.
pub fn metric(map: &HashMap<String, f64>, name: &str) -> f64 {
    *map.get(name).unwrap_or_else(|| panic!("metric {name} missing; have {:?}", map.keys()))
}

/// Polls `/metrics` until `name` satisfies `pred` or `timeout` passes (then panics).
pub fn wait_for_metric(addr: SocketAddr, name: &str, timeout: Duration, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let value = metric(&metrics(addr), name);
        if pred(value) {
            return value;
        }
        if Instant::now() > deadline {
            panic!("metric {name} stuck at {value} after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// Percent-encodes everything but unreserved characters.
pub fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Printable form of bytes for assertion messages (long inputs are cut).
pub fn show(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(600)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if bytes.len() > cut.len() {
        s.push_str(&format!("...({} bytes)", bytes.len()));
    }
    s
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}
