//! The query audit log: one JSON line per query or export (request id,
//! principal, purpose, tables, decision, rows returned; never a data value),
//! fsync'd before the answer leaves. One file per UTC day under
//! `[access] audit_dir`, so its own retention (`audit_retention_days`)
//! deletes whole files. The operator queries it as the `query_audit` table.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, NaiveDate};
use datafusion::datasource::MemTable;
use serde::Serialize;

use super::{AccessError, Result};
use crate::schema::timestamp_type;

/// The table the operator queries the log through.
pub const TABLE: &str = "query_audit";

const PREFIX: &str = "queries-";
const SUFFIX: &str = ".jsonl";

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub at: String,
    pub request_id: String,
    pub principal: String,
    pub principal_kind: String,
    pub purpose: String,
    /// `query`, `query_ballista` (run on the Ballista cluster), `export`,
    /// `list` (a refused Flight SQL listing) or `delivered` (a streamed
    /// answer's end: the rows handed over).
    pub action: String,
    /// The tables the statement names, comma-separated.
    pub tables: String,
    /// `refuse`, `error`, or each table's treatment (`charging:filter,…`).
    pub decision: String,
    /// Why it was refused or failed.
    pub reason: Option<String>,
    /// Rows returned; none on a streamed answer's `query` line, whose
    /// `delivered` line counts them.
    pub rows: Option<u64>,
}

fn schema() -> SchemaRef {
    let text = |name| Field::new(name, DataType::Utf8, false);
    Arc::new(Schema::new(vec![
        Field::new("at", timestamp_type(), false),
        text("request_id"),
        text("principal"),
        text("principal_kind"),
        text("purpose"),
        text("action"),
        text("tables"),
        text("decision"),
        Field::new("reason", DataType::Utf8, true),
        Field::new("rows", DataType::UInt64, true),
    ]))
}

fn day_file(dir: &Path, now_ms: i64) -> PathBuf {
    let day = DateTime::from_timestamp_millis(now_ms)
        .unwrap_or_default()
        .format("%Y-%m-%d");
    dir.join(format!("{PREFIX}{day}{SUFFIX}"))
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> AccessError {
    AccessError::Audit(format!("{}: {e}", path.display()))
}

/// Appends `record` to the day's file and syncs it; after a line cut by a
/// crash, on a line of its own.
pub fn append(dir: &Path, now_ms: i64, record: &AuditRecord) -> Result<()> {
    let path = day_file(dir, now_ms);
    if ends_cut(&path).map_err(|e| io_error(&path, e))? {
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        std::io::Write::write_all(&mut file, b"\n").map_err(|e| io_error(&path, e))?;
    }
    let line = serde_json::to_value(record).map_err(|e| io_error(&path, e))?;
    crate::lifecycle::retention::append_audit(&path, &[line]).map_err(|e| io_error(&path, e))
}

/// Whether the file exists and does not end with a newline.
fn ends_cut(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// The day files, with their day.
fn day_files(dir: &Path) -> Result<Vec<(NaiveDate, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir, e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| io_error(dir, e))?.path();
        let day = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PREFIX)?.strip_suffix(SUFFIX))
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
        if let Some(day) = day {
            files.push((day, path));
        }
    }
    files.sort();
    Ok(files)
}

fn day_of(ms: i64) -> NaiveDate {
    DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .date_naive()
}

/// The log from the day of `since_ms` on, as a table (rows before
/// `since_ms` are filtered out by the caller's view).
pub fn table(dir: &Path, since_ms: i64) -> Result<Arc<MemTable>> {
    let schema = schema();
    let mut batches = Vec::new();
    for (day, path) in day_files(dir)? {
        if day < day_of(since_ms) {
            continue;
        }
        let text = fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
        // Lines are appended whole and synced, but a crash mid-append can
        // leave the last one cut: it is skipped, not allowed to hide the rest.
        let mut whole = String::with_capacity(text.len());
        for line in text.lines() {
            if serde_json::from_str::<serde_json::Value>(line).is_ok() {
                whole.push_str(line);
                whole.push('\n');
            } else if !line.trim().is_empty() {
                tracing::warn!(file = %path.display(), "skipping a cut query audit line");
            }
        }
        let reader = arrow::json::ReaderBuilder::new(schema.clone())
            .build(whole.as_bytes())
            .map_err(|e| io_error(&path, e))?;
        for batch in reader {
            batches.push(batch.map_err(|e| io_error(&path, e))?);
        }
    }
    Ok(Arc::new(MemTable::try_new(schema, vec![batches])?))
}

/// Deletes the day files wholly older than `keep_ms`; returns them.
pub fn expire(dir: &Path, now_ms: i64, keep_ms: i64) -> Result<Vec<PathBuf>> {
    let oldest_kept = day_of(now_ms - keep_ms);
    let mut deleted = Vec::new();
    for (day, path) in day_files(dir)? {
        if day < oldest_kept {
            fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
            deleted.push(path);
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 86_400_000;
    const NOW: i64 = 1_795_521_600_000;

    fn record(id: &str) -> AuditRecord {
        AuditRecord {
            at: DateTime::from_timestamp_millis(NOW)
                .unwrap_or_default()
                .to_rfc3339(),
            request_id: id.into(),
            principal: "alice".into(),
            principal_kind: "user".into(),
            purpose: "own_data_access".into(),
            action: "query".into(),
            tables: "charging".into(),
            decision: "charging:filter".into(),
            reason: None,
            rows: Some(3),
        }
    }

    #[test]
    fn records_are_read_back_and_expire_by_day() {
        let dir = tempfile::tempdir().expect("tempdir");
        append(dir.path(), NOW - 10 * DAY_MS, &record("old")).expect("append");
        append(dir.path(), NOW, &record("new")).expect("append");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let rows = |since| -> usize {
            runtime.block_on(async {
                let ctx = datafusion::prelude::SessionContext::new();
                ctx.register_table("a", table(dir.path(), since).expect("table"))
                    .expect("register");
                ctx.sql("SELECT * FROM a")
                    .await
                    .expect("sql")
                    .count()
                    .await
                    .expect("count")
            })
        };
        assert_eq!(rows(NOW - 20 * DAY_MS), 2);
        // A line cut by a crash is skipped; the others stay readable.
        let today = day_file(dir.path(), NOW);
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&today)
            .expect("open");
        std::io::Write::write_all(&mut file, b"{\"at\":\"2026-11-24T12:00").expect("cut line");
        assert_eq!(rows(NOW - 20 * DAY_MS), 2);
        append(dir.path(), NOW, &record("after")).expect("append after the cut");
        assert_eq!(rows(NOW - 20 * DAY_MS), 3);
        assert_eq!(rows(NOW - DAY_MS), 2, "today's file only");
        let deleted = expire(dir.path(), NOW, 5 * DAY_MS).expect("expire");
        assert_eq!(deleted.len(), 1);
        assert_eq!(rows(NOW - 20 * DAY_MS), 2);
    }
}
