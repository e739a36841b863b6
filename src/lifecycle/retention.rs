//! Retention: the rules of `schemas/retention.toml`, the query-time filter
//! that hides every row past its rule, and the sweep that deletes expired
//! rows from disk (whole hour partitions, or files rewritten without them),
//! with an audit line per deletion.
//!
//! Time is always passed in (`now_ms`), never read here, so tests move the
//! clock instead of sleeping. A rule applies to the rows of one table that
//! match its `when` (the first matching rule wins; each table ends with a
//! rule without `when`), counting from the row's time: its vehicle
//! timestamp or its receipt, whichever is earlier (see [`row_time_sql`]),
//! so that a vehicle clock running ahead extends no rule.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, SchemaRef, TimestampMillisecondType};
use chrono::{DateTime, NaiveDate};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::{Deserialize, Serialize};

use crate::config::RetentionConfig;
use crate::core::fsio;
use crate::lifecycle::requests::{
    self, DeletionRequest, LegalHold, MatchValue, Selection, column_matches, sql_identifier,
    sql_literal,
};
use crate::pipeline::dead_letter;
use crate::schema::Registry;
use crate::store::{PARQUET_EXTENSION, PartitionKey, table_dir, writer_properties};

/// The built-in rules.
const BUILT_IN: &str = include_str!("../../schemas/retention.toml");
const HOUR_MS: i64 = 3_600_000;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("retention rules {origin}: {message}")]
    Rules { origin: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Requests(#[from] crate::core::fsio::FsError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

pub type Result<T, E = RetentionError> = std::result::Result<T, E>;

/// One retention rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub table: String,
    /// Which rows of the table it covers; none: every row no earlier rule covers.
    pub when: Option<When>,
    pub keep_days: Option<u32>,
    pub keep_hours: Option<u32>,
    /// The seed lines it comes from.
    pub seed: String,
    /// What was decided where the seed is silent or names an event.
    pub choice: Option<String>,
}

/// A row matches when `field` equals `equals` (a string or a boolean).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    pub field: String,
    pub equals: MatchValue,
}

impl Rule {
    /// How long a row under this rule is kept, in milliseconds.
    pub fn keep_ms(&self) -> i64 {
        i64::from(self.keep_days.unwrap_or(0)) * 24 * HOUR_MS
            + i64::from(self.keep_hours.unwrap_or(0)) * HOUR_MS
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    rule: Vec<Rule>,
}

/// The rules of every table, checked against the tables' columns.
#[derive(Debug, Clone)]
pub struct Retention {
    tables: BTreeMap<String, Vec<Rule>>,
    /// Rows that must go because of an event (see [`crate::lifecycle::requests`]).
    requests: Vec<DeletionRequest>,
    /// Rows legal holds keep, whatever the rules and requests say.
    held: Vec<Selection>,
}

/// The column a table's rows are partitioned by.
pub fn time_column(table: &str) -> &'static str {
    if table == crate::core::table::DEAD_LETTERS {
        crate::schema::RECEIVED_AT_COLUMN
    } else {
        "ts"
    }
}

/// What a table's rules count from, as SQL: the vehicle timestamp, or the
/// receipt if that is earlier (a vehicle clock ahead of ours, up to
/// `pipeline.max_clock_skew_ms`); dead letters: their receipt.
pub fn row_time_sql(table: &str) -> String {
    let partitioned_by = time_column(table);
    let received = crate::schema::RECEIVED_AT_COLUMN;
    if partitioned_by == received {
        received.to_owned()
    } else {
        format!("least({partitioned_by}, {received})")
    }
}

