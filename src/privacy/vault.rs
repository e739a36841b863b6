//! The vault: each vehicle's random secret and data key, and its consent
//! state, in an embedded redb database next to the root key (outside the
//! data directory), or, for a cluster, in the control plane's PostgreSQL
//! database (`cluster.control_plane`, [`crate::control::vault`]), with the
//! same values under the same keys.
//!
//! Embedded format (redb 4, one file, `storage.vault_file`):
//! - table `vehicles`: key = HMAC(vault index key, VIN) (32 bytes; the vault
//!   holds no VIN), value = vehicle secret (32 bytes) ‖ data key (32 bytes) ‖
//!   created at (i64 ms, little-endian);
//! - table `consent`: same key, value = one byte of flags (see [`Consent`]).
//!
//! Every write commits with redb's default durability (fsync) before it
//! returns, so a secret is on disk before any row that uses it. The file is
//! owner-only (0600): it holds every data key in clear.
//!
//! Erasing a vehicle removes both entries: its pseudonyms can no longer be
//! computed and its encrypted fields no longer decrypted, by anyone
//! (crypto-shredding). redb is copy-on-write and frees a removed entry's page
//! without overwriting it, so a removal alone would leave the secret's bytes
//! in the file. Erasure therefore writes every other entry into a new
//! owner-only file (`<vault>.erasing`), commits it (fsync), renames it over
//! the vault, fsyncs the directory and reopens: no file fleetgate keeps holds
//! an erased secret. A crash before the rename leaves the vault as it was
//! (the erasure reported an error and can be repeated); the leftover file is
//! removed at the next open.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::control::ControlPlane;
use crate::core::consent::Consent;
use crate::core::fsio;
use crate::privacy::pseudo::{KEY_BYTES, KeyRing, Secret};

const VEHICLES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("vehicles");
const CONSENT: TableDefinition<&[u8], u8> = TableDefinition::new("consent");
const VEHICLE_VALUE_BYTES: usize = 2 * KEY_BYTES + 8;
/// Suffix of the file an erasure writes before renaming it over the vault.
const ERASING_SUFFIX: &str = "erasing";

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("vault {path}: {source}")]
    Db {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    #[error("vault in {home}: an entry of {len} bytes is malformed")]
    Malformed { home: String, len: usize },
    #[error("vault: {0}")]
    Control(#[from] crate::control::ControlError),
    #[error("vault: cannot start the thread that follows the shared vault's changes: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Key(#[from] crate::privacy::pseudo::PseudoError),
}

pub type Result<T, E = VaultError> = std::result::Result<T, E>;

/// A vehicle's secrets.
#[derive(Debug, Clone, PartialEq)]
pub struct VehicleKeys {
    /// Input of every pseudonym of the vehicle.
    pub secret: Secret,
    /// Key of its encrypted fields.
    pub data_key: Secret,
    /// When this secret was created (ms since the epoch): every row under
    /// it was received later. An erasure makes the next secret newer than
    /// the erasing event, so a tenure that event ended never reaches rows
    /// under the new one (see `access::registry::AccessRegistry::held_periods_under`).
    pub created_ms: i64,
}

/// The open vault, in one of its two homes.
pub struct Vault {
    store: Store,
    index_key: Secret,
}

enum Store {
    /// The redb file of `storage.vault_file`: one process at a time (redb
    /// locks the file).
    Embedded(Embedded),
    /// The control plane's PostgreSQL database, shared by the nodes of a
    /// cluster (`cluster.control_plane`, see [`crate::control::vault`]).
    Shared(Arc<ControlPlane>),
}

struct Embedded {
    /// Behind a lock only so that an erasure can swap in the rewritten file;
    /// every other method holds the read guard for its whole transaction.
    db: RwLock<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let home = match &self.store {
            Store::Embedded(embedded) => embedded.path.display().to_string(),
            Store::Shared(_) => "the control plane".to_owned(),
        };
        f.debug_struct("Vault")
            .field("home", &home)
            .finish_non_exhaustive()
    }
}

