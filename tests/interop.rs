//! Other engines read what fleetgate writes: the Delta tables' current
//! version, read by the `deltalake` Python package into pyarrow, by Polars,
//! and by DuckDB over the files that version names (all PyPI packages,
//! which `.ci/run` installs), must hold the same rows as fleetgate's SQL;
//! and after a retention sweep deleted rows, none of them reads them.

mod common;

use std::process::Command;

use common::*;
use fleetgate::lifecycle::retention::{self, Retention};
use fleetgate::schema::{Registry, Stream};

/// Prints, as JSON, the RTTI rows each reader finds, one line per row.
const READERS_SCRIPT: &str = r#"
import sys, json, duckdb, polars as pl
from deltalake import DeltaTable

path = sys.argv[1] + "/rtti"
table = DeltaTable(path)
con = duckdb.connect()
columns = ("SELECT trip_id, epoch_ms(ts), latitude, hazard, CAST(date AS VARCHAR), "
           "CAST(hour AS INTEGER) FROM {} ORDER BY ts, latitude")

def lines(relation):
    return ["|".join("" if v is None else str(v) for v in row)
            for row in con.execute(columns.format(relation)).fetchall()]

from_pyarrow = table.to_pyarrow_table()
from_polars = pl.read_delta(path).to_arrow()
con.register("from_pyarrow", from_pyarrow)
con.register("from_polars", from_polars)
files = table.file_uris()
out = {"pyarrow": lines("from_pyarrow"), "polars": lines("from_polars")}
if files:
    from_files = con.read_parquet(files, hive_partitioning=True).fetch_arrow_table()
    con.register("from_files", from_files)
    out["duckdb"] = lines("from_files")
else:
    out["duckdb"] = []
print(json.dumps(out))
"#;

/// What each outside reader finds in the RTTI table under `data_dir`.
fn outside_readers(data_dir: &std::path::Path) -> serde_json::Value {
    let out = Command::new("python3")
        .args(["-c", READERS_SCRIPT])
        .arg(data_dir)
        .output()
        .expect("python3 must be installed (see .ci/run)");
    assert!(
        out.status.success(),
        "the readers failed (pip install deltalake polars pyarrow duckdb): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_readers_read_the_same_rows_and_none_that_were_deleted() {
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
        "SELECT trip_id, CAST(ts AS BIGINT) / 1000 AS ts_ms, latitude, hazard, CAST(date AS VARCHAR), hour \
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

    assert_eq!(ours.len(), 6);
    let theirs = outside_readers(&data_dir);
    for reader in ["pyarrow", "polars", "duckdb"] {
        assert_eq!(theirs[reader], serde_json::json!(ours), "{reader}");
    }

    // RTTI is kept 24 hours: a sweep two days on deletes every row, and no
    // reader of the table's current version finds one.
    let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
    let run = retention::SweepRun {
        now_ms: TEST_NOW_MS + 2 * 86_400_000,
        max_clock_skew_ms: 86_400_000,
        vacuum_grace_ms: 60_000,
        dry_run: false,
        unstored_since_ms: None,
    };
    let root = fleetgate::store::StoreRoot::local(&data_dir).expect("root");
    let deleted = retention::sweep(&root, &rules, run).expect("sweep");
    assert!(deleted.iter().any(|d| d.table == "rtti"), "{deleted:?}");
    let theirs = outside_readers(&data_dir);
    for reader in ["pyarrow", "polars", "duckdb"] {
        assert_eq!(theirs[reader], serde_json::json!([]), "{reader}");
    }
}
