//! The Parquet store: batch building, partition paths and the per-table
//! writer threads that commit files atomically.
//!
//! Layout: `<data_dir>/<table>/date=YYYY-MM-DD/hour=HH/part-<run>-<n>.parquet`,
//! partitioned by the vehicle timestamp (dead letters: by time of receipt).
//! A file becomes visible only by an atomic rename after it and its directory
//! are fsync'd, so a reader never sees a partial file.

mod counters;
mod writer;

pub use counters::TableListener;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};

pub use crate::core::table::{PartitionKey, Table};
use crate::wal::{self, EntryId};

pub use writer::{
    Commit, CommitListener, TableBatch, WriterSettings, spawn_writer, writer_properties,
};

/// Errors of building batches and writing files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Settled(#[from] crate::core::fsio::FsError),
    #[error(transparent)]
    Wal(#[from] crate::wal::WalError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// File extension of committed files; anything else in a partition is ignored by queries.
pub const PARQUET_EXTENSION: &str = "parquet";
/// Suffix of a file still being written.
const IN_PROGRESS_SUFFIX: &str = "inprogress";

/// Directory of a table under the data directory.
pub fn table_dir(data_dir: &Path, table: &str) -> PathBuf {
    data_dir.join(table)
}

/// Parquet files modified this long before the oldest WAL segment holding
/// an entry was created are also searched for the entries they hold (clock
/// granularity); the settled log keeps its lines for as long.
pub const FOOTER_SCAN_MARGIN_MS: i64 = 2_000;

/// The WAL entries held by committed Parquet files modified at or after
/// `since_ms` (ms since the epoch), read from their footers, and by the
/// files the retention sweep removed, committed at or after it (see
/// [`settle`]).
pub fn committed_wal_entries(data_dir: &Path, since_ms: i64) -> Result<HashSet<EntryId>> {
    let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(since_ms.max(0) as u64);
    let mut covered = HashSet::new();
    let mut stack: Vec<PathBuf> = Table::all()
        .map(|t| table_dir(data_dir, t.name()))
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.map_err(io_error(&dir))?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != PARQUET_EXTENSION) {
                continue;
            }
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(io_error(&path))?;
            if modified < since {
                continue;
            }
            if let Some(value) = footer_wal_value(&path)? {
                covered.extend(wal::parse_footer_value(&value));
            }
        }
    }
    covered.extend(
        settled_files(data_dir)?
            .into_iter()
            .filter(|f| f.modified_ms >= since_ms)
            .flat_map(|f| wal::parse_footer_value(&f.wal)),
    );
    Ok(covered)
}

/// The `fleetgate.wal` value of a committed file's footer.
fn footer_wal_value(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    let reader = SerializedFileReader::new(file)?;
    let footer = reader.metadata().file_metadata().key_value_metadata();
    Ok(footer
        .into_iter()
        .flatten()
        .find(|kv| kv.key == wal::FOOTER_KEY)
        .map(|kv| kv.value.clone().unwrap_or_default()))
}

/// The settled log: under the data directory, the footers of the Parquet
/// files the retention sweep removed. A removed file's WAL entries can
/// outlive it in a segment; without this record, recovery after a crash
/// would find them in no footer and write the deleted rows again.
pub const SETTLED_FILE: &str = "_wal_settled.json";

/// One removed file: the WAL entries its footer named and its commit time
/// (its mtime), which scopes it for recovery exactly as a live footer is.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct SettledFile {
    modified_ms: i64,
    wal: String,
}

fn settled_files(data_dir: &Path) -> Result<Vec<SettledFile>> {
    Ok(crate::core::fsio::load_json(&data_dir.join(SETTLED_FILE))?)
}

