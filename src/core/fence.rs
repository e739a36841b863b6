//! Whether a cluster node may still act as itself: the question its WAL (before
//! copying a group commit, hence before acknowledging it) and its table
//! writers (before each commit) ask of the lease on its name, which lives in
//! the control plane (`control::lease::Claim`). Defined here so that neither
//! stage depends on the control plane.

/// A node's standing to act under its name.
pub trait Fence: Send + Sync + std::fmt::Debug {
    /// Whether the node may act now: once this is false, another node may
    /// be storing this one's WAL for it.
    fn holds(&self) -> bool;
    /// Counts the times the node took its name back after losing it: a
    /// writer that sees it change first drops what another node stored for
    /// it meanwhile.
    fn epoch(&self) -> u64;
}
