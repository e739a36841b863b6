//! A lease in PostgreSQL: at most one node holds a named duty (the
//! maintenance of the shared tables) at a time, and when its holder stops
//! renewing it, another node takes it over once it lapses.
//!
//! Taking and renewing are one conditional upsert, judged by the database's
//! clock: a node gets the lease if nobody holds it, if it holds it already,
//! or if the holder's term has run out. A holder that stops (killed, cut
//! off) keeps it at most `term` longer. The lease decides who starts a run;
//! it is renewed between runs, not during one, so a run longer than the
//! term can overlap the next holder's. Two conflicting Delta commits then
//! fail one of them; the deletion audit and the retiring of requests are
//! not fenced (README, "Cluster").

use std::sync::Arc;
use std::time::Duration;

use super::{ControlPlane, Result};

/// The lease of the shared tables' retention sweep, compaction and vacuum.
pub const MAINTENANCE: &str = "maintenance";

/// One node's claim on a named lease.
#[derive(Debug, Clone)]
pub struct Lease {
    plane: Arc<ControlPlane>,
    name: String,
    holder: String,
    term: Duration,
}

impl Lease {
    pub fn new(plane: Arc<ControlPlane>, name: &str, holder: &str, term: Duration) -> Self {
        Self {
            plane,
            name: name.to_owned(),
            holder: holder.to_owned(),
            term,
        }
    }

    /// Takes or renews the lease for another term; true if this node holds
    /// it now.
    pub fn hold(&self) -> Result<bool> {
        let term_secs = self.term.as_secs_f64();
        self.plane.run(|client| {
            let row = client.query_opt(
                "INSERT INTO fleetgate_leases (name, holder, expires_at)
                 VALUES ($1, $2, now() + make_interval(secs => $3))
                 ON CONFLICT (name) DO UPDATE
                    SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                    WHERE fleetgate_leases.holder = EXCLUDED.holder
                       OR fleetgate_leases.expires_at < now()
                 RETURNING holder",
                &[&self.name, &self.holder, &term_secs],
            )?;
            Ok(row.is_some())
        })
    }

    /// Who holds the lease now, if anyone's term is running.
    pub fn holder(&self) -> Result<Option<String>> {
        self.plane.run(|client| {
            let row = client.query_opt(
                "SELECT holder FROM fleetgate_leases WHERE name = $1 AND expires_at >= now()",
                &[&self.name],
            )?;
            Ok(row.map(|row| row.try_get(0)).transpose()?)
        })
    }

    /// Gives the lease up at once (a clean shutdown), so that another node
    /// need not wait for it to lapse.
    pub fn release(&self) -> Result<()> {
        self.plane.run(|client| {
            client.execute(
                "DELETE FROM fleetgate_leases WHERE name = $1 AND holder = $2",
                &[&self.name, &self.holder],
            )?;
            Ok(())
        })
    }
}
