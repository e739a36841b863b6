//! Live access (Data Act Art. 4(1), 5(1)): a principal follows the rows of
//! its views as they become queryable, through exactly the views SQL uses.
//!
//! A follower task reads each table's Delta log every `access.live_poll_ms`
//! and publishes what it finds as [`Commits`]: each table at its newest
//! version, with, per WAL shard, the last entry that version holds (the
//! application transaction every writer commit records, read from each new
//! commit). Every stored row carries the shard and entry that held it
//! (`wal_app`, `wal_entry`), and a shard's entries reach a table in order,
//! so a subscriber's [`Position`] (per table and shard, the last entry it
//! was given) names exactly the rows of any later version it has not seen:
//! those with a higher entry. A shard is named by its application id, which
//! names its node: in a cluster a stream follows every node's shards (this
//! node's from the start, another's from the first commit of it the
//! follower reads), so it sees the rows of vehicles on other nodes too, and
//! its position is good on any node. For every step the subscriber's policy
//! session is built again, as for a query, over the newest version's unseen
//! rows only: a revoked grant, an ended tenure, an erasure, a deletion
//! request or a retention rule applies from the next step on, and rows
//! keep their columns through compaction. The unseen rows of a window are
//! scanned once per reading for all the streams whose steps read that
//! window (streams that keep up do), and each applies its own views to
//! them. A client that comes back with
//! the last position it saw gets every row it missed that its view still
//! holds, and none twice, in steps of bounded size; a position too far
//! behind is refused (SQL reads history). Positions are sealed (encrypted
//! and authenticated under a key derived from the root key, bound to the
//! principal): they say nothing about other vehicles' activity, cannot be
//! forged, and survive a restart. The follower reads the shared tables,
//! not the pipeline.
//!
//! A licensee's views are aggregates over whole hours, k-anonymous only
//! whole: a licensee's stream gets each hour's aggregates once the hour
//! has closed ([`HOUR_GRACE_MS`] after its end), never a partial group.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use datafusion::datasource::{MemTable, TableProvider};
use datafusion::execution::memory_pool::{
    GreedyMemoryPool, MemoryConsumer, MemoryPool, MemoryReservation,
};
use datafusion::prelude::{DataFrame, SessionContext};
use deltalake::DeltaTable;
use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio_util::task::TaskTracker;

use super::policy::Treatment;
use super::registry::{Principal, PrincipalKind};
use super::{AccessEnv, AccessError, Ending, Result, RunningQuery};
use crate::core::table::Table;
use crate::privacy::pseudo::Secret;
use crate::store::StoreRoot;
use crate::store::delta::{self, NodeShards, WAL_COLUMNS};

/// Longest sealed position a client may send back.
const MAX_POSITION_BYTES: usize = 16 * 1024;
/// Most WAL entries per shard one step covers. A shard appends an entry
/// per table and hour for every group commit, a thousand a second and more
/// under load, so a step must span many: one step costs a policy session
/// and a plan whatever its rows.
const MAX_STEP_ENTRIES: i64 = 8192;
/// WAL entries per shard of a stream's first step: a client that resumes
/// far behind starts small, and its steps grow from there.
const FIRST_STEP_ENTRIES: i64 = 128;
/// Rows a step aims to hand over: a step that handed over more halves the
/// next one's entries, one that handed over fewer than a quarter of this
/// doubles them, so a client that comes back behind gets what it missed in
/// answers of about this size, and one that keeps up in one step per commit.
const STEP_ROWS: u64 = 20_000;
/// Most WAL entries a position may be behind on any shard to be resumed:
/// beyond this, what was missed is read with SQL (`received_at`).
const MAX_BEHIND_ENTRIES: i64 = 8 * MAX_STEP_ENTRIES;
/// How often a stream with nothing to deliver tells its client where it
/// stands (a position event): on a clock, whatever the commits, whose
/// timing would tell other vehicles' activity.
const POSITION_EVERY: Duration = Duration::from_secs(10);
/// Nonce of a sealed position.
const NONCE_BYTES: usize = 12;
/// An hour of a licensee's aggregates is delivered once it ended this long
/// ago: records that arrive later (a vehicle offline) count in SQL only.
const HOUR_GRACE_MS: i64 = 5 * 60 * 1000;
const HOUR_MS: i64 = 3_600_000;
/// Most closed hours a resumed aggregate stream catches up.
const MAX_BEHIND_HOURS: i64 = 24;
/// The key under which a position holds, for a table of hourly aggregates,
/// the start of the last hour delivered (no shard's application id is empty).
const HOURS: &str = "";
/// Longest application id a position holds (`fleetgate-wal-<node>-<shard>`).
const MAX_APP_BYTES: usize = 255;

/// What a sealed position is bound to: its format and its principal, so
/// that a position of another principal, or of the earlier format (shards
/// by number), is refused, never misread.
fn position_aad(principal: &str) -> Vec<u8> {
    [
        b"fleetgate-live-position-v2\0".as_slice(),
        principal.as_bytes(),
    ]
    .concat()
}

/// Where a subscriber stands: per table and WAL shard (by its application
/// id), the last entry whose rows it was given. Handed to the client
/// sealed, as the SSE event id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(BTreeMap<(Table, String), i64>);