/// Creates `path` owner-only if it is absent, and narrows an existing one to
/// owner-only (versions before this one let redb create it 0644).
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let file = fsio::private_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(fsio::FILE_MODE))
}

impl Vault {
    /// Opens the vault at `path`, creating it (owner-only) if absent.
    pub fn open(path: &Path, keys: &KeyRing) -> Result<Self> {
        Ok(Self {
            store: Store::Embedded(Embedded::open(path)?),
            index_key: keys.vault_index_key(),
        })
    }

    /// The vault in the control plane's database, shared with every node
    /// that uses the same database and root key; refused if the vault was
    /// made with another root key.
    pub fn shared(plane: Arc<ControlPlane>, keys: &KeyRing) -> Result<Self> {
        let index_key = keys.vault_index_key();
        plane.claim_root_key(&index_key.mac(&[b"root key fingerprint"]))?;
        Ok(Self {
            store: Store::Shared(plane),
            index_key,
        })
    }

    /// The shared vault's change count (see
    /// [`ControlPlane::vault_changes`]); `None` for the embedded vault,
    /// which only this process changes.
    pub fn shared_changes(&self) -> Option<Result<u64>> {
        match &self.store {
            Store::Embedded(_) => None,
            Store::Shared(plane) => Some(plane.vault_changes().map_err(VaultError::from)),
        }
    }

    fn index(&self, vin: &str) -> [u8; 32] {
        self.index_key.mac(&[vin.as_bytes()])
    }

    /// The vehicle's keys, if it has any.
    pub fn get(&self, vin: &str) -> Result<Option<VehicleKeys>> {
        let index = self.index(vin);
        let value = match &self.store {
            Store::Embedded(embedded) => embedded.get(&[index])?.pop().flatten(),
            Store::Shared(plane) => plane.keys(&[index])?.pop().flatten(),
        };
        value.map(|v| self.decode(&v)).transpose()
    }

    /// Every vehicle's keys: for a service purpose that reads the encrypted
    /// fields of rows that name their vehicle only by pseudonym.
    pub fn all_keys(&self) -> Result<Vec<VehicleKeys>> {
        let values = match &self.store {
            Store::Embedded(embedded) => embedded.all()?,
            Store::Shared(plane) => plane.all_keys()?,
        };
        values.iter().map(|v| self.decode(v)).collect()
    }

    /// The vehicle's keys, created (and durably committed) on first use.
    pub fn get_or_create(&self, vin: &str) -> Result<VehicleKeys> {
        let mut keys = self.get_or_create_all(&[vin])?;
        keys.pop().ok_or_else(|| self.malformed(0))
    }

    /// The keys of each of `vins`, in order, creating those that have none
    /// in one durably committed write transaction: a fleet's first contact
    /// costs one commit per call, not one per vehicle.
    pub fn get_or_create_all(&self, vins: &[&str]) -> Result<Vec<VehicleKeys>> {
        let indexes: Vec<[u8; 32]> = vins.iter().map(|vin| self.index(vin)).collect();
        let mut found = match &self.store {
            Store::Embedded(embedded) => embedded.get(&indexes)?,
            Store::Shared(plane) => plane.keys(&indexes)?,
        };
        if found.iter().any(Option::is_none) {
            // Fresh secrets where none was found, drawn outside the
            // transaction (the OS random source can fail; redb's errors
            // cannot carry that). Only the ones whose index has none yet
            // are stored: never replace a key.
            let created_ms = crate::core::clock::now_ms();
            let mut fresh = Vec::with_capacity(vins.len());
            for value in &found {
                fresh.push(match value {
                    Some(_) => Vec::new(),
                    None => encode(&Secret::random()?, &Secret::random()?, created_ms),
                });
            }
            let (indexes, fresh): (Vec<[u8; 32]>, Vec<Vec<u8>>) = indexes
                .into_iter()
                .zip(fresh)
                .filter(|(_, value)| !value.is_empty())
                .unzip();
            let stored = match &self.store {
                Store::Embedded(embedded) => embedded.get_or_insert(&indexes, &fresh)?,
                Store::Shared(plane) => plane.keys_or_insert(&indexes, &fresh)?,
            };
            let mut stored = stored.into_iter();
            for value in found.iter_mut().filter(|v| v.is_none()) {
                *value = stored.next().flatten();
            }
        }
        found
            .into_iter()
            .map(|value| self.decode(&value.ok_or_else(|| self.malformed(0))?))
            .collect()
    }

