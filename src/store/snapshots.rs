//! The tables as this node's queries read them: each table's latest
//! version, kept between queries and brought up to date before each one by
//! reading only the commits after it, and one cache of Parquet footers
//! that every query's session shares.
//!
//! Loading a table from its log (a listing, the last checkpoint and every
//! commit since, decoded and replayed) is most of what a small query costs,
//! and each query's session would otherwise do it again for every table,
//! and read every file's footer again. A query still lists each log before
//! it plans, so it sees every commit made before it started, by this node
//! or any other.
//!
//! A file is never rewritten in place, so a footer read once stays true.
//! The footer cache is emptied at every maintenance tick
//! ([`Snapshots::forget_footers`]), so that the statistics of a file a
//! retention sweep deleted are not kept in memory beyond it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::execution::cache::cache_manager::FileMetadataCache;
use datafusion::execution::cache::default_cache::DefaultCache;
use deltalake::DeltaTable;

use super::Result;
use super::delta::{self, StoreRoot};

/// Memory the footer cache may hold; the least recently used go first.
const FOOTER_CACHE_BYTES: usize = 64 << 20;

/// The latest versions of the tables under one root, and their footers.
pub struct Snapshots {
    root: StoreRoot,
    kept: Mutex<HashMap<String, DeltaTable>>,
    footers: Arc<FileMetadataCache>,
}

impl Snapshots {
    /// Nothing kept yet: the first query of each table loads it.
    pub fn new(root: StoreRoot) -> Self {
        Self {
            root,
            kept: Mutex::new(HashMap::new()),
            footers: Arc::new(DefaultCache::new(FOOTER_CACHE_BYTES).with_name("fleetgate footers")),
        }
    }

    /// Where the tables live.
    pub fn root(&self) -> &StoreRoot {
        &self.root
    }

    /// Table `name` at its latest version, `None` if it was never created:
    /// the kept version brought up to date, or the table loaded if none is
    /// kept or the kept one cannot be (its commits were cleaned up).
    pub async fn latest(&self, name: &str) -> Result<Option<DeltaTable>> {
        let kept = self.lock().get(name).cloned();
        let updated = match kept {
            Some(mut table) => table.update_incremental(None).await.ok().map(|()| table),
            None => None,
        };
        let table = match updated {
            Some(table) => table,
            None => match delta::open(&self.root, name).await? {
                Some(table) => table,
                None => {
                    self.lock().remove(name);
                    return Ok(None);
                }
            },
        };
        let mut kept = self.lock();
        // Another query may have kept a later version meanwhile.
        if kept.get(name).is_none_or(|k| k.version() < table.version()) {
            kept.insert(name.to_owned(), table.clone());
        }
        Ok(Some(table))
    }

    /// The footer cache, for every query session's runtime.
    pub fn footers(&self) -> Arc<FileMetadataCache> {
        Arc::clone(&self.footers)
    }

    /// Empties the footer cache.
    pub fn forget_footers(&self) {
        self.footers.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, DeltaTable>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

    use super::*;
    use crate::store::{PartitionKey, append, block_on};

    fn seqs(schema: &SchemaRef, values: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::clone(schema),
            vec![Arc::new(Int64Array::from(values.to_vec()))],
        )
        .expect("batch")
    }

    fn files(table: &DeltaTable) -> usize {
        table
            .snapshot()
            .expect("snapshot")
            .log_data()
            .iter()
            .count()
    }

    /// A kept version is brought up to date before it is handed out: an
    /// append and a DELETE made through another handle after it was kept
    /// are both seen, and the file the DELETE removed is no longer named.
    #[test]
    fn a_kept_table_is_brought_up_to_date() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = StoreRoot::local(dir.path()).expect("root");
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, false)]));
        let hour = PartitionKey::from_millis(1_780_000_000_000);
        let tables = Snapshots::new(root.clone());
        block_on(async {
            assert!(tables.latest("charging").await?.is_none());
            Ok::<_, crate::store::StoreError>(())
        })
        .expect("no table yet");

        append(
            &root,
            "charging",
            &schema,
            &[(hour, seqs(&schema, &[1]))],
            1,
        )
        .expect("append");
        let first = block_on(tables.latest("charging"))
            .expect("latest")
            .expect("table");
        assert_eq!(files(&first), 1);

        append(
            &root,
            "charging",
            &schema,
            &[(hour, seqs(&schema, &[2, 3]))],
            1,
        )
        .expect("append");
        let second = block_on(tables.latest("charging"))
            .expect("latest")
            .expect("table");
        assert!(second.version() > first.version());
        assert_eq!(files(&second), 2);

        block_on(async {
            let other = delta::open(&root, "charging").await?.expect("table");
            other.delete().with_predicate("seq = 1").await?;
            Ok::<_, crate::store::StoreError>(())
        })
        .expect("delete");
        let third = block_on(tables.latest("charging"))
            .expect("latest")
            .expect("table");
        assert!(third.version() > second.version());
        let named: Vec<String> = third
            .snapshot()
            .expect("snapshot")
            .log_data()
            .iter()
            .map(|f| f.path().to_string())
            .collect();
        let removed: Vec<String> = first
            .snapshot()
            .expect("snapshot")
            .log_data()
            .iter()
            .map(|f| f.path().to_string())
            .collect();
        assert_eq!(
            named.len(),
            1,
            "the DELETE removed the file holding seq 1: {named:?}"
        );
        assert!(
            !named.contains(&removed[0]),
            "{named:?} still names {removed:?}"
        );
    }

    /// A kept version whose commits the log cleanup deleted since (a
    /// checkpoint replaced them) still comes up to date, instead of failing
    /// the query.
    #[test]
    fn a_kept_table_whose_commits_were_cleaned_up_still_comes_up_to_date() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = StoreRoot::local(dir.path()).expect("root");
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, false)]));
        let hour = PartitionKey::from_millis(1_780_000_000_000);
        let tables = Snapshots::new(root.clone());
        append(
            &root,
            "charging",
            &schema,
            &[(hour, seqs(&schema, &[1]))],
            1,
        )
        .expect("append");
        let kept = block_on(tables.latest("charging"))
            .expect("latest")
            .expect("table");
        // Later commits, a checkpoint, and every commit before it gone.
        for seq in 2..5 {
            append(
                &root,
                "charging",
                &schema,
                &[(hour, seqs(&schema, &[seq]))],
                1,
            )
            .expect("append");
        }
        block_on(async {
            let table = delta::open(&root, "charging").await?.expect("table");
            deltalake::checkpoints::create_checkpoint(&table, None).await?;
            Ok::<_, crate::store::StoreError>(())
        })
        .expect("checkpoint");
        let log = dir.path().join("charging").join("_delta_log");
        for entry in std::fs::read_dir(&log).expect("log") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".json") && !name.starts_with("00000000000000000004") {
                std::fs::remove_file(&path).expect("remove commit");
            }
        }
        let latest = block_on(tables.latest("charging"))
            .expect("latest")
            .expect("table");
        assert!(latest.version() > kept.version());
        assert_eq!(files(&latest), 4);
    }
}