impl Position {
    /// The position sealed for `principal` under `key`: an opaque token.
    fn seal(&self, key: &Secret, principal: &str) -> String {
        let mut plain = Vec::with_capacity(self.0.len() * 40);
        for ((table, app), &entry) in &self.0 {
            let app = &app.as_bytes()[..app.len().min(MAX_APP_BYTES)];
            plain.push(table.index() as u8);
            plain.push(app.len() as u8);
            plain.extend_from_slice(app);
            plain.extend_from_slice(&entry.to_le_bytes());
        }
        let mut nonce = [0u8; NONCE_BYTES];
        if getrandom::fill(&mut nonce).is_err() {
            // The clock stands in: a nonce must only never repeat under this key.
            let now = crate::core::clock::now_ms().to_le_bytes();
            nonce[..8].copy_from_slice(&now);
        }
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&key.0));
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &position_aad(principal),
                },
            )
            .unwrap_or_default();
        hex::encode([nonce.as_slice(), &sealed].concat())
    }

    /// A position [`Position::seal`] gave `principal`; anything else is refused.
    fn unseal(text: &str, key: &Secret, principal: &str) -> Result<Self> {
        let invalid = || {
            AccessError::Invalid(
                "live position: not one this server gave this principal; follow from now".into(),
            )
        };
        if text.len() > MAX_POSITION_BYTES {
            return Err(invalid());
        }
        let bytes = hex::decode(text).map_err(|_| invalid())?;
        if bytes.len() < NONCE_BYTES {
            return Err(invalid());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_BYTES);
        let plain = ChaCha20Poly1305::new(Key::from_slice(&key.0))
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &position_aad(principal),
                },
            )
            .map_err(|_| invalid())?;
        let mut through = BTreeMap::new();
        let mut rest = plain.as_slice();
        while let [table, len, after @ ..] = rest {
            let table = Table::from_index(usize::from(*table)).ok_or_else(invalid)?;
            let len = usize::from(*len);
            if after.len() < len + 8 {
                return Err(invalid());
            }
            let (app, after) = after.split_at(len);
            let (entry, after) = after.split_at(8);
            let app = std::str::from_utf8(app).map_err(|_| invalid())?;
            let entry = i64::from_le_bytes(<[u8; 8]>::try_from(entry).map_err(|_| invalid())?);
            through.insert((table, app.to_owned()), entry);
            rest = after;
        }
        if !rest.is_empty() {
            return Err(invalid());
        }
        Ok(Self(through))
    }

    /// Where `commits` stand for `tables`: nothing of them unseen.
    fn at(commits: &Commits, tables: &[Table]) -> Self {
        let mut position = Self::default();
        position.start_missing(commits, tables);
        position
    }

    /// Tables of `tables` this position has nothing of (a resumed position
    /// that followed fewer) start where `commits` stand: from now. Every
    /// shard of this node that has not committed to the table yet is
    /// recorded as having nothing seen, so that the position names the
    /// table even before its first commit: resumed, it reads what came
    /// since, rather than looking like a table it never followed.
    fn start_missing(&mut self, commits: &Commits, tables: &[Table]) {
        for &table in tables {
            if self.0.keys().any(|(t, _)| *t == table) {
                continue;
            }
            if let Some(committed) = commits.tables.get(&table) {
                for (app, &entry) in &committed.through {
                    self.0.insert((table, app.clone()), entry);
                }
            }
            for shard in 0..commits.shards.count {
                self.0
                    .entry((table, commits.shards.app(shard)))
                    .or_insert(-1);
            }
        }
    }

    /// The last entry of `shard` in `table` this position has seen: its
    /// own, or, for a shard the follower learned of after this position
    /// was made, where the shard stood then.
    fn seen(&self, table: Table, app: &str, committed: &Committed) -> i64 {
        self.0
            .get(&(table, app.to_owned()))
            .or_else(|| committed.learned_at.get(app))
            .copied()
            .unwrap_or(-1)
    }

    /// Where this position stands after one more step of at most `size`
    /// entries per table and shard through `commits`.
    fn next_step(&self, commits: &Commits, tables: &[Table], size: i64) -> Self {
        let mut next = self.clone();
        for &table in tables {
            let Some(committed) = commits.tables.get(&table) else {
                continue;
            };
            for (app, &through) in &committed.through {
                let seen = self.seen(table, app, committed);
                if seen < through {
                    let step = through.min(seen.saturating_add(size));
                    next.0.insert((table, app.clone()), step);
                }
            }
        }
        next
    }

    /// Whether `commits` hold rows of `tables` this position has not seen.
    fn behind(&self, commits: &Commits, tables: &[Table]) -> bool {
        self.next_step(commits, tables, 1) != *self
    }

    /// The table and the entries it is furthest behind `commits` by.
    fn lag(&self, commits: &Commits, tables: &[Table]) -> Option<(Table, i64)> {
        tables
            .iter()
            .filter_map(|&table| {
                let committed = commits.tables.get(&table)?;
                committed
                    .through
                    .iter()
                    .map(|(app, &through)| through - self.seen(table, app, committed))
                    .max()
                    .map(|lag| (table, lag))
            })
            .max_by_key(|(_, lag)| *lag)
    }

    /// The start of the last hour of `table`'s aggregates delivered.
    fn last_hour(&self, table: Table) -> Option<i64> {
        self.0.get(&(table, HOURS.to_owned())).copied()
    }

    fn set_last_hour(&mut self, table: Table, start_ms: i64) {
        self.0.insert((table, HOURS.to_owned()), start_ms);
    }

    /// Takes `step`'s entries of `table`.
    fn take_table(&mut self, step: &Position, table: Table) {
        for ((t, app), &entry) in &step.0 {
            if *t == table {
                self.0.insert((*t, app.clone()), entry);
            }
        }
    }

    /// The rows of `table`, as `committed` holds it, that this position has
    /// not seen and `step` has, as SQL over the table's columns. Rows no
    /// shard committed (NULL `wal_app`: converted or appended outside a
    /// server) never are.
    fn unseen_sql(&self, step: &Position, table: Table, committed: &Committed) -> String {
        let (app, entry) = (WAL_COLUMNS[0], WAL_COLUMNS[1]);
        let windows: Vec<(&str, i64, i64)> = committed
            .through
            .keys()
            .map(|shard| {
                (
                    shard.as_str(),
                    self.seen(table, shard, committed),
                    step.seen(table, shard, committed),
                )
            })
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
                format!("({app} = '{shard}' AND {entry} > {seen} AND {entry} <= {upto})")
            })
            .collect();
        // The range alone lets the scan skip files by their statistics.
        format!(
            "{entry} > {lowest} AND {entry} <= {highest} AND ({})",
            per_shard.join(" OR ")
        )
    }
}

/// One table as the follower last read it.
#[derive(Clone)]
struct Committed {
    table: DeltaTable,
    /// Per WAL shard (application id), the last entry this version holds.
    through: BTreeMap<String, i64>,
    /// Shards the follower learned of from a commit after it first read
    /// the table, with the last entry they held before that commit.
    learned_at: BTreeMap<String, i64>,
}

/// Every table as one reading of the logs found it.
#[derive(Clone, Default)]
pub struct Commits {
    /// This node's WAL shards, followed from the first reading; other
    /// nodes' from their first commit read.
    shards: NodeShards,
    tables: BTreeMap<Table, Committed>,
    /// Whether every table's log was read once.
    read: bool,
    /// The unseen rows the streams of this reading have read, each once.
    scans: SharedScans,
    /// The JSON the streams of this reading were handed, each text made once.
    answers: SharedAnswers,
}

/// The rows of a table's version in a window of WAL entries (a step's
/// `unseen_sql`), read once per reading for every stream whose step reads
/// the same window: streams that keep up read the same windows, and each
/// would otherwise plan and scan the table on its own. Raw stored rows, as
/// the Delta scan gives them; every stream applies its own principal's
/// views to them. A new reading starts empty, so a deletion committed
/// since is in the next step's rows. The windows of one reading hold at
/// most the query memory bound together (a stream catching up alone steps
/// through many); a window that does not fit is not shared: each stream
/// then reads it through its own views as before, so that whether a step
/// fits in memory never depends on rows the principal cannot see.
#[derive(Clone, Default)]
struct SharedScans {
    cells: Arc<Mutex<HashMap<Window, Arc<ScanCell>>>>,
    /// What the reading's windows hold, made with the first.
    pool: Arc<std::sync::OnceLock<Arc<dyn MemoryPool>>>,
}

/// A table and a window of its WAL entries (a step's `unseen_sql`).
type Window = (Table, String);
/// One window's rows, read by the first step that needs them; `None` when
/// they were too many to hold.
type ScanCell = tokio::sync::OnceCell<Option<HeldRows>>;

/// A window's rows and their memory, counted in the reading's pool while
/// they are held.
struct HeldRows {
    rows: Arc<MemTable>,
    _memory: MemoryReservation,
}

impl SharedScans {
    /// The cell of `table`'s rows in `window`, filled by the first step
    /// that reads it.
    fn cell(&self, table: Table, window: &str) -> Arc<ScanCell> {
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(cells.entry((table, window.to_owned())).or_default())
    }

    /// The pool the reading's windows are held in: `memory_mb` in all.
    fn pool(&self, memory_mb: u32) -> Arc<dyn MemoryPool> {
        Arc::clone(self.pool.get_or_init(|| {
            Arc::new(GreedyMemoryPool::new((memory_mb as usize) << 20)) as Arc<dyn MemoryPool>
        }))
    }
}

