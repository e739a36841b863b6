//! User export (Data Act Art. 4): all of a user's readily available data,
//! for the periods in which they held each vehicle, machine-readable, free
//! of charge. It is the user's view of every table (own vehicles, own
//! tenure, VIN and encrypted fields readable), read in full, plus a
//! metadata file: each table's fields, types, units and meaning, its schema
//! version, the time range covered, and the whole data dictionary
//! ([`super::dictionary`]). Audited like a query.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use serde_json::{Value, json};

use super::registry::{Principal, PrincipalKind};
use super::{AccessEnv, AccessError, Result, rfc3339};
use crate::core::fsio;

/// The purpose every export runs under.
pub const PURPOSE: &str = "own_data_access";

/// One table of an export.
#[derive(Debug)]
pub struct ExportTable {
    pub name: String,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

/// A user's export.
#[derive(Debug)]
pub struct Export {
    pub request_id: String,
    pub tables: Vec<ExportTable>,
    pub metadata: Value,
}

/// How an export is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One zstd Parquet file per table.
    Parquet,
    /// One JSON array of objects per table.
    Json,
}

impl AccessEnv {
    /// Everything `user` may have under Art. 4, audited as an `export`.
    pub async fn export(&self, user: &Principal, now_ms: i64) -> Result<Export> {
        let request_id = super::request_id();
        let outcome = match self.start(user) {
            Ok(_running) => {
                self.bounded(self.collect_export(user, &request_id, now_ms))
                    .await
            }
            Err(e) => Err(e),
        };
        let (tables, decision, rows) = match &outcome {
            Ok(export) => (
                export.tables.iter().map(|t| t.name.clone()).collect(),
                Ok(export
                    .tables
                    .iter()
                    .map(|t| format!("{}:filter", t.name))
                    .collect::<Vec<_>>()
                    .join(",")),
                Some(
                    export
                        .tables
                        .iter()
                        .flat_map(|t| &t.batches)
                        .map(|b| b.num_rows() as u64)
                        .sum(),
                ),
            ),
            Err(e) => (Vec::new(), Err(e), None),
        };
        self.audit(
            &request_id,
            user,
            PURPOSE,
            "export",
            &tables,
            decision,
            rows,
            now_ms,
        )?;
        outcome
    }

    async fn collect_export(
        &self,
        user: &Principal,
        request_id: &str,
        now_ms: i64,
    ) -> Result<Export> {
        if user.kind != PrincipalKind::User {
            return Err(AccessError::Refused(format!(
                "an export (Data Act Art. 4) is a user's; {} is a {}",
                user.id,
                user.kind.name()
            )));
        }
        let memory_mb = self.settings.export_memory_mb;
        let session = self.session(user, PURPOSE, now_ms, memory_mb).await?;
        let pool = Arc::clone(&session.ctx.runtime_env().memory_pool);
        let mut tables = Vec::new();
        let mut described = serde_json::Map::new();
        for name in session.treatments.keys() {
            let df = session
                .ctx
                .sql(&format!("SELECT * FROM {name} ORDER BY ts"))
                .await?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            let (_, batches) = super::collect_bounded(df, &pool, user.kind, memory_mb).await?;
            described.insert(name.clone(), self.describe(name, &schema, &batches));
            tables.push(ExportTable {
                name: name.clone(),
                schema,
                batches,
            });
        }
        let vehicles: Vec<Value> = self
            .registry()?
            .vehicles_held(&user.id)
            .into_iter()
            .map(|(vin, periods)| {
                let held: Vec<Value> = periods
                    .into_iter()
                    .map(|(from, until)| json!({ "from": rfc3339(from), "until": until.and_then(rfc3339) }))
                    .collect();
                json!({ "vin": vin, "held": held })
            })
            .collect();
        let hidden: serde_json::Map<String, Value> = session
            .hidden
            .iter()
            .map(|(table, reason)| (table.clone(), Value::String(reason.clone())))
            .collect();
        let metadata = json!({
            "export": "fleetgate user export (EU Data Act Art. 4)",
            "request_id": request_id,
            "generated_at": rfc3339(now_ms),
            "user": user.id,
            "vehicles": vehicles,
            "time_range": "each vehicle's `held` periods, up to `generated_at`",
            "tables": described,
            "not_included": hidden,
            "dictionary": self.dictionary()?,
        });
        Ok(Export {
            request_id: request_id.to_owned(),
            tables,
            metadata,
        })
    }

