//! The Parquet store: batch building, partition paths and the per-table
//! writer threads that commit files atomically.
//!
//! Layout: `<data_dir>/<table>/date=YYYY-MM-DD/hour=HH/part-<run>-<n>.parquet`,
//! partitioned by the vehicle timestamp (dead letters: by time of receipt).
//! A file becomes visible only by an atomic rename after it and its directory
//! are fsync'd, so a reader never sees a partial file.

mod batch;
mod writer;

use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, NaiveDate, Timelike};

pub use batch::StreamBatcher;
pub use writer::{Commit, CommitListener, TableBatch, WriterSettings, spawn_writer};

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

/// The hour partition a row belongs to. The only way to a partition path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    date: NaiveDate,
    hour: u32,
}

impl PartitionKey {
    /// The partition of a UTC timestamp in milliseconds.
    pub fn from_millis(ms: i64) -> Self {
        let t = DateTime::from_timestamp_millis(ms).unwrap_or_default();
        Self {
            date: t.date_naive(),
            hour: t.hour(),
        }
    }

    /// `date=YYYY-MM-DD/hour=HH`, relative to the table directory.
    pub fn relative_dir(&self) -> PathBuf {
        PathBuf::from(format!(
            "date={:04}-{:02}-{:02}",
            self.date.year(),
            self.date.month(),
            self.date.day()
        ))
        .join(format!("hour={:02}", self.hour))
    }
}

/// Directory of a table under the data directory.
pub fn table_dir(data_dir: &Path, table: &str) -> PathBuf {
    data_dir.join(table)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_path_of_a_timestamp() {
        // 2026-11-24T07:45:05Z
        let key = PartitionKey::from_millis(1_795_506_305_000);
        assert_eq!(key.relative_dir(), PathBuf::from("date=2026-11-24/hour=07"));
    }
}
