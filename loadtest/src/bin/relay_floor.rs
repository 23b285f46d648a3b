//! The light-load latency floor: the least an SSE relay can do between a publish and its
//! subscribers, to compare ringcast's publish -> receive latency with (docs/BENCHMARKS.md).
//!
//! One blocking thread per connection and nothing else. A subscriber (`GET`) gets a 200 head
//! and is added to one list; a publisher's thread reads each `POST` body and writes its SSE frame
//! to every subscriber itself, then answers. So an event costs one thread wake-up in the relay
//! (the publisher's thread, woken by its request) and no hand-off at all: no queue, no other
//! thread, no event loop. Only for benchmarks on loopback: topics, ids, limits, slow
//! subscribers and bad input are not handled (a subscriber that stops reading stalls everyone).
//!
//!   relay_floor 127.0.0.1:18181
//!   ringcast-loadtest http://127.0.0.1:18181 -c 10 --rate 100 -d 10s -p 1 --max-in-flight 1
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

type Subscribers = Arc<Mutex<Vec<TcpStream>>>;

fn main() -> io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18181".into());
    let listener = TcpListener::bind(&addr)?;
    println!("relay_floor listening on {}", listener.local_addr()?);
    let subscribers: Subscribers = Arc::default();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        let subscribers = subscribers.clone();
        std::thread::spawn(move || {
            let _ = serve(conn, &subscribers);
        });
    }
    Ok(())
}

fn serve(conn: TcpStream, subscribers: &Subscribers) -> io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    let mut frame = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let is_get = line.starts_with("GET ");
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        if is_get {
            writer
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n")?;
            subscribers.lock().unwrap().push(writer);
            return Ok(()); // the list owns the stream now; nothing more is read from it
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        frame.clear();
        frame.extend_from_slice(b"data: ");
        frame.extend_from_slice(&body);
        frame.extend_from_slice(b"\n\n");
        subscribers.lock().unwrap().retain_mut(|s| s.write_all(&frame).is_ok());
        writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")?;
    }
}
