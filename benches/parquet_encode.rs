//! Parquet encode: Arrow record batches → a zstd Parquet file in memory,
//! with the table writers' own encoding settings (zstd level 3).
//!
//! Input: 100,000 RTTI rows (1,000 vehicles) and 100,000 diagnostics rows,
//! built by the pipeline's own batcher. Measures encoding and compression
//! only; the file's fsync and rename are the WAL and writer's business.
//! Prints the encoded bytes per row once, for the size side of the story.

mod common;

use std::sync::Arc;

use arrow::array::RecordBatch;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetgate::pipeline::batch::StreamBatcher;
use fleetgate::schema::{Registry, Stream};
use fleetgate::store::writer_properties;
use parquet::arrow::ArrowWriter;

fn rows(stream: Stream) -> Vec<RecordBatch> {
    let registry = Registry::load().expect("schemas");
    let mut fixture = common::privacy();
    let mut batcher = StreamBatcher::new(registry.get(stream));
    for (vin, record) in common::decoded(stream, 1_000, 100) {
        batcher.push(&record, &vin, common::T0_MS, &mut fixture.privacy);
    }
    batcher
        .drain()
        .expect("drain")
        .into_iter()
        .map(|(_, b)| b)
        .collect()
}

fn encode(batches: &[RecordBatch]) -> Vec<u8> {
    let properties = writer_properties(3, 1_000_000, &[]).expect("properties");
    let mut writer =
        ArrowWriter::try_new(Vec::new(), batches[0].schema(), Some(properties)).expect("writer");
    for batch in batches {
        writer.write(batch).expect("write");
    }
    writer.into_inner().expect("finish")
}

fn parquet_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("parquet_encode");
    for stream in [Stream::Rtti, Stream::Diagnostics] {
        let batches = Arc::new(rows(stream));
        let total: usize = batches.iter().map(|b| b.num_rows()).sum();
        let size = encode(&batches).len();
        eprintln!(
            "parquet_encode/{}: {total} rows → {size} bytes ({:.1} bytes per row)",
            stream.name(),
            size as f64 / total as f64
        );
        group.throughput(Throughput::Elements(total as u64));
        group.bench_function(format!("{}/100k_rows_zstd3", stream.name()), |b| {
            b.iter(|| encode(&batches))
        });
    }
    group.finish();
}

criterion_group!(benches, parquet_encode);
criterion_main!(benches);