/// The JSON of rows the streams of one reading were handed, per table,
/// window and [`Audience`]: a stream whose views give rows equal, value for
/// value and column for column, to rows already put into JSON for the same
/// audience gets that text rather than encoding its own, so streams that
/// see the same rows (an operator's dashboards, a fleet of operator
/// followers) pay for the encoding once. Since the rows are compared, a
/// stream gets exactly the text it would have made. The rows are kept
/// beside their text for that, as long as the reading, within
/// [`MOST_ANSWER_BYTES`] per audience: whether an answer is kept depends on
/// nothing outside its audience either.
#[derive(Clone, Default)]
struct SharedAnswers(Arc<Mutex<KeptAnswers>>);

/// Whose views a text was made through, apart from the moment: a stream
/// quicker for a text already made learns only that a stream entitled to
/// the same rows saw the same ones, never anything about rows its views
/// hide.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Audience {
    /// Every operator's views are the same for a purpose.
    Operators { purpose: String },
    /// Anyone else's are their own.
    Principal { id: String, purpose: String },
}

impl Audience {
    fn of(principal: &Principal, purpose: &str) -> Self {
        match principal.kind {
            PrincipalKind::Operator => Self::Operators {
                purpose: purpose.to_owned(),
            },
            PrincipalKind::User | PrincipalKind::ThirdParty | PrincipalKind::Licensee => {
                Self::Principal {
                    id: principal.id.clone(),
                    purpose: purpose.to_owned(),
                }
            }
        }
    }
}

#[derive(Default)]
struct KeptAnswers {
    answers: HashMap<(Window, Audience), Vec<Arc<Answer>>>,
    /// Per audience: the Arrow memory of the rows kept and the length of
    /// their texts.
    bytes: HashMap<Audience, usize>,
}

/// Rows, and their JSON once the first stream that needs it made it.
struct Answer {
    rows: Vec<RecordBatch>,
    json: tokio::sync::OnceCell<Arc<str>>,
}

/// Most distinct answers kept per window and audience; streams whose rows
/// match none of them encode their own.
const MOST_ANSWERS_PER_WINDOW: usize = 4;
/// Most bytes one reading keeps for one audience's answers (rows and
/// texts); an answer that would pass it is not kept.
const MOST_ANSWER_BYTES: usize = 64 << 20;

impl SharedAnswers {
    /// `rows` of `table` in `window`, for `audience`, as a JSON array: made
    /// once per reading for equal rows.
    async fn json(
        &self,
        table: Table,
        window: &str,
        audience: Audience,
        rows: Vec<RecordBatch>,
    ) -> Result<Arc<str>> {
        let key = ((table, window.to_owned()), audience);
        let known = self.lock().answers.get(&key).cloned().unwrap_or_default();
        // Compared outside the lock: every step of the reading takes it.
        let (answer, rows_size) = match known.into_iter().find(|a| a.rows == rows) {
            Some(answer) => (answer, None),
            None => {
                let answer = Arc::new(Answer {
                    rows,
                    json: tokio::sync::OnceCell::new(),
                });
                let size: usize = answer.rows.iter().map(|b| b.get_array_memory_size()).sum();
                let kept = self.keep(&key, &answer, size);
                (answer, kept.then_some(size))
            }
        };
        let json = answer
            .json
            .get_or_try_init(|| async {
                let text = crate::query::format(&answer.rows, crate::query::OutputFormat::Json)?;
                Ok::<_, AccessError>(Arc::<str>::from(text))
            })
            .await;
        if let Some(rows_size) = rows_size {
            // Its text counts too; an answer whose text does not fit (or
            // could not be made) is let go.
            let text_size = json.as_ref().map_or(usize::MAX, |text| text.len());
            self.count_text(&key, &answer, rows_size, text_size);
        }
        Ok(Arc::clone(json?))
    }

    /// Keeps `answer` (of `size` bytes of rows) under `key` if another
    /// stream of the audience asked for the window before (a stream alone
    /// in its window, catching up, keeps nothing) and the window and
    /// audience have room.
    fn keep(&self, key: &(Window, Audience), answer: &Arc<Answer>, size: usize) -> bool {
        let mut shared = self.lock();
        let used = shared.bytes.get(&key.1).copied().unwrap_or(0);
        let Some(kept) = shared.answers.get_mut(key) else {
            shared.answers.insert(key.clone(), Vec::new());
            return false;
        };
        if used + size > MOST_ANSWER_BYTES || kept.len() >= MOST_ANSWERS_PER_WINDOW {
            return false;
        }
        kept.push(Arc::clone(answer));
        *shared.bytes.entry(key.1.clone()).or_default() += size;
        true
    }

    /// Counts the text of a kept `answer`, or lets the answer go if that
    /// passes its audience's bytes.
    fn count_text(&self, key: &(Window, Audience), answer: &Arc<Answer>, rows: usize, text: usize) {
        let mut shared = self.lock();
        let used = shared.bytes.get(&key.1).copied().unwrap_or(0);
        if used.saturating_add(text) <= MOST_ANSWER_BYTES {
            *shared.bytes.entry(key.1.clone()).or_default() += text;
            return;
        }
        if let Some(list) = shared.answers.get_mut(key) {
            list.retain(|kept| !Arc::ptr_eq(kept, answer));
        }
        if let Some(used) = shared.bytes.get_mut(&key.1) {
            *used = used.saturating_sub(rows);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeptAnswers> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The tables a live session reads: each at the version the follower
/// published, restricted to the rows the subscriber has not seen.
pub struct LiveTables<'a> {
    commits: &'a Commits,
    position: &'a Position,
    /// Where the position stands after this step.
    step: &'a Position,
    /// The tables followed; the session has no other.
    followed: &'a [Table],
    /// Who reads, and the memory bound of a scan made for them.
    kind: PrincipalKind,
    memory_mb: u32,
}

impl LiveTables<'_> {
    /// Whether the step reads table `name`; a live session has no other.
    pub(crate) fn follows(&self, name: &str) -> bool {
        self.followed.iter().any(|t| t.name() == name)
    }

    /// Table `name` for the private session `files` (and `run`, which runs
    /// the plans): its unseen rows; `None` when it has no commit yet, or is
    /// not followed.
    pub(crate) async fn table(
        &self,
        name: &str,
        files: &SessionContext,
        run: &SessionContext,
    ) -> Result<Option<Arc<dyn TableProvider>>> {
        let Some(table) = self.followed.iter().find(|t| t.name() == name).copied() else {
            return Ok(None);
        };
        let Some(committed) = self.commits.tables.get(&table) else {
            return Ok(None);
        };
        let window = self.position.unseen_sql(self.step, table, committed);
        let unseen = || async {
            let provider = crate::query::provider(&committed.table, &[files, run]).await?;
            let committed_name = format!("{name}_committed");
            // Read twice when the window is too large to share.
            files.deregister_table(&committed_name)?;
            files.register_table(&committed_name, provider)?;
            files
                .sql(&format!("SELECT * FROM {committed_name} WHERE {window}"))
                .await
                .map_err(AccessError::from)
        };
        let cell = self.commits.scans.cell(table, &window);
        let shared = cell
            .get_or_try_init(|| async {
                let pool = self.commits.scans.pool(self.memory_mb);
                shared_rows(unseen().await?, &pool, self.kind, self.memory_mb).await
            })
            .await?;
        Ok(Some(match shared {
            Some(held) => Arc::clone(&held.rows) as Arc<dyn TableProvider>,
            // Too many to share: this stream's own views read the window.
            None => unseen().await?.into_view(),
        }))
    }
}

/// The rows of `window` (a scan of one table's unseen rows) to share among
/// the streams of a reading, held in `pool`; `None` when they do not fit.
async fn shared_rows(
    window: DataFrame,
    pool: &Arc<dyn MemoryPool>,
    kind: PrincipalKind,
    memory_mb: u32,
) -> Result<Option<HeldRows>> {
    let running = |e| super::limits::running_error(kind, e, memory_mb);
    let memory = MemoryConsumer::new("fleetgate live window").register(pool);
    let mut stream = window.execute_stream().await.map_err(running)?;
    let schema = stream.schema();
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(running)?;
        if memory.try_grow(batch.get_array_memory_size()).is_err() {
            return Ok(None);
        }
        batches.push(batch);
    }
    Ok(Some(HeldRows {
        rows: Arc::new(MemTable::try_new(schema, vec![batches])?),
        _memory: memory,
    }))
}

