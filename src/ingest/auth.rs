//! Vehicle passwords: the credential store and the check rumqttd runs on
//! every CONNECT of the plain listeners when `[broker] credentials_file`
//! is set.
//!
//! A vehicle logs in with its VIN as the username and the password
//! `fleetgate vehicle credential` issued it (32 random bytes, hex). The
//! store keeps, per vehicle, a random salt and SHA-256(salt ‖ password),
//! under the VIN's keyed tag: neither the password nor the VIN is stored.
//! A plain salted hash suffices because the passwords are random 256-bit
//! secrets, not chosen by people: there is nothing to guess.
//!
//! The client id must equal the username (the VIN): the patched broker
//! tells ingest each publish's client id, and ingest lets a logged-in
//! vehicle publish only to its own topic. rumqttd writes client ids into its
//! log spans; the process's log writer replaces every VIN-shaped token.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::control::documents::{Document, Stamp};
use crate::privacy::pseudo::{Secret, is_vin, vin_tag};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("not a VIN")]
    InvalidVin,
    #[error(transparent)]
    Store(#[from] crate::control::ControlError),
    #[error("cannot make a password: {0}")]
    Random(String),
}

/// One vehicle's credential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Credential {
    salt: String,
    sha256: String,
    issued_ms: i64,
}

/// The store file: credentials by the VIN's keyed tag.
type CredentialFile = BTreeMap<String, Credential>;

/// Why a CONNECT was refused, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The username is not a VIN.
    NotAVin,
    /// The client id differs from the username (the VIN).
    ClientIdNotUsername,
    /// No credential for this vehicle.
    UnknownVehicle,
    WrongPassword,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::NotAVin,
        Refusal::ClientIdNotUsername,
        Refusal::UnknownVehicle,
        Refusal::WrongPassword,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAVin => "username_not_a_vin",
            Refusal::ClientIdNotUsername => "client_id_not_username",
            Refusal::UnknownVehicle => "unknown_vehicle",
            Refusal::WrongPassword => "wrong_password",
        }
    }
}

/// Connects accepted and refused (by reason) on the authenticated listeners.
#[derive(Debug, Default)]
pub struct AuthCounters {
    pub accepted: AtomicU64,
    pub refused: [AtomicU64; Refusal::ALL.len()],
}

/// The name of the credential store in a cluster's control plane.
pub const CREDENTIALS: &str = "vehicle-credentials";

/// The store as the broker reads it: reloaded when it changes, so a
/// credential issued (or revoked) while the server runs works at the
/// vehicle's next CONNECT; in a cluster, at its first CONNECT from
/// [`SHARED_RECHECK`] after it was issued, on any node.
pub struct Credentials {
    store: Document,
    tag_key: Secret,
    cached: Mutex<Cached>,
    pub counters: AuthCounters,
}

/// The store as last read, its stamp, and when the stamp was last asked for.
#[derive(Default)]
struct Cached {
    stamp: Option<Stamp>,
    file: CredentialFile,
    asked: Option<Instant>,
}

/// How often a node asks the control plane whether the shared store
/// changed: not on every CONNECT, which would put one query per vehicle
/// connecting (19,000 at once after a restart) in series on PostgreSQL.
pub const SHARED_RECHECK: Duration = Duration::from_secs(1);

fn hash(salt: &str, password: &str) -> String {
    hex::encode(Sha256::digest(format!("{salt}{password}").as_bytes()))
}

impl Credentials {
    pub fn new(store: Document, tag_key: Secret) -> Self {
        Self {
            store,
            tag_key,
            cached: Mutex::new(Cached::default()),
            counters: AuthCounters::default(),
        }
    }

