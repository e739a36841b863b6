//! The control plane in PostgreSQL: the state that several fleetgate nodes
//! must share besides the tables, when `cluster.control_plane` names a
//! database: the vault of vehicle secrets and consent ([`vault`]); the
//! access registry, deletion requests, legal holds and vehicle credentials
//! ([`documents`]); the maintenance lease ([`lease`]). The audit logs stay
//! with the node that wrote them (README, "Cluster"). Without a control
//! plane, the same [`documents`] are files of the node's own.
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

pub mod documents;
pub mod lease;
pub mod vault;

use std::sync::{Arc, Mutex};

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
    #[error(
        "control plane (PostgreSQL): this node's root key is not the one the cluster's vault \
         was made with; copy storage.key_file from a node of the cluster before starting"
    )]
    OtherRootKey,
    #[error(transparent)]
    File(#[from] crate::core::fsio::FsError),
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
    CREATE TABLE IF NOT EXISTS fleetgate_documents (
        name text PRIMARY KEY,
        body text NOT NULL,
        version bigint NOT NULL
    );
    CREATE TABLE IF NOT EXISTS fleetgate_cluster (
        name text PRIMARY KEY,
        value bytea NOT NULL
    );
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
    /// The control plane `config` names (`cluster.control_plane`),
    /// connected; `None` when it names none (one node, embedded state).
    pub fn from_config(config: &crate::config::Config) -> Result<Option<Arc<Self>>> {
        match config.cluster.control_plane.as_str() {
            "" => Ok(None),
            url => Ok(Some(Arc::new(Self::connect(url)?))),
        }
    }

    /// Connects to the database `url` names (a libpq connection string or
    /// `postgresql://` URL) and creates the control plane's tables if absent.
    pub fn connect(url: &str) -> Result<Self> {
        let config: postgres::Config = url.parse()?;
        // The vault's secrets cross this connection, and this build has no
        // TLS client for PostgreSQL: only a Unix socket or loopback, named
        // by a path or an address (a host name could resolve anywhere).
        let beyond = |what: String| {
            ControlError::Malformed(format!(
                "{what}: the control plane carries every vehicle's secrets and this build has \
                 no TLS for PostgreSQL; connect through a Unix socket or a loopback address"
            ))
        };
        for host in config.get_hosts() {
            if let postgres::config::Host::Tcp(name) = host
                && !name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
            {
                return Err(beyond(format!("host {name}")));
            }
        }
        if let Some(addr) = config.get_hostaddrs().iter().find(|a| !a.is_loopback()) {
            return Err(beyond(format!("hostaddr {addr}")));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_plane_beyond_this_host_is_refused_without_connecting() {
        for url in [
            "host=db.example.com dbname=fleetgate",
            "postgresql://fleetgate@10.0.0.7/fleetgate",
            "host=/run/postgresql,db.example.com dbname=fleetgate",
            "host=localhost hostaddr=10.0.0.7 dbname=fleetgate",
            "host=/run/postgresql hostaddr=10.0.0.7 dbname=fleetgate",
        ] {
            let error = ControlPlane::connect(url).expect_err(url).to_string();
            assert!(error.contains("no TLS"), "{url}: {error}");
        }
    }
}