    /// Erases the vehicle's keys and consent state; true if it had keys.
    /// Both homes rewrite their storage without them (see the module
    /// documentation), which blocks every other vault access meanwhile:
    /// O(vehicles), and erasures are rare.
    pub fn erase(&self, vin: &str) -> Result<bool> {
        let index = self.index(vin);
        match &self.store {
            Store::Embedded(embedded) => embedded.erase(&index),
            Store::Shared(plane) => Ok(plane.erase(&index)?),
        }
    }

    pub fn consent(&self, vin: &str) -> Result<Consent> {
        let mut consents = self.consents(&[vin])?;
        consents.pop().ok_or_else(|| self.malformed(0))
    }

    /// The consent state of each of `vins`, in order, in one read.
    pub fn consents(&self, vins: &[&str]) -> Result<Vec<Consent>> {
        let indexes: Vec<[u8; 32]> = vins.iter().map(|vin| self.index(vin)).collect();
        let flags = match &self.store {
            Store::Embedded(embedded) => embedded.consents(&indexes)?,
            Store::Shared(plane) => plane.consents(&indexes)?,
        };
        Ok(flags
            .into_iter()
            .map(|f| f.map_or_else(Consent::default, Consent::from_flags))
            .collect())
    }

    pub fn set_consent(&self, vin: &str, consent: Consent) -> Result<()> {
        let index = self.index(vin);
        match &self.store {
            Store::Embedded(embedded) => embedded.set_consent(&index, consent.to_flags()),
            Store::Shared(plane) => Ok(plane.set_consent(&index, consent.to_flags())?),
        }
    }

    fn malformed(&self, len: usize) -> VaultError {
        let home = match &self.store {
            Store::Embedded(embedded) => embedded.path.display().to_string(),
            Store::Shared(_) => "the control plane".to_owned(),
        };
        VaultError::Malformed { home, len }
    }

    fn decode(&self, value: &[u8]) -> Result<VehicleKeys> {
        let malformed = || self.malformed(value.len());
        if value.len() != VEHICLE_VALUE_BYTES {
            return Err(malformed());
        }
        let key = |range: std::ops::Range<usize>| -> Result<Secret> {
            Ok(Secret(value[range].try_into().map_err(|_| malformed())?))
        };
        let created: [u8; 8] = value[2 * KEY_BYTES..].try_into().map_err(|_| malformed())?;
        Ok(VehicleKeys {
            secret: key(0..KEY_BYTES)?,
            data_key: key(KEY_BYTES..2 * KEY_BYTES)?,
            created_ms: i64::from_le_bytes(created),
        })
    }
}

/// A vehicle's stored keys: secret ‖ data key ‖ created at (ms, little-endian).
fn encode(secret: &Secret, data_key: &Secret, created_ms: i64) -> Vec<u8> {
    let mut value = Vec::with_capacity(VEHICLE_VALUE_BYTES);
    value.extend_from_slice(&secret.0);
    value.extend_from_slice(&data_key.0);
    value.extend_from_slice(&created_ms.to_le_bytes());
    value
}

