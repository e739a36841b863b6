//! Operations: the server that wires the stages together, the front-ends
//! principals and operators reach it through (the HTTP endpoint, Flight
//! SQL, the users' portal page), the runtime their queries share, and the
//! admin token.

pub mod admin_token;
pub mod ballista;
pub mod flight;
pub mod http;
mod portal;
pub mod queries;
pub mod served;
pub mod server;
mod takeover;