/// The follower of the process: a template receiver of its readings while
/// it runs, shared by every live stream.
#[derive(Default)]
pub(crate) struct Follower(Mutex<Option<watch::Receiver<Arc<Commits>>>>);

impl Follower {
    /// A receiver of the follower's readings, starting the follower (on the
    /// caller's runtime, tracked in `tasks`) if none runs, or if the last
    /// one ended.
    fn subscribe(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        store: &StoreRoot,
        shards: &NodeShards,
        every: Duration,
    ) -> watch::Receiver<Arc<Commits>> {
        let mut running = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(template) = running.as_ref()
            && template.has_changed().is_ok()
        {
            return template.clone();
        }
        let (sender, receiver) = watch::channel(Arc::new(Commits::default()));
        *running = Some(receiver.clone());
        tasks.spawn(follow(
            Arc::clone(self),
            sender,
            store.clone(),
            shards.clone(),
            every,
        ));
        receiver
    }
}

/// Reads every table's log each `every` and publishes each change, until
/// no stream listens (only the template receiver is left). If it ends any
/// other way, every stream's receiver sees it.
async fn follow(
    follower: Arc<Follower>,
    sender: watch::Sender<Arc<Commits>>,
    store: StoreRoot,
    shards: NodeShards,
    every: Duration,
) {
    let mut commits = Commits {
        shards,
        ..Commits::default()
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        {
            // Decided under the lock that `subscribe` takes: a stream
            // arriving now either finds this follower or starts another.
            let mut running = follower.0.lock().unwrap_or_else(|p| p.into_inner());
            if sender.receiver_count() <= 1 {
                *running = None;
                return;
            }
        }
        let mut changed = false;
        let mut all_read = true;
        for table in Table::all() {
            let last = commits.tables.get(&table);
            // delta-rs has panicked on odd logs: one table's reading must
            // not end every stream.
            let appeared = commits.read;
            let reading =
                std::panic::AssertUnwindSafe(read(&store, table, &commits.shards, last, appeared));
            match reading.catch_unwind().await {
                Ok(Ok(Some(committed))) => {
                    commits.tables.insert(table, committed);
                    changed = true;
                }
                Ok(Ok(None)) => {}
                Ok(Err(error)) => {
                    all_read = false;
                    tracing::warn!(table = table.name(), %error, "live: cannot read the log");
                }
                Err(_panic) => {
                    all_read = false;
                    tracing::error!(table = table.name(), "live: reading the log panicked");
                }
            }
        }
        // Streams start once every table was read: a table missing from
        // the first reading would later look wholly new to them.
        if all_read && !commits.read {
            commits.read = true;
            changed = true;
        }
        if changed && commits.read {
            sender.send_replace(Arc::new(Commits {
                scans: SharedScans::default(),
                answers: SharedAnswers::default(),
                ..commits.clone()
            }));
        }
    }
}

/// Most commits of a table that appeared while streams follow read to
/// learn its shards; an older table's other nodes are learned as they commit.
const MAX_FIRST_COMMITS: u64 = 1_000;

/// Table `table` at its newest version if it is newer than `last`. A table
/// read for the first time has this node's shards; one that `appeared`
/// since a complete reading (created while streams follow) has every node's
/// shards in its first commits, all of it news.
async fn read(
    store: &StoreRoot,
    table: Table,
    shards: &NodeShards,
    last: Option<&Committed>,
    appeared: bool,
) -> crate::store::Result<Option<Committed>> {
    let Some(last) = last else {
        let Some(opened) = delta::open(store, table.name()).await? else {
            return Ok(None);
        };
        let own = (0..shards.count).map(|shard| shards.app(shard));
        let mut through = through_of(&opened, own).await?;
        let mut learned_at = BTreeMap::new();
        if appeared && let Some(to) = opened.version() {
            for version in 0..=to.min(MAX_FIRST_COMMITS - 1) {
                let Some(commit) = opened.log_store().read_commit_entry(version).await? else {
                    continue;
                };
                for (app, entry) in wal_transactions(&commit) {
                    learned_at.entry(app.clone()).or_insert(-1);
                    let held = through.entry(app).or_insert(entry);
                    *held = (*held).max(entry);
                }
            }
        }
        return Ok(Some(Committed {
            table: opened,
            through,
            learned_at,
        }));
    };
    let mut newer = last.table.clone();
    if newer.update_incremental(None).await.is_err() {
        // The log was cleaned up under it: read it again whole.
        match delta::open(store, table.name()).await? {
            Some(table) => newer = table,
            None => return Ok(None),
        }
    }
    let (Some(from), Some(to)) = (last.table.version(), newer.version()) else {
        return Ok(None);
    };
    if to <= from {
        return Ok(None);
    }
    let mut through = last.through.clone();
    let mut learned_at = last.learned_at.clone();
    for version in from + 1..=to {
        let Some(commit) = newer.log_store().read_commit_entry(version).await? else {
            // A commit the cleanup removed: ask the newest version instead.
            let known: Vec<String> = through.keys().cloned().collect();
            through.extend(through_of(&newer, known).await?);
            continue;
        };
        for (app, entry) in wal_transactions(&commit) {
            if !through.contains_key(&app) {
                let before = delta::stored_through(&last.table, &app).await?;
                let before = before.map_or(-1, |e| i64::try_from(e).unwrap_or(i64::MAX));
                learned_at.insert(app.clone(), before);
            }
            let held = through.entry(app).or_insert(entry);
            *held = (*held).max(entry);
        }
    }
    Ok(Some(Committed {
        table: newer,
        through,
        learned_at,
    }))
}

/// Per shard of `apps` (application ids), the last entry `table` holds.
async fn through_of(
    table: &DeltaTable,
    apps: impl IntoIterator<Item = String>,
) -> crate::store::Result<BTreeMap<String, i64>> {
    let mut through = BTreeMap::new();
    for app in apps {
        if let Some(entry) = delta::stored_through(table, &app).await? {
            through.insert(app, i64::try_from(entry).unwrap_or(i64::MAX));
        }
    }
    Ok(through)
}

/// The WAL shards, of any node, and their entries that a commit file
/// records (its `txn` actions). An application id that is not a shard's,
/// or holds anything but the letters, digits, '-' and '_' of a node name,
/// is not one (it goes into SQL).
fn wal_transactions(commit: &[u8]) -> Vec<(String, i64)> {
    commit
        .split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .filter_map(|action| {
            let txn = action.get("txn")?;
            let app = txn.get("appId")?.as_str()?;
            let shard = app.strip_prefix(delta::wal_app_prefix("").as_str())?;
            let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
            (!shard.is_empty() && shard.chars().all(plain) && app.len() <= MAX_APP_BYTES)
                .then_some(())?;
            Some((app.to_owned(), txn.get("version")?.as_i64()?))
        })
        .collect()
}

