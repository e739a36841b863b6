//! Ingest: the embedded broker vehicles publish to, its vehicle
//! authentication, the link that hands each publish to a worker shard, and
//! the durable watermark that decides when the broker acknowledges it.

pub mod auth;
pub mod broker;
pub mod durable;
pub mod link;
