//! A cluster node's claim on its name, and the storing of a dead node's WAL.
//!
//! While it runs, each node holds the lease `node:<id>` in the control plane
//! ([`lease::Claim`]), renewed every sixth of `cluster.lease_secs`. Its
//! table writers commit only while it can trust that it holds it (two thirds
//! of a term after the last renewal began), so once the lease can have
//! lapsed in the database, nothing the node still does reaches the tables.
//! A second process started under the same name waits for the lease and is
//! refused if a live holder keeps renewing it. A node restarted on the same
//! WAL directory takes the lease over from its earlier run at once: the
//! directory is locked (`flock`) by one process at a time, and names the
//! holder its last run used.
//!
//! The node holding the maintenance lease looks, every third of a term, for
//! WAL copies (`wal::copies`) of nodes whose lease lapsed. It takes such a
//! node's lease, stores what the copies hold and no table holds, under the
//! dead node's name (Delta's transaction identifiers then store every entry
//! at most once, and the dead node, restarted, skips what was stored for
//! it), deletes the copies it read, and lets the lease go.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Sender, bounded};

use super::server::{Recovery, Result, ServerError, start_writers};
use crate::config::Config;
use crate::control::ControlPlane;
use crate::control::lease::{self, Claim, Lease};
use crate::core::fence::Fence;
use crate::core::fsio;
use crate::metrics::Metrics;
use crate::schema::Registry;
use crate::store::StoreRoot;
use crate::wal::Tracker;
use crate::wal::copies::Copies;

/// The lock file of a WAL directory, held by the running process.
const LOCK_FILE: &str = "lock";
/// The holder name of this directory's last run.
const HOLDER_FILE: &str = "lease-holder";
/// How a node storing another's WAL names itself as the lease's holder.
const STORING_FOR: &str = "storing-for-a-dead-node:";

impl Fence for Claim {
    fn holds(&self) -> bool {
        Claim::holds(self)
    }

    fn epoch(&self) -> u64 {
        Claim::epoch(self)
    }
}

/// A running node's claim on its name, renewed by a thread of its own.
pub(super) struct NodeClaim {
    claim: Arc<Claim>,
    stop: Sender<()>,
    thread: JoinHandle<()>,
    /// Held open: the `flock` on the WAL directory lasts as long as the file.
    _lock: std::fs::File,
}