impl Retention {
    /// Loads `file`, or the built-in rules, and checks them against the
    /// stream schemas and the dead-letter table.
    pub fn load(file: Option<&Path>, registry: &Registry) -> Result<Self> {
        let (origin, text) = match file {
            Some(path) => (
                path.display().to_string(),
                fs::read_to_string(path).map_err(|source| RetentionError::Io {
                    path: path.to_owned(),
                    source,
                })?,
            ),
            None => ("schemas/retention.toml".to_owned(), BUILT_IN.to_owned()),
        };
        let error = |message: String| RetentionError::Rules {
            origin: origin.clone(),
            message,
        };
        let parsed: RulesFile = toml::from_str(&text).map_err(|e| error(e.to_string()))?;
        let schemas: BTreeMap<String, SchemaRef> = registry
            .iter()
            .map(|s| (s.stream.name().to_owned(), s.arrow.clone()))
            .chain([(
                crate::core::table::DEAD_LETTERS.to_owned(),
                dead_letter::arrow_schema(),
            )])
            .collect();
        let mut tables: BTreeMap<String, Vec<Rule>> = BTreeMap::new();
        for rule in parsed.rule {
            let Some(schema) = schemas.get(&rule.table) else {
                return Err(error(format!(
                    "rule {:?} names no table {:?}",
                    rule.name, rule.table
                )));
            };
            if rule.keep_ms() <= 0 || (rule.keep_days.is_some() && rule.keep_hours.is_some()) {
                return Err(error(format!(
                    "rule {:?} needs exactly one of keep_days and keep_hours, above zero",
                    rule.name
                )));
            }
            if let Some(when) = &rule.when {
                let expected = match when.equals {
                    MatchValue::Bool(_) => DataType::Boolean,
                    MatchValue::Text(_) => DataType::Utf8,
                    MatchValue::AnyOf(_) => {
                        return Err(error(format!(
                            "rule {:?}: `equals` is one string or boolean, not a list",
                            rule.name
                        )));
                    }
                };
                match schema.field_with_name(&when.field) {
                    Ok(f) if *f.data_type() == expected => {}
                    _ => {
                        return Err(error(format!(
                            "rule {:?}: {} has no {expected} column {:?}",
                            rule.name, rule.table, when.field
                        )));
                    }
                }
            }
            let rules = tables.entry(rule.table.clone()).or_default();
            if rules.last().is_some_and(|r| r.when.is_none()) {
                return Err(error(format!(
                    "rule {:?} follows {}'s catch-all rule and would never apply",
                    rule.name, rule.table
                )));
            }
            rules.push(rule);
        }
        for table in schemas.keys() {
            match tables.get(table).and_then(|r| r.last()) {
                Some(last) if last.when.is_none() => {}
                _ => {
                    return Err(error(format!(
                        "table {table} needs a last rule without `when`, so that no row is kept forever"
                    )));
                }
            }
        }
        Ok(Self {
            tables,
            requests: Vec::new(),
            held: Vec::new(),
        })
    }

    /// The rules as configured, with the deletion requests and legal holds
    /// in force now: what a query or a sweep must apply.
    pub fn current(config: &RetentionConfig, registry: &Registry) -> Result<Self> {
        Self::load(config.rules_file.as_deref(), registry)?.with_state(config)
    }

    /// The same rules, with the deletion requests and legal holds in force now.
    pub fn with_state(self, config: &RetentionConfig) -> Result<Self> {
        Ok(self
            .with_requests(requests::load(&config.requests_file)?)
            .with_holds(&requests::load_holds(&config.holds_file)?))
    }

    /// The same rules, also deleting the rows of `requests`.
    pub fn with_requests(mut self, requests: Vec<DeletionRequest>) -> Self {
        self.requests = requests;
        self
    }

    /// The deletion requests these rules also apply.
    pub fn requests(&self) -> &[DeletionRequest] {
        &self.requests
    }

    fn requests_of<'a>(&'a self, table: &'a str) -> impl Iterator<Item = &'a DeletionRequest> {
        self.requests.iter().filter(move |r| r.rows.table == table)
    }

