//! The privacy stage of each worker: turns identifying values into what the
//! schema's policies allow to be stored, and gates records on consent.
//!
//! - **Pseudonyms** are HMAC(domain key of the record's key epoch, the
//!   vehicle's vault secret): domains cannot be joined, epochs rotate every
//!   `privacy.key_epoch_days` by the record's own timestamp, and erasing the
//!   vault secret unlinks the vehicle for good.
//! - **Encryption** uses the vehicle's data key (ChaCha20-Poly1305, a random
//!   nonce per value, the field name as associated data).
//! - **Trip ids** start with every ignition cycle, after
//!   `privacy.max_trip_minutes` and at every UTC hour. Each is the key
//!   generation of its hour, the vehicle's 16-bit bucket under that hour's
//!   key, then random bytes: the bucket lets a licensee's k count vehicles,
//!   not trips. The hour's key is random, held in memory only and forgotten
//!   [`TRIP_KEY_IDLE_MS`] after its last use, so no one can ever tell which
//!   vehicle a bucket stands for, and buckets of different hours are
//!   unrelated. Trips of one vehicle in one hour share their bucket.
//! - **Consent** comes from the vault and decides whether gated records and,
//!   after SIM deactivation, any records are stored.
//!
//! Each worker caches keys and consent for its own vehicles, so no lock is
//! taken per record; an admin change bumps a generation counter that makes
//! every worker drop its caches before its next round.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

use crate::control::ControlPlane;
use crate::core::consent::Consent;
use crate::privacy::pseudo::{self, KeyRing, Secret};
use crate::privacy::vault::{Vault, VaultError, VehicleKeys};
use crate::schema::INTERNAL_DOMAIN;

/// Bytes of a ChaCha20-Poly1305 nonce, stored in front of each ciphertext.
const NONCE_BYTES: usize = 12;
/// Most vehicles a worker caches before it starts afresh.
const CACHE_LIMIT: usize = 100_000;
const MAX_VAULT_RETRY_DELAY: Duration = Duration::from_secs(5);
const DAY_MS: i64 = 86_400_000;
/// What a dead-letter copy holds in place of a VIN other than its topic's.
pub const OTHER_VEHICLE: &str = "<other-vehicle>";
const HOUR_MS: i64 = 3_600_000;
/// An hour's trip key is forgotten this long after its last use (wall clock).
pub const TRIP_KEY_IDLE_MS: i64 = 2 * HOUR_MS;
/// Most hours' trip keys held at once; past it they are all forgotten, and
/// new ones (new generations) made as needed.
const MAX_TRIP_KEYS: usize = 1_024;
/// Bytes of a trip id: the key generation, the vehicle bucket, random.
const TRIP_GENERATION_BYTES: usize = 6;
const TRIP_BUCKET_BYTES: usize = 2;
const TRIP_RANDOM_BYTES: usize = 8;
/// Leading hex digits of a trip id that name the key generation of its hour.
pub const TRIP_GENERATION_HEX: usize = 2 * TRIP_GENERATION_BYTES;
/// Leading hex digits of a trip id that name its vehicle within its key
/// generation (generation and bucket): distinct values among trips of one
/// generation are at most the number of vehicles.
pub const TRIP_VEHICLE_HEX: usize = 2 * (TRIP_GENERATION_BYTES + TRIP_BUCKET_BYTES);

/// Settings from `[privacy]`.
#[derive(Debug, Clone, Copy)]
pub struct PrivacySettings {
    /// Length of a key epoch in days; 0 never rotates.
    pub key_epoch_days: u32,
    pub max_trip: Duration,
}

/// What workers share with each other and with the admin API.
pub struct PrivacyShared {
    pub keys: KeyRing,
    pub vault: Vault,
    settings: PrivacySettings,
    generation: AtomicU64,
    /// The trip keys of the hours (of record time) seen lately.
    trip_keys: Mutex<HashMap<i64, TripKey>>,
}