impl Embedded {
    fn open(path: &Path) -> Result<Self> {
        let err = |e: redb::Error| VaultError::Db {
            path: path.to_owned(),
            source: Box::new(e),
        };
        let io = |e: std::io::Error| err(redb::StorageError::Io(e).into());
        fsio::create_dir_all(fsio::parent_dir(path)).map_err(io)?;
        // Before redb opens it: redb creates a missing file with the umask's mode.
        private_file(path).map_err(io)?;
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        // What a crash during an erasure left (never the vault itself); only
        // now, under redb's lock, so that no erasure of another process is cut.
        match std::fs::remove_file(erasing_path(path)) {
            Ok(()) => fsio::sync_dir(fsio::parent_dir(path)).map_err(io)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let embedded = Self {
            db: RwLock::new(db),
            path: path.to_owned(),
        };
        // Create both tables, so that readers never meet a missing one.
        embedded.write(|txn| {
            txn.open_table(VEHICLES)?;
            txn.open_table(CONSENT)?;
            Ok(())
        })?;
        Ok(embedded)
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> VaultError {
        VaultError::Db {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    /// The open database, for one transaction.
    fn db(&self) -> RwLockReadGuard<'_, Database> {
        self.db
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T> {
        let db = self.db();
        let txn = db.begin_write().map_err(|e| self.db_err(e))?;
        let out = f(&txn).map_err(|e| self.db_err(e))?;
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(out)
    }

    fn get(&self, indexes: &[[u8; 32]]) -> Result<Vec<Option<Vec<u8>>>> {
        let db = self.db();
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(VEHICLES).map_err(|e| self.db_err(e))?;
        let mut found = Vec::with_capacity(indexes.len());
        for index in indexes {
            let value = table.get(index.as_slice()).map_err(|e| self.db_err(e))?;
            found.push(value.map(|v| v.value().to_vec()));
        }
        Ok(found)
    }

    fn all(&self) -> Result<Vec<Vec<u8>>> {
        let db = self.db();
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(VEHICLES).map_err(|e| self.db_err(e))?;
        let mut values = Vec::new();
        for entry in table.iter().map_err(|e| self.db_err(e))? {
            let (_, value) = entry.map_err(|e| self.db_err(e))?;
            values.push(value.value().to_vec());
        }
        Ok(values)
    }

    /// Stores `fresh[i]` under `indexes[i]` where nothing is stored yet, in
    /// one durable transaction, and returns what each index holds now.
    fn get_or_insert(
        &self,
        indexes: &[[u8; 32]],
        fresh: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        self.write(|txn| {
            let mut table = txn.open_table(VEHICLES)?;
            let mut stored = Vec::with_capacity(indexes.len());
            for (index, value) in indexes.iter().zip(fresh) {
                // Checked again inside the write transaction (and for an
                // index named twice): never replace a key.
                if let Some(existing) = table.get(index.as_slice())? {
                    stored.push(Some(existing.value().to_vec()));
                    continue;
                }
                table.insert(index.as_slice(), value.as_slice())?;
                stored.push(Some(value.clone()));
            }
            Ok(stored)
        })
    }

    fn erase(&self, index: &[u8; 32]) -> Result<bool> {
        let mut db = self
            .db
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (had_keys, had_consent) = entries_of(&db, index).map_err(|e| self.db_err(e))?;
        if !had_keys && !had_consent {
            return Ok(false);
        }
        let fresh = erasing_path(&self.path);
        copy_without(&db, &fresh, index).map_err(|e| self.db_err(e))?;
        let io = |e: std::io::Error| self.db_err(redb::StorageError::Io(e));
        fsio::rename_durably(&fresh, &self.path).map_err(io)?;
        // The old handle holds (and locks) the now unlinked file: open the
        // new one, then close the old, whose blocks the filesystem frees.
        let reopened = Database::create(&self.path).map_err(|e| self.db_err(e))?;
        drop(std::mem::replace(&mut *db, reopened));
        Ok(had_keys)
    }

    fn consents(&self, indexes: &[[u8; 32]]) -> Result<Vec<Option<u8>>> {
        let db = self.db();
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(CONSENT).map_err(|e| self.db_err(e))?;
        let mut found = Vec::with_capacity(indexes.len());
        for index in indexes {
            let flags = table.get(index.as_slice()).map_err(|e| self.db_err(e))?;
            found.push(flags.map(|f| f.value()));
        }
        Ok(found)
    }

    fn set_consent(&self, index: &[u8; 32], flags: u8) -> Result<()> {
        self.write(|txn| {
            txn.open_table(CONSENT)?.insert(index.as_slice(), flags)?;
            Ok(())
        })
    }
}

/// Whether `index` has keys, and whether it has a consent entry.
fn entries_of(db: &Database, index: &[u8]) -> Result<(bool, bool), redb::Error> {
    let txn = db.begin_read()?;
    let keys = txn.open_table(VEHICLES)?.get(index)?.is_some();
    let consent = txn.open_table(CONSENT)?.get(index)?.is_some();
    Ok((keys, consent))
}

/// `<vault>.erasing`: where an erasure writes the vault anew.
fn erasing_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(ERASING_SUFFIX);
    PathBuf::from(name)
}

/// Every entry of both tables but `skip`'s, into a new owner-only redb file
/// at `to`, committed durably and closed.
fn copy_without(from: &Database, to: &Path, skip: &[u8]) -> Result<(), redb::Error> {
    match std::fs::remove_file(to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(redb::StorageError::Io(e).into()),
    }
    private_file(to).map_err(redb::StorageError::Io)?;
    let fresh = Database::create(to)?;
    let read = from.begin_read()?;
    let write = fresh.begin_write()?;
    {
        let (source, mut target) = (read.open_table(VEHICLES)?, write.open_table(VEHICLES)?);
        for entry in source.iter()? {
            let (key, value) = entry?;
            if key.value() != skip {
                target.insert(key.value(), value.value())?;
            }
        }
        let (source, mut target) = (read.open_table(CONSENT)?, write.open_table(CONSENT)?);
        for entry in source.iter()? {
            let (key, value) = entry?;
            if key.value() != skip {
                target.insert(key.value(), value.value())?;
            }
        }
    }
    // redb's default durability: fsync'd before commit returns.
    write.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Vault {
        let keys = KeyRing::load_or_create(&dir.join("root.key")).expect("keys");
        Vault::open(&dir.join("vault.redb"), &keys).expect("vault")
    }

    #[test]
    fn a_key_survives_reopening_and_is_never_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = {
            let vault = open(dir.path());
            let keys = vault.get_or_create("WMW11DJ04N2T00001").expect("create");
            // Dropped without any use of the key: a crash right after the write.
            keys
        };
        let vault = open(dir.path());
        assert_eq!(
            vault.get("WMW11DJ04N2T00001").expect("get"),
            Some(first.clone())
        );
        assert_eq!(
            vault.get_or_create("WMW11DJ04N2T00001").expect("again"),
            first
        );
        assert_ne!(
            vault
                .get_or_create("WMW21GD07P2S00002")
                .expect("other")
                .secret,
            first.secret
        );
    }

    #[test]
    fn many_vehicles_get_their_keys_in_one_call_and_keep_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = open(dir.path());
        let a = vault.get_or_create("WMW11DJ04N2T00001").expect("a");
        let vins = [
            "WMW21GD07P2S00002",
            "WMW11DJ04N2T00001",
            "WMW21GD07P2S00002",
        ];
        let keys = vault.get_or_create_all(&vins).expect("all");
        assert_eq!(keys.len(), 3, "one per VIN asked, in order");
        assert_eq!(keys[1], a, "an existing key is kept");
        assert_eq!(keys[0], keys[2], "a VIN named twice gets one key");
        assert_ne!(keys[0].secret, a.secret);
        let vault = {
            drop(vault);
            open(dir.path())
        };
        assert_eq!(
            vault.get("WMW21GD07P2S00002").expect("get"),
            Some(keys[0].clone()),
            "created durably"
        );
    }

    #[test]
    fn the_vault_file_holds_no_vin() {
        let dir = tempfile::tempdir().expect("tempdir");
        open(dir.path())
            .get_or_create("WMW11DJ04N2T00001")
            .expect("create");
        let bytes = std::fs::read(dir.path().join("vault.redb")).expect("read");
        assert!(!bytes.windows(17).any(|w| w == b"WMW11DJ04N2T00001"));
    }

    #[test]
    fn erasure_removes_keys_and_consent_of_that_vehicle_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = open(dir.path());
        vault.get_or_create("WMW11DJ04N2T00001").expect("a");
        let other = vault.get_or_create("WMW21GD07P2S00002").expect("b");
        let consent = Consent {
            smart_maintenance: true,
            ..Consent::default()
        };
        vault
            .set_consent("WMW11DJ04N2T00001", consent)
            .expect("consent");
        assert_eq!(vault.consent("WMW11DJ04N2T00001").expect("read"), consent);
        assert!(vault.erase("WMW11DJ04N2T00001").expect("erase"));
        assert_eq!(vault.get("WMW11DJ04N2T00001").expect("get"), None);
        assert_eq!(
            vault.consent("WMW11DJ04N2T00001").expect("read"),
            Consent::default()
        );
        assert_eq!(vault.get("WMW21GD07P2S00002").expect("get"), Some(other));
        assert!(!vault.erase("WMW11DJ04N2T00001").expect("erase twice"));
    }

