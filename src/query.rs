//! SQL over the Parquet store through DataFusion.
//!
//! Every stream is a table named after it, plus `dead_letters`. Each is a
//! listing table over `<data_dir>/<table>/` with the hour partitions exposed
//! as columns `date` (DATE) and `hour` (INT), so filters on them prune files
//! before any is opened. The file schema comes from `schemas/`, never from
//! guessing at files. Only committed `*.parquet` files are read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::dead_letter;
use crate::schema::{Registry, SchemaError};
use crate::store::{PARQUET_EXTENSION, table_dir};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("data directory {0} does not exist")]
    NoDataDir(PathBuf),
    #[error(transparent)]
    Schema(#[from] SchemaError),
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
/// the built-in schemas.
pub async fn session(data_dir: &Path) -> Result<SessionContext> {
    session_with(data_dir, &*Registry::load()?).await
}

/// A DataFusion session with every table of `data_dir` registered.
pub async fn session_with(data_dir: &Path, registry: &Registry) -> Result<SessionContext> {
    if !data_dir.is_dir() {
        return Err(QueryError::NoDataDir(data_dir.to_owned()));
    }
    let config = SessionConfig::new().with_information_schema(true);
    let ctx = SessionContext::new_with_config(config);
    let tables = registry
        .iter()
        .map(|s| (s.stream.name(), s.arrow.clone()))
        .chain([(dead_letter::TABLE, dead_letter::arrow_schema())]);
    for (name, schema) in tables {
        register(&ctx, data_dir, name, schema).await?;
    }
    Ok(ctx)
}

async fn register(
    ctx: &SessionContext,
    data_dir: &Path,
    name: &str,
    schema: SchemaRef,
) -> Result<()> {
    let dir = table_dir(data_dir, name);
    if !dir.is_dir() {
        // Nothing stored yet: an empty table with the same columns.
        let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
        for (col, ty) in partition_columns() {
            fields.push(Arc::new(arrow::datatypes::Field::new(col, ty, true)));
        }
        let empty = MemTable::try_new(
            Arc::new(arrow::datatypes::Schema::new(fields)),
            vec![vec![]],
        )?;
        ctx.register_table(name, Arc::new(empty))?;
        return Ok(());
    }
    let absolute = std::path::absolute(&dir).map_err(|e| DataFusionError::External(Box::new(e)))?;
    let url = ListingTableUrl::parse(format!("{}/", absolute.display()))?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(format!(".{PARQUET_EXTENSION}"))
        .with_table_partition_cols(partition_columns());
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(schema);
    ctx.register_table(name, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
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
