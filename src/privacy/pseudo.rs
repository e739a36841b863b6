//! The key ring: one root secret from which every key fleetgate uses is
//! derived, and the keyed functions built on it.
//!
//! The 32-byte root secret is created from the OS random source on first
//! start, written with mode 0600 by write-then-rename, kept outside the data
//! directory, and never logged. Keys are derived per purpose as
//! HMAC-SHA256(root, purpose ‖ 0 ‖ parameters): one per (pseudonym domain,
//! key epoch), one to index the vault. A derived key reveals nothing about
//! the root or about any other derived key, so a recipient holding its own
//! domain's key cannot compute another domain's pseudonyms.
//!
//! Pseudonyms themselves are computed from a vehicle's random secret in the
//! vault (see `vault` and `privacy`), never from the VIN alone: erasing that
//! secret unlinks the vehicle for good. This module must never write a raw
//! identifier anywhere.

use std::fs;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the root secret and of every derived key.
pub const KEY_BYTES: usize = 32;
const PSEUDONYM_BYTES: usize = 16;

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

/// A 32-byte secret that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; KEY_BYTES]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

impl Secret {
    /// A fresh secret from the OS random source.
    pub fn random() -> Result<Self> {
        let mut key = [0u8; KEY_BYTES];
        getrandom::fill(&mut key).map_err(PseudoError::Random)?;
        Ok(Self(key))
    }

    /// HMAC-SHA256 under this secret of the parts, each followed by a 0 byte.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail for 32 bytes.
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        for part in parts {
            mac.update(part);
            mac.update(&[0]);
        }
        mac.finalize().into_bytes().into()
    }
}

/// The root secret and the keys derived from it.
#[derive(Debug, Clone)]
pub struct KeyRing {
    root: Secret,
}

impl KeyRing {
    pub fn from_root(root: Secret) -> Self {
        Self { root }
    }

    /// Loads the root secret at `path`, creating it (and its directory) if absent.
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
                Ok(Self::from_root(Secret(key)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let root = Secret::random()?;
                crate::core::fsio::replace(path, &root.0).map_err(io)?;
                tracing::info!(key_file = %path.display(), "created a new root key");
                Ok(Self::from_root(root))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The key of pseudonym domain `domain` in key epoch `epoch`.
    pub fn domain_key(&self, domain: &str, epoch: i32) -> Secret {
        Secret(
            self.root
                .mac(&[b"pseudonym-domain", domain.as_bytes(), &epoch.to_le_bytes()]),
        )
    }

    /// The key that turns a VIN into its vault index, so the vault stores no VIN.
    pub fn vault_index_key(&self) -> Secret {
        Secret(self.root.mac(&[b"vault-index"]))
    }

    /// The key that seals live stream positions (`access::live`): they
    /// stay readable across restarts, and only by this installation.
    pub fn live_position_key(&self) -> Secret {
        Secret(self.root.mac(&[b"live-position"]))
    }

    /// The key of VIN-shaped tokens in dead-letter copies.
    pub fn redaction_key(&self) -> Secret {
        Secret(self.root.mac(&[b"dead-letter-redaction"]))
    }
}

/// The pseudonym of a vehicle under a domain key: from the vehicle's vault
/// secret, so it cannot be recomputed from the VIN once the secret is erased.
pub fn vehicle_pseudonym(domain_key: &Secret, vehicle_secret: &Secret) -> String {
    hex::encode(&domain_key.mac(&[b"vehicle", &vehicle_secret.0])[..PSEUDONYM_BYTES])
}

/// The pseudonym of another field's value of a vehicle, bound to the same secret.
pub fn field_pseudonym(
    domain_key: &Secret,
    vehicle_secret: &Secret,
    field: &str,
    value: &str,
) -> String {
    hex::encode(
        &domain_key.mac(&[
            b"field",
            &vehicle_secret.0,
            field.as_bytes(),
            value.as_bytes(),
        ])[..PSEUDONYM_BYTES],
    )
}

/// Replaces every VIN-shaped token in `bytes` (17 characters of the VIN
/// alphabet, ISO 3779: digits and letters but I, O, Q, either case) by
/// `vin:` and what `replace` makes of the (upper-cased) VIN. For payloads
/// that cannot be parsed, where the field holding the VIN cannot be found.
pub fn redact_vins(bytes: &[u8], replace: &mut dyn FnMut(&str) -> String) -> Vec<u8> {
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
                out.extend_from_slice(replace(&vin).as_bytes());
            }
            None => out.extend_from_slice(token),
        }
        i += run;
    }
    out
}

