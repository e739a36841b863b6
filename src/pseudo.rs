//! Keyed pseudonyms: the only form in which a VIN or another direct identifier
//! reaches disk.
//!
//! A pseudonym is the first 16 bytes of HMAC-SHA256(secret key, label ‖ 0 ‖ value),
//! hex-encoded. The label (the field name) keeps the pseudonyms of different
//! fields apart. The 32-byte secret key is created from the OS random source
//! on first start, written with mode 0600 by write-then-rename, and never
//! logged. Whoever holds the data but not the key cannot recompute or reverse
//! a pseudonym. This module must never write a raw identifier anywhere.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const KEY_BYTES: usize = 32;
const PSEUDONYM_BYTES: usize = 16;
/// Label of the VIN, the vehicle's pseudonym.
pub const VIN_LABEL: &str = "vin";

#[derive(Debug, thiserror::Error)]
pub enum PseudoError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} holds {len} bytes, expected {KEY_BYTES}")]
    BadKey { path: PathBuf, len: usize },
    #[error("no random source for a new key: {0}")]
    Random(getrandom::Error),
}

pub type Result<T, E = PseudoError> = std::result::Result<T, E>;

/// Computes pseudonyms under one secret key. Cheap to clone.
#[derive(Clone)]
pub struct Pseudonymiser {
    mac: HmacSha256,
}

impl std::fmt::Debug for Pseudonymiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymiser { key: <secret> }")
    }
}

impl Pseudonymiser {
    pub fn from_key(key: &[u8; KEY_BYTES]) -> Self {
        // HMAC accepts keys of any length, so this cannot fail for 32 bytes.
        let mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        Self { mac }
    }

    /// Loads the key at `path`, creating it (and its directory) if absent.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let io = |source| PseudoError::Io {
            path: path.to_owned(),
            source,
        };
        match fs::read(path) {
            Ok(bytes) => {
                let key: [u8; KEY_BYTES] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| PseudoError::BadKey {
                            path: path.to_owned(),
                            len: bytes.len(),
                        })?;
                Ok(Self::from_key(&key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; KEY_BYTES];
                getrandom::fill(&mut key).map_err(PseudoError::Random)?;
                write_secret_file(path, &key).map_err(io)?;
                tracing::info!(key_file = %path.display(), "created a new pseudonym key");
                Ok(Self::from_key(&key))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The pseudonym of `value` under `label`.
    pub fn pseudonym(&self, label: &str, value: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        hex::encode(&digest[..PSEUDONYM_BYTES])
    }

    /// The vehicle pseudonym of a VIN.
    pub fn vehicle(&self, vin: &str) -> String {
        self.pseudonym(VIN_LABEL, vin)
    }

    /// Replaces every VIN-shaped token in `bytes` (17 characters of the VIN
    /// alphabet, ISO 3779: digits and letters but I, O, Q, either case) by
    /// `vin:<pseudonym>`. For payloads that cannot be parsed, where the field
    /// holding the VIN cannot be found.
    pub fn redact_vins(&self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let run = bytes[i..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric())
                .count();
            if run == 0 {
                out.push(bytes[i]);
                i += 1;
                continue;
            }
            let token = &bytes[i..i + run];
            match vin_from_token(token) {
                Some(vin) => {
                    out.extend_from_slice(b"vin:");
                    out.extend_from_slice(self.vehicle(&vin).as_bytes());
                }
                None => out.extend_from_slice(token),
            }
            i += run;
        }
        out
    }
}

/// Most cached vehicle pseudonyms per worker before the cache starts afresh.
const CACHE_LIMIT: usize = 100_000;

/// A per-worker cache of vehicle pseudonyms: vehicles publish often, and
/// sharding by vehicle keeps each one's entry on a single worker, so no lock
/// is needed. Other labels are computed every time.
#[derive(Debug)]
pub struct PseudonymCache {
    pseudonymiser: Pseudonymiser,
    vehicles: std::collections::HashMap<String, String>,
}

