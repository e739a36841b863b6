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
//! The kept versions and the footers are all dropped every [`KEEP_FOR`]
//! (at the first query after it, and at every maintenance tick of the
//! server's sweeper: [`Snapshots::forget`]), so that what they say of a file
//! a retention sweep or an erasure deleted (paths, partition values, the
//! log's and the footer's column statistics) is not kept in memory much
//! beyond its deletion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use datafusion::execution::cache::cache_manager::{CacheManagerConfig, FileMetadataCache};
use datafusion::execution::cache::default_cache::DefaultCache;
use deltalake::DeltaTable;

use super::Result;
use super::delta::{self, StoreRoot};

/// Memory the footer cache may hold; the least recently used go first.
const FOOTER_CACHE_BYTES: usize = 64 << 20;

/// How long kept versions and footers are kept at most.
const KEEP_FOR: Duration = Duration::from_secs(300);

/// The latest versions of the tables under one root, and their footers.
pub struct Snapshots {
    root: StoreRoot,
    /// [`KEEP_FOR`], but in tests.
    keep_for: Duration,
    kept: Mutex<Kept>,
    footers: Arc<FileMetadataCache>,
}

/// The kept versions, and since when they and the footers are kept.
struct Kept {
    tables: HashMap<String, DeltaTable>,
    since: Instant,
}

impl Snapshots {
    /// Nothing kept yet: the first query of each table loads it.
    pub fn new(root: StoreRoot) -> Self {
        Self::keeping_for(root, KEEP_FOR)
    }

    fn keeping_for(root: StoreRoot, keep_for: Duration) -> Self {
        Self {
            root,
            keep_for,
            kept: Mutex::new(Kept {
                tables: HashMap::new(),
                since: Instant::now(),
            }),
            footers: Arc::new(DefaultCache::new(FOOTER_CACHE_BYTES).with_name("fleetgate footers")),
        }
    }

    /// Where the tables live.
    pub fn root(&self) -> &StoreRoot {
        &self.root
    }

    /// Table `name` at its latest version, `None` if it was never created:
    /// the kept version brought up to date, or the table loaded if none is
    /// kept or the kept one cannot be brought up to date.
    pub async fn latest(&self, name: &str) -> Result<Option<DeltaTable>> {
        let kept = {
            let mut kept = self.lock();
            if kept.since.elapsed() >= self.keep_for {
                self.forget_kept(&mut kept);
            }
            kept.tables.get(name).cloned()
        };
        let updated = match kept {
            Some(mut table) => match table.update_incremental(None).await {
                Ok(()) => Some(table),
                Err(error) => {
                    tracing::debug!(table = name, %error, "loading the table anew: its kept version cannot be brought up to date");
                    None
                }
            },
            None => None,
        };
        let (table, loaded) = match updated {
            Some(table) => (table, false),
            None => match delta::open(&self.root, name).await? {
                Some(table) => (table, true),
                None => {
                    self.lock().tables.remove(name);
                    return Ok(None);
                }
            },
        };
        let mut kept = self.lock();
        // Another query may have kept a later version meanwhile; a table
        // loaded anew replaces whatever was kept (its log may have started
        // over at a lower version).
        if loaded
            || kept
                .tables
                .get(name)
                .is_none_or(|k| k.version() < table.version())
        {
            kept.tables.insert(name.to_owned(), table.clone());
        }
        Ok(Some(table))
    }

    /// How every query session's runtime caches: in the shared footer
    /// cache, within [`FOOTER_CACHE_BYTES`].
    pub fn cache_config(&self) -> CacheManagerConfig {
        CacheManagerConfig::default()
            .with_file_metadata_cache(Some(Arc::clone(&self.footers)))
            .with_metadata_cache_limit(FOOTER_CACHE_BYTES)
    }

    /// Drops every kept version and footer: the next query of each table
    /// loads it from its log, and reads the footers it needs again.
    pub fn forget(&self) {
        let mut kept = self.lock();
        self.forget_kept(&mut kept);
    }

