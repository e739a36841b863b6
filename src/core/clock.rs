//! Wall-clock time in milliseconds and random identifiers.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A random 64-bit value, for markers and client ids that must not be guessed.
pub fn random_nonce() -> u64 {
    let mut bytes = [0u8; 8];
    // Without a random source, time still makes the marker unguessable enough
    // that a client cannot end the drain early by accident.
    if getrandom::fill(&mut bytes).is_err() {
        return now_ms() as u64;
    }
    u64::from_le_bytes(bytes)
}
