//! Live access (Data Act Art. 4(1), 5(1)): a principal follows the rows of
//! its views as they become queryable, through exactly the views SQL uses.
//!
//! A follower task reads each table's Delta log every `access.live_poll_ms`
//! and publishes what it finds as [`Commits`]: each table at its newest
//! version, with, per WAL shard, the last entry that version holds (the
//! application transaction every writer commit records). Every stored row
//! carries the shard and entry that held it (`wal_app`, `wal_entry`), and a
//! shard's entries reach a table in order, so a subscriber's [`Position`]
//! (per table and shard, the last entry it was given) names exactly the
//! rows of any later version it has not seen: those with a higher entry.
//! For every new version the subscriber's policy session is built again, as
//! for a query, over that version's unseen rows only: a revoked grant, an
//! ended tenure, an erasure or a retention rule applies from the next
//! version on, and compaction or vacuum change nothing (rows keep their
//! columns). A client that comes back with the last position it saw gets
//! every row it missed that its view still holds, and none twice. The
//! follower reads the shared tables, not the pipeline, so every node that
//! reads the same store serves the same stream.
//!
//! A licensee's views are aggregates over whole hours; they are not offered
//! live (a stream of partial groups would not be k-anonymous).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::datasource::TableProvider;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

use super::policy::Treatment;
use super::registry::Principal;
use super::{AccessEnv, AccessError, Ending, Result, RunningQuery};
use crate::core::table::Table;
use crate::store::StoreRoot;
use crate::store::delta::{self, WAL_COLUMNS};

/// Longest position a client may send back.
const MAX_POSITION_BYTES: usize = 4096;

/// Where a subscriber stands: per table and WAL shard, the last entry whose
/// rows it was given. Written `table.shard=entry,…`, the SSE event id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(BTreeMap<(String, u16), i64>);

impl Position {
    /// A position as [`Position::encode`] wrote it; only tables of the
    /// store, shard numbers and entries are accepted.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |why: &str| AccessError::Invalid(format!("live position: {why}"));
        if text.len() > MAX_POSITION_BYTES {
            return Err(invalid("too long"));
        }
        let mut through = BTreeMap::new();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (key, entry) = part
                .split_once('=')
                .ok_or_else(|| invalid("expected table.shard=entry"))?;
            let (table, shard) = key
                .rsplit_once('.')
                .ok_or_else(|| invalid("expected table.shard=entry"))?;
            if !Table::all().any(|t| t.name() == table) {
                return Err(invalid("unknown table"));
            }
            let shard: u16 = shard.parse().map_err(|_| invalid("bad shard"))?;
            let entry: i64 = entry.parse().map_err(|_| invalid("bad entry"))?;
            if entry < 0 {
                return Err(invalid("bad entry"));
            }
            through.insert((table.to_owned(), shard), entry);
        }
        Ok(Self(through))
    }

    pub fn encode(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|((table, shard), entry)| format!("{table}.{shard}={entry}"))
            .collect();
        parts.join(",")
    }

    /// Where `commits` stand for `tables`: nothing of them unseen.
    fn at(commits: &Commits, tables: &[String]) -> Self {
        let mut position = Self::default();
        for table in tables {
            if let Some(committed) = commits.tables.get(table) {
                for (&shard, &entry) in &committed.through {
                    position.0.insert((table.clone(), shard), entry);
                }
            }
        }
        position
    }

    /// Takes `step`'s entries of `table`.
    fn take_table(&mut self, step: &Position, table: &str) {
        for ((t, shard), &entry) in &step.0 {
            if t == table {
                self.0.insert((t.clone(), *shard), entry);
            }
        }
    }

    fn seen(&self, table: &str, shard: u16) -> i64 {
        self.0
            .get(&(table.to_owned(), shard))
            .copied()
            .unwrap_or(-1)
    }

    /// Where this position stands after one more step through `commits`:
    /// per table and shard, at most [`CATCH_UP_ENTRIES`] entries further,
    /// so that a client far behind catches up in bounded steps.
    fn next_step(&self, commits: &Commits, tables: &[String]) -> Self {
        let mut next = self.clone();
        for table in tables {
            let Some(committed) = commits.tables.get(table) else {
                continue;
            };
            for (&shard, &through) in &committed.through {
                let seen = self.seen(table, shard);
                if seen < through {
                    let step = through.min(seen.saturating_add(CATCH_UP_ENTRIES));
                    next.0.insert((table.clone(), shard), step);
                }
            }
        }
        next
    }

    /// Whether `commits` hold rows of `tables` this position has not seen.
    fn behind(&self, commits: &Commits, tables: &[String]) -> bool {
        self.next_step(commits, tables) != *self
    }

    /// The rows of `table`, as `committed` holds it, that this position has
    /// not seen and `step` has, as SQL over the table's columns. Rows no
    /// shard committed (NULL `wal_app`: converted or appended outside a
    /// server) never are.
    fn unseen_sql(&self, step: &Position, table: &str, committed: &Committed) -> String {
        let (app, entry) = (WAL_COLUMNS[0], WAL_COLUMNS[1]);
        let windows: Vec<(u16, i64, i64)> = committed
            .through
            .keys()
            .map(|&shard| (shard, self.seen(table, shard), step.seen(table, shard)))
            .filter(|(_, seen, upto)| seen < upto)
            .collect();
        let (Some(lowest), Some(highest)) = (
            windows.iter().map(|w| w.1).min(),
            windows.iter().map(|w| w.2).max(),
        ) else {
            return "FALSE".to_owned();
        };
        let per_shard: Vec<String> = windows
            .iter()
            .map(|(shard, seen, upto)| {
                format!(
                    "({app} = '{}' AND {entry} > {seen} AND {entry} <= {upto})",
                    delta::wal_app_id(*shard),
                )
            })
            .collect();
        // The range alone lets the scan skip files by their statistics.
        format!(
            "{entry} > {lowest} AND {entry} <= {highest} AND ({})",
            per_shard.join(" OR ")
        )
    }
}