/// The random key of one hour's vehicle buckets, and its generation: a
/// random name, so that buckets of two keys of one hour (after a restart, or
/// once the key was forgotten) are never counted as one.
struct TripKey {
    generation: [u8; TRIP_GENERATION_BYTES],
    key: Secret,
    last_used_ms: i64,
}

impl std::fmt::Debug for PrivacyShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivacyShared")
            .field("vault", &self.vault)
            .finish_non_exhaustive()
    }
}

impl PrivacyShared {
    pub fn new(keys: KeyRing, vault: Vault, settings: PrivacySettings) -> Arc<Self> {
        Arc::new(Self {
            keys,
            vault,
            settings,
            generation: AtomicU64::new(0),
            trip_keys: Mutex::new(HashMap::new()),
        })
    }

    /// A new trip id of `vin` for a trip starting at `ts_ms`: the key
    /// generation of that UTC hour, the vehicle's bucket under the hour's
    /// key, random bytes. None without a random source.
    fn new_trip_id(&self, vin: &str, ts_ms: i64, now_ms: i64) -> Option<String> {
        let hour = ts_ms.div_euclid(HOUR_MS);
        let mut keys = self.trip_keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.retain(|_, k| now_ms - k.last_used_ms < TRIP_KEY_IDLE_MS);
        if keys.len() >= MAX_TRIP_KEYS && !keys.contains_key(&hour) {
            keys.clear();
        }
        let key = match keys.entry(hour) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let mut generation = [0u8; TRIP_GENERATION_BYTES];
                getrandom::fill(&mut generation).ok()?;
                entry.insert(TripKey {
                    generation,
                    key: Secret::random().ok()?,
                    last_used_ms: now_ms,
                })
            }
        };
        key.last_used_ms = now_ms;
        let bucket = key.key.mac(&[vin.as_bytes()]);
        let mut random = [0u8; TRIP_RANDOM_BYTES];
        getrandom::fill(&mut random).ok()?;
        Some(hex::encode(
            [
                &key.generation[..],
                &bucket[..TRIP_BUCKET_BYTES],
                &random[..],
            ]
            .concat(),
        ))
    }

    /// Opens the key ring and the vault the configuration names (creating
    /// them on first use). Only one process at a time can hold an embedded
    /// vault; a shared one, every node of the cluster.
    pub fn open(config: &crate::config::Config) -> Result<Arc<Self>, VaultError> {
        let keys = KeyRing::load_or_create(&config.storage.key_file)?;
        let vault = match ControlPlane::from_config(config)? {
            None => Vault::open(&config.storage.vault_file, &keys)?,
            Some(plane) => Vault::shared(plane, &keys)?,
        };
        let shared = Self::new(
            keys,
            vault,
            PrivacySettings {
                key_epoch_days: config.privacy.key_epoch_days,
                max_trip: Duration::from_secs(u64::from(config.privacy.max_trip_minutes) * 60),
            },
        );
        if shared.vault.shared_changes().is_some() {
            watch_shared_changes(&shared).map_err(VaultError::Thread)?;
        }
        Ok(shared)
    }

    /// Erases a vehicle's secrets (crypto-shredding); true if it had any.
    pub fn erase(&self, vin: &str) -> Result<bool, VaultError> {
        let erased = self.vault.erase(vin)?;
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(erased)
    }

    pub fn set_consent(&self, vin: &str, consent: Consent) -> Result<(), VaultError> {
        self.vault.set_consent(vin, consent)?;
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// The key epoch of a timestamp.
    pub fn epoch(&self, ts_ms: i64) -> i32 {
        match self.settings.key_epoch_days {
            0 => 0,
            days => ts_ms.div_euclid(i64::from(days) * DAY_MS) as i32,
        }
    }

    /// The pseudonym of a vehicle in a domain and epoch, if it has a secret.
    pub fn lookup_vehicle_id(
        &self,
        domain: &str,
        vin: &str,
        epoch: i32,
    ) -> Result<Option<String>, VaultError> {
        Ok(self
            .vault
            .get(vin)?
            .map(|k| pseudo::vehicle_pseudonym(&self.keys.domain_key(domain, epoch), &k.secret)))
    }
}