/// The start of the newest hour closed at `now_ms`.
fn newest_closed_hour(now_ms: i64) -> i64 {
    (now_ms - HOUR_GRACE_MS).div_euclid(HOUR_MS) * HOUR_MS - HOUR_MS
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
        rows_json: Arc<str>,
        position: String,
    },
    /// Where the stream stands, sent now and then while nothing comes.
    Moved { position: String },
    /// The stream ends, and why.
    Ended { reason: String },
}

/// Entries per shard of the step after one of `entries` that handed over
/// `rows`: fewer after a large answer, more after a small one, within
/// 1..=`most` (at most [`MAX_STEP_ENTRIES`]; less once a step was too large
/// to answer).
fn next_step_entries(entries: i64, rows: u64, most: i64) -> i64 {
    if rows > STEP_ROWS {
        (entries / 2).max(1)
    } else if rows < STEP_ROWS / 4 {
        entries.saturating_mul(2).min(most)
    } else {
        entries
    }
}

/// A live stream admitted for one principal, purpose and set of tables.
pub struct LiveStream {
    request_id: String,
    principal: Principal,
    purpose: String,
    tables: Vec<Table>,
    /// The tables of `tables` the principal sees as hourly aggregates.
    hourly: Vec<Table>,
    treatments: String,
    position: Position,
    /// Entries per shard of the next step.
    step_entries: i64,
    /// Most entries per shard a step may grow to: halved with a step that
    /// was over the query memory or time bound, for good, so that a stream
    /// does not go back to a size that failed.
    step_most: i64,
    commits: watch::Receiver<Arc<Commits>>,
    key: Secret,
    /// Rows handed to the client, and how many of them a `delivered` line
    /// already counts, written when.
    rows: u64,
    rows_audited: u64,
    audited_at: tokio::time::Instant,
    _running: RunningQuery,
    _slot: OwnedSemaphorePermit,
}

impl LiveStream {
    /// The tables followed row by row.
    fn row_tables(&self) -> Vec<Table> {
        self.tables
            .iter()
            .filter(|t| !self.hourly.contains(t))
            .copied()
            .collect()
    }

    /// An hourly table whose next hour has closed by `now_ms`, and that
    /// hour's start.
    fn hour_due(&self, now_ms: i64) -> Option<(Table, i64)> {
        let closed = newest_closed_hour(now_ms);
        self.hourly.iter().find_map(|&table| {
            let next = self.position.last_hour(table)? + HOUR_MS;
            (next <= closed).then_some((table, next))
        })
    }

    fn names(&self) -> Vec<String> {
        self.tables.iter().map(|t| t.name().to_owned()).collect()
    }

    fn sealed_position(&self) -> String {
        self.position.seal(&self.key, &self.principal.id)
    }
}

/// Counts of the live streams open per principal.
pub(crate) type LiveCounts = Arc<Mutex<HashMap<String, u32>>>;