    /// The same rules, keeping whatever `holds` cover.
    pub fn with_holds(mut self, holds: &[LegalHold]) -> Self {
        self.held = holds
            .iter()
            .flat_map(|h| h.covers.iter().cloned())
            .collect();
        self
    }

    fn held_of<'a>(&'a self, table: &'a str) -> impl Iterator<Item = &'a Selection> {
        self.held.iter().filter(move |h| h.table == table)
    }

    /// The rows legal holds keep.
    pub fn held(&self) -> &[Selection] {
        &self.held
    }

    /// The requests a sweep carries out in full: those of tables without a
    /// legal hold (a held table's request waits for the hold's release).
    pub fn completed_by_sweep(&self) -> Vec<DeletionRequest> {
        self.requests
            .iter()
            .filter(|r| self.held_of(&r.rows.table).next().is_none())
            .cloned()
            .collect()
    }

    /// Every rule, table by table.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.tables.values().flatten()
    }

    fn table(&self, table: &str) -> &[Rule] {
        self.tables.get(table).map_or(&[], Vec::as_slice)
    }

    /// Rows of `table` older than this are expired under every rule.
    pub fn oldest_kept_ms(&self, table: &str, now_ms: i64) -> i64 {
        let longest = self
            .table(table)
            .iter()
            .map(Rule::keep_ms)
            .max()
            .unwrap_or(0);
        now_ms - longest
    }

    /// The SQL condition of the rows of `table` still visible at `now_ms`:
    /// each row against its own rule's cutoff, plus the hour partitions that
    /// can still hold such rows, so that expired partitions are never opened.
    /// `with_held`: also the rows legal holds keep past their rule, which is
    /// for the operator only (a hold preserves evidence; it gives no one
    /// else access).
    pub fn visible_sql(&self, table: &str, now_ms: i64, with_held: bool) -> String {
        let time = row_time_sql(table);
        let kept_since =
            |rule: &Rule| format!("{time} >= to_timestamp_millis({})", now_ms - rule.keep_ms());
        let mut case = String::from("CASE");
        let mut otherwise = "false".to_owned();
        for rule in self.table(table) {
            match &rule.when {
                Some(when) => case.push_str(&format!(
                    " WHEN {} = {} THEN {}",
                    sql_identifier(&when.field),
                    sql_literal(&when.equals),
                    kept_since(rule)
                )),
                None => otherwise = kept_since(rule),
            }
        }
        let date = DateTime::from_timestamp_millis(self.oldest_kept_ms(table, now_ms))
            .unwrap_or_default()
            .date_naive();
        let per_row = if case == "CASE" {
            otherwise
        } else {
            format!("{case} ELSE {otherwise} END")
        };
        let requested: String = self
            .requests_of(table)
            .map(|r| format!(" AND NOT {}", r.rows.sql()))
            .collect();
        // The partition bound holds for the row time too: it is never later
        // than the partitioning column.
        let visible = format!("date >= DATE '{date}' AND ({per_row}){requested}");
        let held: Vec<String> = match with_held {
            true => self.held_of(table).map(Selection::sql).collect(),
            false => Vec::new(),
        };
        if held.is_empty() {
            visible
        } else {
            format!("({visible}) OR {}", held.join(" OR "))
        }
    }
}

/// One deletion the sweep made, or would make.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Deletion {
    /// `delete_partition`: every row of the partition had expired;
    /// `rewrite_file`: the file was rewritten without its expired rows;
    /// `delete_file`: every row of the file had expired.
    pub action: &'static str,
    pub table: String,
    /// `date=YYYY-MM-DD/hour=HH`.
    pub partition: String,
    pub files: usize,
    pub rows: u64,
    /// The rules the deleted rows fell under.
    pub rules: Vec<String>,
}

