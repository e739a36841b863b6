//! The vault's two tables in PostgreSQL, as opaque bytes: a vehicle's index
//! (a keyed hash of its VIN, never the VIN) and the encoded keys or consent
//! flags of `privacy::vault`, which alone knows their layout.
//!
//! A vehicle's keys are written once: [`ControlPlane::keys_or_insert`]
//! inserts with `ON CONFLICT DO NOTHING` and then reads what is stored, so
//! two nodes creating the same vehicle's keys at once both get the winner's.
//! Every erasure and consent change increments one counter in the same
//! transaction ([`ControlPlane::vault_changes`]), by which every node learns
//! that the entries it has cached may be stale (new keys need no count:
//! they replace nothing a node could hold).

use super::{ControlPlane, Result};

impl ControlPlane {
    /// Records `fingerprint` (of the root key) as the vault's if it has
    /// none, and refuses a different one: a node with another root key
    /// would index every vehicle anew, giving it a second secret, and an
    /// erasure through it would miss the first.
    pub fn claim_root_key(&self, fingerprint: &[u8; 32]) -> Result<()> {
        let fingerprint = fingerprint.as_slice();
        let stored: Vec<u8> = self.run(|client| {
            client.execute(
                "INSERT INTO fleetgate_cluster (name, value) VALUES ('root-key', $1)
                 ON CONFLICT (name) DO NOTHING",
                &[&fingerprint],
            )?;
            let row = client.query_one(
                "SELECT value FROM fleetgate_cluster WHERE name = 'root-key'",
                &[],
            )?;
            Ok(row.try_get(0)?)
        })?;
        if stored != fingerprint {
            return Err(super::ControlError::OtherRootKey);
        }
        Ok(())
    }

    /// The stored keys of each of `vehicles`, in order.
    pub fn keys(&self, vehicles: &[[u8; 32]]) -> Result<Vec<Option<Vec<u8>>>> {
        let indexes: Vec<&[u8]> = vehicles.iter().map(|v| v.as_slice()).collect();
        self.run(|client| {
            let rows = client.query(
                "SELECT vehicle, keys FROM fleetgate_vehicles WHERE vehicle = ANY($1)",
                &[&indexes],
            )?;
            let mut found = std::collections::HashMap::with_capacity(rows.len());
            for row in rows {
                found.insert(row.try_get::<_, Vec<u8>>(0)?, row.try_get::<_, Vec<u8>>(1)?);
            }
            Ok(indexes.iter().map(|v| found.remove(*v)).collect())
        })
    }

    /// Stores `fresh[i]` for each vehicle that has no keys yet (committed
    /// before it returns) and returns what each vehicle has now: its old
    /// keys where it had some, never replaced.
    pub fn keys_or_insert(
        &self,
        vehicles: &[[u8; 32]],
        fresh: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let indexes: Vec<&[u8]> = vehicles.iter().map(|v| v.as_slice()).collect();
        let values: Vec<&[u8]> = fresh.iter().map(Vec::as_slice).collect();
        // One statement, committed on its own. No change is counted: keys
        // are written once, so no node holds a stale copy of new ones. Rows
        // go in in index order: two nodes inserting the same new vehicles
        // each wait for the other's uncommitted row, and in different
        // orders they would wait for each other (a deadlock PostgreSQL
        // breaks by failing one of them).
        self.run(|client| {
            client.execute(
                "INSERT INTO fleetgate_vehicles (vehicle, keys)
                 SELECT * FROM unnest($1::bytea[], $2::bytea[]) AS fresh (vehicle, keys)
                 ORDER BY vehicle
                 ON CONFLICT (vehicle) DO NOTHING",
                &[&indexes, &values],
            )?;
            Ok(())
        })?;
        self.keys(vehicles)
    }

    /// Every vehicle's stored keys.
    pub fn all_keys(&self) -> Result<Vec<Vec<u8>>> {
        self.run(|client| {
            let rows = client.query("SELECT keys FROM fleetgate_vehicles", &[])?;
            rows.iter()
                .map(|row| Ok(row.try_get::<_, Vec<u8>>(0)?))
                .collect()
        })
    }

    /// Deletes a vehicle's keys and consent; true if it had keys. Then
    /// rewrites both tables (`VACUUM FULL`), so that no page of their files
    /// still holds the deleted bytes (README, "Cluster" says what remains in
    /// PostgreSQL's WAL and for how long).
    pub fn erase(&self, vehicle: &[u8; 32]) -> Result<bool> {
        let index = vehicle.as_slice();
        let had_keys = self.run(|client| {
            let mut txn = client.transaction()?;
            let keys = txn.execute(
                "DELETE FROM fleetgate_vehicles WHERE vehicle = $1",
                &[&index],
            )?;
            let consent = txn.execute(
                "DELETE FROM fleetgate_consent WHERE vehicle = $1",
                &[&index],
            )?;
            if keys + consent > 0 {
                count_change(&mut txn)?;
            }
            txn.commit()?;
            Ok(keys > 0)
        })?;
        self.run(|client| {
            client.batch_execute("VACUUM (FULL) fleetgate_vehicles, fleetgate_consent")?;
            Ok(())
        })?;
        Ok(had_keys)
    }

    /// Each of `vehicles`' consent flags, in order, if any were set.
    pub fn consents(&self, vehicles: &[[u8; 32]]) -> Result<Vec<Option<u8>>> {
        let indexes: Vec<&[u8]> = vehicles.iter().map(|v| v.as_slice()).collect();
        self.run(|client| {
            let rows = client.query(
                "SELECT vehicle, flags FROM fleetgate_consent WHERE vehicle = ANY($1)",
                &[&indexes],
            )?;
            let mut found = std::collections::HashMap::with_capacity(rows.len());
            for row in rows {
                let flags: i16 = row.try_get(1)?;
                let flags = u8::try_from(flags).map_err(|_| {
                    super::ControlError::Malformed(format!("consent flags {flags} out of range"))
                })?;
                found.insert(row.try_get::<_, Vec<u8>>(0)?, flags);
            }
            Ok(indexes.iter().map(|v| found.remove(*v)).collect())
        })
    }

    pub fn set_consent(&self, vehicle: &[u8; 32], flags: u8) -> Result<()> {
        let index = vehicle.as_slice();
        let flags = i16::from(flags);
        self.run(|client| {
            let mut txn = client.transaction()?;
            txn.execute(
                "INSERT INTO fleetgate_consent (vehicle, flags) VALUES ($1, $2)
                 ON CONFLICT (vehicle) DO UPDATE SET flags = EXCLUDED.flags",
                &[&index, &flags],
            )?;
            count_change(&mut txn)?;
            txn.commit()?;
            Ok(())
        })
    }

    /// How many changes of keys or consent the vault has seen: a node whose
    /// caches were filled at a lower count must drop them.
    pub fn vault_changes(&self) -> Result<u64> {
        self.run(|client| {
            let row = client.query_one("SELECT changes FROM fleetgate_vault_changes", &[])?;
            let changes: i64 = row.try_get(0)?;
            Ok(changes.unsigned_abs())
        })
    }
}

fn count_change(txn: &mut postgres::Transaction<'_>) -> Result<()> {
    txn.execute(
        "UPDATE fleetgate_vault_changes SET changes = changes + 1",
        &[],
    )?;
    Ok(())
}
