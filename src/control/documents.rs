//! Small JSON documents of state (the access registry, deletion requests,
//! legal holds, vehicle credentials): in a file of this node's, or in the
//! control plane's database when the nodes of a cluster share them.
//!
//! Either home changes a document the same way: read, change, write, with
//! no other change in between. A file is changed under an exclusive lock
//! and replaced durably (`core::fsio::update_json`); a shared document in
//! one transaction that locks its row (`SELECT … FOR UPDATE`), so that two
//! nodes granting or revoking at once both land, one after the other.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{ControlError, ControlPlane, Result};
use crate::core::fsio;

/// Where one document lives.
#[derive(Debug, Clone)]
pub enum Document {
    /// A file of this node's.
    File(PathBuf),
    /// A row of the control plane's `fleetgate_documents` table.
    Shared {
        plane: Arc<ControlPlane>,
        name: &'static str,
    },
}

/// What a document's version was when it was read: it differs after any change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    Modified(std::time::SystemTime),
    Version(i64),
    Absent,
}

impl Document {
    /// `file` when `plane` is `None`; otherwise the shared document `name`.
    pub fn at(plane: Option<&Arc<ControlPlane>>, name: &'static str, file: PathBuf) -> Self {
        match plane {
            Some(plane) => Self::Shared {
                plane: Arc::clone(plane),
                name,
            },
            None => Self::File(file),
        }
    }

    /// The document; its default when it was never written.
    pub fn load<T: DeserializeOwned + Default + Send>(&self) -> Result<T> {
        match self {
            Self::File(path) => Ok(fsio::load_json(path)?),
            Self::Shared { plane, name } => plane.run(|client| {
                let row = client.query_opt(
                    "SELECT body FROM fleetgate_documents WHERE name = $1",
                    &[name],
                )?;
                match row {
                    Some(row) => parse(name, &row.try_get::<_, String>(0)?),
                    None => Ok(T::default()),
                }
            }),
        }
    }

    /// Applies `change` to the document and stores it durably before
    /// returning what `change` returned.
    pub fn update<T, R>(&self, change: impl FnOnce(&mut T) -> R + Send) -> Result<R>
    where
        T: Serialize + DeserializeOwned + Default + Send,
        R: Send,
    {
        match self {
            Self::File(path) => Ok(fsio::update_json(path, change)?),
            Self::Shared { plane, name } => plane.run(|client| {
                let mut txn = client.transaction()?;
                txn.execute(
                    "INSERT INTO fleetgate_documents (name, body, version)
                     VALUES ($1, 'null', 0) ON CONFLICT (name) DO NOTHING",
                    &[name],
                )?;
                let row = txn.query_one(
                    "SELECT body FROM fleetgate_documents WHERE name = $1 FOR UPDATE",
                    &[name],
                )?;
                let mut document: T = parse(name, &row.try_get::<_, String>(0)?)?;
                let outcome = change(&mut document);
                let body = serde_json::to_string(&document)
                    .map_err(|e| ControlError::Malformed(format!("document {name}: {e}")))?;
                txn.execute(
                    "UPDATE fleetgate_documents SET body = $2, version = version + 1
                     WHERE name = $1",
                    &[name, &body],
                )?;
                txn.commit()?;
                Ok(outcome)
            }),
        }
    }

    /// The document's version now, to tell whether a copy read earlier is
    /// still current.
    pub fn stamp(&self) -> Result<Stamp> {
        match self {
            Self::File(path) => Ok(std::fs::metadata(path)
                .and_then(|m| m.modified())
                .map_or(Stamp::Absent, Stamp::Modified)),
            Self::Shared { plane, name } => plane.run(|client| {
                let row = client.query_opt(
                    "SELECT version FROM fleetgate_documents WHERE name = $1",
                    &[name],
                )?;
                Ok(match row {
                    Some(row) => Stamp::Version(row.try_get(0)?),
                    None => Stamp::Absent,
                })
            }),
        }
    }
}

/// A stored body; `null` (a row made by a failed first change) is the default.
fn parse<T: DeserializeOwned + Default>(name: &str, body: &str) -> Result<T> {
    let value: Option<T> = serde_json::from_str(body)
        .map_err(|e| ControlError::Malformed(format!("document {name}: {e}")))?;
    Ok(value.unwrap_or_default())
}
