//! Back-pressure: when delivery falls behind and the core queues are full, publishers wait
//! their turn for room (`RoomLine`) and are all answered; nothing is lost or doubled.

mod support;

use std::thread;
use support::{metric, parse_id, post_request, publish_id, Conn, Server};

const SUBSCRIBERS: usize = 20;
const PUBLISHERS: usize = 8;
const EACH: usize = 300;

#[test]
fn publishers_meeting_full_queues_wait_their_turn_and_every_event_arrives() {
    // A 4-batch mailbox on one core: eight publishers that each send the next event as soon as
    // the last is answered keep it full, so most publishes find no room and wait in line.
    let server = Server::start(&["--cores", "1", "--core-queue", "4", "--heartbeat", "60s"]);
    let subs: Vec<_> = (0..SUBSCRIBERS).map(|_| server.subscribe(&["bp"])).collect();
    let addr = server.addr;

    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            thread::spawn(move || {
                let mut conn = Conn::connect(addr);
                let mut last = (0, 0);
                for i in 0..EACH {
                    let body = format!("p{p}-{i}");
                    conn.send(&post_request("/publish?topic=bp", Some("text/plain"), body.as_bytes()));
                    let resp = conn.read_response().unwrap_or_else(|e| panic!("publisher {p}, event {i}: {e}"));
                    resp.assert_status(200, &format!("publisher {p}, event {i}"));
                    let id = parse_id(&publish_id(&resp));
                    assert!(id > last, "publisher {p}: id {id:?} after {last:?}");
                    last = id;
                }
            })
        })
        .collect();

    let readers: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(k, mut sub)| {
            thread::spawn(move || {
                let mut next = [0usize; PUBLISHERS];
                let mut last = (0, 0);
                for n in 0..PUBLISHERS * EACH {
                    let ev = sub.next_event().unwrap_or_else(|e| panic!("subscriber {k}: event {n}: {e}"));
                    let id = parse_id(ev.id.as_deref().expect("an id"));
                    assert!(id > last, "subscriber {k}: id {id:?} after {last:?}");
                    last = id;
                    // Each publisher's events arrive in the order it published them, once.
                    let (p, i) = ev.data[1..].split_once('-').expect("p<publisher>-<seq>");
                    let (p, i): (usize, usize) = (p.parse().unwrap(), i.parse().unwrap());
                    assert_eq!(i, next[p], "subscriber {k}: publisher {p}'s events out of order or doubled");
                    next[p] += 1;
                }
            })
        })
        .collect();

    for p in publishers {
        p.join().expect("a publisher failed");
    }
    for r in readers {
        r.join().expect("a subscriber failed");
    }
    let m = server.metrics();
    assert_eq!(metric(&m, "ringcast_events_published_total"), (PUBLISHERS * EACH) as f64);
    assert!(metric(&m, "ringcast_publish_waits_total") > 0.0, "no publish ever waited: the test tested nothing");
    // The waits ended in answers, not 503s, and the server is idle again: a new publish goes
    // through at once.
    let mut late = server.subscribe(&["bp"]);
    let id = server.publish("bp", "after");
    let ev = late.next_event().expect("the event after the storm");
    assert_eq!((ev.id.as_deref(), ev.data.as_str()), (Some(id.as_str()), "after"));
}
