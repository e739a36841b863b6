//! SQL over the store through DataFusion.
//!
//! Every stream is a table named after it, plus `dead_letters`. Each reads
//! the latest version of its Delta table ([`Snapshots`] keeps versions and
//! footers between queries) as the Parquet files that version names,
//! through DataFusion's own Parquet scan ([`TableFiles`]; delta-rs's
//! provider for a table it refuses: deletion vectors, mapped columns, or
//! the WAL columns appended after the partition columns of a table older
//! than them), with the hour partitions as columns `date`
//! (DATE) and `hour` (INT), so filters on them, and on the time columns the
//! log keeps statistics of, prune files before any is opened. Only through
//! views that hide every row past its retention rule. Counts of the hour
//! partitions a view keeps whole are read from the log
//! ([`RowCountsFromLog`]), and aggregates grouped by hour partition look a
//! key up once per run of rows ([`PartitionGroups`]).

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::view::ViewTable;
use datafusion::datasource::MemTable;
use datafusion::datasource::TableProvider;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::lifecycle::retention::{Retention, RetentionError, row_time_columns};
use crate::schema::{Registry, SchemaError};
use crate::store::{PartitionKey, Snapshots, StoreError, StoreRoot, TableFiles, delta};

mod partition_groups;
mod row_counts;

pub(crate) use partition_groups::PartitionGroups;
pub(crate) use row_counts::{RowCountsFromLog, is_plain_comparison};

/// Which plan nodes a session's optimizer rules may look through: nodes
/// that pass every row of their one input unchanged (a principal's policy
/// barrier).
type SeeThrough = fn(&dyn ExecutionPlan) -> bool;

/// Whether `plan` passes every row of its one input unchanged: a
/// repartition, a merge of partitions, or a node `see_through` names.
fn passes_rows(plan: &dyn ExecutionPlan, see_through: SeeThrough) -> bool {
    plan.is::<RepartitionExec>() || plan.is::<CoalescePartitionsExec>() || see_through(plan)
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("data directory {0} does not exist")]
    NoDataDir(PathBuf),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Retention(#[from] RetentionError),
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("delta: {0}")]
    Delta(Box<deltalake::DeltaTableError>),
    #[error("formatting the result: {0}")]
    Format(#[from] arrow::error::ArrowError),
    #[error("the answer as text is over {most_bytes} bytes")]
    TooLarge { most_bytes: usize },
}

pub type Result<T, E = QueryError> = std::result::Result<T, E>;

/// Boxed: Delta's error is large, and this one travels up every `Result`.
impl From<deltalake::DeltaTableError> for QueryError {
    fn from(error: deltalake::DeltaTableError) -> Self {
        Self::Delta(Box::new(error))
    }
}

/// A DataFusion session with every table of `data_dir` registered, under
/// the built-in schemas and retention rules, as of now.
pub async fn session(data_dir: &Path) -> Result<SessionContext> {
    let registry = Registry::load()?;
    let retention = Retention::load(None, &registry)?;
    session_at(
        data_dir,
        &registry,
        &retention,
        crate::core::clock::now_ms(),
    )
    .await
}

/// A DataFusion session with every table of `data_dir` registered as it is
/// visible at `now_ms`: each table is a view over its Delta table that
/// leaves out every row past its retention rule. The tables themselves are
/// never registered, so no statement can reach around the view.
pub async fn session_at(
    data_dir: &Path,
    registry: &Registry,
    retention: &Retention,
    now_ms: i64,
) -> Result<SessionContext> {
    if !data_dir.is_dir() {
        return Err(QueryError::NoDataDir(data_dir.to_owned()));
    }
    session_on(&StoreRoot::local(data_dir)?, registry, retention, now_ms).await
}

/// [`session_at`] over the tables under `root`, wherever they are.
pub async fn session_on(
    root: &StoreRoot,
    registry: &Registry,
    retention: &Retention,
    now_ms: i64,
) -> Result<SessionContext> {
    session_over(&Snapshots::new(root.clone()), registry, retention, now_ms).await
}