/// What admission gives a stream.
struct Admitted {
    position: Position,
    hourly: Vec<Table>,
    treatments: String,
    commits: watch::Receiver<Arc<Commits>>,
    key: Secret,
    running: RunningQuery,
    slot: OwnedSemaphorePermit,
}

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
        let mut named: Vec<Table> = Table::all()
            .filter(|t| tables.iter().any(|name| name == t.name()))
            .collect();
        named.dedup();
        // Only names of the store's tables reach the audit.
        let audited: Vec<String> = named.iter().map(|t| t.name().to_owned()).collect();
        let admitted = match tables
            .iter()
            .find(|n| !named.iter().any(|t| t.name() == *n))
        {
            Some(_) => Err(AccessError::Invalid(
                "live access follows the stored tables: teleservice, rtti, diagnostics, \
                 charging, dead_letters"
                    .into(),
            )),
            None => {
                self.admit_live(principal, purpose, &named, from, now_ms)
                    .await
            }
        };
        self.audit(
            &request_id,
            principal,
            purpose,
            "live",
            &audited,
            admitted.as_ref().map(|a| a.treatments.clone()),
            None,
            now_ms,
        )?;
        let admitted = admitted?;
        Ok(LiveStream {
            request_id,
            principal: principal.clone(),
            purpose: purpose.to_owned(),
            tables: named,
            hourly: admitted.hourly,
            treatments: admitted.treatments,
            position: admitted.position,
            step_entries: FIRST_STEP_ENTRIES,
            step_most: MAX_STEP_ENTRIES,
            commits: admitted.commits,
            key: admitted.key,
            rows: 0,
            rows_audited: 0,
            audited_at: tokio::time::Instant::now(),
            _running: admitted.running,
            _slot: admitted.slot,
        })
    }

    async fn admit_live(
        &self,
        principal: &Principal,
        purpose: &str,
        tables: &[Table],
        from: Option<&str>,
        now_ms: i64,
    ) -> Result<Admitted> {
        if tables.is_empty() {
            return Err(AccessError::Invalid(
                "name the tables to follow: ?tables=charging,diagnostics".into(),
            ));
        }
        let privacy = self.privacy.as_ref().ok_or(AccessError::VaultNeeded)?;
        let key = privacy.keys.live_position_key();
        let from = from
            .filter(|text| !text.is_empty())
            .map(|text| Position::unseal(text, &key, &principal.id))
            .transpose()?;
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
        let mut hourly = Vec::new();
        for &table in tables {
            let name = table.name();
            if let Some(reason) = session.hidden.get(name) {
                return Err(AccessError::Refused(format!("table {name}: {reason}")));
            }
            match session.treatments.get(name) {
                Some(treatment) => {
                    if *treatment == Treatment::Aggregate {
                        hourly.push(table);
                    }
                    treatments.push(format!("{name}:{}", treatment.name()));
                }
                None => {
                    return Err(AccessError::Refused(format!(
                        "table {name}: not among this principal's views"
                    )));
                }
            }
        }
        let mut commits = self.follower.subscribe(
            &self.query_tasks,
            self.tables.root(),
            &self.wal_shards,
            Duration::from_millis(self.settings.live_poll_ms),
        );
        // A table whose log cannot be read keeps the follower from a
        // complete reading: the stream is refused in time, not held open.
        let limit = Duration::from_millis(self.settings.query_timeout_ms);
        match tokio::time::timeout(limit, commits.wait_for(|c| c.read)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(AccessError::Unavailable("the live follower stopped".into())),
            Err(_) => {
                return Err(AccessError::Unavailable(
                    "the live follower cannot read every table's log yet; try again".into(),
                ));
            }
        }
        let latest = Arc::clone(&commits.borrow_and_update());
        let rows: Vec<Table> = tables
            .iter()
            .filter(|t| !hourly.contains(t))
            .copied()
            .collect();
        let mut position = match from {
            Some(mut position) => {
                position.start_missing(&latest, &rows);
                if let Some((table, lag)) = position.lag(&latest, &rows)
                    && lag > MAX_BEHIND_ENTRIES
                {
                    return Err(AccessError::Invalid(format!(
                        "this position is more WAL entries behind on {} than live access \
                         catches up ({MAX_BEHIND_ENTRIES}): read what was missed with SQL \
                         (received_at) and follow from now",
                        table.name()
                    )));
                }
                position
            }
            None => Position::at(&latest, &rows),
        };
        // Hourly aggregates start with the newest closed hour.
        let closed = newest_closed_hour(now_ms);
        for &table in &hourly {
            match position.last_hour(table) {
                Some(last) if closed - last > MAX_BEHIND_HOURS * HOUR_MS => {
                    return Err(AccessError::Invalid(format!(
                        "this position is more than {MAX_BEHIND_HOURS} closed hours behind on \
                         {}: query those hours with SQL and follow from now",
                        table.name()
                    )));
                }
                Some(_) => {}
                None => position.set_last_hour(table, closed - HOUR_MS),
            }
        }
        treatments.sort();
        Ok(Admitted {
            position,
            hourly,
            treatments: treatments.join(","),
            commits,
            key,
            running,
            slot,
        })
    }

    /// Runs `stream` until its client goes (`events` closes or stops
    /// reading), its policy ends it, or it fails; then audits the rows it
    /// delivered since its last `delivered` line (see [`Self::hand_rows`]).
    pub async fn run_live(&self, mut stream: LiveStream, events: mpsc::Sender<LiveEvent>) {
        let started = LiveEvent::Started {
            request_id: stream.request_id.clone(),
            tables: stream.names(),
            position: stream.sealed_position(),
        };
        let ending = match self.send(&events, started).await {
            Err(ending) => ending,
            Ok(()) => self.deliver(&mut stream, &events).await,
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
            let _ = self.send(&events, LiveEvent::Ended { reason }).await;
        }
        let outcome = super::ending_outcome(ending, &stream.treatments);
        if let Err(error) = self.audit(
            &stream.request_id,
            &stream.principal,
            &stream.purpose,
            "delivered",
            &stream.names(),
            outcome.as_ref().map(String::clone),
            Some(stream.rows - stream.rows_audited),
            crate::core::clock::now_ms(),
        ) {
            tracing::error!(%error, "live stream: audit");
        }
    }

    /// Hands `event` to the client, which must take it within the query
    /// time limit: a client that stops reading ends its stream.
    async fn send(
        &self,
        events: &mpsc::Sender<LiveEvent>,
        event: LiveEvent,
    ) -> std::result::Result<(), Ending> {
        let limit = Duration::from_millis(self.settings.query_timeout_ms);
        match tokio::time::timeout(limit, events.send(event)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(Ending::ClientGone),
        }
    }

    /// Hands `stream` the unseen rows of the newest version, step by step,
    /// until it ends.
    async fn deliver(&self, stream: &mut LiveStream, events: &mpsc::Sender<LiveEvent>) -> Ending {
        let mut told = tokio::time::Instant::now();
        let rows = stream.row_tables();
        loop {
            // Steps that hand nothing over (hidden rows, an empty hour, a
            // smaller retry) do not notice a client that left: ask.
            if events.is_closed() {
                return Ending::ClientGone;
            }
            // Rows handed over get their line on time while the stream
            // steps through other rows too (idle, the wait below sees to it).
            if stream.rows > stream.rows_audited
                && stream.audited_at.elapsed() >= self.audit_interval()
            {
                self.audit_delivered(stream);
            }
            let now_ms = crate::core::clock::now_ms();
            if let Some((table, start_ms)) = stream.hour_due(now_ms) {
                let hour = self
                    .bounded(self.hour_of(stream, table, start_ms, now_ms))
                    .await;
                let (count, json) = match hour {
                    Ok(hour) => hour,
                    Err(e) => return Ending::Failed(e),
                };
                stream.position.set_last_hour(table, start_ms);
                if count > 0 {
                    let json = Arc::from(json);
                    if let Err(ending) = self.hand_rows(stream, events, table, count, json).await {
                        return ending;
                    }
                    told = tokio::time::Instant::now();
                }
                continue;
            }
            // Always the newest version: a row a deletion removed since the
            // last step is not in it.
            let commits = Arc::clone(&stream.commits.borrow_and_update());
            if !stream.position.behind(&commits, &rows) {
                let heartbeat = tokio::time::sleep_until(told + POSITION_EVERY);
                // The next hour of aggregates closes then.
                let next_close_ms = newest_closed_hour(now_ms) + 2 * HOUR_MS + HOUR_GRACE_MS;
                let wait_ms = u64::try_from(next_close_ms - now_ms).unwrap_or(0);
                let hour_closes = tokio::time::sleep(Duration::from_millis(wait_ms));
                let hourly = !stream.hourly.is_empty();
                // Rows handed over and not audited yet get their line on
                // time even if no more come.
                let audit_due = tokio::time::sleep_until(stream.audited_at + self.audit_interval());
                let unaudited = stream.rows > stream.rows_audited;
                tokio::select! {
                    () = hour_closes, if hourly => {}
                    () = audit_due, if unaudited => self.audit_delivered(stream),
                    () = events.closed() => return Ending::ClientGone,
                    changed = stream.commits.changed() => {
                        if changed.is_err() {
                            return Ending::Abandoned;
                        }
                    }
                    () = heartbeat => {
                        let position = stream.sealed_position();
                        if let Err(ending) = self.send(events, LiveEvent::Moved { position }).await {
                            return ending;
                        }
                        told = tokio::time::Instant::now();
                        }
                }
                continue;
            }
            let step = stream
                .position
                .next_step(&commits, &rows, stream.step_entries);
            let unseen = match self
                .bounded(self.unseen_rows(stream, &commits, &step, now_ms))
                .await
            {
                Ok(unseen) => unseen,
                // Too much for one answer: smaller steps, down to one entry.
                Err(AccessError::Limit(_)) if stream.step_entries > 1 => {
                    stream.step_entries /= 2;
                    stream.step_most = stream.step_entries;
                    continue;
                }
                Err(e) => return Ending::Failed(e),
            };
            let handed: u64 = unseen.iter().map(|(_, rows, _)| rows).sum();
            stream.step_entries = next_step_entries(stream.step_entries, handed, stream.step_most);
            for (table, rows, json) in unseen {
                stream.position.take_table(&step, table);
                if rows == 0 {
                    continue;
                }
                if let Err(ending) = self.hand_rows(stream, events, table, rows, json).await {
                    return ending;
                }
                told = tokio::time::Instant::now();
            }
        }
    }

    /// Hands the client `rows` rows of `table` (`json`) with the stream's
    /// position after them, and counts them as delivered. Once
    /// `access.live_audit_interval_ms` has passed since the stream's last
    /// `delivered` line, the rows handed over since then get one, so that a
    /// crash loses the count of one interval at most and the grant holder's
    /// last read (`GET /account`) keeps up with an open stream.
    async fn hand_rows(
        &self,
        stream: &mut LiveStream,
        events: &mpsc::Sender<LiveEvent>,
        table: Table,
        rows: u64,
        json: Arc<str>,
    ) -> std::result::Result<(), Ending> {
        let event = LiveEvent::Rows {
            table: table.name().to_owned(),
            rows_json: json,
            position: stream.sealed_position(),
        };
        self.send(events, event).await?;
        stream.rows += rows;
        if stream.audited_at.elapsed() >= self.audit_interval() {
            self.audit_delivered(stream);
        }
        Ok(())
    }

    fn audit_interval(&self) -> Duration {
        Duration::from_millis(self.settings.live_audit_interval_ms)
    }

    /// A `delivered` line for the rows handed over since the last one; if
    /// it cannot be written, they are counted in the next, an interval on.
    fn audit_delivered(&self, stream: &mut LiveStream) {
        let rows = stream.rows - stream.rows_audited;
        let audited = self.audit(
            &stream.request_id,
            &stream.principal,
            &stream.purpose,
            "delivered",
            &stream.names(),
            Ok(stream.treatments.clone()),
            Some(rows),
            crate::core::clock::now_ms(),
        );
        match audited {
            Ok(()) => stream.rows_audited = stream.rows,
            Err(error) => tracing::error!(%error, "live stream: audit"),
        }
        stream.audited_at = tokio::time::Instant::now();
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
    ) -> Result<Vec<(Table, u64, Arc<str>)>> {
        let principal = self.same_principal(stream)?;
        let followed = stream.row_tables();
        let memory_mb = self.settings.query_memory_mb;
        let live = LiveTables {
            commits,
            position: &stream.position,
            step,
            followed: &followed,
            kind: principal.kind,
            memory_mb,
        };
        let session = self
            .session_with(
                &principal,
                &stream.purpose,
                now_ms,
                memory_mb,
                super::Scope::Live(&live),
                super::Engine::Local,
            )
            .await?;
        let pool = Arc::clone(&session.ctx.runtime_env().memory_pool);
        let mut unseen = Vec::new();
        for table in stream.row_tables() {
            let name = table.name();
            if let Some(reason) = session.hidden.get(name) {
                return Err(AccessError::Refused(format!("table {name}: {reason}")));
            }
            let df = session.ctx.sql(&format!("SELECT * FROM {name}")).await?;
            let (_, batches) = super::collect_bounded(df, &pool, principal.kind, memory_mb).await?;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            let json = match commits.tables.get(&table) {
                _ if rows == 0 => Arc::from("[]"),
                Some(committed) => {
                    let window = stream.position.unseen_sql(step, table, committed);
                    let audience = Audience::of(&principal, &stream.purpose);
                    commits
                        .answers
                        .json(table, &window, audience, batches)
                        .await?
                }
                None => crate::query::format(&batches, crate::query::OutputFormat::Json)?.into(),
            };
            unseen.push((table, rows as u64, json));
        }
        Ok(unseen)
    }
}

