//! Deletion requests and legal holds: rows selected by an event rather
//! than by a period.
//!
//! A deletion request (a teleservice case closed, a remote-managed charging
//! session ended, an analysis completed, charge history switched off) names
//! a table and the column values its rows match. From the moment it is
//! recorded, every query leaves those rows out; the next retention sweep
//! rewrites the files that hold them and then retires the request.
//!
//! A legal hold keeps the rows it covers (a vehicle's, or a case's) whatever
//! retention or a deletion request says, and blocks the vehicle's erasure,
//! until it is released.
//!
//! Each is one small JSON document ([`crate::control::documents`]): a file
//! (`[retention] requests_file`, `holds_file`) replaced atomically under an
//! exclusive lock, or, for the nodes of a cluster, a row of the control
//! plane changed in a transaction; so the server's admin API, its sweep and
//! the CLI, on any node, can all change it without losing an entry.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use serde::{Deserialize, Serialize};

use crate::config::{Config, RetentionConfig};
use crate::control::documents::Document;
use crate::control::{ControlError, ControlPlane};

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// Where the lifecycle keeps its state: the pending deletion requests and
/// the legal holds (shared by a cluster's nodes through its control plane,
/// else files of this node's), and this node's own deletion audit.
#[derive(Debug, Clone)]
pub struct LifecycleState {
    /// Every deletion, as JSON lines (never the data itself).
    pub audit_file: PathBuf,
    pub requests: Document,
    pub holds: Document,
}

impl LifecycleState {
    /// The state in `plane` if given, else in the files `config` names.
    pub fn new(config: &RetentionConfig, plane: Option<&Arc<ControlPlane>>) -> Self {
        Self {
            audit_file: config.audit_file.clone(),
            requests: Document::at(plane, "deletion-requests", config.requests_file.clone()),
            holds: Document::at(plane, "legal-holds", config.holds_file.clone()),
        }
    }

    /// The state where `config` keeps it: in its control plane if it has one.
    pub fn open(config: &Config) -> Result<Self> {
        let plane = ControlPlane::from_config(config)?;
        Ok(Self::new(&config.retention, plane.as_ref()))
    }
}

/// A value a selection matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MatchValue {
    Bool(bool),
    Text(String),
    /// Any of these texts (a vehicle's pseudonyms over its key epochs).
    AnyOf(Vec<String>),
}

/// The rows of `table` whose every `(column, value)` pair matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub table: String,
    pub matches: Vec<(String, MatchValue)>,
}

/// Rows that must go because of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeletionRequest {
    #[serde(flatten)]
    pub rows: Selection,
    /// The event that asked for it, e.g. `case_closed`.
    pub event: String,
    pub requested_ms: i64,
}

/// Rows kept whatever retention or a deletion request says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegalHold {
    /// The name the hold was placed under; releasing uses it.
    pub name: String,
    /// The keyed tag of the vehicle's VIN (never the VIN): its erasure is refused.
    pub vehicle_tag: String,
    pub covers: Vec<Selection>,
    pub placed_ms: i64,
}

impl Selection {
    /// The SQL condition true for the rows this request deletes (never NULL).
    pub fn sql(&self) -> String {
        let parts: Vec<String> = self
            .matches
            .iter()
            .map(|(column, value)| {
                let column = sql_identifier(column);
                match value {
                    MatchValue::AnyOf(list) if list.is_empty() => "false".to_owned(),
                    MatchValue::AnyOf(list) => {
                        let list: Vec<String> = list.iter().map(|t| sql_text(t)).collect();
                        format!("coalesce({column} IN ({}), false)", list.join(", "))
                    }
                    single => format!("coalesce({column} = {}, false)", sql_literal(single)),
                }
            })
            .collect();
        format!("({})", parts.join(" AND "))
    }

    /// Per row of `batch`: whether it is selected.
    pub fn matching_rows(&self, batch: &RecordBatch) -> Vec<bool> {
        let mut out = vec![true; batch.num_rows()];
        for (column, value) in &self.matches {
            for (selected, hit) in out.iter_mut().zip(column_matches(batch, column, value)) {
                *selected &= hit;
            }
        }
        out
    }
}

/// Per row of `batch`: whether `column` holds `value` (never for a null or
/// a missing column).
pub fn column_matches(batch: &RecordBatch, column: &str, value: &MatchValue) -> Vec<bool> {
    let Some(array) = batch.column_by_name(column) else {
        return vec![false; batch.num_rows()];
    };
    (0..batch.num_rows())
        .map(|row| {
            array.is_valid(row)
                && match value {
                    MatchValue::Bool(b) => {
                        array.as_boolean_opt().is_some_and(|a| a.value(row) == *b)
                    }
                    MatchValue::Text(t) => array
                        .as_string_opt::<i32>()
                        .is_some_and(|a| a.value(row) == t),
                    MatchValue::AnyOf(list) => array
                        .as_string_opt::<i32>()
                        .is_some_and(|a| list.iter().any(|t| a.value(row) == t)),
                }
        })
        .collect()
}

/// A column name as a quoted SQL identifier.
pub fn sql_identifier(column: &str) -> String {
    format!("\"{}\"", column.replace('"', "\"\""))
}