/// One run of the sweep.
#[derive(Debug, Clone, Copy)]
pub struct SweepRun {
    pub now_ms: i64,
    /// When this process swept last: rows that expired before then are gone
    /// already, so only files that can hold rows expired since are read.
    /// `None` reads every file that can hold expired rows.
    pub since_ms: Option<i64>,
    /// zstd level of rewritten files.
    pub zstd_level: i32,
    /// How far ahead of its receipt a row's timestamp may be
    /// (`pipeline.max_clock_skew_ms`): how far from its rule's cutoff by
    /// timestamp a file can hold rows expired by their receipt.
    pub max_clock_skew_ms: i64,
    /// List what would be deleted; delete nothing.
    pub dry_run: bool,
}

/// Deletes what has expired at `run.now_ms`: every hour partition whose rows
/// have all expired under the table's rules, without opening its files; and,
/// where a table has shorter rules for some rows (HV warn calls, remote
/// charge management), those rows, by rewriting each file that holds them
/// (write a new file, fsync, rename over the old one, fsync the directory:
/// a crash leaves the old file or the new one, never both, never neither).
/// Only partitions where rows can have expired since the last sweep, or
/// that were written since (a late, back-dated record), are opened; and in
/// the partitions a vehicle clock running ahead can have filled with rows
/// that expire by their receipt (within `max_clock_skew_ms` after a rule's
/// cutoff), only the files committed before that cutoff since the last
/// sweep. So the cost grows with what is deleted, not with the store.
/// Deletion requests are carried out the same way, and rows a legal hold
/// covers are kept: while a table has a hold, its expired partitions are
/// rewritten around the held rows instead of dropped (and re-read by every
/// sweep until the hold is released; the first sweep after a release must
/// be a full one, `since_ms: None`).
pub fn sweep(data_dir: &Path, retention: &Retention, run: SweepRun) -> Result<Vec<Deletion>> {
    let mut out = Vec::new();
    for (table, rules) in &retention.tables {
        let dir = table_dir(data_dir, table);
        let oldest_kept = retention.oldest_kept_ms(table, run.now_ms);
        let longest = rules.iter().map(Rule::keep_ms).max().unwrap_or(0);
        let shortest = rules.iter().map(Rule::keep_ms).min().unwrap_or(0);
        let shorter: Vec<&Rule> = rules
            .iter()
            .filter(|r| r.when.is_some() && r.keep_ms() < longest)
            .collect();
        // Dead letters are timed by their receipt: no clock runs ahead of it.
        let skew = match time_column(table) == crate::schema::RECEIVED_AT_COLUMN {
            true => 0,
            false => run.max_clock_skew_ms.max(0),
        };
        let held_here = retention.held_of(table).next().is_some();
        let requested_here = retention.requests_of(table).next().is_some();
        for (key, partition_dir) in partitions(&dir)? {
            let (days, hour) = key.to_parts();
            let hour_start = (i64::from(days) * 24 + i64::from(hour)) * HOUR_MS;
            let hour_end = hour_start + HOUR_MS;
            let partition = key.relative_dir().display().to_string();
            if hour_end <= oldest_kept && !held_here {
                let files = parquet_files(&partition_dir)?;
                let mut rows = 0u64;
                for file in &files {
                    rows += footer_rows(file)?;
                }
                if !run.dry_run {
                    // Before any file goes: a WAL segment may outlive it.
                    crate::store::settle(data_dir, &files)?;
                    delete_partition(&partition_dir, &files)?;
                }
                out.push(Deletion {
                    action: "delete_partition",
                    table: table.clone(),
                    partition,
                    files: files.len(),
                    rows,
                    rules: rules.iter().map(|r| r.name.clone()).collect(),
                });
                continue;
            }
            let expiring_here = shorter.iter().any(|r| {
                let cutoff = run.now_ms - r.keep_ms();
                let swept_up_to = run.since_ms.map(|s| s - r.keep_ms());
                hour_start < cutoff && swept_up_to.is_none_or(|p| hour_end > p)
            });
            // Written since the last sweep (a late, back-dated record, a
            // replay): it may hold rows of a shorter rule whose hour the
            // window has passed.
            let written_since = run.since_ms.is_some_and(|since| {
                shorter
                    .iter()
                    .any(|r| hour_start < run.now_ms - r.keep_ms())
                    && modified_ms(&partition_dir).is_some_and(|m| m >= since - MTIME_MARGIN_MS)
            });
            let held_and_expiring = held_here && hour_start < run.now_ms - shortest;
            let files = if expiring_here || written_since || held_and_expiring || requested_here {
                parquet_files(&partition_dir)?
            } else {
                expired_by_receipt(&partition_dir, rules, (hour_start, hour_end), skew, run)?
            };
            if files.is_empty() {
                continue;
            }
            remove_stale_rewrites(&partition_dir)?;
            for file in files {
                if let Some(deletion) = rewrite(data_dir, &file, table, retention, &partition, run)?
                {
                    out.push(deletion);
                }
            }
        }
    }
    Ok(out)
}

