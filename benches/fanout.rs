//! Per-core fan-out of one event to 1k / 10k in-memory subscribers (topic lookup, queueing the
//! shared frame on each stream), without the socket cost; and the broker's gzip segment.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast::event::Event;
use ringcast::hub::{Hub, HubLimits, SlowPolicy};
use ringcast::metrics::CoreStats;
use ringcast::sse::{encode_event, EventId, Wire};

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("hub_publish");
    for subscribers in [1_000usize, 10_000] {
        let stats = CoreStats::default();
        let limits = HubLimits { max_queued: 1 << 20, slow: SlowPolicy::Disconnect, windowed: false, batch_max: 256 };
        let hub = Hub::new(limits);
        let mut hub = hub.borrow_mut();
        let topics: Vec<Box<str>> = vec!["prices".into()];
        for _ in 0..subscribers {
            // fd -1: nothing is ever sent (the bench never flushes).
            hub.subscribe(&topics, None, -1, None, Wire::Chunked, EventId::default(), Bytes::new(), &stats);
        }
        hub.discard_queued();
        let id = EventId { ms: 1_796_230_263_034, seq: 1 };
        let event =
            Event::new(id, topics.clone().into_boxed_slice(), encode_event(id, None, &"x".repeat(64)), Vec::new());
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(BenchmarkId::from_parameter(subscribers), &subscribers, |b, _| {
            b.iter(|| {
                hub.publish(black_box(&event), &stats);
                black_box(hub.discard_queued())
            })
        });
    }
    group.finish();

    // Targeted events: every stream has its own user; the cost follows the recipients (the
    // user index), not the subscribers of the topic.
    let mut group = c.benchmark_group("hub_targeted");
    for subscribers in [1_000usize, 10_000] {
        let stats = CoreStats::default();
        let limits = HubLimits { max_queued: 1 << 20, slow: SlowPolicy::Disconnect, windowed: false, batch_max: 256 };
        let hub = Hub::new(limits);
        let mut hub = hub.borrow_mut();
        let topics: Vec<Box<str>> = vec!["orders".into()];
        for i in 0..subscribers {
            let user: std::rc::Rc<str> = format!("user-{i}").into();
            hub.subscribe(&topics, Some(user), -1, None, Wire::Chunked, EventId::default(), Bytes::new(), &stats);
        }
        hub.discard_queued();
        let id = EventId { ms: 1_796_230_263_034, seq: 1 };
        for recipients in [1usize, 10] {
            let users: Vec<Box<str>> = (0..recipients).map(|i| format!("user-{}", i * 7).into()).collect();
            let event = Event::new(id, topics.clone().into_boxed_slice(), encode_event(id, None, "x"), users);
            group.throughput(Throughput::Elements(recipients as u64));
            let name = format!("{recipients}_of_{subscribers}");
            group.bench_function(name, |b| {
                b.iter(|| {
                    hub.publish(black_box(&event), &stats);
                    black_box(hub.discard_queued())
                })
            });
        }
    }
    group.finish();

    let data = format!("{{\"rows\":[{}]}}", "{\"sym\":\"EURUSD\",\"bid\":1.08412,\"ask\":1.08415},".repeat(90));
    let frame = encode_event(EventId { ms: 1, seq: 1 }, Some("snapshot"), &data);
    let mut group = c.benchmark_group("gzip_segment");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("4KiB_json_level1", |b| b.iter(|| black_box(frame.clone().with_gzip(1024))));
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