/// Most WAL entries per shard one step of a live stream covers: a client
/// that comes back far behind gets what it missed in steps this size,
/// each within the query memory bound, instead of in one answer.
const CATCH_UP_ENTRIES: i64 = 32;

/// One table as the follower last read it.
#[derive(Clone)]
struct Committed {
    table: DeltaTable,
    /// Per WAL shard, the last entry this version holds.
    through: BTreeMap<u16, i64>,
}

/// Every table as one reading of the logs found it.
#[derive(Clone, Default)]
pub struct Commits {
    tables: BTreeMap<String, Committed>,
    /// Whether the logs were read yet.
    read: bool,
}

/// The tables a live session reads: each at the version the follower
/// published, restricted to the rows the subscriber has not seen.
pub struct LiveTables<'a> {
    commits: &'a Commits,
    position: &'a Position,
    /// Where the position stands after this step.
    step: &'a Position,
    /// The tables followed; the others read as empty.
    followed: &'a [String],
}

impl LiveTables<'_> {
    /// Table `name` for the private session `files` (and `run`, which runs
    /// the plans): its unseen rows; `None` when it has no commit yet.
    pub(crate) async fn table(
        &self,
        name: &str,
        files: &SessionContext,
        run: &SessionContext,
    ) -> Result<Option<Arc<dyn TableProvider>>> {
        if !self.followed.iter().any(|t| t == name) {
            return Ok(None);
        }
        let Some(committed) = self.commits.tables.get(name) else {
            return Ok(None);
        };
        let provider = crate::query::provider(&committed.table, &[files, run]).await?;
        let committed_name = format!("{name}_committed");
        files.register_table(&committed_name, provider)?;
        let unseen = files
            .sql(&format!(
                "SELECT * FROM {committed_name} WHERE {}",
                self.position.unseen_sql(self.step, name, committed)
            ))
            .await?;
        Ok(Some(unseen.into_view()))
    }
}

/// The follower's channel, shared by every live stream of the process; the
/// follower runs while a stream listens.
#[derive(Default)]
pub(crate) struct Follower(Mutex<Option<watch::Sender<Arc<Commits>>>>);

