//! A lease in PostgreSQL: at most one node holds a named duty (the
//! maintenance of the shared tables) at a time, and when its holder stops
//! renewing it, another node takes it over once it lapses.
//!
//! A running cluster node also holds a lease on its own name ([`node`],
//! [`Claim`]), which fences its table commits and tells the others when its
//! WAL copies are theirs to store.
//!
//! Taking and renewing are one conditional upsert, judged by the database's
//! clock: a node gets the lease if nobody holds it, if it holds it already,
//! or if the holder's term has run out. A holder that stops (killed, cut
//! off) keeps it at most `term` longer. The lease decides who starts a run;
//! it is renewed between runs, and before each run once two thirds of a term
//! have passed since the last renewal ([`Claim::confirm`]), not during one,
//! so a run longer than the term can overlap the next holder's. Two
//! conflicting Delta commits then fail one of them; the deletion audit and
//! the retiring of requests are not fenced (README, "Cluster").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

impl Lease {
    /// Takes the lease over from `previous`, whatever its term: for a node
    /// that knows `previous` was its own earlier run, now gone.
    pub fn take_from(&self, previous: &str) -> Result<bool> {
        let term_secs = self.term.as_secs_f64();
        self.plane.run(|client| {
            let updated = client.execute(
                "UPDATE fleetgate_leases
                    SET holder = $3, expires_at = now() + make_interval(secs => $4)
                  WHERE name = $1 AND holder = $2",
                &[&self.name, &previous, &self.holder, &term_secs],
            )?;
            Ok(updated == 1)
        })
    }

    pub fn term(&self) -> Duration {
        self.term
    }
}

/// The name of the lease a running node holds on its `cluster.node_id`.
pub fn node(node_id: &str) -> String {
    format!("node:{node_id}")
}

/// A lease its holder can trust without asking the database: for two thirds
/// of a term after the start of its last successful renewal. The database
/// gives the lease to another node only a whole term after that renewal, so
/// the last third is the margin for a clock that runs slow, or a commit
/// already on its way.
#[derive(Debug)]
pub struct Claim {
    lease: Lease,
    trusted_until: Mutex<Option<Instant>>,
    /// How many times the claim was taken while not trusted (the first
    /// time included): it moved whenever someone else may have acted on
    /// the lease in between.
    epoch: AtomicU64,
}

impl Claim {
    pub fn new(lease: Lease) -> Self {
        Self {
            lease,
            trusted_until: Mutex::new(None),
            epoch: AtomicU64::new(0),
        }
    }

    /// Takes or renews the lease; true if held now. A failed call changes
    /// nothing: the claim runs out on its own.
    pub fn renew(&self) -> Result<bool> {
        let start = Instant::now();
        let held = self.lease.hold()?;
        self.trust(held.then(|| start + self.lease.term * 2 / 3));
        Ok(held)
    }

    /// Counts a lease taken by other means ([`Lease::take_from`]) as held
    /// from `since`.
    pub fn trust_from(&self, since: Instant) {
        self.trust(Some(since + self.lease.term * 2 / 3));
    }

    fn trust(&self, until: Option<Instant>) {
        if let Ok(mut trusted) = self.trusted_until.lock() {
            let was_trusted = trusted.is_some_and(|t| Instant::now() < t);
            if until.is_some() && !was_trusted {
                self.epoch.fetch_add(1, Ordering::SeqCst);
            }
            *trusted = until;
        }
    }

    /// See [`crate::core::fence::Fence::epoch`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether this holder may act on the lease now: without asking while
    /// its last renewal is trusted, by renewing it once that trust ran out
    /// (after a step that took long, in which the lease may have moved).
    pub fn confirm(&self) -> Result<bool> {
        if self.holds() {
            return Ok(true);
        }
        self.renew()
    }

    /// Whether this holder may still act on the lease.
    pub fn holds(&self) -> bool {
        self.trusted_until
            .lock()
            .is_ok_and(|t| t.is_some_and(|until| Instant::now() < until))
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }
}
