//! Where each table lives and how it is opened: one Delta Lake table per
//! stream plus the dead letters, under the store's root directory, each
//! partitioned by `date` (DATE) and `hour` (INT) of its rows' time.
//!
//! The Delta transaction log is the only truth about which Parquet files
//! belong to a table: a file is part of it once a commit names it, and a
//! reader (fleetgate, DuckDB, Polars, Spark) sees one consistent version.
//! Every writer commit also records, per WAL shard, the last entry it
//! holds (Delta's application transactions: app id = shard, version = WAL
//! sequence number), which is how recovery knows exactly what is stored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array, Int32Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::{Add, StructField, StructType};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use url::Url;

use super::{Result, StoreError, io_error};
use crate::core::fsio;
use crate::core::table::PartitionKey;

/// The partition columns of every table, in SQL and in the Delta log.
pub const PARTITION_COLUMNS: [&str; 2] = ["date", "hour"];

/// Columns that carry per-file statistics in the Delta log: times only, so
/// that no identifier, pseudonym or measured value is copied into the log,
/// which outlives the files it describes (see `delta.logRetentionDuration`).
const STATS_COLUMNS: &str = "ts,received_at";

/// Table properties set when a table is created.
fn table_properties() -> HashMap<String, Option<String>> {
    [
        ("delta.dataSkippingStatsColumns", STATS_COLUMNS),
        // A checkpoint every 100 commits keeps opening a table cheap.
        ("delta.checkpointInterval", "100"),
        // The log of commits (paths, partition values, time statistics) is
        // kept for a day after a checkpoint supersedes it.
        ("delta.logRetentionDuration", "interval 1 day"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Some(v.to_owned())))
    .collect()
}

/// The root under which every table lives: `<root>/<table>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRoot {
    dir: PathBuf,
}

impl StoreRoot {
    /// A store on local disk under `dir` (made absolute).
    pub fn local(dir: &Path) -> Result<Self> {
        let dir = std::path::absolute(dir).map_err(io_error(dir))?;
        Ok(Self { dir })
    }

    /// The directory of a table.
    pub fn table_dir(&self, table: &str) -> PathBuf {
        self.dir.join(table)
    }

    /// The URL of a table, as delta-rs names it.
    pub fn table_url(&self, table: &str) -> Result<Url> {
        let dir = self.table_dir(table);
        Url::from_directory_path(&dir).map_err(|()| StoreError::Location(dir))
    }
}

/// The Delta schema of a table: its file schema, then `date` and `hour`.
pub fn table_schema(file_schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<_> = file_schema.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(
        PARTITION_COLUMNS[0],
        DataType::Date32,
        true,
    )));
    fields.push(Arc::new(Field::new(
        PARTITION_COLUMNS[1],
        DataType::Int32,
        true,
    )));
    Arc::new(Schema::new(fields))
}

/// `batch` with its partition's `date` and `hour` columns appended, as the
/// Delta writer splits and names files by them.
pub fn with_partition_columns(batch: &RecordBatch, partition: PartitionKey) -> Result<RecordBatch> {
    let (days, hour) = partition.to_parts();
    let rows = batch.num_rows();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(Date32Array::from(vec![days; rows])));
    columns.push(Arc::new(Int32Array::from(vec![i32::from(hour); rows])));
    Ok(RecordBatch::try_new(
        table_schema(&batch.schema()),
        columns,
    )?)
}

/// A partition's values as the Delta log writes them: `YYYY-MM-DD` and the hour.
pub fn partition_values(key: PartitionKey) -> (String, u8) {
    let (days, hour) = key.to_parts();
    let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|epoch| epoch.checked_add_signed(chrono::Duration::days(days.into())))
        .unwrap_or_default();
    (date.format("%Y-%m-%d").to_string(), hour)
}

/// The application id under which commits record how far they hold a WAL shard.
pub fn wal_app_id(shard: u16) -> String {
    format!("fleetgate-wal-{shard}")
}

