//! Operations: the server that wires the stages together and the admin HTTP endpoint.

pub mod http;
pub mod server;
