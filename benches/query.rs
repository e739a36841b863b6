//! Query: SQL through fleetgate's DataFusion session over a fixed store.
//!
//! Input: a data directory written by the pipeline's own batcher and
//! Parquet settings: 200,000 RTTI rows (1,000 vehicles, 200 probes each)
//! and 50,000 diagnostics rows, in hour partitions. Each query runs hot
//! (one session, files in the page cache); `scripts/bench.sh` times the
//! full suite cold and hot against DuckDB.

mod common;

use criterion::{Criterion, criterion_group, criterion_main};

const QUERIES: [(&str, &str); 4] = [
    (
        "count_by_hour",
        "SELECT date, hour, count(*) FROM rtti GROUP BY date, hour",
    ),
    (
        "hazards_per_cell",
        "SELECT round(latitude, 2) AS lat, round(longitude, 2) AS lon, count(*) AS n \
         FROM rtti WHERE hazard IS NOT NULL GROUP BY 1, 2 ORDER BY n DESC LIMIT 10",
    ),
    (
        "mean_speed_per_trip",
        "SELECT trip_id, avg(speed_kmh) FROM rtti GROUP BY trip_id ORDER BY 2 DESC LIMIT 10",
    ),
    (
        "warnings_per_ecu",
        "SELECT ecu, count(*) FROM diagnostics WHERE severity <> 'info' GROUP BY ecu",
    ),
];

fn query(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    common::write_store(dir.path(), &mut common::privacy());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let ctx = rt
        .block_on(fleetgate::query::session(dir.path()))
        .expect("session");
    let mut group = c.benchmark_group("query");
    for (name, sql) in QUERIES {
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(fleetgate::query::run(&ctx, sql))
                    .expect("query")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, query);
criterion_main!(benches);