impl AccessEnv {
    /// The aggregates of `table` in the hour starting at `start_ms`, through
    /// the principal's view as it stands at `now_ms`: the row count and JSON.
    async fn hour_of(
        &self,
        stream: &LiveStream,
        table: Table,
        start_ms: i64,
        now_ms: i64,
    ) -> Result<(u64, String)> {
        let principal = self.same_principal(stream)?;
        let memory_mb = self.settings.query_memory_mb;
        let session = self
            .session(&principal, &stream.purpose, now_ms, memory_mb)
            .await?;
        let name = table.name();
        if let Some(reason) = session.hidden.get(name) {
            return Err(AccessError::Refused(format!("table {name}: {reason}")));
        }
        let start = chrono::DateTime::from_timestamp_millis(start_ms).unwrap_or_default();
        let sql = format!(
            "SELECT * FROM {name} WHERE date = DATE '{}' AND hour = {}",
            start.format("%Y-%m-%d"),
            start.format("%H").to_string().parse::<u32>().unwrap_or(0)
        );
        let df = session.ctx.sql(&sql).await?;
        let pool = Arc::clone(&session.ctx.runtime_env().memory_pool);
        let (_, batches) = super::collect_bounded(df, &pool, principal.kind, memory_mb).await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let json = crate::query::format(&batches, crate::query::OutputFormat::Json)?;
        Ok((rows as u64, json))
    }

    /// The stream's principal as the registry has it now, if it is still
    /// the same: removed, or its id now naming another token or kind, ends
    /// the stream.
    fn same_principal(&self, stream: &LiveStream) -> Result<Principal> {
        let principal = self.principal(&stream.principal.id)?;
        if principal.token_sha256 != stream.principal.token_sha256
            || principal.kind != stream.principal.kind
        {
            return Err(AccessError::UnknownPrincipal);
        }
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One batch of `column` holding `values`.
    fn rows(column: &str, values: &[i64]) -> Vec<RecordBatch> {
        let array: arrow::array::ArrayRef =
            Arc::new(arrow::array::Int64Array::from(values.to_vec()));
        vec![RecordBatch::try_from_iter([(column, array)]).expect("batch")]
    }

    fn encoded(batches: &[RecordBatch]) -> String {
        crate::query::format(batches, crate::query::OutputFormat::Json).expect("JSON")
    }

    /// `rows` as `answers` gives them for `audience` in `window` of `table`.
    fn answer(
        answers: &SharedAnswers,
        table: Table,
        window: &str,
        audience: &Audience,
        rows: Vec<RecordBatch>,
    ) -> Arc<str> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(answers.json(table, window, audience.clone(), rows))
            .expect("json")
    }

    fn principal(id: &str, kind: PrincipalKind) -> Principal {
        Principal {
            id: id.to_owned(),
            kind,
            token_sha256: String::new(),
            gatekeeper: false,
            role: None,
            eea: true,
            created_ms: 0,
        }
    }

    #[test]
    fn operators_share_an_audience_per_purpose_and_anyone_else_has_their_own() {
        use PrincipalKind::{Licensee, Operator, ThirdParty, User};
        let of = |id, kind, purpose| Audience::of(&principal(id, kind), purpose);
        assert_eq!(
            of("ops", Operator, "operations"),
            of("ops2", Operator, "operations")
        );
        assert_ne!(
            of("ops", Operator, "operations"),
            of("ops", Operator, "hv_warn_call")
        );
        for kind in [User, ThirdParty, Licensee] {
            assert_ne!(of("a", kind, "p"), of("b", kind, "p"), "{kind:?}");
            assert_ne!(of("a", kind, "p"), of("a", kind, "q"), "{kind:?}");
            assert_ne!(of("a", kind, "p"), of("a", Operator, "p"), "{kind:?}");
        }
    }

    #[test]
    fn equal_rows_for_one_audience_share_one_text_and_any_difference_gets_its_own() {
        use crate::core::table::Stream;
        let charging = Table::Stream(Stream::Charging);
        let answers = SharedAnswers::default();
        let window = "entry > 1";
        let ops = Audience::of(&principal("ops", PrincipalKind::Operator), "operations");
        let alice = Audience::of(&principal("alice", PrincipalKind::User), "operations");
        // The first stream in a window keeps nothing (it may be alone in
        // it); the second keeps its text.
        let alone = answer(&answers, charging, window, &ops, rows("seq", &[1, 2]));
        assert_eq!(&*alone, encoded(&rows("seq", &[1, 2])));
        assert_eq!(answers.lock().bytes.get(&ops), None, "nothing kept");
        let first = answer(&answers, charging, window, &ops, rows("seq", &[1, 2]));
        assert!(!Arc::ptr_eq(&alone, &first));
        assert_eq!(&*first, encoded(&rows("seq", &[1, 2])));
        // Equal rows, made apart: the same text, not encoded again.
        let again = answer(&answers, charging, window, &ops, rows("seq", &[1, 2]));
        assert!(Arc::ptr_eq(&first, &again));
        // A value, a column name, a window, a table or an audience apart:
        // each its own text, the one its rows make.
        let diagnostics = Table::Stream(Stream::Diagnostics);
        for (table, window, audience, other) in [
            (charging, window, &ops, rows("seq", &[1, 3])),
            (charging, window, &ops, rows("soc", &[1, 2])),
            (charging, "entry > 2", &ops, rows("seq", &[1, 2])),
            (diagnostics, window, &ops, rows("seq", &[1, 2])),
            (charging, window, &alice, rows("seq", &[1, 2])),
        ] {
            let expected = encoded(&other);
            let text = answer(&answers, table, window, audience, other);
            assert!(!Arc::ptr_eq(&first, &text), "{audience:?} {window}");
            assert_eq!(&*text, expected);
        }
    }

