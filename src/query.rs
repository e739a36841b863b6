//! SQL over the Parquet store through DataFusion.
//!
//! Every stream is a table named after it, plus `dead_letters`. Each is a
//! listing table over `<data_dir>/<table>/` with the hour partitions exposed
//! as columns `date` (DATE) and `hour` (INT), so filters on them prune files
//! before any is opened. The file schema comes from `schemas/`, never from
//! guessing at files. Only committed `*.parquet` files are read, and only
//! through views that hide every row past its retention rule.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::view::ViewTable;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::lifecycle::retention::{Retention, RetentionError};
use crate::pipeline::dead_letter;
use crate::schema::{Registry, SchemaError};
use crate::store::{PARQUET_EXTENSION, table_dir};

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
    #[error("formatting the result: {0}")]
    Format(#[from] arrow::error::ArrowError),
}

pub type Result<T, E = QueryError> = std::result::Result<T, E>;

/// Partition columns of every table, as they appear in SQL.
fn partition_columns() -> Vec<(String, DataType)> {
    vec![
        ("date".to_owned(), DataType::Date32),
        ("hour".to_owned(), DataType::Int32),
    ]
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
/// visible at `now_ms`: each table is a view over its Parquet files that
/// leaves out every row past its retention rule. The files themselves are
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
    let config = SessionConfig::new().with_information_schema(true);
    let ctx = SessionContext::new_with_config(config.clone());
    // The files are registered here only, to plan the views.
    let files = SessionContext::new_with_config(config);
    let tables = registry
        .iter()
        .map(|s| (s.stream.name(), s.arrow.clone()))
        .chain([(
            crate::core::table::DEAD_LETTERS,
            dead_letter::arrow_schema(),
        )]);
    for (name, schema) in tables {
        let Some(listing) = listing_table(data_dir, name, schema.clone())? else {
            ctx.register_table(name, empty_table(&schema)?)?;
            continue;
        };
        files.register_table(name, listing)?;
        let definition = format!(
            "SELECT * FROM {name} WHERE {}",
            retention.visible_sql(name, now_ms)
        );
        let plan = files.sql(&definition).await?.into_unoptimized_plan();
        ctx.register_table(name, Arc::new(ViewTable::new(plan, Some(definition))))?;
    }
    Ok(ctx)
}

/// An empty table with a stored table's columns, for a table with no files yet.
pub(crate) fn empty_table(schema: &SchemaRef) -> Result<Arc<MemTable>> {
    let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
    for (col, ty) in partition_columns() {
        fields.push(Arc::new(arrow::datatypes::Field::new(col, ty, true)));
    }
    Ok(Arc::new(MemTable::try_new(
        Arc::new(arrow::datatypes::Schema::new(fields)),
        vec![vec![]],
    )?))
}

/// The listing table over `<data_dir>/<name>/`, if it exists.
pub(crate) fn listing_table(
    data_dir: &Path,
    name: &str,
    schema: SchemaRef,
) -> Result<Option<Arc<ListingTable>>> {
    let dir = table_dir(data_dir, name);
    if !dir.is_dir() {
        return Ok(None);
    }
    let absolute = std::path::absolute(&dir).map_err(|e| DataFusionError::External(Box::new(e)))?;
    let url = ListingTableUrl::parse(format!("{}/", absolute.display()))?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(format!(".{PARQUET_EXTENSION}"))
        .with_table_partition_cols(partition_columns());
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(schema);
    Ok(Some(Arc::new(ListingTable::try_new(config)?)))
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

/// Renders a result in the given format.
pub fn format(batches: &[RecordBatch], format: OutputFormat) -> Result<String> {
    let text = match format {
        OutputFormat::Table => arrow::util::pretty::pretty_format_batches(batches)?.to_string(),
        OutputFormat::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(Vec::new());
            for batch in batches {
                writer.write(batch)?;
            }
            String::from_utf8_lossy(&writer.into_inner()).into_owned()
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::ArrayWriter::new(Vec::new());
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs)?;
            writer.finish()?;
            let mut text = String::from_utf8_lossy(&writer.into_inner()).into_owned();
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
            String::from_utf8_lossy(&writer.into_inner()).into_owned()
        }
    };
    Ok(text)
}
