//! Batch build: decoded records → one Arrow record batch per hour partition.
//!
//! Input: 10,000 decoded RTTI records and 10,000 decoded diagnostics
//! records of 1,000 vehicles, pushed into a `StreamBatcher` (which applies
//! the field policies: pseudonyms, coarsening, trip ids) and drained into
//! record batches, as a worker does between two WAL appends.
//! Throughput is in records.

mod common;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fleetgate::pipeline::batch::StreamBatcher;
use fleetgate::schema::{Registry, Stream};

fn batch_build(c: &mut Criterion) {
    let registry = Registry::load().expect("schemas");
    let mut fixture = common::privacy();
    let mut group = c.benchmark_group("batch_build");
    for stream in [Stream::Rtti, Stream::Diagnostics] {
        let records = common::decoded(stream, 1_000, 10);
        group.throughput(Throughput::Elements(records.len() as u64));
        group.bench_function(format!("{}/10k_records", stream.name()), |b| {
            b.iter_batched(
                || StreamBatcher::new(registry.get(stream)),
                |mut batcher| {
                    for (vin, record) in &records {
                        batcher.push(record, vin, common::T0_MS, &mut fixture.privacy);
                    }
                    batcher.drain().expect("drain")
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, batch_build);
criterion_main!(benches);