/// Records durably the WAL entries `files` hold, before the sweep removes
/// them: from then on they count as stored for recovery, as if the files
/// were still there. A crash between this and the removal leaves both,
/// which is harmless; the next sweep removes the files.
pub fn settle(data_dir: &Path, files: &[PathBuf]) -> Result<()> {
    let mut settled = Vec::new();
    for path in files {
        let Some(wal) = footer_wal_value(path)? else {
            continue;
        };
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_err(io_error(path))?;
        settled.push(SettledFile {
            modified_ms: millis_since_epoch(modified),
            wal,
        });
    }
    if settled.is_empty() {
        return Ok(());
    }
    crate::core::fsio::update_json(
        &data_dir.join(SETTLED_FILE),
        |log: &mut Vec<SettledFile>| log.extend(settled),
    )?;
    Ok(())
}

/// Forgets the removed files no recovery can need any more: those committed
/// before the oldest WAL segment under `wal_dir` that holds an entry was
/// created (before `now_ms` when none does: a later segment is newer).
pub fn prune_settled(data_dir: &Path, wal_dir: &Path, now_ms: i64) -> Result<()> {
    let path = data_dir.join(SETTLED_FILE);
    if !path.exists() {
        return Ok(());
    }
    let keep_since = wal::oldest_segment_ms(wal_dir)?.unwrap_or(now_ms) - FOOTER_SCAN_MARGIN_MS;
    crate::core::fsio::update_json(&path, |log: &mut Vec<SettledFile>| {
        log.retain(|f| f.modified_ms >= keep_since)
    })?;
    Ok(())
}

fn millis_since_epoch(time: std::time::SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1]))]).expect("batch")
    }

    /// A committed file holding `entry`, with its commit time.
    fn committed_file(dir: &Path, entry: EntryId, committed: SystemTime) -> PathBuf {
        let path = dir.join("part-0.parquet");
        let metadata = vec![(wal::FOOTER_KEY.to_owned(), wal::footer_value(&[entry]))];
        let properties = writer_properties(1, 1024, &metadata).expect("properties");
        let file = crate::core::fsio::create(&path).expect("create");
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, batch().schema(), Some(properties))
                .expect("writer");
        writer.write(&batch()).expect("write");
        let file = writer.into_inner().expect("footer");
        file.set_modified(committed).expect("mtime");
        path
    }

    #[test]
    fn a_removed_file_counts_as_stored_while_a_segment_may_hold_its_entries() {
        let data = tempfile::tempdir().expect("tempdir");
        let partition = data.path().join("rtti/date=2026-11-24/hour=12");
        crate::core::fsio::create_dir_all(&partition).expect("partition");
        let now = crate::core::clock::now_ms();
        // Committed a minute from now: after the segment below was created.
        let committed_ms = now + 60_000;
        let entry = EntryId { shard: 0, seq: 7 };
        let file = committed_file(
            &partition,
            entry,
            UNIX_EPOCH + Duration::from_millis(committed_ms as u64),
        );
        settle(data.path(), std::slice::from_ref(&file)).expect("settle");
        std::fs::remove_file(&file).expect("remove");
        let stored = |since| committed_wal_entries(data.path(), since).expect("scan");
        assert!(stored(committed_ms).contains(&entry));
        assert!(
            !stored(committed_ms + 1).contains(&entry),
            "scoped by its commit time, as a footer is"
        );

        // A segment holding an entry (a crash: never closed) may hold it.
        let wal_dir = data.path().join("_wal");
        let settings = wal::WalSettings {
            dir: wal_dir.clone(),
            segment_bytes: 1 << 20,
            fsync_interval: Duration::from_millis(5),
            fsync_bytes: 1 << 20,
            max_segment_age: Duration::from_secs(3600),
        };
        let mut log = wal::ShardWal::open(&settings, 0, None, Arc::default()).expect("log");
        log.append(Table::DeadLetters, PartitionKey::from_millis(now), &batch())
            .expect("append");
        log.sync().expect("sync");
        drop(log);
        prune_settled(data.path(), &wal_dir, committed_ms + 10_000).expect("prune");
        assert!(stored(0).contains(&entry), "kept while the segment exists");

        std::fs::remove_dir_all(&wal_dir).expect("the segment is gone");
        prune_settled(data.path(), &wal_dir, committed_ms + 10_000).expect("prune");
        assert!(
            !stored(0).contains(&entry),
            "forgotten once no segment can hold it"
        );
    }
}
