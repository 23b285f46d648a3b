//! One event alone never counts as "too far behind": a subscriber whose socket takes
//! `--max-body` events in pieces (small receive buffer, slow reads) gets them live, then the
//! event after them, on the same stream. And `--max-queued-bytes` below `--max-body` stops
//! start-up.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};
use support::{metric, post_request, publish_id, ChunkDecoder, Server, SseEvent, SseItem, SseParser};

/// A client socket with an 8 KiB receive buffer, set before connecting so the TCP window
/// stays small: the server's sends of a large event come back short and its backlog takes over.
fn small_window_socket(addr: SocketAddr) -> TcpStream {
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 test address expected") };
    // SAFETY: plain socket calls on a fresh fd with valid, initialised arguments; the fd is
    // owned by the returned TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let size: libc::c_int = 8192;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect {addr}: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

/// The largest TCP send buffer the kernel grows a socket to, in whole MiB (at least 1).
fn wmem_max_mib() -> usize {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap_or_default();
    let max: usize = text.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or(4 << 20);
    (max >> 20).clamp(1, 20)
}

/// Reads the stream 16 KiB at a time with a pause after each read until `want` events arrived.
fn read_slowly(stream: &mut TcpStream, want: usize) -> Vec<SseEvent> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut raw = Vec::new();
    let mut body_from = None;
    let mut decoder = ChunkDecoder::default();
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut buf = [0u8; 16384];
    while events.len() < want {
        assert!(Instant::now() < deadline, "only {} of {want} events within 60 s", events.len());
        let n = stream.read(&mut buf).expect("read the stream");
        assert!(n > 0, "the stream ended after {} events: the subscriber was cut off", events.len());
        raw.extend_from_slice(&buf[..n]);
        if body_from.is_none() {
            let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            assert!(raw.starts_with(b"HTTP/1.1 200"), "head: {:?}", String::from_utf8_lossy(&raw[..end]));
            body_from = Some(end + 4);
        }
        let from = body_from.expect("set above");
        let body = raw.split_off(from);
        for chunk in decoder.push(&body).expect("chunked framing") {
            for item in parser.push(&chunk).expect("event-stream syntax") {
                if let SseItem::Event(ev) = item {
                    events.push(ev);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    events
}

#[test]
fn max_body_event_reaches_a_slow_small_window_subscriber_live() {
    // The defaults: --max-body 1 MiB, --max-queued-bytes 4 MiB.
    let server = Server::start(&[]);
    let mut sub = small_window_socket(server.addr);
    sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    sub.write_all(b"GET /events?topic=big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    server.wait_for_metric("ringcast_subscribers", Duration::from_secs(10), |v| v == 1.0);

    // More of them than the server socket's send buffer can grow to (tcp_wmem's maximum), so
    // its sends come back short and the rest waits on the stream's queue: behind what is being
    // written there is then at most what the socket took since, well within the 4 MiB bound.
    let fills: Vec<u8> = (b'a'..=b'z').take(wmem_max_mib() + 3).collect();
    let mut conn = server.connect();
    let mut ids = Vec::new();
    for &fill in &fills {
        let big = vec![fill; 1 << 20];
        conn.send(&post_request("/publish?topic=big", Some("text/plain"), &big));
        let resp = conn.read_response().expect("answer to a 1 MiB publish");
        resp.assert_status(200, "1 MiB publish (exactly --max-body)");
        ids.push(publish_id(&resp));
    }
    conn.send(&post_request("/publish?topic=big", Some("text/plain"), b"after"));
    let last = conn.read_response().expect("answer to the next publish");
    last.assert_status(200, "publish after the large ones");
    ids.push(publish_id(&last));

    let events = read_slowly(&mut sub, fills.len() + 1);
    let got: Vec<_> = events.iter().map(|e| e.id.clone().unwrap_or_default()).collect();
    assert_eq!(got, ids, "event ids on the stream");
    for (ev, &fill) in events.iter().zip(&fills) {
        assert_eq!(ev.data.len(), 1 << 20, "a large event's data");
        assert!(ev.data.bytes().all(|c| c == fill), "event {:?} data", ev.id);
    }
    assert_eq!(events[fills.len()].data, "after");

    let m = server.metrics();
    assert_eq!(metric(&m, "ringcast_slow_consumer_disconnects_total"), 0.0, "{m:?}");
    assert!(metric(&m, "ringcast_stream_backlogs_total") >= 1.0, "the socket never filled: {m:?}");
}

#[test]
fn max_queued_bytes_below_max_body_stops_start_up() {
    let out = support::command()
        .args(["--listen", "127.0.0.1:0", "--max-body", "2000", "--max-queued-bytes", "1000"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ringcast");
    assert!(!out.status.success(), "ringcast started with --max-queued-bytes < --max-body");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--max-queued-bytes (1000)") && stderr.contains("--max-body (2000)"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
}
