//! The vault: each vehicle's random secret and data key, and its consent
//! state, in an embedded redb database next to the root key (outside the
//! data directory).
//!
//! Format (redb 4, one file, `storage.vault_file`):
//! - table `vehicles`: key = HMAC(vault index key, VIN) (32 bytes; the vault
//!   holds no VIN), value = vehicle secret (32 bytes) ‖ data key (32 bytes) ‖
//!   created at (i64 ms, little-endian);
//! - table `consent`: same key, value = one byte of flags (see [`Consent`]).
//!
//! Every write commits with redb's default durability (fsync) before it
//! returns, so a secret is on disk before any row that uses it. Erasing a
//! vehicle deletes both entries: its pseudonyms can no longer be computed
//! and its encrypted fields no longer decrypted, by anyone (crypto-shredding).

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::core::consent::Consent;
use crate::privacy::pseudo::{KEY_BYTES, KeyRing, Secret};

const VEHICLES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("vehicles");
const CONSENT: TableDefinition<&[u8], u8> = TableDefinition::new("consent");
const VEHICLE_VALUE_BYTES: usize = 2 * KEY_BYTES + 8;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("vault {path}: {source}")]
    Db {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    #[error("vault {path}: an entry of {len} bytes is malformed")]
    Malformed { path: PathBuf, len: usize },
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
}

/// The open vault. One process at a time: redb locks the file.
pub struct Vault {
    db: Database,
    path: PathBuf,
    index_key: Secret,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Opens the vault at `path`, creating it if absent.
    pub fn open(path: &Path, keys: &KeyRing) -> Result<Self> {
        let err = |e: redb::Error| VaultError::Db {
            path: path.to_owned(),
            source: Box::new(e),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(redb::StorageError::Io(e).into()))?;
        }
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let vault = Self {
            db,
            path: path.to_owned(),
            index_key: keys.vault_index_key(),
        };
        // Create both tables, so that readers never meet a missing one.
        vault.write(|txn| {
            txn.open_table(VEHICLES)?;
            txn.open_table(CONSENT)?;
            Ok(())
        })?;
        Ok(vault)
    }

    fn index(&self, vin: &str) -> [u8; 32] {
        self.index_key.mac(&[vin.as_bytes()])
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> VaultError {
        VaultError::Db {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let out = f(&txn).map_err(|e| self.db_err(e))?;
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(out)
    }

    /// The vehicle's keys, if it has any.
    pub fn get(&self, vin: &str) -> Result<Option<VehicleKeys>> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(VEHICLES).map_err(|e| self.db_err(e))?;
        let value = table
            .get(self.index(vin).as_slice())
            .map_err(|e| self.db_err(e))?;
        value.map(|v| self.decode(v.value())).transpose()
    }

    /// Every vehicle's keys: for a service purpose that reads the encrypted
    /// fields of rows that name their vehicle only by pseudonym.
    pub fn all_keys(&self) -> Result<Vec<VehicleKeys>> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(VEHICLES).map_err(|e| self.db_err(e))?;
        let mut keys = Vec::new();
        for entry in table.iter().map_err(|e| self.db_err(e))? {
            let (_, value) = entry.map_err(|e| self.db_err(e))?;
            keys.push(self.decode(value.value())?);
        }
        Ok(keys)
    }

    /// The vehicle's keys, created (and durably committed) on first use.
    pub fn get_or_create(&self, vin: &str) -> Result<VehicleKeys> {
        if let Some(keys) = self.get(vin)? {
            return Ok(keys);
        }
        let fresh = VehicleKeys {
            secret: Secret::random()?,
            data_key: Secret::random()?,
        };
        let index = self.index(vin);
        let stored = self.write(|txn| {
            let mut table = txn.open_table(VEHICLES)?;
            // Checked again inside the write transaction: never replace a key.
            if let Some(existing) = table.get(index.as_slice())? {
                return Ok(existing.value().to_vec());
            }
            let mut value = Vec::with_capacity(VEHICLE_VALUE_BYTES);
            value.extend_from_slice(&fresh.secret.0);
            value.extend_from_slice(&fresh.data_key.0);
            value.extend_from_slice(&crate::core::clock::now_ms().to_le_bytes());
            table.insert(index.as_slice(), value.as_slice())?;
            Ok(value)
        })?;
        self.decode(&stored)
    }

    /// Erases the vehicle's keys and consent state; true if it had keys.
    pub fn erase(&self, vin: &str) -> Result<bool> {
        let index = self.index(vin);
        self.write(|txn| {
            txn.open_table(CONSENT)?.remove(index.as_slice())?;
            let removed = txn
                .open_table(VEHICLES)?
                .remove(index.as_slice())?
                .is_some();
            Ok(removed)
        })
    }

    pub fn consent(&self, vin: &str) -> Result<Consent> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(CONSENT).map_err(|e| self.db_err(e))?;
        let flags = table
            .get(self.index(vin).as_slice())
            .map_err(|e| self.db_err(e))?;
        Ok(flags.map_or_else(Consent::default, |f| Consent::from_flags(f.value())))
    }

    pub fn set_consent(&self, vin: &str, consent: Consent) -> Result<()> {
        let index = self.index(vin);
        self.write(|txn| {
            txn.open_table(CONSENT)?
                .insert(index.as_slice(), consent.to_flags())?;
            Ok(())
        })
    }

    fn decode(&self, value: &[u8]) -> Result<VehicleKeys> {
        let malformed = || VaultError::Malformed {
            path: self.path.clone(),
            len: value.len(),
        };
        if value.len() != VEHICLE_VALUE_BYTES {
            return Err(malformed());
        }
        let key = |range: std::ops::Range<usize>| -> Result<Secret> {
            Ok(Secret(value[range].try_into().map_err(|_| malformed())?))
        };
        Ok(VehicleKeys {
            secret: key(0..KEY_BYTES)?,
            data_key: key(KEY_BYTES..2 * KEY_BYTES)?,
        })
    }
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

    #[test]
    fn consent_flags_round_trip() {
        for flags in 0..8u8 {
            assert_eq!(Consent::from_flags(flags).to_flags(), flags);
        }
    }
}