/// Clock granularity of file times, as in recovery's footer scan.
const MTIME_MARGIN_MS: i64 = crate::store::FOOTER_SCAN_MARGIN_MS;

/// When a file or directory was last changed (ms since the epoch).
fn modified_ms(path: &Path) -> Option<i64> {
    let modified = fs::metadata(path).ok()?.modified().ok()?;
    let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since_epoch.as_millis()).ok()
}

/// The files of a partition that can hold rows expired by their receipt
/// while their timestamps still keep them (a vehicle clock ahead of ours):
/// under some rule, the partition's hour lies within `skew` after the
/// rule's cutoff, and the file was committed (so every row in it received)
/// before the cutoff, since the last sweep. One `stat` per file of those
/// few partitions; only such files are read.
fn expired_by_receipt(
    dir: &Path,
    rules: &[Rule],
    (hour_start, hour_end): (i64, i64),
    skew: i64,
    run: SweepRun,
) -> Result<Vec<PathBuf>> {
    let ahead: Vec<i64> = rules
        .iter()
        .map(Rule::keep_ms)
        .filter(|keep| {
            let cutoff = run.now_ms - keep;
            hour_end > cutoff && hour_start < cutoff + skew
        })
        .collect();
    if ahead.is_empty() {
        return Ok(Vec::new());
    }
    let mut files = parquet_files(dir)?;
    files.retain(|file| {
        modified_ms(file).is_some_and(|committed| {
            ahead.iter().any(|keep| {
                committed < run.now_ms - keep
                    && run
                        .since_ms
                        .is_none_or(|since| committed >= since - keep - MTIME_MARGIN_MS)
            })
        })
    });
    Ok(files)
}

/// Suffix of a file being rewritten; never read by queries.
const REWRITE_SUFFIX: &str = "rewrite";