impl Follower {
    /// A receiver of the follower's readings, starting the follower (on the
    /// caller's runtime) if none runs.
    fn subscribe(
        self: &Arc<Self>,
        store: &StoreRoot,
        shards: u16,
        every: Duration,
    ) -> watch::Receiver<Arc<Commits>> {
        let mut running = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = running.as_ref() {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(Arc::new(Commits::default()));
        *running = Some(sender.clone());
        tokio::spawn(follow(
            Arc::clone(self),
            sender,
            store.clone(),
            shards,
            every,
        ));
        receiver
    }
}

/// Reads every table's log each `every` and publishes each change, until
/// no stream listens.
async fn follow(
    follower: Arc<Follower>,
    sender: watch::Sender<Arc<Commits>>,
    store: StoreRoot,
    shards: u16,
    every: Duration,
) {
    let mut commits = Commits::default();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        {
            // Decided under the lock that `subscribe` takes: a stream
            // arriving now either finds this follower or starts another.
            let mut running = follower.0.lock().unwrap_or_else(|p| p.into_inner());
            if sender.receiver_count() == 0 {
                *running = None;
                return;
            }
        }
        let mut changed = !commits.read;
        for table in Table::all() {
            let name = table.name();
            match read(&store, name, shards, commits.tables.get(name)).await {
                Ok(Some(committed)) => {
                    commits.tables.insert(name.to_owned(), committed);
                    changed = true;
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(table = name, %error, "live: cannot read the log"),
            }
        }
        commits.read = true;
        if changed {
            sender.send_replace(Arc::new(commits.clone()));
        }
    }
}

/// Table `name` at its newest version if it is newer than `last`.
async fn read(
    store: &StoreRoot,
    name: &str,
    shards: u16,
    last: Option<&Committed>,
) -> crate::store::Result<Option<Committed>> {
    let table = match last {
        Some(last) => {
            let mut table = last.table.clone();
            if table.update_incremental(None).await.is_err() {
                // The log was cleaned up under it: read it again whole.
                match delta::open(store, name).await? {
                    Some(table) => table,
                    None => return Ok(None),
                }
            } else {
                table
            }
        }
        None => match delta::open(store, name).await? {
            Some(table) => table,
            None => return Ok(None),
        },
    };
    if last.is_some_and(|last| last.table.version() == table.version()) {
        return Ok(None);
    }
    let mut through = BTreeMap::new();
    for shard in 0..shards {
        if let Some(entry) = delta::stored_through(&table, shard).await? {
            through.insert(shard, i64::try_from(entry).unwrap_or(i64::MAX));
        }
    }
    Ok(Some(Committed { table, through }))
}

/// What a live stream hands its client.
#[derive(Debug)]
pub enum LiveEvent {
    /// The stream is open; nothing is delivered before this.
    Started {
        request_id: String,
        tables: Vec<String>,
        position: String,
    },
    /// Rows of `table` as JSON objects (`rows_json`, an array), and the
    /// position after them.
    Rows {
        table: String,
        rows_json: String,
        position: String,
    },
    /// New commits held nothing for this view; the position after them.
    Moved { position: String },
    /// The stream ends, and why.
    Ended { reason: String },
}

/// A live stream admitted for one principal, purpose and set of tables.
pub struct LiveStream {
    request_id: String,
    principal: Principal,
    purpose: String,
    tables: Vec<String>,
    treatments: String,
    position: Position,
    commits: watch::Receiver<Arc<Commits>>,
    rows: u64,
    _running: RunningQuery,
    _slot: OwnedSemaphorePermit,
}

/// Counts of the live streams open per principal.
pub(crate) type LiveCounts = Arc<Mutex<HashMap<String, u32>>>;

impl AccessEnv {
    /// Opens a live stream of `tables` for `principal` and `purpose`, from
    /// `from` (a position a stream of theirs handed out) or from now.
    /// Refused like a query would be (unknown purpose, a hidden table), and
    /// for a licensee's aggregates; audited as `live`.
    pub async fn open_live(
        &self,
        principal: &Principal,
        purpose: &str,
        tables: &[String],
        from: Option<&str>,
        now_ms: i64,
    ) -> Result<LiveStream> {
        let request_id = super::request_id();
        let opened = self
            .admit_live(principal, purpose, tables, from, now_ms)
            .await;
        let decision = opened
            .as_ref()
            .map(|(_, treatments, ..)| treatments.clone());
        self.audit(
            &request_id,
            principal,
            purpose,
            "live",
            tables,
            decision,
            None,
            now_ms,
        )?;
        let (position, treatments, commits, running, slot) = opened?;
        Ok(LiveStream {
            request_id,
            principal: principal.clone(),
            purpose: purpose.to_owned(),
            tables: tables.to_vec(),
            treatments,
            position,
            commits,
            rows: 0,
            _running: running,
            _slot: slot,
        })
    }

