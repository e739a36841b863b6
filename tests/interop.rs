//! Another engine reads what fleetgate writes: DuckDB (Python package, which
//! `.ci/run` installs) queries the same Parquet files with Hive partitioning
//! and must return the same rows as fleetgate's SQL.

mod common;

use std::process::Command;

use common::*;
use fleetgate::schema::Stream;

const DUCKDB_SCRIPT: &str = r#"
import sys, duckdb
con = duckdb.connect()
rows = con.execute(
    "SELECT trip_id, epoch_ms(ts), latitude, hazard, CAST(date AS VARCHAR), CAST(hour AS INTEGER) "
    "FROM read_parquet(? || '/rtti/**/*.parquet', hive_partitioning = true) ORDER BY ts, latitude",
    [sys.argv[1]],
).fetchall()
for r in rows:
    print("|".join("" if v is None else str(v) for v in r))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_reads_the_same_rows() {
    let server = TestServer::start();
    let mut messages = Vec::new();
    for (_, bytes) in examples(Stream::Rtti, "valid") {
        let vin = records(&bytes)[0]["vin"].as_str().expect("vin").to_owned();
        messages.push((format!("vehicles/{vin}/rtti"), bytes));
    }
    publish_all(server.handle.mqtt_addr(), &messages).await;
    let data_dir = server.data_dir();
    server.handle.shutdown().expect("shutdown");

    let batches = query(
        &data_dir,
        "SELECT trip_id, CAST(ts AS BIGINT) AS ts_ms, latitude, hazard, CAST(date AS VARCHAR), hour \
         FROM rtti ORDER BY ts_ms, latitude",
    )
    .await;
    let mut ours = Vec::new();
    for batch in &batches {
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = batch
                .columns()
                .iter()
                .map(|c| {
                    if c.is_null(row) {
                        String::new()
                    } else {
                        arrow::util::display::array_value_to_string(c, row).expect("cell")
                    }
                })
                .collect();
            ours.push(cells.join("|"));
        }
    }

    let out = Command::new("python3")
        .args(["-c", DUCKDB_SCRIPT])
        .arg(&data_dir)
        .output()
        .expect("python3 must be installed (see .ci/run)");
    assert!(
        out.status.success(),
        "DuckDB failed (pip install duckdb): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<String> = String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ours.len(), 6);
    assert_eq!(theirs, ours);
}
