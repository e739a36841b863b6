//! Where the store keeps the copies of the nodes' WAL group commits
//! ([`crate::wal::copies`]): under `<root>/_fleetgate_wal/`, beside the
//! tables, in the same directory or bucket every node shares.
//!
//! On local disk (a directory every node mounts) a copy is a file written to
//! a temporary name, fsync'd, renamed and its directory fsync'd, so it is
//! whole or absent. In an object store a PUT is whole or absent by itself,
//! and durable once answered.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use super::delta::StoreRoot;
use crate::core::fsio;
use crate::wal::copies::CopyStore;

/// The directory (or key prefix) below the store's root that holds the copies.
const COPIES_DIR: &str = "_fleetgate_wal";

impl StoreRoot {
    /// Where this store keeps WAL copies.
    pub fn wal_copies(&self) -> std::io::Result<Arc<dyn CopyStore>> {
        Ok(match self.object_store() {
            None => Arc::new(LocalCopies {
                dir: self
                    .local_dir()
                    .map(|d| d.join(COPIES_DIR))
                    .unwrap_or_default(),
            }),
            Some((store, prefix)) => Arc::new(RemoteCopies {
                store,
                prefix: format!("{prefix}{COPIES_DIR}/"),
                runtime: tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("wal-copies")
                    .enable_all()
                    .build()?,
            }),
        })
    }
}

/// Copies as files in a shared directory.
struct LocalCopies {
    dir: PathBuf,
}

impl CopyStore for LocalCopies {
    fn put(&self, key: &str, bytes: Vec<u8>) -> std::io::Result<()> {
        let path = self.dir.join(key);
        let fresh_dir = !fsio::parent_dir(&path).exists();
        fsio::replace(&path, &bytes)?;
        if fresh_dir {
            // The new shard directory's own entry, up to the copies' root.
            let mut dir = fsio::parent_dir(&path);
            while dir.starts_with(&self.dir) && dir != self.dir {
                dir = fsio::parent_dir(dir);
                fsio::sync_dir(dir)?;
            }
        }
        Ok(())
    }

    fn list(&self, prefix: &str) -> std::io::Result<Vec<(String, i64)>> {
        let mut keys = Vec::new();
        list_files(&self.dir, &self.dir.join(prefix), &mut keys)?;
        Ok(keys)
    }

    fn get(&self, key: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.dir.join(key))
    }

    fn delete(&self, keys: &[String]) -> std::io::Result<()> {
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            let path = self.dir.join(key);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    dirs.insert(fsio::parent_dir(&path).to_owned());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        dirs.iter().try_for_each(|dir| fsio::sync_dir(dir))
    }
}

/// How old a temporary file must be to be taken for one a killed writer
/// left: a copy is written in milliseconds.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Every finished copy below `dir` (a temporary file of an unfinished
/// write is not one), as keys relative to `root`, with its mtime. A
/// temporary file older than [`STALE_TEMPORARY`] (a write a crash cut
/// short, whose retry went to another key) is deleted: what it holds must
/// not outlive the copies.
fn list_files(root: &Path, dir: &Path, keys: &mut Vec<(String, i64)>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            list_files(root, &path, keys)?;
        } else if path.extension().is_some_and(|x| x == "tmp") {
            let age = std::fs::metadata(&path)?
                .modified()?
                .elapsed()
                .unwrap_or_default();
            if age > STALE_TEMPORARY {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        } else if path.extension().is_some_and(|x| x == "wal")
            && let Some(key) = path.strip_prefix(root).ok().and_then(Path::to_str)
        {
            let written = std::fs::metadata(&path)?.modified()?;
            let written_ms = written
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            keys.push((key.to_owned(), written_ms));
        }
    }
    Ok(())
}

/// Copies as objects in the store's bucket.
struct RemoteCopies {
    store: Arc<dyn ObjectStore>,
    /// `<root prefix>/_fleetgate_wal/`.
    prefix: String,
    runtime: tokio::runtime::Runtime,
}

impl RemoteCopies {
    fn path(&self, key: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{key}", self.prefix))
    }

    /// Runs `work` on this store's runtime; on a thread of its own when the
    /// caller is inside a runtime already (which may not block).
    fn run<T: Send>(&self, work: impl Future<Output = T> + Send) -> T {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.runtime.block_on(work);
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.runtime.block_on(work))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl CopyStore for RemoteCopies {
    fn put(&self, key: &str, bytes: Vec<u8>) -> std::io::Result<()> {
        let path = self.path(key);
        self.run(self.store.put(&path, bytes.into()))
            .map(drop)
            .map_err(std::io::Error::other)
    }

    fn list(&self, prefix: &str) -> std::io::Result<Vec<(String, i64)>> {
        let path = self.path(prefix);
        let strip = self.prefix.clone();
        self.run(async {
            self.store
                .list(Some(&path))
                .map_ok(|meta| {
                    let key = meta.location.as_ref().strip_prefix(strip.as_str())?;
                    Some((key.to_owned(), meta.last_modified.timestamp_millis()))
                })
                .try_collect::<Vec<_>>()
                .await
        })
        .map(|keys| keys.into_iter().flatten().collect())
        .map_err(std::io::Error::other)
    }

    fn get(&self, key: &str) -> std::io::Result<Vec<u8>> {
        let path = self.path(key);
        self.run(async { self.store.get(&path).await?.bytes().await })
            .map(|bytes| bytes.to_vec())
            .map_err(std::io::Error::other)
    }

    fn delete(&self, keys: &[String]) -> std::io::Result<()> {
        let paths: Vec<object_store::Result<ObjectPath>> =
            keys.iter().map(|key| Ok(self.path(key))).collect();
        self.run(async {
            self.store
                .delete_stream(futures::stream::iter(paths).boxed())
                .try_for_each(|_| async { Ok(()) })
                .await
        })
        .or_else(|e| match e {
            object_store::Error::NotFound { .. } => Ok(()),
            e => Err(std::io::Error::other(e)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary file a killed writer left is deleted once it is older
    /// than any write takes; a younger one may be a write under way.
    #[test]
    fn a_stale_temporary_copy_is_deleted_when_the_copies_are_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let copies = LocalCopies {
            dir: dir.path().to_owned(),
        };
        copies
            .put("node/shard-000/1-2.wal", b"entries".to_vec())
            .expect("a copy");
        let shard = dir.path().join("node/shard-000");
        let stale = shard.join("3-4.tmp");
        let fresh = shard.join("5-6.tmp");
        for path in [&stale, &fresh] {
            std::fs::write(path, b"cut short").expect("temporary");
        }
        let two_hours_ago = std::time::SystemTime::now() - 2 * STALE_TEMPORARY;
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .and_then(|f| f.set_modified(two_hours_ago))
            .expect("aged");
        let keys: Vec<String> = copies
            .list("")
            .expect("list")
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(keys, vec!["node/shard-000/1-2.wal".to_owned()]);
        assert!(!stale.exists());
        assert!(fresh.exists());
    }
}
