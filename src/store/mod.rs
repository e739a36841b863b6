//! The Parquet store: batch building, partition paths and the per-table
//! writer threads that commit files atomically.
//!
//! Layout: `<data_dir>/<table>/date=YYYY-MM-DD/hour=HH/part-<run>-<n>.parquet`,
//! partitioned by the vehicle timestamp (dead letters: by time of receipt).
//! A file becomes visible only by an atomic rename after it and its directory
//! are fsync'd, so a reader never sees a partial file.

mod writer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, NaiveDate, Timelike};
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::schema::Stream;
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

/// A table of the store: one per stream, and the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Stream(Stream),
    DeadLetters,
}

impl Table {
    pub const COUNT: usize = Stream::ALL.len() + 1;

    pub fn all() -> impl Iterator<Item = Table> {
        Stream::ALL
            .into_iter()
            .map(Table::Stream)
            .chain([Table::DeadLetters])
    }

    /// Position in [`Table::all`], for per-table arrays.
    pub fn index(self) -> usize {
        match self {
            Table::Stream(s) => s.index(),
            Table::DeadLetters => Stream::ALL.len(),
        }
    }

    pub fn from_index(index: usize) -> Option<Table> {
        Table::all().nth(index)
    }

    pub fn name(self) -> &'static str {
        match self {
            Table::Stream(s) => s.name(),
            Table::DeadLetters => crate::pipeline::dead_letter::TABLE,
        }
    }
}

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
    /// Days since the Unix epoch and hour of day: the partition in numbers, for the WAL.
    pub fn to_parts(self) -> (i32, u8) {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        ((self.date - epoch).num_days() as i32, self.hour as u8)
    }

    /// The inverse of [`PartitionKey::to_parts`]; `None` for an impossible hour.
    pub fn from_parts(days: i32, hour: u8) -> Option<Self> {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
        let date = epoch.checked_add_signed(chrono::Duration::days(days.into()))?;
        (hour < 24).then_some(Self {
            date,
            hour: hour.into(),
        })
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_parts_round_trip() {
        let key = PartitionKey::from_millis(1_795_506_305_000);
        let (days, hour) = key.to_parts();
        assert_eq!(PartitionKey::from_parts(days, hour), Some(key));
        assert_eq!(PartitionKey::from_parts(days, 24), None);
        for table in Table::all() {
            assert_eq!(Table::from_index(table.index()), Some(table));
        }
    }

    #[test]
    fn partition_path_of_a_timestamp() {
        // 2026-11-24T07:45:05Z
        let key = PartitionKey::from_millis(1_795_506_305_000);
        assert_eq!(key.relative_dir(), PathBuf::from("date=2026-11-24/hour=07"));
    }
}
