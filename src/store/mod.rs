//! The store: one Delta Lake table per stream plus the dead letters (see
//! [`delta`]), and the per-table writer threads that commit to them.
//!
//! Layout: `<root>/<table>/_delta_log/` (the transaction log) and
//! `<root>/<table>/date=YYYY-MM-DD/hour=H/part-*.zstd.parquet`, partitioned
//! by the vehicle timestamp (dead letters: by time of receipt). A file
//! becomes visible only when a commit names it, so a reader never sees a
//! partial file or half a roll.

mod compact;
mod counters;
pub mod delta;
mod files;
mod snapshots;
mod wal_copies;
mod writer;

pub use compact::{Compaction, compact};
pub use counters::TableListener;
pub use files::{RowCount, TableFiles};
pub use snapshots::Snapshots;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use crate::core::table::{PartitionKey, Table};
pub use delta::StoreRoot;

pub use writer::{
    Commit, CommitListener, TableBatch, WriterSettings, append, spawn_writer, writer_properties,
};

/// Errors of building batches and writing files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("delta: {0}")]
    Delta(Box<deltalake::DeltaTableError>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} cannot hold a table")]
    Location(PathBuf),
    #[error("storage.uri {0}")]
    Uri(String),
    #[error(
        "{0:?} hold Parquet files of an older version and no Delta log: stop, run `fleetgate admin convert`, start again"
    )]
    NotConverted(Vec<String>),
    #[error("a store thread panicked")]
    Panicked,
    #[error(
        "this node no longer holds the lease on its name (cluster.lease_secs): not committing \
         until it does, since another node may be storing its WAL"
    )]
    Fenced,
    #[error("{0}: it cannot be read as plain Parquet files")]
    NotPlainFiles(String),
    #[error("reading the table to rewrite it: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
    #[error("the store did not answer within {0:?}")]
    TimedOut(std::time::Duration),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Boxed: Delta's error is large, and this one travels up every `Result`.
impl From<deltalake::DeltaTableError> for StoreError {
    fn from(error: deltalake::DeltaTableError) -> Self {
        Self::Delta(Box::new(error))
    }
}

/// For every table and every shard of `node` in `shards`: the last WAL
/// entry of that shard a commit to the table holds. An entry at or below it is stored;
/// recovery writes exactly the others again, so none is stored twice.
pub async fn stored_through(
    root: &StoreRoot,
    node: &str,
    shards: &[u16],
) -> Result<HashMap<(Table, u16), u64>> {
    let mut through = HashMap::new();
    for table in Table::all() {
        let Some(delta_table) = delta::open(root, table.name()).await? else {
            continue;
        };
        for &shard in shards {
            let app = delta::wal_app_id(node, shard);
            if let Some(seq) = delta::stored_through(&delta_table, &app).await? {
                through.insert((table, shard), seq);
            }
        }
    }
    Ok(through)
}

/// Runs a store future to completion from synchronous code, on a thread
/// and runtime of its own (the caller may be inside a runtime or not).
pub fn block_on<T: Send, E: Send + From<StoreError>>(
    work: impl Future<Output = Result<T, E>> + Send,
) -> Result<T, E> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(io_error(Path::new("store runtime")))?
                    .block_on(work)
            })
            .join()
            .unwrap_or(Err(StoreError::Panicked.into()))
    })
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}