    #[allow(clippy::type_complexity)]
    async fn admit_live(
        &self,
        principal: &Principal,
        purpose: &str,
        tables: &[String],
        from: Option<&str>,
        now_ms: i64,
    ) -> Result<(
        Position,
        String,
        watch::Receiver<Arc<Commits>>,
        RunningQuery,
        OwnedSemaphorePermit,
    )> {
        if tables.is_empty() {
            return Err(AccessError::Invalid(
                "name the tables to follow: ?tables=charging,diagnostics".into(),
            ));
        }
        for table in tables {
            if !Table::all().any(|t| t.name() == table) {
                return Err(AccessError::Invalid(format!(
                    "live access follows the stored tables; `{table}` is none"
                )));
            }
        }
        let from = from.map(Position::parse).transpose()?;
        let running = RunningQuery::start_as(
            &self.live_running,
            &principal.id,
            self.settings.max_live_per_principal,
            "live streams",
            "access.max_live_per_principal",
        )?;
        let most = self.settings.max_live_streams;
        let slot = Arc::clone(&self.live_slots)
            .try_acquire_owned()
            .map_err(|_| {
                AccessError::Limit(if most == 0 {
                    "live access is off here (access.max_live_streams = 0)".to_owned()
                } else {
                    format!(
                        "{most} live streams are open, the most this server serves \
                         (access.max_live_streams)"
                    )
                })
            })?;
        // The views as they stand now decide admission, as for a query.
        let session = self
            .bounded(self.session(principal, purpose, now_ms, 1))
            .await?;
        let mut treatments = Vec::new();
        for table in tables {
            if let Some(reason) = session.hidden.get(table) {
                return Err(AccessError::Refused(format!("table {table}: {reason}")));
            }
            let treatment = session.treatments.get(table).copied();
            if treatment == Some(Treatment::Aggregate) {
                return Err(AccessError::Refused(format!(
                    "table {table}: a licensee's aggregates cover whole hours and are not \
                     offered live; query them with SQL once an hour has closed"
                )));
            }
            treatments.push(format!(
                "{table}:{}",
                treatment.map_or("allow", Treatment::name)
            ));
        }
        let mut commits = self.follower.subscribe(
            &self.store,
            self.wal_shards,
            Duration::from_millis(self.settings.live_poll_ms),
        );
        commits
            .wait_for(|c| c.read)
            .await
            .map_err(|_| AccessError::Invalid("the live follower stopped".into()))?;
        let position = match from {
            Some(position) => position,
            None => Position::at(&commits.borrow_and_update(), tables),
        };
        Ok((position, treatments.join(","), commits, running, slot))
    }

    /// Runs `stream` until its client goes (`events` closes), its policy
    /// ends it, or it fails; then audits the rows it delivered (`delivered`).
    pub async fn run_live(&self, mut stream: LiveStream, events: mpsc::Sender<LiveEvent>) {
        let started = LiveEvent::Started {
            request_id: stream.request_id.clone(),
            tables: stream.tables.clone(),
            position: stream.position.encode(),
        };
        let ending = if events.send(started).await.is_err() {
            Ending::ClientGone
        } else {
            self.deliver(&mut stream, &events).await
        };
        // A live stream has no last row: the client leaving is how it ends.
        let ending = match ending {
            Ending::ClientGone => Ending::Complete,
            other => other,
        };
        if let Ending::Failed(e) = &ending {
            let reason = match e {
                AccessError::Refused(reason) => reason.clone(),
                AccessError::Limit(_) | AccessError::Invalid(_) | AccessError::UnknownPrincipal => {
                    e.to_string()
                }
                other => {
                    tracing::error!(error = %other, "live stream failed");
                    "the live stream failed; reconnect with the last position".to_owned()
                }
            };
            let _ = events.send(LiveEvent::Ended { reason }).await;
        }
        let outcome = super::ending_outcome(ending, &stream.treatments);
        if let Err(error) = self.audit(
            &stream.request_id,
            &stream.principal,
            &stream.purpose,
            "delivered",
            &stream.tables,
            outcome.as_ref().map(String::clone),
            Some(stream.rows),
            crate::core::clock::now_ms(),
        ) {
            tracing::error!(%error, "live stream: audit");
        }
    }

