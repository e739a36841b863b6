//! The control plane in PostgreSQL: the state that several fleetgate nodes
//! must share besides the tables, when `cluster.control_plane` names a
//! database. Today that is the vault of vehicle secrets and consent
//! ([`vault`]) and the maintenance lease ([`lease`]); the access registry,
//! deletion requests, legal holds, vehicle credentials and the audit logs
//! still live in each node's files (README, "Cluster").
//!
//! PostgreSQL does what a home-made coordinator would get wrong: a write-once
//! key is an `INSERT … ON CONFLICT DO NOTHING` inside a transaction, so two
//! nodes meeting a new vehicle at once keep one secret; a lease is one
//! conditional upsert judged by the database's clock, so nodes' clocks never
//! disagree about who holds it. Every commit waits for PostgreSQL's WAL fsync
//! (`synchronous_commit` is on by default): a secret is durable before a row
//! uses it, as in the embedded vault.
//!
//! The synchronous `postgres` client runs a runtime of its own, which may not
//! be entered from inside another (an HTTP handler); [`ControlPlane::run`]
//! therefore runs each call on a short-lived thread of its own when the caller
//! is inside a runtime, and on the caller's thread otherwise.

pub mod lease;
pub mod vault;

use std::sync::Mutex;

use postgres::{Client, NoTls};

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control plane (PostgreSQL): {0}")]
    Postgres(#[from] postgres::Error),
    #[error("control plane (PostgreSQL): a call panicked")]
    Panicked,
    #[error("control plane (PostgreSQL): {0}")]
    Malformed(String),
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// Tables of the control plane, created on first connect (under an advisory
/// lock, so that nodes starting together do not race each other).
const SCHEMA: &str = "
    SELECT pg_advisory_xact_lock(7236784829);
    CREATE TABLE IF NOT EXISTS fleetgate_vehicles (
        vehicle bytea PRIMARY KEY,
        keys bytea NOT NULL
    );
    CREATE TABLE IF NOT EXISTS fleetgate_consent (
        vehicle bytea PRIMARY KEY,
        flags smallint NOT NULL
    );
    CREATE TABLE IF NOT EXISTS fleetgate_vault_changes (
        id smallint PRIMARY KEY CHECK (id = 1),
        changes bigint NOT NULL
    );
    INSERT INTO fleetgate_vault_changes VALUES (1, 0) ON CONFLICT DO NOTHING;
    CREATE TABLE IF NOT EXISTS fleetgate_leases (
        name text PRIMARY KEY,
        holder text NOT NULL,
        expires_at timestamptz NOT NULL
    );
";

/// Connections to the control plane's database, made as needed and kept
/// for the next call.
pub struct ControlPlane {
    config: postgres::Config,
    idle: Mutex<Vec<Client>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may hold a password.
        f.debug_struct("ControlPlane").finish_non_exhaustive()
    }
}

/// A client closes its connection on its own runtime, which may not be
/// entered from inside another: idle clients are closed on a thread of
/// their own.
impl Drop for ControlPlane {
    fn drop(&mut self) {
        let idle = std::mem::take(
            self.idle
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        if !idle.is_empty() {
            std::thread::scope(|scope| {
                scope.spawn(move || drop(idle));
            });
        }
    }
}

impl ControlPlane {
    /// Connects to the database `url` names (a libpq connection string or
    /// `postgresql://` URL) and creates the control plane's tables if absent.
    pub fn connect(url: &str) -> Result<Self> {
        let config: postgres::Config = url.parse()?;
        let plane = Self {
            config,
            idle: Mutex::new(Vec::new()),
        };
        plane.run(|client| {
            let mut txn = client.transaction()?;
            txn.batch_execute(SCHEMA)?;
            txn.commit()?;
            Ok(())
        })?;
        Ok(plane)
    }

    /// Runs `call` with a connection (an idle one, or a new one), and keeps
    /// the connection for the next call unless it broke.
    pub fn run<T: Send>(&self, call: impl FnOnce(&mut Client) -> Result<T> + Send) -> Result<T> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let work = move || -> (Result<T>, Option<Client>) {
            let mut client = match idle {
                Some(client) if !client.is_closed() => client,
                _ => match self.config.connect(NoTls) {
                    Ok(client) => client,
                    Err(e) => return (Err(e.into()), None),
                },
            };
            let outcome = call(&mut client);
            (outcome, (!client.is_closed()).then_some(client))
        };
        let (outcome, client) = if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|scope| {
                scope
                    .spawn(work)
                    .join()
                    .unwrap_or((Err(ControlError::Panicked), None))
            })
        } else {
            work()
        };
        if let Some(client) = client {
            self.idle
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(client);
        }
        outcome
    }
}
