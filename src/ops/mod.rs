//! Operations: the server that wires the stages together, the admin HTTP
//! endpoint and the token its `/admin` routes require.

pub mod admin_token;
pub mod http;
pub mod server;
