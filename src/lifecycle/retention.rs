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
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use chrono::DateTime;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use deltalake::operations::vacuum::VacuumMode;
use serde::{Deserialize, Serialize};

use crate::core::fsio;
use crate::lifecycle::requests::LifecycleState;
use crate::lifecycle::requests::{
    self, DeletionRequest, LegalHold, MatchValue, Selection, sql_identifier, sql_literal,
};
use crate::schema::Registry;
use crate::store::delta;
use crate::store::{PartitionKey, StoreRoot};

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
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("delta: {0}")]
    Delta(Box<deltalake::DeltaTableError>),
    #[error("query: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
    #[error(transparent)]
    Requests(#[from] crate::control::ControlError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

pub type Result<T, E = RetentionError> = std::result::Result<T, E>;

/// Boxed: Delta's error is large, and this one travels up every `Result`.
impl From<deltalake::DeltaTableError> for RetentionError {
    fn from(error: deltalake::DeltaTableError) -> Self {
        Self::Delta(Box::new(error))
    }
}

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
    match row_time_columns(table).as_slice() {
        [only] => (*only).to_owned(),
        columns => format!("least({})", columns.join(", ")),
    }
}

/// The columns of `table` a row's time ([`row_time_sql`]) is made of.
pub fn row_time_columns(table: &str) -> Vec<&'static str> {
    let received = crate::schema::RECEIVED_AT_COLUMN;
    match time_column(table) {
        column if column == received => vec![received],
        column => vec![column, received],
    }
}

