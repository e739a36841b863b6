//! The leaf of the crate: small items every stage shares, importing nothing of
//! ours. The clock and random ids, the tables of the store and their hour
//! partitions, the consent flags, the reasons a record is rejected, the one
//! way a file is written durably with an owner-only mode, a cluster node's
//! fence, and the CPU priority of the threads whose work can wait.

pub mod clock;
pub mod consent;
pub mod fence;
pub mod fsio;
pub mod priority;
pub mod reject;
pub mod table;
