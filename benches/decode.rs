//! Decode and validate: JSON payload → typed, validated records, per stream.
//!
//! Input: generated records shaped like loadgen's (about 200 bytes each),
//! one record per publish and 100 records per publish (a JSON array).
//! Validation (required fields, types, ranges, enumerations, VIN match,
//! clock skew) happens in the same pass as parsing, so this is the cost of
//! both. Throughput is in records.

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetgate::pipeline::decode::{self, Decoded};
use fleetgate::schema::{Registry, Stream};

fn decode_validate(c: &mut Criterion) {
    let registry = Registry::load().expect("schemas");
    let limits = common::limits();
    let vin = common::vin(7);
    let mut group = c.benchmark_group("decode_validate");
    for stream in Stream::ALL {
        for records in [1, 100] {
            let payload = common::payload(stream, 7, 0, records);
            group.throughput(Throughput::Elements(records as u64));
            let mut out = Decoded::default();
            group.bench_function(format!("{}/{records}_per_publish", stream.name()), |b| {
                b.iter(|| {
                    out.clear();
                    decode::decode(
                        registry.get(stream),
                        &limits,
                        &vin,
                        &payload,
                        common::T0_MS,
                        &mut out,
                    );
                    assert_eq!(out.valid.len(), records);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decode_validate);
criterion_main!(benches);
