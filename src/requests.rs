//! Deletion requests: rows that must go because of an event, not a period
//! (a teleservice case closed, a remote-managed charging session ended, a
//! diagnostic analysis completed). A request names a table and the column
//! values its rows match. From the moment it is recorded, every query
//! leaves those rows out; the next retention sweep rewrites the files that
//! hold them and then retires the request.
//!
//! Requests live in one small JSON file (`[retention] requests_file`),
//! replaced atomically (write, fsync, rename, fsync the directory) under an
//! exclusive file lock, so the server's admin API, its sweep and the CLI
//! can all change it without losing a request.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("deletion requests {path}: {message}")]
pub struct RequestError {
    pub path: PathBuf,
    pub message: String,
}

pub type Result<T, E = RequestError> = std::result::Result<T, E>;

/// A value a request matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MatchValue {
    Bool(bool),
    Text(String),
}

/// Rows of `table` whose every `(column, value)` pair is equal go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeletionRequest {
    pub table: String,
    pub matches: Vec<(String, MatchValue)>,
    /// The event that asked for it, e.g. `case_closed`.
    pub event: String,
    pub requested_ms: i64,
}

impl DeletionRequest {
    /// Whether `other` asks for the same rows.
    fn same_rows(&self, other: &DeletionRequest) -> bool {
        self.table == other.table && self.matches == other.matches
    }

    /// The SQL condition true for the rows this request deletes (never NULL).
    pub fn sql(&self) -> String {
        let parts: Vec<String> = self
            .matches
            .iter()
            .map(|(column, value)| {
                let value = match value {
                    MatchValue::Bool(b) => b.to_string(),
                    MatchValue::Text(t) => format!("'{}'", t.replace('\'', "''")),
                };
                format!(
                    "coalesce(\"{}\" = {value}, false)",
                    column.replace('"', "\"\"")
                )
            })
            .collect();
        format!("({})", parts.join(" AND "))
    }

    /// Per row of `batch`: whether this request deletes it.
    pub fn matching_rows(&self, batch: &RecordBatch) -> Vec<bool> {
        let mut out = vec![true; batch.num_rows()];
        for (column, value) in &self.matches {
            let Some(array) = batch.column_by_name(column) else {
                return vec![false; batch.num_rows()];
            };
            for (row, keep) in out.iter_mut().enumerate() {
                *keep = *keep
                    && array.is_valid(row)
                    && match value {
                        MatchValue::Bool(b) => {
                            array.as_boolean_opt().is_some_and(|a| a.value(row) == *b)
                        }
                        MatchValue::Text(t) => array
                            .as_string_opt::<i32>()
                            .is_some_and(|a| a.value(row) == t),
                    };
            }
        }
        out
    }
}

/// The pending requests; none when the file does not exist yet.
pub fn load(path: &Path) -> Result<Vec<DeletionRequest>> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| error(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(error(path, e)),
    }
}

/// Records `request` durably; recording the same rows twice keeps one.
pub fn add(path: &Path, request: DeletionRequest) -> Result<()> {
    update(path, |requests| {
        if !requests.iter().any(|r| r.same_rows(&request)) {
            requests.push(request);
        }
    })
}

/// Retires requests whose rows are gone from disk.
pub fn retire(path: &Path, done: &[DeletionRequest]) -> Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    update(path, |requests| requests.retain(|r| !done.contains(r)))
}

/// Read, change, write-then-rename, under an exclusive lock on a side file.
fn update(path: &Path, change: impl FnOnce(&mut Vec<DeletionRequest>)) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| error(path, e))?;
    let lock = File::create(path.with_extension("lock")).map_err(|e| error(path, e))?;
    lock.lock().map_err(|e| error(path, e))?;
    let mut requests = load(path)?;
    change(&mut requests);
    let text = serde_json::to_vec_pretty(&requests).map_err(|e| error(path, e))?;
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary).map_err(|e| error(path, e))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&temporary, path))
        .and_then(|()| File::open(dir)?.sync_all())
        .map_err(|e| error(path, e))
}

fn error(path: &Path, e: impl std::fmt::Display) -> RequestError {
    RequestError {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(id: &str) -> DeletionRequest {
        DeletionRequest {
            table: "teleservice".into(),
            matches: vec![("case_id".into(), MatchValue::Text(id.into()))],
            event: "case_closed".into(),
            requested_ms: 1,
        }
    }

    #[test]
    fn requests_are_kept_once_and_retired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("requests.json");
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
            case("it's").sql(),
            "(coalesce(\"case_id\" = 'it''s', false))"
        );
    }
}