struct Trip {
    id: String,
    cycle: Option<i64>,
    started_ms: i64,
    last_ms: i64,
}

/// One worker's privacy state.
pub struct Privacy {
    shared: Arc<PrivacyShared>,
    seen_generation: u64,
    vehicles: HashMap<String, VehicleKeys>,
    consents: HashMap<String, Consent>,
    domain_keys: HashMap<(String, i32), Secret>,
    vehicle_ids: HashMap<(String, i32), String>,
    trips: HashMap<String, Trip>,
}

/// What `read` returns once it succeeds: retried with a growing delay
/// (at most [`MAX_VAULT_RETRY_DELAY`]) while the vault cannot be reached,
/// which holds the worker's batch and, through the queues, ingest.
fn until_readable<T>(mut read: impl FnMut() -> Result<T, VaultError>) -> T {
    let mut delay = Duration::from_millis(50);
    loop {
        match read() {
            Ok(value) => return value,
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?delay, "vault unavailable; holding the batch");
                std::thread::sleep(delay);
                delay = (delay * 2).min(MAX_VAULT_RETRY_DELAY);
            }
        }
    }
}

/// How often a node asks the shared vault whether another node changed it.
const SHARED_CHANGES_POLL: Duration = Duration::from_millis(200);

/// Follows the shared vault's change count: when another node erased a
/// vehicle or changed its consent, every worker here drops its caches at
/// its next round, as after a change made here. The thread ends with the
/// last user of `shared`.
fn watch_shared_changes(shared: &Arc<PrivacyShared>) -> std::io::Result<()> {
    let shared = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name("vault-changes".into())
        .spawn(move || {
            let mut seen = None;
            while let Some(shared) = shared.upgrade() {
                match shared.vault.shared_changes() {
                    Some(Ok(changes)) => {
                        if seen.is_some_and(|seen| seen != changes) {
                            shared.generation.fetch_add(1, Ordering::SeqCst);
                        }
                        seen = Some(changes);
                    }
                    Some(Err(error)) => {
                        // Nothing can change the vault while it cannot be
                        // reached; the next poll that reaches it compares
                        // with the count last seen. Caches stay.
                        tracing::warn!(%error, "cannot read the shared vault's changes");
                    }
                    None => return,
                }
                drop(shared);
                std::thread::sleep(SHARED_CHANGES_POLL);
            }
        })
        .map(drop)
}

impl Privacy {
    pub fn new(shared: Arc<PrivacyShared>) -> Self {
        Self {
            seen_generation: shared.generation.load(Ordering::SeqCst),
            shared,
            vehicles: HashMap::new(),
            consents: HashMap::new(),
            domain_keys: HashMap::new(),
            vehicle_ids: HashMap::new(),
            trips: HashMap::new(),
        }
    }

    /// Drops the caches when an admin changed the vault; call once per round.
    pub fn refresh(&mut self) {
        let current = self.shared.generation.load(Ordering::SeqCst);
        if current != self.seen_generation || self.vehicles.len() > CACHE_LIMIT {
            self.seen_generation = current;
            self.vehicles.clear();
            self.consents.clear();
            self.vehicle_ids.clear();
            self.trips.clear();
        }
    }

    pub fn epoch(&self, ts_ms: i64) -> i32 {
        self.shared.epoch(ts_ms)
    }

    /// The vehicle's keys, created in the vault on first use. Retries while
    /// the vault cannot be written: no row may use a key that is not durable.
    fn vehicle(&mut self, vin: &str) -> &VehicleKeys {
        if !self.vehicles.contains_key(vin) {
            let keys = until_readable(|| self.shared.vault.get_or_create(vin));
            self.vehicles.insert(vin.to_owned(), keys);
        }
        &self.vehicles[vin]
    }

