//! Request-head parsing and chunked-body decoding.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringcast::http::{parse_request, ChunkedDecoder};

const STREAM_REQUEST: &[u8] = b"GET /events?topic=prices&topic=news HTTP/1.1\r\nHost: localhost:8080\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/156.0 Safari/537.36\r\n\
Accept: text/event-stream\r\nCache-Control: no-cache\r\nLast-Event-ID: 1796230263034-0\r\n\
Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\nConnection: keep-alive\r\n\r\n";

const PUBLISH_REQUEST: &[u8] = b"POST /publish?topic=prices&event=quote HTTP/1.1\r\nHost: localhost\r\n\
Content-Type: text/plain\r\nContent-Length: 24\r\n\r\n{\"sym\":\"EURUSD\",\"p\":1.1}";

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_request");
    for (name, wire) in [("stream_get", STREAM_REQUEST), ("publish_post", PUBLISH_REQUEST)] {
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut buf = BytesMut::from(black_box(wire));
                black_box(parse_request(&mut buf, 8192).unwrap().unwrap())
            })
        });
    }
    group.finish();

    let mut body = Vec::new();
    for _ in 0..64 {
        body.extend_from_slice(b"100\r\n");
        body.extend_from_slice(&[b'x'; 256]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let mut group = c.benchmark_group("chunked_body");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("64x256B", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&body[..]);
            let mut dec = ChunkedDecoder::new(1 << 20);
            assert!(dec.feed(&mut buf).unwrap());
            black_box(dec.into_body())
        })
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
