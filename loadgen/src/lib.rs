//! loadgen: a simulated fleet that publishes to fleetgate (or any MQTT
//! broker), measures acknowledgement latency without coordinated omission,
//! and checks through fleetgate's SQL that every acknowledged record is
//! stored exactly once.
//!
//! - [`fleet`]: vehicles and the JSON records they publish;
//! - [`run`]: the MQTT connections, the schedule and the measurements;
//! - [`acks`]: what was acknowledged, as sequence ranges;
//! - [`report`]: text, JSON and SVG reports;
//! - [`verify`]: the exactly-once check against the store;
//! - [`queries`]: the SQL suite timed cold and hot;
//! - [`analysts`]: the SQL suite as N concurrent principals over Flight SQL;
//! - [`followers`]: N principals following live streams, receipt → delivered;
//! - [`connections`]: one connection per vehicle, accept rate and memory.

pub mod acks;
pub mod analysts;
pub mod connections;
pub mod fleet;
pub mod followers;
pub mod queries;
pub mod report;
pub mod run;
pub mod verify;
