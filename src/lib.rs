//! fleetgate: connected-car telemetry from MQTT to lawful, queryable Parquet.
//!
//! The path of one record, one folder per stage, each depending only on the
//! ones listed before it:
//! - [`core`]: the leaf: clock, tables and partitions, consent, reject codes, durable files;
//! - [`config`]: the configuration file and its defaults;
//! - [`control`]: the control plane a cluster's nodes share in PostgreSQL (vault, leases);
//! - [`schema`]: the stream schemas in `schemas/`, the single source of truth;
//! - [`privacy`]: key ring ([`privacy::pseudo`]), each vehicle's secrets and consent
//!   ([`privacy::vault`]), the per-worker pseudonymising stage ([`privacy::stage`]);
//! - [`metrics`]: counters and latency histograms, in the Prometheus text format;
//! - [`ingest`]: the embedded broker ([`ingest::broker`]), vehicle passwords
//!   ([`ingest::auth`]) and the link that routes each publish to a worker shard
//!   ([`ingest::link`]);
//! - [`wal`]: the write-ahead log every batch is appended to before it is stored;
//! - [`store`]: Arrow batches → zstd Parquet files, committed atomically per hour partition;
//! - [`pipeline`]: worker shards ([`pipeline::worker`]) that decode ([`pipeline::decode`]),
//!   pseudonymise, batch ([`pipeline::batch`]) and dead-letter ([`pipeline::dead_letter`]);
//! - [`lifecycle`]: retention rules and the sweep ([`lifecycle::retention`]), deletion
//!   requests and holds ([`lifecycle::requests`]), vehicle events ([`lifecycle::events`]);
//! - [`query`]: SQL over the store through DataFusion, through retention views;
//! - [`access`]: the Data Act query layer: principals, purposes, grants, policy views, audit, export;
//! - [`ops`]: the server that wires the stages and shuts them down in order
//!   ([`ops::server`]), the admin HTTP endpoint ([`ops::http`]).

// Bottom-up: a module names only modules above it in this list
// (`tests/layers.rs` checks it).
pub mod core;

pub mod config;

pub mod control;

pub mod schema;

pub mod privacy;

pub mod metrics;

pub mod ingest;

pub mod wal;

pub mod store;

pub mod pipeline;

pub mod lifecycle;

pub mod query;

pub mod access;

pub mod ops;