/// [`session_on`] over `tables`, which keeps their latest versions and
/// footers between sessions.
pub async fn session_over(
    tables: &Snapshots,
    registry: &Registry,
    retention: &Retention,
    now_ms: i64,
) -> Result<SessionContext> {
    let config = SessionConfig::new().with_information_schema(true);
    let runtime = RuntimeEnvBuilder::new()
        .with_cache_manager(tables.cache_config())
        .build_arc()?;
    let state = SessionStateBuilder::new()
        .with_config(config.clone())
        .with_runtime_env(runtime)
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(RowCountsFromLog::new(|_| false)))
        .with_physical_optimizer_rule(Arc::new(PartitionGroups::new(|_| false)))
        .build();
    let ctx = SessionContext::new_with_state(state);
    // The files are registered here only, to plan the views.
    let files = SessionContext::new_with_config(config);
    for (table, schema) in registry.tables() {
        let name = table.name();
        let Some(stored) = stored_table(tables, name, &[&files, &ctx]).await? else {
            ctx.register_table(name, empty_table(&schema)?)?;
            continue;
        };
        let definition = retention
            .visible_rows(
                name,
                now_ms,
                true,
                earliest_rows(stored.as_ref(), name).as_ref(),
            )
            .select(name, "*");
        files.register_table(name, stored)?;
        let plan = files.sql(&definition).await?.into_unoptimized_plan();
        ctx.register_table(name, Arc::new(ViewTable::new(plan, Some(definition))))?;
    }
    Ok(ctx)
}

/// An empty table with a stored table's columns, for a table with no files yet.
pub(crate) fn empty_table(schema: &SchemaRef) -> Result<Arc<MemTable>> {
    Ok(Arc::new(MemTable::try_new(
        delta::table_schema(schema),
        vec![vec![]],
    )?))
}

/// The latest version of the Delta table `name` of `tables`, if one was
/// created, as the Parquet files it names; the sessions in `sessions` (the
/// one planning over it and the one running the plans) are given the store
/// it reads from.
pub(crate) async fn stored_table(
    tables: &Snapshots,
    name: &str,
    sessions: &[&SessionContext],
) -> Result<Option<Arc<dyn TableProvider>>> {
    let Some(table) = tables.latest(name).await? else {
        return Ok(None);
    };
    // DataFusion's own Parquet scan over the files the version names: the
    // same rows, without the Delta scan's extra columns and transforms.
    for session in sessions {
        table.update_datafusion_session(&session.state())?;
    }
    let schema = table.snapshot()?.snapshot().arrow_schema();
    match TableFiles::new(tables.root(), name, &table, schema) {
        Ok(files) => Ok(Some(Arc::new(files))),
        // Deletion vectors, mapped columns, partition columns not last:
        // delta-rs reads those.
        Err(StoreError::NotPlainFiles(reason)) => {
            tracing::debug!(%reason, "read through delta-rs's provider");
            Ok(Some(provider(&table, sessions).await?))
        }
        Err(e) => Err(e.into()),
    }
}

/// The earliest row time in each hour partition of `stored`, table
/// `table`, by its log's statistics ([`TableFiles::earliest_rows`]);
/// `None` for a table read through delta-rs's provider.
pub(crate) fn earliest_rows(
    stored: &dyn TableProvider,
    table: &str,
) -> Option<BTreeMap<PartitionKey, Option<i64>>> {
    let stored: &dyn Any = stored;
    stored
        .downcast_ref::<TableFiles>()?
        .earliest_rows(&row_time_columns(table))
}

/// [`stored_table`] as the Parquet files its latest version names
/// ([`TableFiles`]), for a plan another process runs; planned in `session`.
pub(crate) async fn portable_table(
    root: &StoreRoot,
    name: &str,
    session: &SessionContext,
) -> Result<Option<Arc<dyn TableProvider>>> {
    let Some(table) = delta::open(root, name).await? else {
        return Ok(None);
    };
    let schema = provider(&table, &[session]).await?.schema();
    Ok(Some(Arc::new(TableFiles::new(root, name, &table, schema)?)))
}