impl NodeClaim {
    /// Takes the lease on `config.cluster.node_id`, waiting while a dead
    /// holder's term runs out or another node stores this one's WAL; refuses
    /// if a live process keeps renewing it. Then renews it in the background.
    pub(super) fn take(
        config: &Config,
        plane: Arc<ControlPlane>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let node = &config.cluster.node_id;
        let wal_dir = config.wal_dir();
        let lock = lock_dir(&wal_dir)?;
        let holder = format!(
            "{node}/{}-{:08x}",
            std::process::id(),
            crate::core::clock::random_nonce() as u32
        );
        let term = Duration::from_secs(config.cluster.lease_secs);
        let claim = Arc::new(Claim::new(Lease::new(
            plane,
            &lease::node(node),
            &holder,
            term,
        )));
        let previous = std::fs::read_to_string(wal_dir.join(HOLDER_FILE)).ok();
        let refuse_at = Instant::now() + term * 2;
        loop {
            let start = Instant::now();
            if let Some(previous) = previous.as_deref().map(str::trim)
                && claim.lease().take_from(previous)?
            {
                claim.trust_from(start);
                break;
            }
            if claim.renew()? {
                break;
            }
            match claim.lease().holder()? {
                Some(other) if other.starts_with(STORING_FOR) => {
                    tracing::info!(%other, "another node is storing this node's WAL copies; waiting");
                }
                Some(other) if Instant::now() >= refuse_at => {
                    return Err(ServerError::NodeInUse {
                        node: node.clone(),
                        holder: other,
                    });
                }
                Some(other) => {
                    tracing::info!(%other, "waiting for the lease on this node's name to lapse");
                }
                None => continue,
            }
            std::thread::sleep((term / 6).min(Duration::from_secs(1)));
        }
        fsio::replace(&wal_dir.join(HOLDER_FILE), holder.as_bytes()).map_err(|source| {
            ServerError::WalDir {
                path: wal_dir.clone(),
                source,
            }
        })?;
        metrics.node_lease_held.store(1, Ordering::Relaxed);
        let (stop, stopped) = bounded::<()>(0);
        let renewing = claim.clone();
        let own_prefix = format!("{node}/");
        let own_holder = holder.clone();
        let thread = std::thread::Builder::new()
            .name("node-lease".into())
            .spawn(move || {
                let mut held = true;
                while let Err(crossbeam::channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(term / 6)
                {
                    let now = renewing.renew().unwrap_or_else(|error| {
                        tracing::warn!(%error, "cannot renew the lease on this node's name");
                        renewing.holds()
                    });
                    if now != held {
                        held = now;
                        metrics.fenced.store(!held, Ordering::Relaxed);
                        metrics.node_lease_held.store(u64::from(held), Ordering::Relaxed);
                        match held {
                            false => tracing::error!("this node lost the lease on its name: it acknowledges and commits nothing until it has it back, and another node may store its WAL copies"),
                            true => tracing::warn!("this node holds the lease on its name again"),
                        }
                    }
                    if !held {
                        stop_if_replaced(&renewing, &own_prefix, &own_holder);
                    }
                }
                if let Err(error) = renewing.lease().release() {
                    tracing::warn!(%error, "cannot release the lease on this node's name; it lapses");
                }
            })
            .map_err(ServerError::RetentionThread)?;
        Ok(Self {
            claim,
            stop,
            thread,
            _lock: lock,
        })
    }

    /// The fence of this node's table writers.
    pub(super) fn fence(&self) -> Arc<dyn Fence> {
        self.claim.clone()
    }

    /// Stops renewing and gives the lease up (after a clean stop, when the
    /// tables hold everything the WAL held).
    pub(super) fn release(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            tracing::warn!("the node lease thread panicked; the lease lapses");
        }
    }
}

/// Ends the process when another run of this node holds its lease (it was
/// started elsewhere while this one was cut off): it would number its WAL
/// entries as this one does. Nothing is lost: what this run acknowledged is
/// in its WAL and copies, and it acknowledged nothing since it lost the
/// lease; its vehicles reconnect to a node that runs.
fn stop_if_replaced(claim: &Claim, own_prefix: &str, own_holder: &str) {
    if let Ok(Some(holder)) = claim.lease().holder()
        && holder.starts_with(own_prefix)
        && holder != own_holder
        && !claim.holds()
    {
        tracing::error!(%holder, "another run of this node holds the lease on its name; stopping");
        std::process::exit(EXIT_REPLACED);
    }
}

/// The exit status of a node that found another run of itself.
const EXIT_REPLACED: i32 = 75;

/// Locks `dir` for this process, or refuses: two processes on one WAL.
fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    let dir_err = |source| ServerError::WalDir {
        path: dir.to_owned(),
        source,
    };
    fsio::create_dir_all(dir).map_err(dir_err)?;
    let file = fsio::private_options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(dir_err)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| ServerError::WalInUse {
            path: dir.to_owned(),
        },
    )?;
    Ok(file)
}

/// What the maintenance holder needs to store dead nodes' WAL copies.
pub(super) struct Takeover {
    config: Config,
    root: StoreRoot,
    copies: Copies,
    plane: Arc<ControlPlane>,
    metrics: Arc<Metrics>,
}