    /// Hands `stream` the unseen rows of every new version until it ends.
    async fn deliver(&self, stream: &mut LiveStream, events: &mpsc::Sender<LiveEvent>) -> Ending {
        // A resumed stream may be behind the commits already read.
        let mut commits = Arc::clone(&stream.commits.borrow_and_update());
        loop {
            if !stream.position.behind(&commits, &stream.tables) {
                tokio::select! {
                    () = events.closed() => return Ending::ClientGone,
                    changed = stream.commits.changed() => {
                        if changed.is_err() {
                            return Ending::Abandoned;
                        }
                    }
                }
                commits = Arc::clone(&stream.commits.borrow_and_update());
                continue;
            }
            let step = stream.position.next_step(&commits, &stream.tables);
            let now_ms = crate::core::clock::now_ms();
            let unseen = match self
                .bounded(self.unseen_rows(stream, &commits, &step, now_ms))
                .await
            {
                Ok(unseen) => unseen,
                Err(e) => return Ending::Failed(e),
            };
            let mut sent_rows = false;
            for (table, rows, json) in unseen {
                stream.position.take_table(&step, &table);
                if rows == 0 {
                    continue;
                }
                stream.rows += rows;
                sent_rows = true;
                let event = LiveEvent::Rows {
                    table,
                    rows_json: json,
                    position: stream.position.encode(),
                };
                if events.send(event).await.is_err() {
                    return Ending::ClientGone;
                }
            }
            if !sent_rows {
                let position = stream.position.encode();
                if events.send(LiveEvent::Moved { position }).await.is_err() {
                    return Ending::ClientGone;
                }
            }
        }
    }

    /// Per followed table: the rows of `commits` the stream has not seen
    /// and `step` has, through the principal's views as they stand at
    /// `now_ms`, as JSON.
    async fn unseen_rows(
        &self,
        stream: &LiveStream,
        commits: &Commits,
        step: &Position,
        now_ms: i64,
    ) -> Result<Vec<(String, u64, String)>> {
        // Removed principals and revoked tokens end the stream here.
        let principal = self.principal(&stream.principal.id)?;
        let live = LiveTables {
            commits,
            position: &stream.position,
            step,
            followed: &stream.tables,
        };
        let memory_mb = self.settings.query_memory_mb;
        let session = self
            .session_with(&principal, &stream.purpose, now_ms, memory_mb, Some(&live))
            .await?;
        let pool = Arc::clone(&session.ctx.runtime_env().memory_pool);
        let mut unseen = Vec::new();
        for table in &stream.tables {
            if let Some(reason) = session.hidden.get(table) {
                return Err(AccessError::Refused(format!("table {table}: {reason}")));
            }
            let df = session.ctx.sql(&format!("SELECT * FROM {table}")).await?;
            let (_, batches) = super::collect_bounded(df, &pool, principal.kind, memory_mb).await?;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            let json = crate::query::format(&batches, crate::query::OutputFormat::Json)?;
            unseen.push((table.clone(), rows as u64, json));
        }
        Ok(unseen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_as_written_and_nothing_else_is_taken() {
        let text = "charging.0=12,charging.1=7,diagnostics.0=3";
        let position = Position::parse(text).expect("valid");
        assert_eq!(position.encode(), text);
        assert_eq!(Position::parse("").expect("empty"), Position::default());
        for bad in [
            "charging=1",
            "charging.0",
            "secrets.0=1",
            "charging.x=1",
            "charging.0=-1",
            "charging.70000=1",
            "charging.0=1;DROP",
        ] {
            assert!(Position::parse(bad).is_err(), "{bad}");
        }
        assert!(Position::parse(&"charging.0=1,".repeat(400)).is_err());
    }
}
