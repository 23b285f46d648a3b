//! Fan-out at scale: 5,000 streams over `--cores 2` each get all 100 events, in order, once.

mod support;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};
use support::{metric, parse_id, post_request, publish_id, ChunkDecoder, Server, SseItem, SseParser};

const SUBSCRIBERS: usize = 5000;
const THREADS: usize = 10;
const EVENTS: usize = 100;
/// Failure bound for every stream to be registered (debug build, shared 2-core machine).
const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(90);
/// Failure bound for a subscriber thread, connecting and reading included.
const READ_DEADLINE: Duration = Duration::from_secs(180);

/// One nonblocking subscriber socket and its decoders.
struct Sub {
    stream: TcpStream,
    head: Vec<u8>,
    head_done: bool,
    chunks: ChunkDecoder,
    parser: SseParser,
    /// Ids of the data events received, in order.
    ids: Vec<(u64, u64)>,
    done: bool,
    /// The first body bytes, for failure messages.
    first_bytes: Vec<u8>,
}

impl Sub {
    fn feed(&mut self, bytes: &[u8], k: usize) {
        if !self.head_done {
            self.head.extend_from_slice(bytes);
            let Some(end) = support::find(&self.head, b"\r\n\r\n") else {
                return;
            };
            let head = String::from_utf8_lossy(&self.head[..end]).into_owned();
            assert!(head.starts_with("HTTP/1.1 200"), "subscriber {k}: head {head:?}");
            assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "subscriber {k}: {head:?}");
            self.head_done = true;
            let rest = self.head.split_off(end + 4);
            return self.feed_body(&rest, k);
        }
        self.feed_body(bytes, k);
    }

    fn feed_body(&mut self, bytes: &[u8], k: usize) {
        if self.first_bytes.len() < 512 {
            self.first_bytes.extend_from_slice(&bytes[..bytes.len().min(512)]);
        }
        let chunks = self.chunks.push(bytes).unwrap_or_else(|e| panic!("subscriber {k}: {e}"));
        assert!(
            !self.chunks.is_done(),
            "subscriber {k}: stream ended after {} events; head {:?}; body began {:?}",
            self.ids.len(),
            String::from_utf8_lossy(&self.head),
            support::show(&self.first_bytes)
        );
        for chunk in chunks {
            for item in self.parser.push(&chunk).unwrap_or_else(|e| panic!("subscriber {k}: {e}")) {
                let SseItem::Event(ev) = item else { continue };
                assert!(!self.done, "subscriber {k}: event after the end marker: {ev:?}");
                let n = self.ids.len();
                let id = ev.id.as_deref().unwrap_or_else(|| panic!("subscriber {k}: event without id {ev:?}"));
                if ev.data == "end" {
                    assert_eq!(n, EVENTS, "subscriber {k}: end marker after {n} events");
                    self.done = true;
                } else {
                    assert_eq!(
                        ev.data,
                        format!("ev-{n}"),
                        "subscriber {k}: event {n} out of order, duplicated or missing"
                    );
                }
                self.ids.push(parse_id(id));
            }
        }
    }
}

/// Connects `count` subscribers, then reads them round-robin until every one saw the end marker.
fn subscriber_thread(addr: std::net::SocketAddr, first: usize, count: usize) -> Vec<Vec<(u64, u64)>> {
    let mut subs = Vec::with_capacity(count);
    for k in first..first + count {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("subscriber {k}: connect: {e}"));
        stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(stream, "GET /events?topic=fan HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap_or_else(|e| panic!("subscriber {k}: write: {e}"));
        stream.set_nonblocking(true).unwrap();
        subs.push(Sub {
            stream,
            head: Vec::new(),
            head_done: false,
            chunks: ChunkDecoder::default(),
            parser: SseParser::default(),
            ids: Vec::with_capacity(EVENTS + 1),
            done: false,
            first_bytes: Vec::new(),
        });
    }
    let deadline = Instant::now() + READ_DEADLINE;
    let mut buf = vec![0u8; 16 * 1024];
    let mut remaining = count;
    while remaining > 0 {
        let mut progress = false;
        for (i, sub) in subs.iter_mut().enumerate() {
            if sub.done {
                continue;
            }
            let k = first + i;
            loop {
                match sub.stream.read(&mut buf) {
                    Ok(0) => panic!("subscriber {k}: server closed after {} events", sub.ids.len()),
                    Ok(n) => {
                        progress = true;
                        sub.feed(&buf[..n], k);
                        if sub.done {
                            remaining -= 1;
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("subscriber {k}: read: {e}"),
                }
            }
        }
        if !progress {
            assert!(
                Instant::now() < deadline,
                "{remaining} subscribers of thread {first}.. unfinished after {READ_DEADLINE:?}"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
    subs.into_iter().map(|s| s.ids).collect()
}

#[test]
fn five_thousand_subscribers_get_every_event_in_order_once() {
    let server = Server::start(&["--cores", "2", "--log-level", "info"]);
    let per_thread = SUBSCRIBERS / THREADS;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let addr = server.addr;
            thread::spawn(move || subscriber_thread(addr, t * per_thread, per_thread))
        })
        .collect();
    // Publishing starts only once the server has registered every stream.
    let start = Instant::now();
    loop {
        let subscribers = metric(&server.metrics(), "ringcast_subscribers");
        if subscribers == SUBSCRIBERS as f64 {
            break;
        }
        // A subscriber thread only finishes early by failing: surface its panic now.
        assert!(!handles.iter().any(|h| h.is_finished()), "a subscriber thread failed while connecting");
        assert!(
            start.elapsed() < SUBSCRIBE_DEADLINE,
            "only {subscribers} of {SUBSCRIBERS} streams registered after {SUBSCRIBE_DEADLINE:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{SUBSCRIBERS} streams registered in {:?}", start.elapsed());
    let start = Instant::now();

    let mut conn = server.connect();
    let mut published = Vec::with_capacity(EVENTS + 1);
    for n in 0..=EVENTS {
        let data = if n == EVENTS { "end".to_string() } else { format!("ev-{n}") };
        conn.send(&post_request("/publish?topic=fan", Some("text/plain"), data.as_bytes()));
        let resp = conn.read_response().unwrap_or_else(|e| panic!("publish {n}: {e}"));
        resp.assert_status(200, &format!("publish {n}"));
        published.push(parse_id(&publish_id(&resp)));
    }

    let mut checked = 0;
    for (t, h) in handles.into_iter().enumerate() {
        let ids = h.join().unwrap_or_else(|_| panic!("subscriber thread {t} failed"));
        for (i, got) in ids.iter().enumerate() {
            assert_eq!(got, &published, "subscriber {} ids differ from the publish answers", t * per_thread + i);
            checked += 1;
        }
    }
    assert_eq!(checked, SUBSCRIBERS);
    eprintln!("{} events published and received by all in {:?}", EVENTS + 1, start.elapsed());
}