impl Takeover {
    pub(super) fn new(
        config: &Config,
        root: StoreRoot,
        copies: Copies,
        plane: Arc<ControlPlane>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config: config.clone(),
            root,
            copies,
            plane,
            metrics,
        }
    }

    /// When the oldest WAL copy in the store was written; when the store
    /// cannot say, as if at the dawn of time (no deletion request retires).
    pub(super) fn oldest_copy_ms(&self) -> i64 {
        match self.copies.oldest_ms() {
            Ok(oldest) => oldest.unwrap_or(i64::MAX),
            Err(error) => {
                tracing::warn!(%error, "cannot list the WAL copies; deletion requests stay active");
                i64::MIN
            }
        }
    }

    /// Stores the WAL copies of every node whose lease lapsed.
    pub(super) fn run(&self) {
        let nodes = match self.copies.nodes() {
            Ok(nodes) => nodes,
            Err(error) => {
                tracing::warn!(%error, "cannot list the nodes' WAL copies");
                return;
            }
        };
        for node in nodes.iter().filter(|n| **n != self.config.cluster.node_id) {
            let holder = format!("{STORING_FOR}{}", self.config.cluster.node_id);
            let term = Duration::from_secs(self.config.cluster.lease_secs);
            let claim = Arc::new(Claim::new(Lease::new(
                self.plane.clone(),
                &lease::node(node),
                &holder,
                term,
            )));
            match claim.renew() {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    tracing::warn!(%error, "cannot ask for a node's lease");
                    continue;
                }
            }
            match self.store_for(node, &claim) {
                Ok(0) => {}
                Ok(entries) => tracing::warn!(
                    %node,
                    entries,
                    "stored the WAL copies of a node whose lease lapsed"
                ),
                Err(error) => {
                    tracing::error!(%node, %error, "storing a dead node's WAL copies failed; will try again")
                }
            }
            if let Err(error) = claim.lease().release() {
                tracing::warn!(%error, "cannot release a dead node's lease; it lapses");
            }
        }
    }

    /// Stores what `node`'s copies hold and no table holds, as `node`;
    /// returns the number of entries the copies held.
    fn store_for(&self, node: &str, claim: &Arc<Claim>) -> Result<usize> {
        let copies = self.copies.of(node);
        let recovered = copies.read(self.config.wal.skip_corrupt)?;
        let entries = recovered.entry_count();
        if entries == 0 {
            copies.forget(&recovered)?;
            return Ok(0);
        }
        let mut config = self.config.clone();
        config.cluster.node_id = node.to_owned();
        let recovery = Recovery::of(&config, &self.root, recovered)?;
        let registry = Registry::load_from(config.storage.schema_dir.as_deref())?;
        let tracker = Arc::new(Tracker::default());
        let term = Duration::from_secs(self.config.cluster.lease_secs);
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            // The dead node's lease is renewed for as long as this runs: a
            // replay can wait on writers that wait on their commits.
            scope.spawn(|| {
                let mut renewed = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if renewed.elapsed() >= term / 6 {
                        renewed = Instant::now();
                        if let Err(error) = claim.renew() {
                            tracing::warn!(%error, "cannot renew a dead node's lease");
                        }
                    }
                }
            });
            let stored = self.replay_with(&config, &recovery, &registry, &tracker, claim, term);
            done.store(true, Ordering::Relaxed);
            stored
        })?;
        if tracker.pending_count() == 0 {
            copies.forget(&recovery.recovered)?;
        }
        Ok(entries)
    }

    /// Hands `recovery`'s entries to writers committing as the dead node
    /// and waits until every one has committed all and ended. Gives up,
    /// leaving them fenced, once the lease on that node's name was not held
    /// for a whole term (the node came back, or the control plane is gone).
    fn replay_with(
        &self,
        config: &Config,
        recovery: &Recovery,
        registry: &Registry,
        tracker: &Arc<Tracker>,
        claim: &Arc<Claim>,
        term: Duration,
    ) -> Result<()> {
        let writers = start_writers(
            config,
            &self.root,
            registry,
            &self.metrics,
            tracker,
            &mut Vec::new(),
            Some(claim.clone()),
        )?;
        recovery.replay(tracker, &writers.senders, &self.metrics);
        drop(writers.senders);
        let mut lost_since: Option<Instant> = None;
        while writers.handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
            if claim.holds() {
                lost_since = None;
            } else if lost_since.get_or_insert_with(Instant::now).elapsed() > term {
                return Err(ServerError::TakeoverAbandoned(
                    config.cluster.node_id.clone(),
                ));
            }
        }
        let panicked = writers
            .handles
            .into_iter()
            .map(std::thread::JoinHandle::join)
            .filter(Result::is_err)
            .count();
        if panicked > 0 {
            return Err(ServerError::Panicked("writer".into()));
        }
        Ok(())
    }
}
