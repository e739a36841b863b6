//! The tables of the store (one per stream, and the dead letters) and the hour
//! partition a row belongs to.

use std::path::PathBuf;

use chrono::{DateTime, Datelike, NaiveDate, Timelike};

/// Name of the dead-letter table.
pub const DEAD_LETTERS: &str = "dead_letters";

/// The four telemetry streams a vehicle publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Teleservice,
    Rtti,
    Diagnostics,
    Charging,
}

impl Stream {
    pub const ALL: [Stream; 4] = [
        Stream::Teleservice,
        Stream::Rtti,
        Stream::Diagnostics,
        Stream::Charging,
    ];

    /// The topic segment and table name of the stream.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Teleservice => "teleservice",
            Stream::Rtti => "rtti",
            Stream::Diagnostics => "diagnostics",
            Stream::Charging => "charging",
        }
    }

    pub fn from_name(name: &str) -> Option<Stream> {
        Stream::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Position in [`Stream::ALL`], for per-stream arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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

    pub fn from_name(name: &str) -> Option<Table> {
        Table::all().find(|t| t.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Table::Stream(s) => s.name(),
            Table::DeadLetters => DEAD_LETTERS,
        }
    }
}

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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

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