/// `table`, at the version it was loaded at, as a provider for the
/// sessions in `sessions` (the one planning over it and the one running
/// the plans), which are given the store it reads from.
pub(crate) async fn provider(
    table: &deltalake::DeltaTable,
    sessions: &[&SessionContext],
) -> Result<Arc<dyn TableProvider>> {
    for session in sessions {
        table.update_datafusion_session(&session.state())?;
    }
    // Strings and bytes as the schemas type them (Utf8, Binary), not as
    // views: the reveal functions and every consumer take those.
    let scan = SessionConfig::new().set_bool(
        "datafusion.execution.parquet.schema_force_view_types",
        false,
    );
    let scan = SessionContext::new_with_config(scan).state();
    Ok(table.table_provider().with_session(Arc::new(scan)).await?)
}

/// Runs one SQL statement and collects its result.
pub async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    Ok(ctx.sql(sql).await?.collect().await?)
}

/// How a result is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// An aligned text table, for people.
    Table,
    /// CSV with a header line.
    Csv,
    /// A JSON array of objects.
    Json,
    /// One JSON object per line.
    Ndjson,
}

/// Whether CSV has no notation for values of this type.
fn needs_text_in_csv(data_type: &DataType) -> bool {
    data_type.is_nested()
        || matches!(
            data_type,
            DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
                | DataType::FixedSizeBinary(_)
        )
}

/// `batch` with every column CSV cannot write as text, the way the table
/// format shows it (lists as `[a, b]`, binary as hex), as DuckDB and Spark do;
/// nulls stay empty.
fn with_text_columns(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = batch.schema();
    if !schema
        .fields()
        .iter()
        .any(|f| needs_text_in_csv(f.data_type()))
    {
        return Ok(batch.clone());
    }
    let options = arrow::util::display::FormatOptions::default();
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if !needs_text_in_csv(field.data_type()) {
            fields.push(field.clone());
            columns.push(column.clone());
            continue;
        }
        let formatter = arrow::util::display::ArrayFormatter::try_new(column.as_ref(), &options)?;
        let text: arrow::array::StringArray = (0..column.len())
            .map(|row| {
                column
                    .is_valid(row)
                    .then(|| formatter.value(row).to_string())
            })
            .collect();
        fields.push(Arc::new(arrow::datatypes::Field::new(
            field.name(),
            DataType::Utf8,
            true,
        )));
        columns.push(Arc::new(text) as arrow::array::ArrayRef);
    }
    Ok(RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(fields)),
        columns,
    )?)
}

/// Renders a result in the given format.
pub fn format(batches: &[RecordBatch], format: OutputFormat) -> Result<String> {
    let text = match format {
        OutputFormat::Table => arrow::util::pretty::pretty_format_batches(batches)?.to_string(),
        OutputFormat::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(Vec::new());
            for batch in batches {
                writer.write(&with_text_columns(batch)?)?;
            }
            utf8(writer.into_inner())
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::ArrayWriter::new(Vec::new());
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs)?;
            writer.finish()?;
            let mut text = utf8(writer.into_inner());
            if text.is_empty() {
                text.push_str("[]");
            }
            text
        }
        OutputFormat::Ndjson => {
            let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs)?;
            writer.finish()?;
            utf8(writer.into_inner())
        }
    };
    Ok(text)
}

