//! Privacy: the key ring and keyed functions, each vehicle's vault entry
//! (secrets, consent, crypto-shredding), and the per-worker stage that
//! pseudonymises and encrypts records, and the redaction of log lines.

pub mod log;
pub mod pseudo;
pub mod stage;
pub mod vault;