    #[test]
    fn a_window_keeps_its_first_answers_and_the_rest_encode_their_own() {
        let charging = Table::Stream(crate::core::table::Stream::Charging);
        let answers = SharedAnswers::default();
        let ops = Audience::of(&principal("ops", PrincipalKind::Operator), "operations");
        let most = MOST_ANSWERS_PER_WINDOW as i64;
        let of = |value: i64| answer(&answers, charging, "w", &ops, rows("seq", &[value]));
        of(most + 1);
        let firsts: Vec<Arc<str>> = (0..most).map(of).collect();
        for (value, first) in (0..most).zip(&firsts) {
            assert!(Arc::ptr_eq(first, &of(value)), "answer {value} kept");
        }
        let (one, two) = (of(most), of(most));
        assert!(!Arc::ptr_eq(&one, &two), "one past the most: not kept");
        assert_eq!(&*one, encoded(&rows("seq", &[most])));
    }

    #[test]
    fn an_audience_keeps_no_more_bytes_than_its_bound_and_others_are_not_counted() {
        let charging = Table::Stream(crate::core::table::Stream::Charging);
        let answers = SharedAnswers::default();
        let big: Vec<i64> = (0..400_000).collect();
        let ops = Audience::of(&principal("ops", PrincipalKind::Operator), "operations");
        let alice = Audience::of(&principal("alice", PrincipalKind::User), "own_data_access");
        // Rows of 3.2 MB and their text, larger: kept as long as both fit
        // in the audience's bytes; then each stream encodes its own.
        let mut kept = 0;
        for window in 0..10 {
            let window = window.to_string();
            answer(&answers, charging, &window, &ops, rows("seq", &big));
            let one = answer(&answers, charging, &window, &ops, rows("seq", &big));
            let two = answer(&answers, charging, &window, &ops, rows("seq", &big));
            kept += usize::from(Arc::ptr_eq(&one, &two));
        }
        let rows_size: usize = rows("seq", &big)
            .iter()
            .map(|b| b.get_array_memory_size())
            .sum();
        let text_size = encoded(&rows("seq", &big)).len();
        assert_eq!(
            kept,
            MOST_ANSWER_BYTES / (rows_size + text_size),
            "answers of {rows_size} bytes of rows and {text_size} of text"
        );
        let used = answers.lock().bytes.get(&ops).copied().unwrap_or(0);
        assert!(used <= MOST_ANSWER_BYTES, "{used}");
        // Another audience has room of its own.
        answer(&answers, charging, "0", &alice, rows("seq", &big));
        let one = answer(&answers, charging, "0", &alice, rows("seq", &big));
        let two = answer(&answers, charging, "0", &alice, rows("seq", &big));
        assert!(Arc::ptr_eq(&one, &two));
    }

    #[test]
    fn a_step_shrinks_after_a_large_answer_and_grows_back_after_small_ones() {
        let mut entries = FIRST_STEP_ENTRIES;
        for _ in 0..20 {
            entries = next_step_entries(entries, 0, MAX_STEP_ENTRIES);
        }
        assert_eq!(entries, MAX_STEP_ENTRIES, "grows to the most, never above");
        entries = next_step_entries(entries, 4 * STEP_ROWS, MAX_STEP_ENTRIES);
        assert_eq!(entries, MAX_STEP_ENTRIES / 2);
        assert_eq!(
            next_step_entries(1, 4 * STEP_ROWS, MAX_STEP_ENTRIES),
            1,
            "never below one"
        );
        assert_eq!(
            next_step_entries(entries, STEP_ROWS, MAX_STEP_ENTRIES),
            entries,
            "about right"
        );
        assert_eq!(
            next_step_entries(64, 0, 64),
            64,
            "not past a size that was too large to answer"
        );
    }

    /// A reading's windows are read in a session of their own with no
    /// memory bound (the private `files` session of a stream's policy):
    /// whether their rows are shared still follows the query memory bound,
    /// over all the windows the reading holds.
    #[test]
    fn a_readings_windows_hold_no_more_than_the_memory_bound_together() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let scans = SharedScans::default();
        let held = |values: &[i64]| {
            runtime.block_on(async {
                let files = SessionContext::new();
                // In batches under the scan's batch size, so that none is
                // cut into slices that each count the whole buffer.
                let batches: Vec<RecordBatch> = values
                    .chunks(8_000)
                    .flat_map(|chunk| rows("seq", chunk))
                    .collect();
                let table = MemTable::try_new(batches[0].schema(), vec![batches]).expect("table");
                files
                    .register_table("charging_committed", Arc::new(table))
                    .expect("register");
                let window = files
                    .sql("SELECT * FROM charging_committed")
                    .await
                    .expect("plan");
                shared_rows(window, &scans.pool(1), PrincipalKind::User, 1)
                    .await
                    .expect("read")
            })
        };
        let over: Vec<i64> = (0..400_000).collect();
        assert!(held(&over).is_none(), "3.2 MB of rows over a 1 MiB bound");
        let most: Vec<i64> = (0..80_000).collect();
        let first = held(&most);
        assert!(first.is_some(), "640 KB fit");
        assert!(held(&most).is_none(), "and twice that does not");
        drop(first);
        assert!(held(&most).is_some(), "room again once the first is let go");
    }

    #[test]
    fn a_position_unseals_only_for_its_principal_and_untouched() {
        let key = Secret([7; 32]);
        let charging = Table::Stream(crate::core::table::Stream::Charging);
        let position = Position(BTreeMap::from([
            ((charging, "fleetgate-wal-0".to_owned()), 12),
            ((charging, "fleetgate-wal-node-2-1".to_owned()), 7),
            ((charging, HOURS.to_owned()), 1_795_503_600_000),
            ((Table::DeadLetters, "fleetgate-wal-3".to_owned()), 0),
        ]));
        let sealed = position.seal(&key, "alice");
        assert_eq!(
            Position::unseal(&sealed, &key, "alice").expect("alice's"),
            position
        );
        assert_ne!(
            sealed,
            position.seal(&key, "alice"),
            "a fresh nonce each time"
        );
        // No application id in the clear.
        let app = hex::encode("fleetgate-wal");
        assert!(!sealed.contains(&app), "nothing readable: {sealed}");
        assert!(Position::unseal(&sealed, &key, "mallory").is_err());
        assert!(Position::unseal(&sealed, &Secret([8; 32]), "alice").is_err());
        let mut tampered = hex::decode(&sealed).expect("hex");
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(Position::unseal(&hex::encode(tampered), &key, "alice").is_err());
        for bad in ["", "zz", "00", &"ab".repeat(MAX_POSITION_BYTES)] {
            assert!(Position::unseal(bad, &key, "alice").is_err(), "{bad:.10}");
        }
    }

    #[test]
    fn a_commits_wal_transactions_are_read_from_its_txn_actions() {
        let commit = br#"{"commitInfo":{"timestamp":1}}
{"txn":{"appId":"fleetgate-wal-0","version":41,"lastUpdated":1}}
{"txn":{"appId":"fleetgate-wal-12","version":7}}
{"txn":{"appId":"someone-else","version":99}}
{"txn":{"appId":"fleetgate-wal-node-2-3","version":5}}
{"add":{"path":"x.parquet"}}"#;
        let transactions = wal_transactions(commit);
        let found: Vec<(&str, i64)> = transactions
            .iter()
            .map(|(app, entry)| (app.as_str(), *entry))
            .collect();
        assert_eq!(
            found,
            [
                ("fleetgate-wal-0", 41),
                ("fleetgate-wal-12", 7),
                ("fleetgate-wal-node-2-3", 5)
            ],
            "every node's shards, nothing else"
        );
        let quoted = br#"{"txn":{"appId":"fleetgate-wal-x' OR 1=1 --","version":1}}"#;
        assert!(
            wal_transactions(quoted).is_empty(),
            "nothing that could leave its quotes"
        );
    }
}
