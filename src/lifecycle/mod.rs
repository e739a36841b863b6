//! Lifecycle: how long data lives. Retention rules and the expiry sweep,
//! deletion requests and legal holds, and the vehicle events that cause them.

pub mod events;
pub mod requests;
pub mod retention;