/// Rewrites `file` without the rows expired at `run.now_ms`, keeping its
/// footer metadata (table, schema version, the WAL entries it covers) and
/// its commit time; a file left without rows is settled (see
/// [`crate::store::settle`]), then removed.
fn rewrite(
    data_dir: &Path,
    file: &Path,
    table: &str,
    retention: &Retention,
    partition: &str,
    run: SweepRun,
) -> Result<Option<Deletion>> {
    let io = |source| RetentionError::Io {
        path: file.to_owned(),
        source,
    };
    let parquet = |source| RetentionError::Parquet {
        path: file.to_owned(),
        source,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(fs::File::open(file).map_err(io)?)
        .map_err(parquet)?;
    let metadata: Vec<(String, String)> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let schema = builder.schema().clone();
    let mut kept = Vec::new();
    let mut removed = 0u64;
    let mut removed_by = std::collections::BTreeSet::new();
    for batch in builder.build().map_err(parquet)? {
        let batch = batch?;
        let reasons = deletion_reasons(&batch, table, retention, run.now_ms);
        let keep: BooleanArray = reasons.iter().map(|r| Some(r.is_none())).collect();
        for reason in reasons.into_iter().flatten() {
            removed += 1;
            removed_by.insert(reason);
        }
        kept.push(filter_record_batch(&batch, &keep)?);
    }
    if removed == 0 {
        return Ok(None);
    }
    let rows_left: usize = kept.iter().map(RecordBatch::num_rows).sum();
    if !run.dry_run {
        if rows_left == 0 {
            crate::store::settle(data_dir, &[file.to_owned()])?;
            fs::remove_file(file).map_err(io)?;
            fsio::sync_dir(fsio::parent_dir(file)).map_err(io)?;
        } else {
            let committed = fs::metadata(file).and_then(|m| m.modified()).map_err(io)?;
            let temporary = file.with_extension(format!("{PARQUET_EXTENSION}.{REWRITE_SUFFIX}"));
            let properties = writer_properties(run.zstd_level, 1 << 20, &metadata)?;
            let output = fsio::create(&temporary).map_err(io)?;
            let mut writer =
                ArrowWriter::try_new(output, schema, Some(properties)).map_err(parquet)?;
            for batch in &kept {
                writer.write(batch).map_err(parquet)?;
            }
            let output = writer.into_inner().map_err(parquet)?;
            // Recovery reads a footer only if the file may hold entries of
            // the live log, by its time; the rewrite does not make it newer.
            output.set_modified(committed).map_err(io)?;
            output.sync_all().map_err(io)?;
            fsio::rename_durably(&temporary, file).map_err(io)?;
        }
    }
    Ok(Some(Deletion {
        action: if rows_left == 0 {
            "delete_file"
        } else {
            "rewrite_file"
        },
        table: table.to_owned(),
        partition: partition.to_owned(),
        files: 1,
        rows: removed,
        rules: removed_by.into_iter().collect(),
    }))
}

/// Per row: why it goes, if it does: the event of a deletion request that
/// matches it, or the rule it expired under at `now_ms`.
fn deletion_reasons(
    batch: &RecordBatch,
    table: &str,
    retention: &Retention,
    now_ms: i64,
) -> Vec<Option<String>> {
    let rules = retention.table(table);
    let mut reasons: Vec<Option<String>> = expired_rules(batch, table, rules, now_ms)
        .into_iter()
        .map(|rule| rule.map(|r| rules[r].name.clone()))
        .collect();
    for request in retention.requests_of(table) {
        for (reason, hit) in reasons.iter_mut().zip(request.rows.matching_rows(batch)) {
            if hit {
                *reason = Some(request.event.clone());
            }
        }
    }
    for held in retention.held_of(table) {
        for (reason, hit) in reasons.iter_mut().zip(held.matching_rows(batch)) {
            if hit {
                *reason = None;
            }
        }
    }
    reasons
}

/// Per row: the index of the rule it expired under at `now_ms`, if it has,
/// counting from the row's time (see [`row_time_sql`]).
fn expired_rules(
    batch: &RecordBatch,
    table: &str,
    rules: &[Rule],
    now_ms: i64,
) -> Vec<Option<usize>> {
    let timestamps = |column: &str| {
        batch
            .column_by_name(column)
            .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
    };
    let time = timestamps(time_column(table));
    let received = timestamps(crate::schema::RECEIVED_AT_COLUMN);
    // Per rule, which rows it covers; a rule without `when` covers all.
    let covered: Vec<Option<Vec<bool>>> = rules
        .iter()
        .map(|r| {
            r.when
                .as_ref()
                .map(|w| column_matches(batch, &w.field, &w.equals))
        })
        .collect();
    (0..batch.num_rows())
        .map(|row| {
            let stamped = time.filter(|t| t.is_valid(row))?.value(row);
            let time = received
                .filter(|r| r.is_valid(row))
                .map_or(stamped, |r| stamped.min(r.value(row)));
            let rule = covered
                .iter()
                .position(|c| c.as_ref().is_none_or(|rows| rows[row]))?;
            (time < now_ms - rules[rule].keep_ms()).then_some(rule)
        })
        .collect()
}

/// Removes what a crash left of an unfinished rewrite.
fn remove_stale_rewrites(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|source| RetentionError::Io {
        path: dir.to_owned(),
        source,
    })?;
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_some_and(|e| e == REWRITE_SUFFIX) {
            fs::remove_file(&path).map_err(|source| RetentionError::Io { path, source })?;
        }
    }
    Ok(())
}