    /// redb frees a removed entry's page without overwriting it: erasure
    /// must leave no byte of the secret in the file, and the file, which
    /// holds every data key, is owner-only.
    #[test]
    fn an_erased_secret_is_in_no_byte_of_the_vault_and_the_vault_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vault.redb");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        let vault = open(dir.path());
        assert_eq!(mode(&path), 0o600, "created owner-only");
        let a = vault.get_or_create("WMW11DJ04N2T00001").expect("a");
        let b = vault.get_or_create("WMW21GD07P2S00002").expect("b");
        let consent = Consent {
            smart_maintenance: true,
            ..Consent::default()
        };
        vault
            .set_consent("WMW11DJ04N2T00001", consent)
            .expect("consent");
        vault
            .set_consent("WMW21GD07P2S00002", consent)
            .expect("consent");
        assert!(vault.erase("WMW11DJ04N2T00001").expect("erase"));
        let bytes = std::fs::read(&path).expect("read");
        for secret in [&a.secret.0, &a.data_key.0] {
            assert!(
                !bytes.windows(KEY_BYTES).any(|w| w == secret.as_slice()),
                "an erased key is still in the vault file"
            );
        }
        assert_eq!(mode(&path), 0o600, "rewritten owner-only");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n != "vault.redb" && n != "root.key")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // The same handle keeps working, for reads and writes.
        assert_eq!(
            vault.get("WMW21GD07P2S00002").expect("get"),
            Some(b.clone())
        );
        assert_eq!(vault.consent("WMW21GD07P2S00002").expect("read"), consent);
        let c = vault.get_or_create("WMW11DJ04N2T00001").expect("a anew");
        assert_ne!(c.secret, a.secret);
        drop(vault);
        let vault = open(dir.path());
        assert_eq!(vault.get("WMW21GD07P2S00002").expect("get"), Some(b));
        assert_eq!(vault.get("WMW11DJ04N2T00001").expect("get"), Some(c));
        assert_eq!(
            vault.consent("WMW11DJ04N2T00001").expect("read"),
            Consent::default()
        );
    }

    #[test]
    fn an_existing_world_readable_vault_is_narrowed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vault.redb");
        drop(open(dir.path()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        drop(open(dir.path()));
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_secret_carries_when_it_was_created_and_a_new_one_is_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = open(dir.path());
        let before = crate::core::clock::now_ms();
        let first = vault.get_or_create("WMW11DJ04N2T00001").expect("create");
        let after = crate::core::clock::now_ms();
        assert!((before..=after).contains(&first.created_ms), "{first:?}");
        assert!(vault.erase("WMW11DJ04N2T00001").expect("erase"));
        let second = vault.get_or_create("WMW11DJ04N2T00001").expect("again");
        assert!(second.created_ms >= after, "a fresh secret is newer");
        assert_ne!(second.secret, first.secret);
    }

    #[test]
    fn consent_flags_round_trip() {
        for flags in 0..8u8 {
            assert_eq!(Consent::from_flags(flags).to_flags(), flags);
        }
    }
}