fn sql_text(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A single value as a SQL literal; a list as a parenthesised list.
pub fn sql_literal(value: &MatchValue) -> String {
    match value {
        MatchValue::Bool(b) => b.to_string(),
        MatchValue::Text(t) => sql_text(t),
        MatchValue::AnyOf(list) => {
            let list: Vec<String> = list.iter().map(|t| sql_text(t)).collect();
            format!("({})", list.join(", "))
        }
    }
}

/// The pending requests; none before the first.
pub fn load(requests: &Document) -> Result<Vec<DeletionRequest>> {
    requests.load()
}

/// The legal holds in force; none before the first.
pub fn load_holds(holds: &Document) -> Result<Vec<LegalHold>> {
    holds.load()
}

/// Records `request` durably; recording the same rows twice keeps one.
pub fn add(requests: &Document, request: DeletionRequest) -> Result<()> {
    requests.update(|requests: &mut Vec<DeletionRequest>| {
        if !requests.iter().any(|r| r.rows == request.rows) {
            requests.push(request);
        }
    })
}

/// Places `hold`, replacing the vehicle's hold of the same name; returns
/// whether it is new. One name may hold several vehicles (one legal
/// matter): each vehicle's hold stands on its own.
pub fn place_hold(holds: &Document, hold: LegalHold) -> Result<bool> {
    holds.update(|holds: &mut Vec<LegalHold>| {
        let same = |h: &LegalHold| h.name == hold.name && h.vehicle_tag == hold.vehicle_tag;
        let new = !holds.iter().any(same);
        holds.retain(|h| !same(h));
        holds.push(hold);
        new
    })
}

/// Releases the hold named `name` of the vehicle tagged `vehicle_tag`;
/// returns whether there was one.
pub fn release_hold(holds: &Document, name: &str, vehicle_tag: &str) -> Result<bool> {
    holds.update(|holds: &mut Vec<LegalHold>| {
        let same = |h: &LegalHold| h.name == name && h.vehicle_tag == vehicle_tag;
        let found = holds.iter().any(same);
        holds.retain(|h| !same(h));
        found
    })
}

/// Retires requests whose rows are gone from disk.
pub fn retire(requests: &Document, done: &[DeletionRequest]) -> Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    requests.update(|requests: &mut Vec<DeletionRequest>| requests.retain(|r| !done.contains(r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(id: &str) -> DeletionRequest {
        DeletionRequest {
            rows: Selection {
                table: "teleservice".into(),
                matches: vec![("case_id".into(), MatchValue::Text(id.into()))],
            },
            event: "case_closed".into(),
            requested_ms: 1,
        }
    }

    #[test]
    fn requests_are_kept_once_and_retired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = Document::File(dir.path().join("requests.json"));
        assert!(load(&path).expect("empty").is_empty());
        add(&path, case("A")).expect("add");
        add(&path, case("A")).expect("add again");
        add(&path, case("B")).expect("add");
        assert_eq!(load(&path).expect("load"), vec![case("A"), case("B")]);
        retire(&path, &[case("A")]).expect("retire");
        assert_eq!(load(&path).expect("load"), vec![case("B")]);
    }

    #[test]
    fn sql_never_matches_nulls_and_quotes_values() {
        assert_eq!(
            case("it's").rows.sql(),
            "(coalesce(\"case_id\" = 'it''s', false))"
        );
        let vehicle = Selection {
            table: "charging".into(),
            matches: vec![(
                "vehicle_id".into(),
                MatchValue::AnyOf(vec!["a".into(), "b".into()]),
            )],
        };
        assert_eq!(
            vehicle.sql(),
            "(coalesce(\"vehicle_id\" IN ('a', 'b'), false))"
        );
    }

    #[test]
    fn holds_are_placed_by_name_and_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = Document::File(dir.path().join("holds.json"));
        let hold = LegalHold {
            name: "LH-1".into(),
            vehicle_tag: "tag".into(),
            covers: vec![case("A").rows],
            placed_ms: 1,
        };
        assert!(place_hold(&path, hold.clone()).expect("place"));
        assert!(!place_hold(&path, hold.clone()).expect("place again"));
        assert_eq!(load_holds(&path).expect("load"), vec![hold]);
        assert!(release_hold(&path, "LH-1", "tag").expect("release"));
        assert!(!release_hold(&path, "LH-1", "tag").expect("release again"));
        assert!(load_holds(&path).expect("load").is_empty());
    }

    /// One legal matter may hold several vehicles under one name: placing
    /// it for a second vehicle must not lift the first's, and releasing
    /// one vehicle's leaves the other's.
    #[test]
    fn a_hold_name_on_two_vehicles_holds_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = Document::File(dir.path().join("holds.json"));
        let hold = |tag: &str| LegalHold {
            name: "LH-1".into(),
            vehicle_tag: tag.into(),
            covers: vec![case(tag).rows],
            placed_ms: 1,
        };
        assert!(place_hold(&path, hold("a")).expect("place"));
        assert!(place_hold(&path, hold("b")).expect("place for b"));
        assert_eq!(load_holds(&path).expect("load"), vec![hold("a"), hold("b")]);
        assert!(!release_hold(&path, "LH-1", "c").expect("not c's"));
        assert!(release_hold(&path, "LH-1", "b").expect("release b's"));
        assert_eq!(load_holds(&path).expect("load"), vec![hold("a")]);
    }
}