    /// The check for one CONNECT; counts and logs (with the vehicle's tag,
    /// never the VIN) a refusal.
    pub fn check(&self, client_id: &str, username: &str, password: &str) -> bool {
        let verdict = self.verdict(client_id, username, password);
        match verdict {
            Ok(()) => {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(refusal) => {
                self.counters.refused[refusal as usize].fetch_add(1, Ordering::Relaxed);
                let vehicle = is_vin(username).then(|| vin_tag(&self.tag_key, username));
                tracing::warn!(reason = refusal.as_str(), vehicle = ?vehicle, "MQTT CONNECT refused");
                false
            }
        }
    }

    fn verdict(&self, client_id: &str, username: &str, password: &str) -> Result<(), Refusal> {
        if !is_vin(username) {
            return Err(Refusal::NotAVin);
        }
        if client_id != username {
            return Err(Refusal::ClientIdNotUsername);
        }
        let tag = vin_tag(&self.tag_key, username);
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        let recent = matches!(self.store, Document::Shared { .. })
            && cached.asked.is_some_and(|t| t.elapsed() < SHARED_RECHECK);
        if !recent {
            cached.asked = Some(Instant::now());
            match self.store.stamp() {
                Ok(stamp) if Some(stamp) == cached.stamp => {}
                Ok(stamp) => match self.store.load::<CredentialFile>() {
                    Ok(file) => (cached.stamp, cached.file) = (Some(stamp), file),
                    Err(e) => tracing::error!(error = %e, "cannot read the credential store"),
                },
                Err(e) => tracing::error!(error = %e, "cannot read the credential store"),
            }
        }
        let credential = cached.file.get(&tag).ok_or(Refusal::UnknownVehicle)?;
        let presented = hash(&credential.salt, password);
        // Compare digests, so the time taken says nothing about the password.
        if presented.len() == credential.sha256.len()
            && presented
                .bytes()
                .zip(credential.sha256.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        {
            Ok(())
        } else {
            Err(Refusal::WrongPassword)
        }
    }
}

/// Issues `vin` a new password (replacing any previous one) and returns it.
pub fn issue(
    store: &Document,
    tag_key: &Secret,
    vin: &str,
    now_ms: i64,
) -> Result<String, AuthError> {
    if !is_vin(vin) {
        return Err(AuthError::InvalidVin);
    }
    let random = |n: usize| -> Result<String, AuthError> {
        let mut bytes = vec![0u8; n];
        getrandom::fill(&mut bytes).map_err(|e| AuthError::Random(e.to_string()))?;
        Ok(hex::encode(bytes))
    };
    let password = random(32)?;
    let salt = random(16)?;
    let credential = Credential {
        sha256: hash(&salt, &password),
        salt,
        issued_ms: now_ms,
    };
    let tag = vin_tag(tag_key, vin);
    store.update(|file: &mut CredentialFile| {
        file.insert(tag, credential);
    })?;
    Ok(password)
}

/// Revokes `vin`'s password; true if it had one.
pub fn revoke(store: &Document, tag_key: &Secret, vin: &str) -> Result<bool, AuthError> {
    let tag = vin_tag(tag_key, &vin.to_ascii_uppercase());
    Ok(store.update(|file: &mut CredentialFile| file.remove(&tag).is_some())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIN: &str = "WMW11DJ04N2T00001";

    #[test]
    fn issued_passwords_are_checked_and_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("credentials.json");
        let store = || Document::File(path.clone());
        let key = Secret([7; 32]);
        let password = issue(&store(), &key, VIN, 1).expect("issue");
        let credentials = Credentials::new(store(), key.clone());
        assert!(credentials.check(VIN, VIN, &password));
        assert!(!credentials.check(VIN, VIN, "guess"));
        assert!(
            !credentials.check("car-1", VIN, &password),
            "the client id must be the VIN"
        );
        let other = "WMW21GD07P2S00002";
        assert!(!credentials.check(other, other, &password));
        assert!(!credentials.check("admin", "admin", &password));
        let text = std::fs::read_to_string(&path).expect("store");
        assert!(!text.contains(VIN) && !text.contains(&password));
        assert!(revoke(&store(), &key, VIN).expect("revoke"));
        // The store is reloaded when it changes (mtime granularity permitting).
        std::thread::sleep(std::time::Duration::from_millis(20));
        let credentials = Credentials::new(store(), key);
        assert!(!credentials.check(VIN, VIN, &password));
        let refused: Vec<u64> = credentials
            .counters
            .refused
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        assert_eq!(refused, vec![0, 0, 1, 0]);
    }
}
