//! The one way fleetgate changes a file durably, and with the narrowest mode.
//!
//! Every file fleetgate creates is readable by its owner only (0600) and
//! every directory it creates is 0700: the data directory holds keys,
//! pseudonymised records, registries and audit trails. A replaced file goes
//! write → fsync → rename → fsync of the directory, so a crash leaves the old
//! state or the complete new one, never a torn file. Small JSON state files
//! (requests, holds, the access registry, credentials) change only under an
//! exclusive lock on a side file, read-modify-write.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Mode of every file fleetgate creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory fleetgate creates.
pub const DIR_MODE: u32 = 0o700;

/// A file operation that failed, with the file it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FsError {
    pub path: PathBuf,
    pub message: String,
}

fn error(path: &Path, e: impl std::fmt::Display) -> FsError {
    FsError {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Options that create a file with [`FILE_MODE`] (the mode applies only
/// when the file is new).
pub fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Creates (or truncates) `path` for writing, owner-only.
pub fn create(path: &Path) -> std::io::Result<File> {
    private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// Creates `dir` and its missing parents with [`DIR_MODE`].
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// The directory a path lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Makes the entries of `dir` durable (a created, renamed or removed file).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes every file and directory this process creates from now on private
/// to its owner (umask 077), including those libraries create (the Delta
/// log and data files written through object_store), which take no mode.
pub fn restrict_new_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// The most open files [`raise_open_file_limit`] asks for: a million
/// vehicle connections and then some.
pub const MAX_OPEN_FILES: u64 = 1 << 20;

/// Raises this process's soft limit on open files to its hard limit (a
/// vehicle connection is a descriptor; the usual soft limit of 1,024 would
/// refuse a fleet past a thousand vehicles) and returns the limit now in
/// force, `None` when unlimited. The soft limit goes no higher than
/// [`MAX_OPEN_FILES`], whatever the hard limit (some systems refuse an
/// unlimited soft limit, and none needs more).
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let wanted = limit
        .maximum
        .map_or(MAX_OPEN_FILES, |m| m.min(MAX_OPEN_FILES));
    if limit.current.is_some_and(|current| current < wanted) {
        limit.current = Some(wanted);
        // Refused only if the hard limit fell meanwhile; what holds is read below.
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current
}

/// Makes the contents of a file another writer wrote durable.
pub fn sync_file(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// Renames `from` over `to` and makes the rename durable.
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::rename(from, to)?;
    sync_dir(parent_dir(to))
}

/// Replaces `path` with `contents`: a temporary file, fsync'd, renamed over
/// it, and the directory fsync'd. A replacement that fails removes its
/// temporary file: what it held must not outlive the attempt.
pub fn replace(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    create_dir_all(parent_dir(path))?;
    let temporary = path.with_extension("tmp");
    let written = (|| {
        let mut file = create(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    let replaced = written.and_then(|()| rename_durably(&temporary, path));
    if replaced.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    replaced
}

/// The JSON document at `path`; its default when the file does not exist yet.
pub fn load_json<T: DeserializeOwned + Default>(path: &Path) -> Result<T, FsError> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| error(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(error(path, e)),
    }
}

/// Read, change, replace, under an exclusive lock on a side file: the one way
/// every small state file is changed. Returns what `change` returns.
pub fn update_json<T: Serialize + DeserializeOwned + Default, R>(
    path: &Path,
    change: impl FnOnce(&mut T) -> R,
) -> Result<R, FsError> {
    create_dir_all(parent_dir(path)).map_err(|e| error(path, e))?;
    let lock = private_options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path.with_extension("lock"))
        .map_err(|e| error(path, e))?;
    lock.lock().map_err(|e| error(path, e))?;
    let mut document = load_json(path)?;
    let outcome = change(&mut document);
    let text = serde_json::to_vec_pretty(&document).map_err(|e| error(path, e))?;
    replace(path, &text).map_err(|e| error(path, e))?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaced_files_and_their_directories_are_owner_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state/sub/doc.json");
        update_json(&path, |doc: &mut Vec<u32>| doc.push(7)).expect("update");
        let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&path), FILE_MODE);
        assert_eq!(mode(&path.with_extension("lock")), FILE_MODE);
        assert_eq!(mode(&dir.path().join("state/sub")), DIR_MODE);
        assert_eq!(load_json::<Vec<u32>>(&path).expect("load"), vec![7]);
    }

    /// A replacement that fails (here its rename: a directory stands at
    /// the path) leaves nothing of what it wrote.
    #[test]
    fn a_failed_replacement_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("copy.wal");
        fs::create_dir(&path).expect("a directory in the way");
        assert!(replace(&path, b"acknowledged rows").is_err());
        assert!(!path.with_extension("tmp").exists());
    }
}
