//! WAL append: one record batch framed (LZ4-compressed Arrow IPC, CRC32)
//! and written to the shard's log, with and without the fsync that makes
//! it durable.
//!
//! Input: a 1,000-row RTTI batch (the size a busy worker appends per group
//! commit) into a log in a temp directory on the machine's disk.
//! "append" is the buffered write alone; "append_fsync" adds one
//! `fdatasync`, which is what a group commit costs when each batch gets
//! its own; real group commits share one fsync among many appends.

mod common;

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetgate::pipeline::batch::StreamBatcher;
use fleetgate::schema::{Registry, Stream};
use fleetgate::store::{PartitionKey, Table};
use fleetgate::wal::{ShardWal, Tracker, WalSettings};

fn batch() -> (PartitionKey, RecordBatch) {
    let registry = Registry::load().expect("schemas");
    let mut fixture = common::privacy();
    let mut batcher = StreamBatcher::new(registry.get(Stream::Rtti));
    for (vin, record) in common::decoded(Stream::Rtti, 100, 10) {
        batcher.push(&record, &vin, common::T0_MS, &mut fixture.privacy);
    }
    batcher.drain().expect("drain").remove(0)
}

fn wal_append(c: &mut Criterion) {
    let (partition, batch) = batch();
    let dir = tempfile::tempdir().expect("tempdir");
    let tracker = Arc::new(Tracker::default());
    let settings = WalSettings {
        dir: dir.path().to_owned(),
        segment_bytes: 64 << 20,
        fsync_interval: Duration::from_millis(5),
        fsync_bytes: 1 << 20,
        max_segment_age: Duration::from_secs(3600),
        copies: None,
        fence: None,
    };
    let mut wal = ShardWal::open(&settings, 0, None, tracker.clone()).expect("wal");
    let mut group = c.benchmark_group("wal_append");
    group.throughput(Throughput::Elements(batch.num_rows() as u64));
    let mut appends = 0u64;
    let mut append = |wal: &mut ShardWal, fsync: bool| {
        let id = wal
            .append(Table::Stream(Stream::Rtti), partition, &batch)
            .expect("append");
        if fsync {
            wal.sync().expect("sync");
        }
        // As if the batch were already in Parquet: lets the log truncate.
        tracker.covered(&[id]);
        appends += 1;
        if appends.is_multiple_of(1024) {
            wal.sync().expect("sync");
            wal.truncate_covered().expect("truncate");
        }
    };
    group.bench_function("rtti/1000_rows", |b| b.iter(|| append(&mut wal, false)));
    group.bench_function("rtti/1000_rows_fsync", |b| {
        b.iter(|| append(&mut wal, true))
    });
    group.finish();
}

criterion_group!(benches, wal_append);
criterion_main!(benches);