/// One sweep as the server and `admin retention` run it: deletes, then (unless
/// a dry run) audits each deletion and retires the requests carried out.
pub fn sweep_and_record(
    data_dir: &Path,
    retention: &Retention,
    config: &RetentionConfig,
    run: SweepRun,
) -> Result<Vec<Deletion>> {
    let deletions = sweep(data_dir, retention, run)?;
    if !run.dry_run {
        audit(&config.audit_file, run.now_ms, &deletions)?;
        requests::retire(&config.requests_file, &retention.completed_by_sweep())?;
    }
    Ok(deletions)
}

/// Appends one JSON line per deletion to the audit log (fsync'd): what was
/// deleted, when and under which rules; never the data itself.
pub fn audit(audit_file: &Path, now_ms: i64, deletions: &[Deletion]) -> Result<()> {
    let at = DateTime::from_timestamp_millis(now_ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default();
    let lines: Vec<serde_json::Value> = deletions
        .iter()
        .map(|d| {
            serde_json::json!({
                "at": at,
                "action": d.action,
                "table": d.table,
                "partition": d.partition,
                "files": d.files,
                "rows": d.rows,
                "rules": d.rules,
            })
        })
        .collect();
    append_audit(audit_file, &lines).map_err(|source| RetentionError::Io {
        path: audit_file.to_owned(),
        source,
    })
}

/// Appends JSON lines to the audit log and fsyncs it; creates it first.
pub fn append_audit(audit_file: &Path, lines: &[serde_json::Value]) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    fsio::create_dir_all(fsio::parent_dir(audit_file))?;
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let mut file = fsio::private_options()
        .create(true)
        .append(true)
        .open(audit_file)?;
    file.write_all(text.as_bytes())?;
    file.sync_data()
}

/// The hour partitions under a table directory.
fn partitions(table_dir: &Path) -> Result<Vec<(PartitionKey, PathBuf)>> {
    let mut out = Vec::new();
    for date_dir in subdirs(table_dir)? {
        let Some(date) = dir_value(&date_dir, "date=")
            .and_then(|d| NaiveDate::parse_from_str(&d, "%Y-%m-%d").ok())
        else {
            continue;
        };
        for hour_dir in subdirs(&date_dir)? {
            let Some(hour) = dir_value(&hour_dir, "hour=").and_then(|h| h.parse::<u8>().ok())
            else {
                continue;
            };
            let days = (date - NaiveDate::default()).num_days() as i32;
            if let Some(key) = PartitionKey::from_parts(days, hour) {
                out.push((key, hour_dir));
            }
        }
    }
    Ok(out)
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RetentionError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    Ok(entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect())
}

fn dir_value(dir: &Path, prefix: &str) -> Option<String> {
    dir.file_name()?
        .to_str()?
        .strip_prefix(prefix)
        .map(str::to_owned)
}

fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).map_err(|source| RetentionError::Io {
        path: dir.to_owned(),
        source,
    })?;
    Ok(entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == PARQUET_EXTENSION))
        .collect())
}

fn footer_rows(file: &Path) -> Result<u64> {
    let footer = |source| RetentionError::Parquet {
        path: file.to_owned(),
        source,
    };
    let handle = fs::File::open(file).map_err(|source| RetentionError::Io {
        path: file.to_owned(),
        source,
    })?;
    let reader = SerializedFileReader::new(handle).map_err(footer)?;
    Ok(reader.metadata().file_metadata().num_rows().max(0) as u64)
}