impl Retention {
    /// Loads `file`, or the built-in rules, and checks them against the
    /// stream schemas and the dead-letter table.
    pub fn load(file: Option<&Path>, registry: &Registry) -> Result<Self> {
        let (origin, text) = match file {
            Some(path) => (
                path.display().to_string(),
                std::fs::read_to_string(path).map_err(|source| RetentionError::Io {
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
            .tables()
            .map(|(table, schema)| (table.name().to_owned(), schema))
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
    pub fn current(
        rules_file: Option<&Path>,
        state: &LifecycleState,
        registry: &Registry,
    ) -> Result<Self> {
        Self::load(rules_file, registry)?.with_state(state)
    }

    /// The same rules, with the deletion requests and legal holds in force now.
    pub fn with_state(self, state: &LifecycleState) -> Result<Self> {
        Ok(self
            .with_requests(requests::load(&state.requests)?)
            .with_holds(&requests::load_holds(&state.holds)?))
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
        let date = DateTime::from_timestamp_millis(self.oldest_kept_ms(table, now_ms))
            .unwrap_or_default()
            .date_naive();
        let per_row = rule_case_sql(self.table(table), String::new(), "false", kept_since);
        // The partition bound holds for the row time too: it is never later
        // than the partitioning column.
        let kept = format!("date >= DATE '{date}' AND ({per_row})");
        self.requested_and_held(table, kept, with_held)
    }

    /// The rows of `table` visible at `now_ms` ([`Retention::visible_sql`])
    /// of a version whose hour partitions hold no row earlier than
    /// `earliest` says (by the log's statistics, `None` where unknown): in
    /// the run of partitions counted back from the newest whose every row is
    /// within every rule of the table, no row's time is compared, so the
    /// view reads no time column there; only deletion requests and holds
    /// apply. The partitions before that run are read row by row.
    pub fn visible_rows(
        &self,
        table: &str,
        now_ms: i64,
        with_held: bool,
        earliest: Option<&BTreeMap<PartitionKey, Option<i64>>>,
    ) -> VisibleRows {
        let Some((from, first)) = earliest.and_then(|earliest| {
            let from = self.whole_from(table, now_ms, earliest)?;
            Some((from, earliest.keys().next() == Some(&from)))
        }) else {
            return VisibleRows::EachRow(self.visible_sql(table, now_ms, with_held));
        };
        let whole = self.requested_and_held(table, "true".to_owned(), with_held);
        if first {
            return VisibleRows::Whole(whole);
        }
        let (date, hour) = delta::partition_values(from);
        VisibleRows::Split {
            whole: format!(
                "(date > DATE '{date}' OR (date = DATE '{date}' AND hour >= {hour})) AND ({whole})"
            ),
            each: format!(
                "({}) AND ({})",
                partitions_before(from),
                self.visible_sql(table, now_ms, with_held)
            ),
        }
    }

    /// The first of the hour partitions `earliest` names from which on no
    /// row is earlier than the latest cutoff of `table`'s rules at `now_ms`,
    /// so that every rule keeps every row (every table has a last rule for
    /// the rows no other covers, checked when the rules are loaded); `None`
    /// if the last partition holds such a row, or may.
    fn whole_from(
        &self,
        table: &str,
        now_ms: i64,
        earliest: &BTreeMap<PartitionKey, Option<i64>>,
    ) -> Option<PartitionKey> {
        let rules = self.table(table);
        let latest_cutoff = rules.iter().map(|rule| now_ms - rule.keep_ms()).max()?;
        earliest
            .iter()
            .rev()
            .take_while(|(_, earliest)| earliest.is_some_and(|e| e >= latest_cutoff))
            .last()
            .map(|(key, _)| *key)
    }

    /// `kept` without the rows deletion requests name, and with
    /// (`with_held`) the rows holds keep.
    fn requested_and_held(&self, table: &str, kept: String, with_held: bool) -> String {
        let requested: String = self
            .requests_of(table)
            .map(|r| format!(" AND NOT {}", r.rows.sql()))
            .collect();
        let visible = format!("{kept}{requested}");
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

/// The rows of a table a query sees, as conditions on its rows
/// ([`Retention::visible_rows`]).
#[derive(Debug, Clone, PartialEq)]
pub enum VisibleRows {
    /// Each row against its rule.
    EachRow(String),
    /// Every row within every rule: deletion requests and holds only.
    Whole(String),
    /// The hour partitions from one on whole, those before it each row.
    Split { whole: String, each: String },
}

impl VisibleRows {
    /// `SELECT columns FROM table WHERE …` of the visible rows: a statement
    /// to which more conditions can be added with `AND`, and then
    /// `GROUP BY`. Split, it reads the table twice (the partitions before
    /// and from the first whole one), as the rows of a subquery named as
    /// the table.
    pub fn select(&self, table: &str, columns: &str) -> String {
        match self {
            Self::EachRow(visible) | Self::Whole(visible) => {
                format!("SELECT {columns} FROM {table} WHERE ({visible})")
            }
            Self::Split { whole, each } => format!(
                "SELECT {columns} FROM (SELECT * FROM {table} WHERE {whole} \
                 UNION ALL SELECT * FROM {table} WHERE {each}) AS {table} WHERE true"
            ),
        }
    }
}

/// One deletion the sweep made, or would make.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Deletion {
    /// `delete_partitions`: every hour partition before `partition` had
    /// expired whole and was dropped from the table without being read;
    /// `delete_rows`: rows of `partition` were deleted, and the files that
    /// held them rewritten without them.
    pub action: &'static str,
    pub table: String,
    /// `date=YYYY-MM-DD/hour=H` (`delete_partitions`: the first kept).
    pub partition: String,
    pub rows: u64,
    /// The rules (or deletion-request events) the deleted rows fell under.
    pub rules: Vec<String>,
}

/// One run of the sweep.
#[derive(Debug, Clone, Copy)]
pub struct SweepRun {
    pub now_ms: i64,
    /// How far ahead of its receipt a row's timestamp may be
    /// (`pipeline.max_clock_skew_ms`): how far after a rule's cutoff by
    /// timestamp a partition can hold rows expired by their receipt.
    pub max_clock_skew_ms: i64,
    /// How long a file a deletion removed from the table stays on disk for
    /// the queries already reading it (`storage.vacuum_grace_ms`).
    pub vacuum_grace_ms: i64,
    /// List what would be deleted; delete nothing.
    pub dry_run: bool,
    /// In a cluster: when the oldest WAL copy still in the store was
    /// written (rows a node acknowledged and no table holds yet, perhaps of
    /// a node that is down). A deletion request made after it stays active
    /// until those rows are stored, so that they are deleted too.
    pub unstored_since_ms: Option<i64>,
}

/// Deletes what has expired at `run.now_ms`, table by table, as Delta
/// DELETE commits: first every hour partition whose rows have all expired
/// under the table's rules (a commit that removes its files without
/// reading them); then, where a table has shorter rules for some rows (HV
/// warn calls, remote charge management) or deletion requests, those rows
/// (the files holding them are rewritten without them, in the same
/// commit). Rows a legal hold covers are kept: while a table has a hold,
/// its expired partitions are deleted row by row around the held rows.
/// Only partitions that can hold expired rows are read (those before the
/// shortest rule's cutoff, plus the clock-skew margin), or every partition
/// of a table with a deletion request. Then VACUUM deletes the files that
/// deletions removed from the table more than `vacuum_grace_ms` ago, and
/// files no commit names (left by a failed write): from then on no version
/// of the table, old or new, can read a deleted row.
pub fn sweep(root: &StoreRoot, retention: &Retention, run: SweepRun) -> Result<Vec<Deletion>> {
    let swept = sweep_each(root, retention, run);
    match swept.failed.into_iter().next() {
        Some((_, error)) => Err(error),
        None => Ok(swept.deletions),
    }
}

/// What a sweep did, table by table: a table that failed (a DELETE in
/// conflict with compaction, the store unreachable) stops nothing else.
pub struct Swept {
    pub deletions: Vec<Deletion>,
    pub failed: Vec<(String, RetentionError)>,
}

/// [`sweep`], going on past a table that fails.
pub fn sweep_each(root: &StoreRoot, retention: &Retention, run: SweepRun) -> Swept {
    let mut swept = Swept {
        deletions: Vec::new(),
        failed: Vec::new(),
    };
    for table in retention.tables.keys() {
        let mut out = Vec::new();
        let outcome = crate::store::block_on(async {
            let Some(delta_table) = delta::open(root, table).await? else {
                return Ok(());
            };
            let delta_table = sweep_table(delta_table, table, retention, run, &mut out).await?;
            if !run.dry_run {
                let delta_table = vacuum(delta_table, run).await?;
                // Every sweep: a DELETE commit that was the newest version
                // last time is history now.
                delta::forget_history(&delta_table, run.now_ms).await?;
                if let Some(dir) = root.table_dir(table) {
                    delta::sync_tree(&dir, run.now_ms - SYNC_MARGIN_MS)?;
                }
            }
            Ok::<_, RetentionError>(())
        });
        // What was deleted before a failure is still reported (and audited).
        swept.deletions.extend(out);
        if let Err(error) = outcome {
            swept.failed.push((table.clone(), error));
        }
    }
    swept
}

/// Files changed this long before a sweep started are fsync'd with it too
/// (clock granularity).
const SYNC_MARGIN_MS: i64 = 2_000;

async fn sweep_table(
    mut delta_table: DeltaTable,
    table: &str,
    retention: &Retention,
    run: SweepRun,
    out: &mut Vec<Deletion>,
) -> Result<DeltaTable> {
    let rules = retention.table(table);
    let held: Vec<String> = retention.held_of(table).map(Selection::sql).collect();
    let requested = retention.requests_of(table).next().is_some();

    // Whole partitions: every hour before the one holding the oldest time
    // any rule keeps; none while a hold may keep some of their rows.
    let whole_until = match held.is_empty() {
        true => {
            let first_kept = PartitionKey::from_millis(retention.oldest_kept_ms(table, run.now_ms));
            let predicate = partitions_before(first_kept);
            let found = query(
                &delta_table,
                &format!(
                    "SELECT date, hour, count(*) FROM t WHERE {predicate} GROUP BY 1, 2 ORDER BY 1, 2"
                ),
            )
            .await?;
            let rule_names: Vec<String> = rules.iter().map(|r| r.name.clone()).collect();
            for ((days, hour), rows) in partition_counts(&found) {
                out.push(Deletion {
                    action: "delete_partition",
                    table: table.to_owned(),
                    partition: partition_name_of(days, hour),
                    rows,
                    rules: rule_names.clone(),
                });
            }
            if !found.is_empty() && !run.dry_run {
                // A predicate on partition columns only: the files go
                // from the table without being read.
                delta_table = delta_table.delete().with_predicate(predicate).await?.0;
            }
            Some(first_kept)
        }
        false => None,
    };

    // Rows, each for the reason it goes. Without a deletion request, only
    // files whose time statistics allow a row older than the shortest
    // rule's cutoff are read.
    let mut conditions = Vec::new();
    if let Some(first_kept) = whole_until {
        // Gone whole above (or, in a dry run, counted there).
        conditions.push(format!("NOT ({})", partitions_before(first_kept)));
    }
    let whole_until = whole_until.map(|first_kept| {
        let (days, hour) = first_kept.to_parts();
        (i64::from(days) * 24 + i64::from(hour) + 1) * HOUR_MS
    });
    let reason = deletion_reason_sql(retention, table, run.now_ms, whole_until);
    if !requested {
        let shortest = rules.iter().map(Rule::keep_ms).min().unwrap_or(0);
        let cutoff = timestamp_sql(run.now_ms - shortest);
        conditions.push(format!(
            "({} < {cutoff} OR {} < {cutoff})",
            time_column(table),
            crate::schema::RECEIVED_AT_COLUMN
        ));
    }
    conditions.push(format!("({reason}) IS NOT NULL"));
    if !held.is_empty() {
        conditions.push(format!("NOT ({})", held.join(" OR ")));
    }
    let deletable = conditions.join(" AND ");
    let found = query(
        &delta_table,
        &format!(
            "SELECT date, hour, {reason} AS reason, count(*) FROM t WHERE {deletable} \
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ),
    )
    .await?;
    let mut by_partition: BTreeMap<(i32, i32), (u64, Vec<String>)> = BTreeMap::new();
    for batch in &found {
        let reasons = arrow::compute::cast(batch.column(2), &DataType::Utf8)?;
        let reasons = reasons.as_string::<i32>();
        let counts = batch
            .column(3)
            .as_primitive::<arrow::datatypes::Int64Type>();
        let (dates, hours) = partition_columns(batch);
        for row in 0..batch.num_rows() {
            let entry = by_partition
                .entry((dates.value(row), hours.value(row)))
                .or_default();
            entry.0 += u64::try_from(counts.value(row)).unwrap_or(0);
            entry.1.push(reasons.value(row).to_owned());
        }
    }
    if by_partition.is_empty() {
        return Ok(delta_table);
    }
    if !run.dry_run {
        delta_table = delta_table.delete().with_predicate(deletable).await?.0;
    }
    for ((days, hour), (rows, rules)) in by_partition {
        out.push(Deletion {
            action: "delete_rows",
            table: table.to_owned(),
            partition: partition_name_of(days, hour),
            rows,
            rules,
        });
    }
    Ok(delta_table)
}

/// The `date` and `hour` columns of a result's first two columns.
fn partition_columns(
    batch: &RecordBatch,
) -> (&arrow::array::Date32Array, &arrow::array::Int32Array) {
    (
        batch
            .column(0)
            .as_primitive::<arrow::datatypes::Date32Type>(),
        batch
            .column(1)
            .as_primitive::<arrow::datatypes::Int32Type>(),
    )
}

/// Rows per partition of a `SELECT date, hour, count(*)` result.
fn partition_counts(batches: &[RecordBatch]) -> Vec<((i32, i32), u64)> {
    let mut out = Vec::new();
    for batch in batches {
        let (dates, hours) = partition_columns(batch);
        let counts = batch
            .column(2)
            .as_primitive::<arrow::datatypes::Int64Type>();
        for row in 0..batch.num_rows() {
            out.push((
                (dates.value(row), hours.value(row)),
                u64::try_from(counts.value(row)).unwrap_or(0),
            ));
        }
    }
    out
}

/// `date=YYYY-MM-DD/hour=H` of a partition given as days since the epoch and hour.
fn partition_name_of(days: i32, hour: i32) -> String {
    PartitionKey::from_parts(days, u8::try_from(hour).unwrap_or(u8::MAX))
        .map(partition_name)
        .unwrap_or_default()
}

/// One sweep as the server and `admin retention` run it: deletes, then (unless
/// a dry run) audits each deletion and retires the requests carried out.
pub fn sweep_and_record(
    root: &StoreRoot,
    retention: &Retention,
    state: &LifecycleState,
    run: SweepRun,
) -> Result<Vec<Deletion>> {
    if run.dry_run {
        return sweep(root, retention, run);
    }
    let swept = sweep_each(root, retention, run);
    audit(&state.audit_file, run.now_ms, &swept.deletions)?;
    let failed: Vec<&str> = swept.failed.iter().map(|(t, _)| t.as_str()).collect();
    // A request made moments ago may have rows still on their way to the
    // table (held by a writer, in the WAL): it stays active, and is carried
    // out again, until it is REQUEST_SETTLE_MS old, and in a cluster until
    // no WAL copy written before it (and as long again after) is left.
    let settled_before = match run.unstored_since_ms {
        Some(oldest) => run.now_ms.min(oldest).saturating_sub(REQUEST_SETTLE_MS),
        None => run.now_ms.saturating_sub(REQUEST_SETTLE_MS),
    };
    let completed: Vec<DeletionRequest> = retention
        .completed_by_sweep()
        .into_iter()
        .filter(|r| !failed.contains(&r.rows.table.as_str()))
        .filter(|r| r.requested_ms <= settled_before)
        .collect();
    requests::retire(&state.requests, &completed)?;
    match swept.failed.into_iter().next() {
        Some((table, error)) => {
            tracing::error!(%table, %error, "retention sweep of a table failed; the others went on");
            Err(error)
        }
        None => Ok(swept.deletions),
    }
}

/// How long a deletion request stays active after it was made: longer
/// than a row received before it takes to reach its table (a writer's roll
/// and commit), so that such rows are deleted too.
pub const REQUEST_SETTLE_MS: i64 = 5 * 60 * 1000;

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

/// The SQL of why a row of `table` goes at `now_ms`, or NULL if it stays:
/// the event of the first deletion request that matches it, else the name
/// of its rule if it expired under it (the first rule whose `when` it
/// matches, counting from its row time, see [`row_time_sql`]). With
/// `whole_until` (ms), the partitions before it go whole as they expire
/// under the table's longest rule; a row of that rule is then named only
/// if its partition is later (a vehicle clock ahead: it expired by its
/// receipt), and left for its partition's deletion otherwise, so that
/// files are not rewritten hour after hour for rows that go with their
/// partition within the hour.
fn deletion_reason_sql(
    retention: &Retention,
    table: &str,
    now_ms: i64,
    whole_until: Option<i64>,
) -> String {
    let time = row_time_sql(table);
    let longest = retention
        .table(table)
        .iter()
        .map(Rule::keep_ms)
        .max()
        .unwrap_or(0);
    let expired = |rule: &Rule| {
        let later_partition = match whole_until {
            Some(until) if rule.keep_ms() == longest => {
                format!(" AND {} >= {}", time_column(table), timestamp_sql(until))
            }
            _ => String::new(),
        };
        format!(
            "CASE WHEN {time} < {}{later_partition} THEN {} END",
            timestamp_sql(now_ms - rule.keep_ms()),
            sql_literal(&MatchValue::Text(rule.name.clone()))
        )
    };
    let requested: String = retention
        .requests_of(table)
        .map(|request| {
            format!(
                " WHEN {} THEN {}",
                request.rows.sql(),
                sql_literal(&MatchValue::Text(request.event.clone()))
            )
        })
        .collect();
    rule_case_sql(retention.table(table), requested, "NULL", expired)
}

/// SQL evaluating, per row, `per_rule` of the first of `rules` whose
/// `when` the row matches (the rule without `when` otherwise; `default`
/// if there is none), after the `WHEN … THEN …` branches of `first`.
fn rule_case_sql(
    rules: &[Rule],
    first: String,
    default: &str,
    per_rule: impl Fn(&Rule) -> String,
) -> String {
    let mut case = format!("CASE{first}");
    let mut otherwise = default.to_owned();
    for rule in rules {
        match &rule.when {
            Some(when) => case.push_str(&format!(
                " WHEN {} = {} THEN {}",
                sql_identifier(&when.field),
                sql_literal(&when.equals),
                per_rule(rule)
            )),
            None => otherwise = per_rule(rule),
        }
    }
    if case == "CASE" {
        otherwise
    } else {
        format!("{case} ELSE {otherwise} END")
    }
}

/// `date=YYYY-MM-DD/hour=H`, as the Delta writer names the partition.
fn partition_name(key: PartitionKey) -> String {
    let (date, hour) = delta::partition_values(key);
    format!("date={date}/hour={hour}")
}

/// SQL: the hour partitions before `key`.
fn partitions_before(key: PartitionKey) -> String {
    let (date, hour) = delta::partition_values(key);
    format!("date < DATE '{date}' OR (date = DATE '{date}' AND hour < {hour})")
}

/// A UTC timestamp literal of `ms`, as the Delta tables type their times
/// (microseconds), which a DELETE commit can record as its predicate.
fn timestamp_sql(ms: i64) -> String {
    format!(
        "arrow_cast({}, 'Timestamp(Microsecond, Some(\"UTC\"))')",
        ms.saturating_mul(1000)
    )
}

/// Runs `sql` over `table`, registered as `t`.
async fn query(table: &DeltaTable, sql: &str) -> Result<Vec<RecordBatch>> {
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state())?;
    ctx.register_table("t", table.table_provider().await?)?;
    Ok(ctx.sql(sql).await?.collect().await?)
}

/// The clock of a sweep, for VACUUM: tests move it instead of sleeping.
#[derive(Debug)]
struct SweepClock(i64);

impl deltalake::operations::vacuum::Clock for SweepClock {
    fn current_timestamp_millis(&self) -> i64 {
        self.0
    }
}

/// Deletes the files a deletion or compaction removed from `table` once
/// they are `run.vacuum_grace_ms` old by the sweep's clock (or the real
/// one, if later), so that no version of the table can read a deleted row
/// any more; then the files no commit names (a failed write's) once they
/// are an hour old by the real clock, whatever the grace, so that a write
/// not committed yet is never taken for one.
async fn vacuum(table: DeltaTable, run: SweepRun) -> Result<DeltaTable> {
    let grace = chrono::Duration::milliseconds(run.vacuum_grace_ms.max(0));
    let (table, removed) = table
        .vacuum()
        .with_mode(VacuumMode::Lite)
        .with_retention_period(grace)
        .with_enforce_retention_duration(false)
        .with_clock(Arc::new(SweepClock(
            run.now_ms.max(crate::core::clock::now_ms()),
        )))
        .await?;
    let orphan_age = grace.max(chrono::Duration::milliseconds(ORPHAN_AGE_MS));
    let (table, orphans) = table
        .vacuum()
        .with_mode(VacuumMode::Full)
        .with_retention_period(orphan_age)
        .with_enforce_retention_duration(false)
        .await?;
    let files = removed.files_deleted.len() + orphans.files_deleted.len();
    if files > 0 {
        tracing::info!(files, "vacuum deleted files no current version reads");
    }
    Ok(table)
}

/// Age at which VACUUM deletes a file no commit names.
const ORPHAN_AGE_MS: i64 = 3_600_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Retention> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, text).expect("write");
        Retention::load(Some(&path), &Registry::load().expect("schemas"))
    }

    fn message(result: Result<Retention>) -> String {
        result.expect_err("rejected").to_string()
    }

    /// Partitions whose earliest row the log puts within every rule of the
    /// table are read whole, without a row's time: from the first of them
    /// on that the latest partitions all are; before it, each row against
    /// its rule.
    #[test]
    fn partitions_within_every_rule_are_read_without_row_times() {
        let rules = Retention::load(None, &Registry::load().expect("schemas")).expect("rules");
        let now = 1_795_500_000_000 / HOUR_MS * HOUR_MS;
        let hour = |h: i64| PartitionKey::from_millis(now + h * HOUR_MS);
        let visible = |earliest: &[(i64, Option<i64>)]| {
            let earliest: BTreeMap<_, _> = earliest.iter().map(|(h, e)| (hour(*h), *e)).collect();
            rules.visible_rows("rtti", now, false, Some(&earliest))
        };
        let each = rules.visible_sql("rtti", now, false);
        // RTTI is kept 24 hours: its cutoff is `now - 24 h`.
        let cutoff = now - 24 * HOUR_MS;
        assert_eq!(
            visible(&[(-24, Some(cutoff)), (-1, Some(now - HOUR_MS))]),
            VisibleRows::Whole("true".into())
        );
        let (date, h) = delta::partition_values(hour(-23));
        assert_eq!(
            visible(&[
                (-25, Some(cutoff - 1)),
                (-24, Some(cutoff - 1)),
                (-23, Some(cutoff)),
                (-1, Some(now)),
            ]),
            VisibleRows::Split {
                whole: format!(
                    "(date > DATE '{date}' OR (date = DATE '{date}' AND hour >= {h})) AND (true)"
                ),
                each: format!("({}) AND ({each})", partitions_before(hour(-23))),
            }
        );
        // A partition the log says nothing of is read row by row, and so is
        // every one before it.
        assert!(matches!(
            visible(&[(-3, Some(now)), (-2, None), (-1, Some(now))]),
            VisibleRows::Split { .. }
        ));
        assert_eq!(
            visible(&[(-2, Some(now)), (-1, None)]),
            VisibleRows::EachRow(each.clone())
        );
        assert_eq!(
            visible(&[(-1, Some(cutoff - 1))]),
            VisibleRows::EachRow(each.clone())
        );
        assert_eq!(
            rules.visible_rows("rtti", now, false, None),
            VisibleRows::EachRow(each)
        );
        // Teleservice keeps HV warn calls 183 days and the rest a year: a
        // partition is whole only once within the shorter.
        let teleservice = |earliest: i64| {
            let earliest = BTreeMap::from([(hour(-1), Some(earliest))]);
            rules.visible_rows("teleservice", now, false, Some(&earliest))
        };
        assert!(matches!(
            teleservice(now - 183 * 24 * HOUR_MS),
            VisibleRows::Whole(_)
        ));
        assert!(matches!(
            teleservice(now - 183 * 24 * HOUR_MS - 1),
            VisibleRows::EachRow(_)
        ));
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
