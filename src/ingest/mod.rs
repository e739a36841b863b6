//! Ingest: the embedded broker vehicles publish to, its vehicle
//! authentication, and the link that hands each publish to a worker shard.

pub mod auth;
pub mod broker;
pub mod link;