/// A vehicle's keyed tag, where fleetgate must name a vehicle outside the
/// data rows (audit lines, legal holds, the credential store, refused
/// CONNECTs, a VIN in a dead letter that is not the topic's). It leads back
/// to no VIN without the root key; with it, it is recomputed from the VIN,
/// and erasure does not change it, so an erased vehicle's audit trail can
/// still be found.
pub fn vin_tag(redaction_key: &Secret, vin: &str) -> String {
    hex::encode(&redaction_key.mac(&[vin.as_bytes()])[..PSEUDONYM_BYTES])
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::from_root(Secret([7u8; KEY_BYTES]))
    }

    #[test]
    fn domains_and_epochs_get_unrelated_keys() {
        let ring = ring();
        let vehicle = Secret([1u8; KEY_BYTES]);
        let internal = vehicle_pseudonym(&ring.domain_key("internal", 0), &vehicle);
        assert_eq!(
            internal,
            vehicle_pseudonym(&ring.domain_key("internal", 0), &vehicle)
        );
        assert_eq!(internal.len(), 32);
        assert_ne!(
            internal,
            vehicle_pseudonym(&ring.domain_key("repair-shop", 0), &vehicle)
        );
        assert_ne!(
            internal,
            vehicle_pseudonym(&ring.domain_key("internal", 1), &vehicle)
        );
        // One domain's key, used as if it were the other's, does not give the other's pseudonyms.
        let repair = ring.domain_key("repair-shop", 0);
        assert_ne!(vehicle_pseudonym(&repair, &vehicle), internal);
        assert_ne!(ring.domain_key("internal", 0), repair);
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/root.key");
        let first = KeyRing::load_or_create(&path).expect("create");
        let second = KeyRing::load_or_create(&path).expect("reload");
        assert_eq!(
            first.domain_key("internal", 3),
            second.domain_key("internal", 3)
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
            KeyRing::load_or_create(&path),
            Err(PseudoError::BadKey { len: 5, .. })
        ));
    }

    #[test]
    fn redaction_replaces_vin_shaped_tokens_only() {
        let key = ring().redaction_key();
        let input = br#"{"vin": "WMW11DJ04N2T00001", "x": "wmw11dj04n2t00001", "note": "ABCDEFGHIJKLMNOPQ"}"#;
        let out =
            String::from_utf8(redact_vins(input, &mut |vin| vin_tag(&key, vin))).expect("utf8");
        assert!(!out.to_ascii_uppercase().contains("WMW11DJ04N2T00001"));
        assert_eq!(out.matches(&vin_tag(&key, "WMW11DJ04N2T00001")).count(), 2);
        // 17 letters containing I, O and Q are not a VIN.
        assert!(out.contains("ABCDEFGHIJKLMNOPQ"));
    }

    #[test]
    fn debug_output_hides_secrets() {
        assert_eq!(
            format!("{:?}", Secret([9u8; KEY_BYTES])),
            "Secret(<hidden>)"
        );
        assert!(!format!("{:?}", ring()).contains('7'));
    }

    #[test]
    fn vin_alphabet() {
        assert!(is_vin("WMW11DJ04N2T00001"));
        assert!(!is_vin("WMW11DJ04N2T0000"));
        assert!(!is_vin("WMW11DJ04N2T0000O"));
        assert!(!is_vin("wmw11dj04n2t00001"));
    }
}
