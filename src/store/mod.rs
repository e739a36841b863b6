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

/// The WAL entries held by committed Parquet files modified at or after
/// `since_ms` (ms since the epoch), read from their footers.
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
            let file = std::fs::File::open(&path).map_err(io_error(&path))?;
            let reader = SerializedFileReader::new(file)?;
            let footer = reader.metadata().file_metadata().key_value_metadata();
            for kv in footer.into_iter().flatten() {
                if kv.key == wal::FOOTER_KEY {
                    covered.extend(wal::parse_footer_value(kv.value.as_deref().unwrap_or("")));
                }
            }
        }
    }
    Ok(covered)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}