/// [`format`] as JSON or CSV, refused with [`QueryError::TooLarge`] once the
/// text would pass `most_bytes`: it is written a slice of rows at a time
/// into a buffer that does not grow past that, so an answer small as Arrow
/// (a long column name on every row, a value repeated) cannot become an
/// unbounded text. Other formats are made whole, then measured.
pub fn format_within(
    batches: &[RecordBatch],
    format: OutputFormat,
    most_bytes: usize,
) -> Result<String> {
    let mut capped = Capped {
        bytes: Vec::new(),
        most: most_bytes,
        over: false,
    };
    let too_large = QueryError::TooLarge { most_bytes };
    let mut slices = batches.iter().flat_map(|batch| {
        (0..batch.num_rows())
            .step_by(SLICE_ROWS)
            .map(|offset| batch.slice(offset, SLICE_ROWS.min(batch.num_rows() - offset)))
    });
    // The writers write into `capped` through a borrow and are dropped
    // before it is read: the CSV writer's `into_inner` unwraps its last
    // flush, which `capped` may refuse.
    let written: Result<()> = match format {
        OutputFormat::Json => {
            let mut writer = arrow::json::ArrayWriter::new(&mut capped);
            let mut written: Result<()> = slices.try_for_each(|slice| Ok(writer.write(&slice)?));
            if written.is_ok() {
                written = writer.finish().map_err(QueryError::from);
            }
            written
        }
        OutputFormat::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut capped);
            // Dropping the writer flushes what it buffered, ignoring a
            // refusal, which `capped.over` records.
            slices.try_for_each(|slice| Ok(writer.write(&with_text_columns(&slice)?)?))
        }
        OutputFormat::Table | OutputFormat::Ndjson => {
            let text = self::format(batches, format)?;
            return if text.len() > most_bytes {
                Err(too_large)
            } else {
                Ok(text)
            };
        }
    };
    match written {
        _ if capped.over => return Err(too_large),
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    let mut bytes = capped.bytes;
    if bytes.is_empty() && format == OutputFormat::Json {
        bytes = b"[]".to_vec();
    }
    Ok(utf8(bytes))
}

/// Rows written at a time by [`format_within`].
const SLICE_ROWS: usize = 1024;

/// A buffer that refuses a write that would take it past `most` bytes.
struct Capped {
    bytes: Vec<u8>,
    most: usize,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.most {
            self.over = true;
            return Err(std::io::Error::other("the answer is too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer's output as text: taken as it is when it is UTF-8, as the
/// Arrow writers write it (a live stream formats every step's rows), and
/// with replacement characters otherwise.
fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use arrow::array::{ArrayRef, BinaryArray, Int64Array, ListBuilder, StringBuilder};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    /// The column types fleetgate stores that CSV has no notation for: lists
    /// (`fault_codes`) and binary (`*_encrypted`), with a null of each.
    fn nested_batch() -> RecordBatch {
        let mut codes = ListBuilder::new(StringBuilder::new());
        codes.values().append_value("P0A7F");
        codes.values().append_value("U0100");
        codes.append(true);
        codes.append(false);
        let sealed = BinaryArray::from(vec![Some(&[0xde_u8, 0xad][..]), None]);
        let seq = Int64Array::from(vec![1, 2]);
        let columns: Vec<ArrayRef> =
            vec![Arc::new(seq), Arc::new(codes.finish()), Arc::new(sealed)];
        let schema = Schema::new(vec![
            Field::new("seq", DataType::Int64, false),
            Field::new("fault_codes", columns[1].data_type().clone(), true),
            Field::new("contract_number_encrypted", DataType::Binary, true),
        ]);
        RecordBatch::try_new(Arc::new(schema), columns).expect("batch")
    }

    #[test]
    fn every_format_writes_lists_and_binary() {
        let batch = nested_batch();
        for output in [
            OutputFormat::Table,
            OutputFormat::Csv,
            OutputFormat::Json,
            OutputFormat::Ndjson,
        ] {
            let text = format(std::slice::from_ref(&batch), output)
                .unwrap_or_else(|e| panic!("{output:?}: {e}"));
            assert!(text.contains("P0A7F"), "{output:?}: {text}");
            assert!(text.contains("dead"), "{output:?}: {text}");
        }
        let csv = format(&[batch], OutputFormat::Csv).expect("csv");
        assert_eq!(
            csv,
            "seq,fault_codes,contract_number_encrypted\n1,\"[P0A7F, U0100]\",dead\n2,,\n"
        );
    }
}
