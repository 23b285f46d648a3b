//! Event encoding (once per event, shared by every subscriber) and publish-body parsing.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringcast::publish::parse_publish;
use ringcast::sse::{encode_event, EventId};

fn encode(c: &mut Criterion) {
    let id = EventId { ms: 1_796_230_263_034, seq: 7 };
    let quote = r#"{"sym":"EURUSD","bid":1.08412,"ask":1.08415,"ts":1796230263034}"#;
    let multiline = "line\n".repeat(50);
    let big = "x".repeat(4096);
    let mut group = c.benchmark_group("encode_event");
    for (name, data) in [("quote_64B", quote), ("multiline_50", multiline.as_str()), ("flat_4KiB", big.as_str())] {
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_function(name, |b| b.iter(|| black_box(encode_event(id, Some("quote"), black_box(data)))));
    }
    group.finish();

    let json = br#"{"topics":["prices","eu"],"event":"quote","data":{"sym":"EURUSD","bid":1.08412}}"#;
    let mut group = c.benchmark_group("parse_publish");
    group.throughput(Throughput::Bytes(json.len() as u64));
    group.bench_function("json", |b| {
        b.iter(|| black_box(parse_publish("", Some("application/json"), black_box(json), 64).unwrap()))
    });
    group.bench_function("raw", |b| {
        b.iter(|| black_box(parse_publish("topic=prices&event=quote", None, black_box(quote.as_bytes()), 64).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