impl PseudonymCache {
    pub fn new(pseudonymiser: Pseudonymiser) -> Self {
        Self {
            pseudonymiser,
            vehicles: std::collections::HashMap::new(),
        }
    }

    pub fn pseudonymiser(&self) -> &Pseudonymiser {
        &self.pseudonymiser
    }

    /// The pseudonym of `value` under `label`.
    pub fn get(&mut self, label: &str, value: &str) -> String {
        if label != VIN_LABEL {
            return self.pseudonymiser.pseudonym(label, value);
        }
        if let Some(p) = self.vehicles.get(value) {
            return p.clone();
        }
        if self.vehicles.len() >= CACHE_LIMIT {
            self.vehicles.clear();
        }
        let p = self.pseudonymiser.vehicle(value);
        self.vehicles.insert(value.to_owned(), p.clone());
        p
    }
}

/// A VIN as vehicles send it: 17 characters, digits and capital letters but I, O, Q.
pub fn is_vin(s: &str) -> bool {
    s.len() == 17
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"IOQ".contains(&b)))
}

fn vin_from_token(token: &[u8]) -> Option<String> {
    if token.len() != 17 {
        return None;
    }
    let upper = String::from_utf8(token.to_ascii_uppercase()).ok()?;
    is_vin(&upper).then_some(upper)
}

/// Writes a secret file with mode 0600 through a temporary file and a rename,
/// fsyncing the file and its directory, so a crash leaves the old state or
/// the complete new file, never a partial key.
fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> Pseudonymiser {
        Pseudonymiser::from_key(&[7u8; KEY_BYTES])
    }

    #[test]
    fn pseudonym_is_stable_keyed_and_labelled() {
        let p = fixed();
        let a = p.vehicle("WMW11DJ04N2T00001");
        assert_eq!(a, p.vehicle("WMW11DJ04N2T00001"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, p.vehicle("WMW21GD07P2S00002"));
        assert_ne!(a, p.pseudonym("contract_number", "WMW11DJ04N2T00001"));
        let other_key = Pseudonymiser::from_key(&[8u8; KEY_BYTES]);
        assert_ne!(a, other_key.vehicle("WMW11DJ04N2T00001"));
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/pseudonym.key");
        let first = Pseudonymiser::load_or_create(&path).expect("create");
        let second = Pseudonymiser::load_or_create(&path).expect("reload");
        assert_eq!(
            first.vehicle("WMW11DJ04N2T00001"),
            second.vehicle("WMW11DJ04N2T00001")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn short_key_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        fs::write(&path, b"short").expect("write");
        assert!(matches!(
            Pseudonymiser::load_or_create(&path),
            Err(PseudoError::BadKey { len: 5, .. })
        ));
    }

    #[test]
    fn redaction_replaces_vin_shaped_tokens_only() {
        let p = fixed();
        let input = br#"{"vin": "WMW11DJ04N2T00001", "x": "wmw11dj04n2t00001", "note": "ABCDEFGHIJKLMNOPQ"}"#;
        let out = String::from_utf8(p.redact_vins(input)).expect("utf8");
        assert!(!out.contains("WMW11DJ04N2T00001"));
        assert!(!out.to_ascii_uppercase().contains("WMW11DJ04N2T00001"));
        assert_eq!(out.matches(&p.vehicle("WMW11DJ04N2T00001")).count(), 2);
        // 17 letters containing I, O and Q are not a VIN.
        assert!(out.contains("ABCDEFGHIJKLMNOPQ"));
    }

    #[test]
    fn vin_alphabet() {
        assert!(is_vin("WMW11DJ04N2T00001"));
        assert!(!is_vin("WMW11DJ04N2T0000"));
        assert!(!is_vin("WMW11DJ04N2T0000O"));
        assert!(!is_vin("wmw11dj04n2t00001"));
    }
}