    fn forget_kept(&self, kept: &mut Kept) {
        kept.tables.clear();
        kept.since = Instant::now();
        self.footers.clear();
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many footers are cached now.
    #[cfg(test)]
    fn footers_cached(&self) -> usize {
        self.footers.len()
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

    /// An empty store, and the one-column schema the tests write.
    fn seq_store() -> (tempfile::TempDir, StoreRoot, SchemaRef) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = StoreRoot::local(dir.path()).expect("root");
        let schema = Arc::new(Schema::new(vec![Field::new("seq", DataType::Int64, false)]));
        (dir, root, schema)
    }

    /// `values` appended to the table `charging` in one hour, one commit.
    fn append_seqs(root: &StoreRoot, schema: &SchemaRef, values: &[i64]) {
        let hour = PartitionKey::from_millis(1_780_000_000_000);
        append(root, "charging", schema, &[(hour, seqs(schema, values))], 1).expect("append");
    }

    /// The table `charging` as `tables` hands it out now.
    fn latest(tables: &Snapshots) -> DeltaTable {
        block_on(tables.latest("charging"))
            .expect("latest")
            .expect("table")
    }

    /// The paths of the files `table`'s version names.
    fn paths(table: &DeltaTable) -> Vec<String> {
        table
            .snapshot()
            .expect("snapshot")
            .log_data()
            .iter()
            .map(|f| f.path().to_string())
            .collect()
    }

    fn files(table: &DeltaTable) -> usize {
        paths(table).len()
    }

    /// A kept version is brought up to date before it is handed out: an
    /// append and a DELETE made through another handle after it was kept
    /// are both seen, and the file the DELETE removed is no longer named.
    #[test]
    fn a_kept_table_is_brought_up_to_date() {
        let (_dir, root, schema) = seq_store();
        let tables = Snapshots::new(root.clone());
        block_on(async {
            assert!(tables.latest("charging").await?.is_none());
            Ok::<_, crate::store::StoreError>(())
        })
        .expect("no table yet");

        append_seqs(&root, &schema, &[1]);
        let first = latest(&tables);
        assert_eq!(files(&first), 1);

        append_seqs(&root, &schema, &[2, 3]);
        let second = latest(&tables);
        assert!(second.version() > first.version());
        assert_eq!(files(&second), 2);

        block_on(async {
            let other = delta::open(&root, "charging").await?.expect("table");
            other.delete().with_predicate("seq = 1").await?;
            Ok::<_, crate::store::StoreError>(())
        })
        .expect("delete");
        let third = latest(&tables);
        assert!(third.version() > second.version());
        let (named, removed) = (paths(&third), paths(&first));
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

    /// A store whose table `charging` has two files (two hours).
    fn two_files() -> (tempfile::TempDir, StoreRoot) {
        let (dir, root, schema) = seq_store();
        let hours = [1_780_000_000_000, 1_780_003_600_000].map(PartitionKey::from_millis);
        let parts: Vec<_> = hours.iter().map(|h| (*h, seqs(&schema, &[1, 2]))).collect();
        append(&root, "charging", &schema, &parts, 1).expect("append");
        (dir, root)
    }

    /// `SELECT sum(seq) FROM charging` in a session of its own that caches
    /// as `tables` says; the rows of its answer.
    async fn sum_of_seqs(tables: &Snapshots) -> crate::store::Result<usize> {
        use datafusion::execution::runtime_env::RuntimeEnvBuilder;
        use datafusion::prelude::{SessionConfig, SessionContext};

        let table = tables.latest("charging").await?.expect("a table");
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(tables.cache_config())
            .build_arc()?;
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
        ctx.register_table("charging", table.table_provider().await?)?;
        let batches = ctx
            .sql("SELECT sum(seq) FROM charging")
            .await?
            .collect()
            .await?;
        Ok(batches[0].num_rows())
    }

    /// Once kept for their bound, the kept versions and the footers are
    /// dropped by the next query, before it loads what it reads: a node
    /// whose sweeper never runs still forgets what it read of files a sweep
    /// elsewhere deleted.
    #[test]
    fn what_is_kept_is_dropped_at_the_first_query_past_its_bound() {
        let (_dir, root) = two_files();
        let keep_for = Duration::from_millis(100);
        let tables = Snapshots::keeping_for(root, keep_for);
        assert_eq!(block_on(sum_of_seqs(&tables)).expect("a query"), 1);
        assert_eq!(tables.footers_cached(), 2);
        let first = tables.lock().since;
        std::thread::sleep(keep_for * 2);
        // The table only: no footer is read again.
        latest(&tables);
        assert_eq!(tables.footers_cached(), 0, "the footers were dropped");
        let kept = tables.lock();
        assert!(kept.since > first, "kept anew since this query");
        assert_eq!(kept.tables.len(), 1, "only the table just loaded");
    }

    /// Every session whose runtime takes [`Snapshots::cache_config`] reads
    /// footers through the one cache, and [`Snapshots::forget`] empties it
    /// along with the kept versions.
    #[test]
    fn sessions_share_the_footers_until_they_are_forgotten() {
        let (_dir, root) = two_files();
        let tables = Snapshots::new(root);
        let sum = || block_on(sum_of_seqs(&tables));
        assert_eq!(sum().expect("first session"), 1);
        assert_eq!(tables.footers_cached(), 2, "one footer per file");
        assert_eq!(sum().expect("second session"), 1);
        assert_eq!(tables.footers_cached(), 2, "read from the cache");
        tables.forget();
        assert_eq!(tables.footers_cached(), 0);
        assert!(tables.lock().tables.is_empty());
    }

    /// A kept version whose commits the log cleanup deleted since (a
    /// checkpoint replaced them) still comes up to date, instead of failing
    /// the query.
    #[test]
    fn a_kept_table_whose_commits_were_cleaned_up_still_comes_up_to_date() {
        let (dir, root, schema) = seq_store();
        let tables = Snapshots::new(root.clone());
        append_seqs(&root, &schema, &[1]);
        let kept = latest(&tables);
        // Later commits, a checkpoint, and every commit before it gone.
        for seq in 2..5 {
            append_seqs(&root, &schema, &[seq]);
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
        let latest = latest(&tables);
        assert!(latest.version() > kept.version());
        assert_eq!(files(&latest), 4);
    }
}