    /// Loads the keys of every vehicle of `vins` not cached yet, creating
    /// the missing ones in one vault transaction (one fsync for a round of
    /// new vehicles, not one each). Skips vehicles whose SIM is deactivated,
    /// whose records are not collected. On a vault error, each vehicle's
    /// keys are fetched when first needed, with retries.
    pub fn load_keys<'a>(&mut self, vins: impl IntoIterator<Item = &'a str>) {
        let mut unknown: Vec<&str> = vins
            .into_iter()
            .filter(|vin| !self.vehicles.contains_key(*vin))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        self.load_consents(&unknown);
        let mut missing: Vec<&str> = Vec::new();
        for vin in unknown {
            if self.consent(vin).sim_active {
                missing.push(vin);
            }
        }
        if missing.is_empty() {
            return;
        }
        match self.shared.vault.get_or_create_all(&missing) {
            Ok(keys) => {
                for (vin, keys) in missing.into_iter().zip(keys) {
                    self.vehicles.insert(vin.to_owned(), keys);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot load a round's vehicle keys at once"),
        }
    }

    fn domain_key(&mut self, domain: &str, epoch: i32) -> Secret {
        let keys = &self.shared.keys;
        self.domain_keys
            .entry((domain.to_owned(), epoch))
            .or_insert_with(|| keys.domain_key(domain, epoch))
            .clone()
    }

    /// The vehicle's pseudonym in a domain and epoch.
    pub fn vehicle_id(&mut self, domain: &str, vin: &str, epoch: i32) -> String {
        let cached = (domain == INTERNAL_DOMAIN)
            .then(|| self.vehicle_ids.get(&(vin.to_owned(), epoch)))
            .flatten();
        if let Some(id) = cached {
            return id.clone();
        }
        let key = self.domain_key(domain, epoch);
        let id = pseudo::vehicle_pseudonym(&key, &self.vehicle(vin).secret);
        if domain == INTERNAL_DOMAIN {
            self.vehicle_ids.insert((vin.to_owned(), epoch), id.clone());
        }
        id
    }

    /// The pseudonym of another field's value, bound to the vehicle's secret.
    pub fn field_pseudonym(
        &mut self,
        domain: &str,
        field: &str,
        vin: &str,
        value: &str,
        epoch: i32,
    ) -> String {
        let key = self.domain_key(domain, epoch);
        pseudo::field_pseudonym(&key, &self.vehicle(vin).secret, field, value)
    }

    /// nonce ‖ ciphertext of `plaintext` under the vehicle's data key.
    pub fn encrypt(&mut self, vin: &str, field: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        if getrandom::fill(&mut nonce).is_err() {
            // Never encrypt twice under one nonce: without randomness, store nothing.
            tracing::error!(
                field,
                "no random source for a nonce; the value is not stored"
            );
            return Vec::new();
        }
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.vehicle(vin).data_key.0));
        let sealed = cipher.encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: field.as_bytes(),
            },
        );
        match sealed {
            Ok(ciphertext) => [nonce.as_slice(), &ciphertext].concat(),
            Err(_) => Vec::new(),
        }
    }

    /// The trip id of a probe: the current one, or a new one when the
    /// ignition cycle changed, the trip is too long, a new UTC hour began, or
    /// time went back.
    pub fn trip_id(&mut self, vin: &str, cycle: Option<i64>, ts_ms: i64) -> String {
        let max_ms = self.shared.settings.max_trip.as_millis() as i64;
        let continues = |t: &Trip| {
            t.cycle == cycle
                && ts_ms >= t.last_ms
                && ts_ms - t.started_ms < max_ms
                && ts_ms.div_euclid(HOUR_MS) == t.started_ms.div_euclid(HOUR_MS)
        };
        if let Some(trip) = self.trips.get_mut(vin).filter(|t| continues(t)) {
            trip.last_ms = ts_ms;
            return trip.id.clone();
        }
        // Without a random source the id is empty: a licensee's group holding
        // it has two generations and is left out.
        let id = self
            .shared
            .new_trip_id(vin, ts_ms, crate::core::clock::now_ms())
            .unwrap_or_default();
        self.trips.insert(
            vin.to_owned(),
            Trip {
                id: id.clone(),
                cycle,
                started_ms: ts_ms,
                last_ms: ts_ms,
            },
        );
        id
    }

    /// Reads the consent state of every vehicle of `vins` not cached yet,
    /// in one vault read (one round trip to a shared vault); on an error,
    /// each is read when first needed.
    pub fn load_consents(&mut self, vins: &[&str]) {
        let unread: Vec<&str> = vins
            .iter()
            .copied()
            .filter(|vin| !self.consents.contains_key(*vin))
            .collect();
        if unread.is_empty() {
            return;
        }
        match self.shared.vault.consents(&unread) {
            Ok(consents) => {
                for (vin, consent) in unread.into_iter().zip(consents) {
                    self.consents.insert(vin.to_owned(), consent);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read a round's consent at once"),
        }
    }

    /// The vehicle's consent state, from the vault. Retries while the vault
    /// cannot be read, holding the batch: a guess would be wrong either way
    /// (the defaults collect from a vehicle whose SIM was switched off;
    /// refusing drops records already acknowledged).
    pub fn consent(&mut self, vin: &str) -> Consent {
        if let Some(c) = self.consents.get(vin) {
            return *c;
        }
        let consent = until_readable(|| self.shared.vault.consent(vin));
        self.consents.insert(vin.to_owned(), consent);
        consent
    }

    /// A dead-letter copy with VIN-shaped tokens replaced: the topic's VIN by
    /// the vehicle's pseudonym, any other by [`OTHER_VEHICLE`] (a tag would
    /// be a stable identifier of a vehicle that erasure does not break).
    pub fn redact(&mut self, bytes: &[u8], topic_vin: Option<(&str, i32)>) -> Vec<u8> {
        let known = topic_vin
            .map(|(vin, epoch)| (vin.to_owned(), self.vehicle_id(INTERNAL_DOMAIN, vin, epoch)));
        pseudo::redact_vins(bytes, &mut |vin| match &known {
            Some((known_vin, id)) if known_vin == vin => id.clone(),
            _ => OTHER_VEHICLE.to_owned(),
        })
    }
}

/// Decrypts a value written by [`Privacy::encrypt`], for a service with a purpose.
pub fn decrypt(data_key: &Secret, field: &str, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_BYTES {
        return None;
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
    ChaCha20Poly1305::new(Key::from_slice(&data_key.0))
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: field.as_bytes(),
            },
        )
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn privacy(dir: &std::path::Path, epoch_days: u32) -> Privacy {
        let keys = KeyRing::load_or_create(&dir.join("root.key")).expect("keys");
        let vault = Vault::open(&dir.join("vault.redb"), &keys).expect("vault");
        let settings = PrivacySettings {
            key_epoch_days: epoch_days,
            max_trip: Duration::from_secs(1800),
        };
        Privacy::new(PrivacyShared::new(keys, vault, settings))
    }

    const VIN: &str = "WMW11DJ04N2T00001";
    const T0: i64 = 1_795_500_000_000;

    #[test]
    fn epochs_rotate_pseudonyms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = privacy(dir.path(), 30);
        let (e1, e2) = (p.epoch(T0), p.epoch(T0 + 30 * DAY_MS));
        assert_eq!(e2, e1 + 1);
        assert_ne!(
            p.vehicle_id(INTERNAL_DOMAIN, VIN, e1),
            p.vehicle_id(INTERNAL_DOMAIN, VIN, e2)
        );
        assert_eq!(
            privacy(tempfile::tempdir().expect("t").path(), 0).epoch(T0),
            0
        );
    }

    #[test]
    fn a_rounds_new_vehicles_get_keys_at_once_but_not_one_whose_sim_is_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = privacy(dir.path(), 30);
        let (other, silent) = ("WMW21GD07P2S00002", "WMW31GD07P2S00003");
        let off = Consent {
            sim_active: false,
            ..Consent::default()
        };
        p.shared.vault.set_consent(silent, off).expect("consent");
        p.load_keys([VIN, other, VIN, silent]);
        let vault = &p.shared.vault;
        assert!(vault.get(VIN).expect("get").is_some());
        assert!(vault.get(other).expect("get").is_some());
        assert_eq!(
            vault.get(silent).expect("get"),
            None,
            "not collected: no key"
        );
        let created = vault.get(VIN).expect("get");
        assert_eq!(created.as_ref(), Some(p.vehicle(VIN)), "cached as stored");
    }

    #[test]
    fn encryption_round_trips_and_binds_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = privacy(dir.path(), 30);
        let sealed = p.encrypt(VIN, "contact_phone", b"+46701234567");
        let again = p.encrypt(VIN, "contact_phone", b"+46701234567");
        assert_ne!(sealed, again, "a fresh nonce every time");
        let key = p.vehicle(VIN).data_key.clone();
        assert_eq!(
            decrypt(&key, "contact_phone", &sealed).as_deref(),
            Some(&b"+46701234567"[..])
        );
        assert_eq!(decrypt(&key, "contract_number", &sealed), None);
    }

    #[test]
    fn trips_change_with_the_ignition_cycle_and_the_maximum_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = privacy(dir.path(), 30);
        let a = p.trip_id(VIN, Some(1), T0);
        assert_eq!(p.trip_id(VIN, Some(1), T0 + 5_000), a);
        let b = p.trip_id(VIN, Some(2), T0 + 10_000);
        assert_ne!(a, b);
        assert_ne!(p.trip_id(VIN, Some(2), T0 + 10_000 + 1_800_000), b);
        assert_ne!(p.trip_id("WMW21GD07P2S00002", Some(2), T0 + 10_000), b);
    }

    #[test]
    fn trips_of_one_vehicle_in_one_hour_share_its_bucket_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = privacy(dir.path(), 30);
        let vehicle = |id: &str| id[..TRIP_VEHICLE_HEX].to_owned();
        let generation = |id: &str| id[..TRIP_GENERATION_HEX].to_owned();
        let first = p.trip_id(VIN, Some(1), T0);
        assert_eq!(first.len(), 32);
        // A new ignition cycle, and a new trip after an admin event: new ids,
        // the same vehicle bucket.
        let second = p.trip_id(VIN, Some(2), T0 + 60_000);
        p.shared
            .set_consent(VIN, Consent::default())
            .expect("consent");
        p.refresh();
        let third = p.trip_id(VIN, Some(2), T0 + 120_000);
        assert!(first != second && second != third && first != third);
        assert_eq!(vehicle(&first), vehicle(&second));
        assert_eq!(vehicle(&first), vehicle(&third));
        // Another vehicle in that hour: the same generation, its own bucket
        // (these two differ under every key with probability 1 - 2^-16).
        let other = p.trip_id("WMW21GD07P2S00002", Some(1), T0 + 1_000);
        assert_eq!(generation(&other), generation(&first));
        // A trip reaching into the next hour ends there; the next hour has
        // its own key.
        let next_hour = p.trip_id(VIN, Some(2), T0 + HOUR_MS);
        assert_ne!(next_hour, third);
        assert_ne!(generation(&next_hour), generation(&third));
        // A key unused for TRIP_KEY_IDLE_MS is forgotten: the hour gets a new generation.
        let now = crate::core::clock::now_ms();
        let later = p
            .shared
            .new_trip_id(VIN, T0, now + TRIP_KEY_IDLE_MS)
            .expect("id");
        assert_ne!(generation(&later), generation(&first));
    }

    #[test]
    fn erasure_makes_workers_forget_and_unlinks_new_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = privacy(dir.path(), 30);
        let before = p.vehicle_id(INTERNAL_DOMAIN, VIN, 0);
        assert!(p.shared.erase(VIN).expect("erase"));
        p.refresh();
        assert_eq!(
            p.shared
                .lookup_vehicle_id(INTERNAL_DOMAIN, VIN, 0)
                .expect("lookup"),
            None
        );
        assert_ne!(p.vehicle_id(INTERNAL_DOMAIN, VIN, 0), before);
    }
}
