//! fleetgate: connected-car telemetry from MQTT to lawful, queryable Parquet.
//!
//! The path of one record, one module per step:
//! - [`broker`]: the embedded rumqttd broker vehicles publish to;
//! - [`auth`]: vehicle passwords: the credential store and the CONNECT check;
//! - [`ingest`]: consumes the broker's local link, routes each topic to a worker shard;
//! - [`pipeline`]: worker shards that decode, validate, pseudonymise and batch;
//! - [`decode`]: payload → typed records, each with its own rejection;
//! - [`schema`]: the stream schemas in `schemas/`, the single source of truth;
//! - [`privacy`]: per-worker pseudonyms, encryption, trip ids and consent gates;
//! - [`pseudo`]: the key ring and the keyed functions built on it;
//! - [`vault`]: each vehicle's secrets and consent, for crypto-shredding;
//! - [`dead_letter`]: rejected records, their reasons and redacted copies;
//! - [`wal`]: the write-ahead log every batch is appended to before it is stored;
//! - [`store`]: Arrow batches → zstd Parquet files, committed atomically per hour partition;
//! - [`query`]: SQL over the store through DataFusion, through retention views;
//! - [`access`]: the Data Act query layer: principals, purposes, grants, policy views, audit, export;
//! - [`retention`]: retention rules, the query-time filter, the expiry sweep;
//! - [`requests`]: deletion requests from events (case closed, session ended);
//! - [`metrics`]: counters and latency histograms, in the Prometheus text format;
//! - [`http`]: the admin HTTP endpoint: `/metrics` and vehicle events;
//! - [`events`]: vehicle events (sale, account deletion, SIM, consent), audited;
//! - [`server`]: wires the stages together and shuts them down in order;
//! - [`config`]: the configuration file and its defaults.

pub mod access;
pub mod auth;
pub mod broker;
pub mod config;
pub mod dead_letter;
pub mod decode;
pub mod events;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod pipeline;
pub mod privacy;
pub mod pseudo;
pub mod query;
pub mod requests;
pub mod retention;
pub mod schema;
pub mod server;
pub mod store;
pub mod vault;
pub mod wal;
