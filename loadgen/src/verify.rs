//! Verification: is every acknowledged record stored exactly once?
//!
//! Reads the store through fleetgate's own SQL layer. Stored rows name a
//! vehicle only by its pseudonym, so the check rebuilds each simulated
//! vehicle's pseudonym from the key file and the vault, for every key epoch
//! the rows carry, exactly as fleetgate derives it. On one node the vault
//! is an exclusively locked redb file: verification runs once the server
//! has stopped (a clean stop stores everything it received). In a cluster
//! it is the control plane's, and the tables may be on S3: a node's
//! configuration file names both.
//!
//! Streams that keep a pseudonymous vehicle id and the sequence number are
//! checked record by record: missing, duplicated, and stored although never
//! acknowledged (sent, ack lost: allowed). RTTI keeps neither (its rows are
//! unlinkable by design), so it is checked by count within the run's time
//! window: acknowledged ≤ stored ≤ sent.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Int32Type, Int64Type};
use fleetgate::control::ControlPlane;
use fleetgate::lifecycle::retention::Retention;
use fleetgate::privacy::pseudo::{self, KeyRing};
use fleetgate::privacy::vault::Vault;
use fleetgate::schema::{INTERNAL_DOMAIN, Registry, Stream, StreamSchema, Transform};
use fleetgate::store::StoreRoot;
use serde::{Deserialize, Serialize};