    /// A table's entry in the metadata: schema version, rows, and each
    /// column's type, unit and meaning, from `schemas/`.
    fn describe(&self, table: &str, schema: &SchemaRef, batches: &[RecordBatch]) -> Value {
        let stream = self.schemas.iter().find(|s| s.stream.name() == table);
        let fields: Vec<Value> = schema
            .fields()
            .iter()
            .map(|column| {
                let name = column.name();
                let spec = stream.and_then(|s| {
                    s.fields
                        .iter()
                        .find(|f| f.name == *name || f.column_name() == name)
                });
                let description = match (spec, name.as_str()) {
                    (Some(f), _) => f.description.clone(),
                    (None, "received_at") => "When fleetgate received the record".to_owned(),
                    (None, "date" | "hour") => "Partition of the record's time (UTC)".to_owned(),
                    (None, _) => String::new(),
                };
                json!({
                    "column": name,
                    "type": column.data_type().to_string(),
                    "unit": spec.and_then(|f| f.unit.clone()),
                    "description": description,
                })
            })
            .collect();
        json!({
            "schema_version": stream.map(|s| s.version),
            "description": stream.map(|s| s.description.clone()),
            "rows": batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
            "fields": fields,
        })
    }
}

impl Export {
    /// Writes one file per table and `metadata.json` into `dir`; returns the files.
    pub fn write_dir(&self, dir: &Path, format: ExportFormat) -> Result<Vec<PathBuf>> {
        let fail = |path: &Path, e: &dyn std::fmt::Display| {
            AccessError::Export(format!("{}: {e}", path.display()))
        };
        fsio::create_dir_all(dir).map_err(|e| fail(dir, &e))?;
        let mut written = Vec::new();
        for table in &self.tables {
            let path = match format {
                ExportFormat::Parquet => dir.join(format!("{}.parquet", table.name)),
                ExportFormat::Json => dir.join(format!("{}.json", table.name)),
            };
            let file = fsio::create(&path).map_err(|e| fail(&path, &e))?;
            match format {
                ExportFormat::Parquet => {
                    let mut writer =
                        parquet::arrow::ArrowWriter::try_new(file, table.schema.clone(), None)
                            .map_err(|e| fail(&path, &e))?;
                    for batch in &table.batches {
                        writer.write(batch).map_err(|e| fail(&path, &e))?;
                    }
                    writer.close().map_err(|e| fail(&path, &e))?;
                }
                ExportFormat::Json => {
                    let text =
                        crate::query::format(&table.batches, crate::query::OutputFormat::Json)?;
                    std::io::Write::write_all(&mut { file }, text.as_bytes())
                        .map_err(|e| fail(&path, &e))?;
                }
            }
            written.push(path);
        }
        let path = dir.join("metadata.json");
        let text = serde_json::to_vec_pretty(&self.metadata).map_err(|e| fail(&path, &e))?;
        let mut file = fsio::create(&path).map_err(|e| fail(&path, &e))?;
        std::io::Write::write_all(&mut file, &text).map_err(|e| fail(&path, &e))?;
        written.push(path);
        Ok(written)
    }

    /// The whole export as one JSON document: `metadata`, and each table's
    /// rows as an array of objects under `tables`.
    pub fn to_json(&self) -> Result<Value> {
        let mut tables = serde_json::Map::new();
        for table in &self.tables {
            let text = crate::query::format(&table.batches, crate::query::OutputFormat::Json)?;
            let rows: Value = serde_json::from_str(&text)
                .map_err(|e| AccessError::Export(format!("{}: {e}", table.name)))?;
            tables.insert(table.name.clone(), rows);
        }
        Ok(json!({ "metadata": self.metadata, "tables": tables }))
    }
}
