//! The admin token: what every `/admin` HTTP route requires, as
//! `Authorization: Bearer <token>`.
//!
//! The token is random (256 bits), created on the server's first start in
//! `admin.token_file` (mode 0600, beside the root key, outside the data
//! directory), so the operator's tools on the same machine can read it
//! (`curl -H "Authorization: Bearer $(cat keys/admin.token)"`). Whoever can
//! read that directory holds the root key already, so the file adds no
//! exposure. The server keeps only the token's SHA-256 and compares digests
//! in constant time; the token is never logged or printed. To replace it,
//! delete the file and restart.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::core::fsio;

/// Shortest token accepted from a file the operator wrote by hand.
const MIN_TOKEN_CHARS: usize = 32;
/// Random bytes of a generated token.
const TOKEN_BYTES: usize = 32;
/// Prefix of a generated token, so it is recognisable in a leak scan.
const TOKEN_PREFIX: &str = "fga_";

#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("admin token {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin token {path}: no randomness for a new token: {message}")]
    Random { path: PathBuf, message: String },
    #[error(
        "admin token {path}: a token needs at least {MIN_TOKEN_CHARS} characters \
         (delete the file to have a new one generated)"
    )]
    TooShort { path: PathBuf },
}

/// The SHA-256 of the admin token; the token itself is kept nowhere in memory.
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads the token at `path`, or creates one there (0600, in a 0700
    /// directory when that is new). An existing file is narrowed to 0600.
    pub fn load_or_create(path: &Path) -> Result<Self, AdminTokenError> {
        let io = |source| AdminTokenError::Io {
            path: path.to_owned(),
            source,
        };
        let token = match std::fs::read_to_string(path) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; TOKEN_BYTES];
                getrandom::fill(&mut bytes).map_err(|e| AdminTokenError::Random {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
                let token = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
                fsio::replace(path, format!("{token}\n").as_bytes()).map_err(io)?;
                tracing::info!(token_file = %path.display(), "created the admin token");
                token
            }
            Err(e) => return Err(io(e)),
        };
        if token.chars().count() < MIN_TOKEN_CHARS {
            return Err(AdminTokenError::TooShort {
                path: path.to_owned(),
            });
        }
        // A file the operator made by hand may carry the umask's mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(fsio::FILE_MODE))
            .map_err(io)?;
        Ok(Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Whether `presented` is the token: digests compared in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest
            .iter()
            .zip(&self.digest)
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_token_is_created_once_owner_only_and_matched_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/admin.token");
        let first = AdminToken::load_or_create(&path).expect("created");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), fsio::FILE_MODE);
        assert_eq!(mode(&dir.path().join("keys")), fsio::DIR_MODE);
        let token = std::fs::read_to_string(&path).expect("read");
        let token = token.trim();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == 4 + 2 * TOKEN_BYTES);
        assert!(first.matches(token));
        assert!(!first.matches(&token[..token.len() - 1]));
        assert!(!first.matches(""));
        let again = AdminToken::load_or_create(&path).expect("loaded");
        assert!(again.matches(token), "kept across restarts");
    }

    #[test]
    fn a_hand_made_file_is_narrowed_and_a_short_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let token = AdminToken::load_or_create(&path).expect("loaded");
        assert!(token.matches("0123456789abcdef0123456789abcdef"));
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, fsio::FILE_MODE);
        std::fs::write(&path, "short").expect("write");
        let refused = AdminToken::load_or_create(&path).expect_err("too short");
        assert!(
            matches!(refused, AdminTokenError::TooShort { .. }),
            "{refused}"
        );
    }
}