use crate::acks::Acks;
use crate::fleet;
use crate::run::StreamTotals;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0} does not exist: verify needs the server's key file and vault")]
    NoKeyStore(PathBuf),
    #[error("cannot read the run's manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error(transparent)]
    Keys(#[from] fleetgate::privacy::pseudo::PseudoError),
    #[error("{0} (is the server still running? it holds the vault until it stops)")]
    Vault(#[from] fleetgate::privacy::vault::VaultError),
    #[error(transparent)]
    Schema(#[from] fleetgate::schema::SchemaError),
    #[error(transparent)]
    Query(#[from] fleetgate::query::QueryError),
    #[error(transparent)]
    Retention(#[from] fleetgate::lifecycle::retention::RetentionError),
    #[error(transparent)]
    ControlPlane(#[from] fleetgate::control::ControlError),
    #[error(transparent)]
    Store(#[from] fleetgate::store::StoreError),
    #[error("unexpected column type in {stream}.{column}")]
    Column {
        stream: &'static str,
        column: String,
    },
}

/// What a run sent and had acknowledged, saved as `acked.json` beside the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub run_tag: String,
    pub vehicles: u32,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub sent_by_stream: [StreamTotals; Stream::ALL.len()],
    pub acks: Acks,
}

/// Where the store and its keys are.
#[derive(Debug, Clone)]
pub struct StoreLocation {
    pub store: StoreRoot,
    pub key_file: PathBuf,
    pub vault: VaultLocation,
}

/// Where the vehicles' secrets are.
#[derive(Debug, Clone)]
pub enum VaultLocation {
    /// One node's redb file.
    File(PathBuf),
    /// A cluster's control plane (a PostgreSQL connection string).
    ControlPlane(String),
}

/// The verdict for one stream.
#[derive(Debug, Clone, Serialize)]
pub struct StreamVerdict {
    pub stream: &'static str,
    /// "exact" (by vehicle and sequence) or "count" (within the time window).
    pub method: &'static str,
    pub sent: u64,
    pub acked: u64,
    pub stored: u64,
    pub missing: u64,
    pub duplicated: u64,
    /// Stored, sent, but never acknowledged (the ack was lost or late): allowed.
    pub stored_unacked: u64,
    /// Up to five missing records, as (vehicle index, sequence number).
    pub missing_examples: Vec<(u32, u64)>,
    pub ok: bool,
}

/// The verdict for a run.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub streams: Vec<StreamVerdict>,
    pub ok: bool,
}

/// Checks the store against the manifest.
pub async fn verify(manifest: &Manifest, store: &StoreLocation) -> Result<Verdict, VerifyError> {
    if !store.key_file.is_file() {
        return Err(VerifyError::NoKeyStore(store.key_file.clone()));
    }
    let keys = KeyRing::load_or_create(&store.key_file)?;
    let vault = match &store.vault {
        VaultLocation::File(file) if !file.is_file() => {
            return Err(VerifyError::NoKeyStore(file.clone()));
        }
        VaultLocation::File(file) => Vault::open(file, &keys)?,
        VaultLocation::ControlPlane(url) => {
            Vault::shared(Arc::new(ControlPlane::connect(url)?), &keys)?
        }
    };
    let registry = Registry::load()?;
    let ctx = fleetgate::query::session_on(
        &store.store,
        &registry,
        &Retention::load(None, &registry)?,
        fleetgate::core::clock::now_ms(),
    )
    .await?;
    let mut streams = Vec::new();
    for stream in Stream::ALL {
        let schema = registry.get(stream);
        let verdict = match exact_columns(schema) {
            Some((id_column, domain)) => {
                exact(&ctx, manifest, stream, &id_column, &domain, &keys, &vault).await?
            }
            None => by_count(&ctx, manifest, stream).await?,
        };
        streams.push(verdict);
    }
    let ok = streams.iter().all(|s| s.ok);
    Ok(Verdict { streams, ok })
}

/// The vehicle id column and its pseudonym domain, if the stream keeps
/// both a vehicle pseudonym and the sequence number.
fn exact_columns(schema: &StreamSchema) -> Option<(String, String)> {
    let vin = &schema.fields[schema.vin_index];
    let keeps_seq = schema
        .fields
        .iter()
        .any(|f| f.name == "seq" && f.transform == Transform::Keep && f.column.is_none());
    (vin.transform == Transform::Pseudonym && keeps_seq).then(|| {
        (
            vin.column_name().to_owned(),
            vin.domain
                .clone()
                .unwrap_or_else(|| INTERNAL_DOMAIN.to_owned()),
        )
    })
}

async fn exact(
    ctx: &datafusion::prelude::SessionContext,
    manifest: &Manifest,
    stream: Stream,
    id_column: &str,
    domain: &str,
    keys: &KeyRing,
    vault: &Vault,
) -> Result<StreamVerdict, VerifyError> {
    let sql = format!("SELECT {id_column}, key_epoch, seq FROM {}", stream.name());
    let batches = fleetgate::query::run(ctx, &sql).await?;
    let column_error = |column: &str| VerifyError::Column {
        stream: stream.name(),
        column: column.to_owned(),
    };
    // Pseudonyms of the run's vehicles in every epoch the rows carry.
    let mut epochs = HashSet::new();
    for batch in &batches {
        let epoch = batch
            .column(1)
            .as_primitive_opt::<Int32Type>()
            .ok_or_else(|| column_error("key_epoch"))?;
        epochs.extend(epoch.iter().flatten());
    }
    let mut vehicle_of: HashMap<String, u32> = HashMap::new();
    for vehicle in 0..manifest.vehicles {
        let vin = fleet::vin(&manifest.run_tag, vehicle);
        let Some(secrets) = vault.get(&vin)? else {
            continue;
        };
        for &epoch in &epochs {
            let id = pseudo::vehicle_pseudonym(&keys.domain_key(domain, epoch), &secrets.secret);
            vehicle_of.insert(id, vehicle);
        }
    }
    let mut stored: HashMap<(u32, u64), u32> = HashMap::new();
    for batch in &batches {
        let ids = batch
            .column(0)
            .as_string_opt::<i32>()
            .ok_or_else(|| column_error(id_column))?;
        let seqs = batch
            .column(2)
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| column_error("seq"))?;
        for row in 0..batch.num_rows() {
            if ids.is_null(row) || seqs.is_null(row) {
                continue;
            }
            if let Some(&vehicle) = vehicle_of.get(ids.value(row)) {
                *stored.entry((vehicle, seqs.value(row) as u64)).or_default() += 1;
            }
        }
    }
    let mut missing = 0;
    let mut missing_examples = Vec::new();
    let mut acked = 0;
    for record in manifest.acks.records(stream) {
        acked += 1;
        if !stored.contains_key(&record) {
            missing += 1;
            if missing_examples.len() < 5 {
                missing_examples.push(record);
            }
        }
    }
    let duplicated = stored
        .values()
        .filter(|&&n| n > 1)
        .map(|&n| u64::from(n - 1))
        .sum();
    let stored_rows: u64 = stored.values().map(|&n| u64::from(n)).sum();
    let distinct = stored.len() as u64;
    Ok(StreamVerdict {
        stream: stream.name(),
        method: "exact",
        sent: manifest.sent_by_stream[stream.index()].records,
        acked,
        stored: stored_rows,
        missing,
        duplicated,
        stored_unacked: distinct - (acked - missing),
        missing_examples,
        ok: missing == 0 && duplicated == 0,
    })
}

async fn by_count(
    ctx: &datafusion::prelude::SessionContext,
    manifest: &Manifest,
    stream: Stream,
) -> Result<StreamVerdict, VerifyError> {
    // Timestamps are truncated to the second at most: widen the window by one.
    let sql = format!(
        "SELECT count(*) FROM {} WHERE ts >= to_timestamp_millis({}) AND ts <= to_timestamp_millis({})",
        stream.name(),
        manifest.started_ms - 1000,
        manifest.finished_ms + 1000
    );
    let batches = fleetgate::query::run(ctx, &sql).await?;
    let stored = batches
        .first()
        .and_then(|b| b.column(0).as_primitive_opt::<Int64Type>())
        .and_then(|c| (!c.is_empty()).then(|| c.value(0)))
        .unwrap_or(0) as u64;
    let sent = manifest.sent_by_stream[stream.index()].records;
    let acked = manifest.acks.count(stream);
    Ok(StreamVerdict {
        stream: stream.name(),
        method: "count",
        sent,
        acked,
        stored,
        missing: acked.saturating_sub(stored),
        duplicated: stored.saturating_sub(sent),
        stored_unacked: stored.saturating_sub(acked).min(sent - acked),
        missing_examples: Vec::new(),
        ok: acked <= stored && stored <= sent,
    })
}

/// Loads a saved manifest.
pub fn load_manifest(path: &Path) -> Result<Manifest, VerifyError> {
    let error = |message: String| VerifyError::Manifest {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| error(e.to_string()))
}