/// The table at `url`, at its latest version; `None` if none was created there.
pub async fn open(url: &Url) -> Result<Option<DeltaTable>> {
    if let Ok(dir) = url.to_file_path()
        && !has_commit(&dir.join("_delta_log"))
    {
        return Ok(None);
    }
    let mut table = DeltaTableBuilder::from_url(url.clone())?.build()?;
    match table.load().await {
        Ok(()) => Ok(Some(table)),
        Err(DeltaTableError::NotATable(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether a local log directory holds a commit or checkpoint yet (a
/// table being created has the directory first).
fn has_commit(log_dir: &Path) -> bool {
    std::fs::read_dir(log_dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && (name.ends_with(".json") || name.ends_with(".parquet"))
        })
    })
}

/// The table at `url`, created empty with `file_schema` if it does not exist.
pub async fn open_or_create(url: &Url, name: &str, file_schema: &SchemaRef) -> Result<DeltaTable> {
    if let Some(table) = open(url).await? {
        return Ok(table);
    }
    if let Ok(dir) = url.to_file_path() {
        fsio::create_dir_all(&dir).map_err(io_error(&dir))?;
    }
    let schema: StructType = table_schema(file_schema).as_ref().try_into_kernel()?;
    let columns: Vec<StructField> = schema.fields().cloned().collect();
    // Built, not loaded: loading an empty location logs an error.
    let table = DeltaTableBuilder::from_url(url.clone())?
        .build()?
        .create()
        .with_table_name(name)
        .with_columns(columns)
        .with_partition_columns(PARTITION_COLUMNS)
        .with_configuration(table_properties())
        .await;
    match table {
        Ok(table) => Ok(table),
        // Another process created it first: open what it created.
        Err(DeltaTableError::VersionAlreadyExists(_)) => open(url)
            .await?
            .ok_or(StoreError::Location(PathBuf::from(url.path()))),
        Err(e) => Err(e.into()),
    }
}

/// The tables under `root` that hold Parquet files but no Delta log: a
/// data directory of an older version, which must be converted first
/// (VACUUM would take such files for a failed write's and delete them).
pub fn unconverted(root: &StoreRoot) -> Vec<String> {
    crate::core::table::Table::all()
        .map(|t| t.name())
        .filter(|name| {
            let dir = root.table_dir(name);
            !has_commit(&dir.join("_delta_log")) && holds_parquet(&dir)
        })
        .map(str::to_owned)
        .collect()
}

fn holds_parquet(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        match path.is_dir() {
            true => holds_parquet(&path),
            false => path.extension().is_some_and(|x| x == "parquet"),
        }
    })
}

/// Converts every table of [`unconverted`] in place: one Delta commit
/// naming its Parquet files, with `date` and `hour` read from their
/// directories and this store's table properties. Returns each table
/// converted with its number of files.
pub fn convert_all(root: &StoreRoot) -> Result<Vec<(String, usize)>> {
    super::block_on(async {
        let mut converted = Vec::new();
        for name in unconverted(root) {
            let url = root.table_url(&name)?;
            let partitions = [
                StructField::new(
                    PARTITION_COLUMNS[0],
                    deltalake::kernel::DataType::DATE,
                    true,
                ),
                StructField::new(
                    PARTITION_COLUMNS[1],
                    deltalake::kernel::DataType::INTEGER,
                    true,
                ),
            ];
            let table = deltalake::operations::convert_to_delta::ConvertToDeltaBuilder::new()
                .with_location(url.to_string())
                .with_partition_schema(partitions)
                .with_table_name(name.clone())
                .with_configuration(table_properties())
                .await?;
            let files = table.snapshot()?.log_data().num_files();
            if let Ok(dir) = url.to_file_path() {
                sync_log(&dir, table.version().unwrap_or(0))?;
            }
            converted.push((name, files));
        }
        Ok(converted)
    })
}

/// The last WAL entry of `shard` that a commit to `table` holds, if any.
pub async fn stored_through(table: &DeltaTable, shard: u16) -> Result<Option<u64>> {
    let version = table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), wal_app_id(shard))
        .await?;
    Ok(version.and_then(|v| u64::try_from(v).ok()))
}

/// Makes the data files a local commit is about to add durable, with
/// their directories, before the commit names them. A local object store
/// writes without fsync; without this a power cut could lose rows whose WAL
/// entries are already released.
pub fn sync_files(table_dir: &Path, adds: &[Add]) -> Result<()> {
    let mut dirs = std::collections::BTreeSet::new();
    for add in adds {
        let relative = percent_encoding::percent_decode_str(&add.path).decode_utf8_lossy();
        let path = table_dir.join(relative.as_ref());
        fsio::sync_file(&path).map_err(io_error(&path))?;
        let mut dir = fsio::parent_dir(&path);
        while dir.starts_with(table_dir) && dirs.insert(dir.to_owned()) && dir != table_dir {
            dir = fsio::parent_dir(dir);
        }
    }
    for dir in dirs {
        fsio::sync_dir(&dir).map_err(io_error(&dir))?;
    }
    Ok(())
}

/// Makes a local commit durable: its file in the log, and the log directory.
pub fn sync_log(table_dir: &Path, version: u64) -> Result<()> {
    let log_dir = table_dir.join("_delta_log");
    let commit = log_dir.join(format!("{version:020}.json"));
    fsio::sync_file(&commit).map_err(io_error(&commit))?;
    fsio::sync_dir(&log_dir).map_err(io_error(&log_dir))?;
    fsio::sync_dir(table_dir).map_err(io_error(table_dir))
}