/// Removes a partition's committed files, then whatever else is left in
/// it (an uncommitted file of a writer that raced the sweep stays and keeps
/// the directory), then the date directory if it is empty. A crash midway
/// leaves fewer expired files, which stay hidden and go at the next sweep.
fn delete_partition(dir: &Path, files: &[PathBuf]) -> Result<()> {
    for file in files {
        fs::remove_file(file).map_err(|source| RetentionError::Io {
            path: file.clone(),
            source,
        })?;
    }
    // Not empty (a late file arrived): keep the directory; the next sweep takes it.
    if fs::remove_dir(dir).is_ok()
        && let Some(date_dir) = dir.parent()
    {
        let _ = fs::remove_dir(date_dir);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Retention> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rules.toml");
        fs::write(&path, text).expect("write");
        Retention::load(Some(&path), &Registry::load().expect("schemas"))
    }

    fn message(result: Result<Retention>) -> String {
        result.expect_err("rejected").to_string()
    }

    #[test]
    fn built_in_rules_cover_every_table() {
        let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
        assert!(rules.rules().count() >= 6);
        assert!(rules.rules().all(|r| !r.seed.is_empty()));
    }

    #[test]
    fn a_table_without_a_catch_all_rule_is_refused_by_name() {
        let without_dead_letters: String = BUILT_IN
            .split("[[rule]]")
            .filter(|r| !r.contains("table = \"dead_letters\""))
            .collect::<Vec<_>>()
            .join("[[rule]]");
        assert!(
            message(load(&without_dead_letters)).contains("table dead_letters needs a last rule")
        );
    }

    #[test]
    fn rules_naming_unknown_columns_or_keeping_nothing_are_refused() {
        let rule = |extra: &str| {
            format!("{BUILT_IN}\n[[rule]]\nname = \"x\"\ntable = \"rtti\"\nseed = \"s\"\n{extra}\n")
        };
        assert!(message(load(&rule("keep_days = 0"))).contains("exactly one of keep_days"));
        assert!(
            message(load(&rule("keep_days = 1\nkeep_hours = 1")))
                .contains("exactly one of keep_days")
        );
        assert!(message(load(&rule("keep_days = 1"))).contains("would never apply"));
        let unknown = BUILT_IN.replace("field = \"remote_managed\"", "field = \"no_such_column\"");
        assert!(message(load(&unknown)).contains("no_such_column"));
        let wrong_type = BUILT_IN.replace("equals = true", "equals = \"yes\"");
        assert!(message(load(&wrong_type)).contains("remote_managed"));
    }

    #[test]
    fn visibility_is_one_condition_per_rule_and_a_partition_bound() {
        let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
        let now = 1_795_521_600_000; // 2026-11-24T12:00:00Z
        let sql = rules.visible_sql("charging", now, true);
        assert!(sql.starts_with("date >= DATE '2025-11-24'"), "{sql}");
        assert!(
            sql.contains(
                "WHEN \"remote_managed\" = true THEN least(ts, received_at) >= to_timestamp_millis(1795435200000)"
            ),
            "{sql}"
        );
        let rtti = rules.visible_sql("rtti", now, true);
        assert_eq!(
            rtti,
            "date >= DATE '2026-11-23' AND (least(ts, received_at) >= to_timestamp_millis(1795435200000))"
        );
        let dead_letters = rules.visible_sql("dead_letters", now, true);
        // Dead letters count from receipt only, RTTI's by their own rule.
        assert!(
            dead_letters.contains(
                "WHEN \"stream\" = 'rtti' THEN received_at >= to_timestamp_millis(1795435200000)"
            ),
            "{dead_letters}"
        );
        assert!(!dead_letters.contains("least("), "{dead_letters}");
    }
}
