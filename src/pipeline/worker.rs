//! Worker shards: decode → validate → pseudonymise → batch → WAL, one thread
//! per shard, each owning its vehicles.
//!
//! A worker blocks for the first publish, drains up to [`DRAIN_MAX`] more
//! without blocking, appends one record batch per (table, hour) to its own
//! write-ahead log, fsyncs the log when a group commit is due (at once when
//! acknowledgements wait for it, else by `wal.fsync_interval_ms` /
//! `fsync_bytes`), and only then hands the batches to their table writers,
//! so a writer's full queue never delays an fsync that acknowledgements
//! wait for. It deletes log segments once the writers have committed all
//! they hold.
//! Each worker owns its batchers, pseudonym cache and log, so no lock is
//! taken per record. Rejected records become dead letters whose copy is
//! redacted here, before anything is written.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread::JoinHandle;
use std::time::Duration;

use arrow::array::{Array, ArrayRef, RecordBatch, TimestampMillisecondArray};
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::Value as Json;

use crate::core::consent::Consent;
use crate::ingest::durable::DurableFrontier;
use crate::ingest::link::{Inbound, Route, TOPIC_ROOT};
use crate::metrics::{Metrics, PolicyDrop};
use crate::pipeline::batch::StreamBatcher;
use crate::pipeline::dead_letter::{self, DeadLetter};
use crate::pipeline::decode::{self, Decoded, Limits, Record, RejectedBytes, RejectedRecord};
use crate::privacy::pseudo::is_vin;
use crate::privacy::stage::{Privacy, PrivacyShared};
use crate::schema::{
    ConsentGate, INTERNAL_DOMAIN, RECEIVED_AT_COLUMN, Registry, Stream, StreamSchema, Transform,
};
use crate::store::{PartitionKey, StoreError, Table, TableBatch};
use crate::wal::{EntryId, ShardWal, WalError};

/// Most publishes a worker takes per round before handing its batches on.
pub const DRAIN_MAX: usize = 512;
/// How often an idle worker looks for WAL segments it may delete.
const IDLE_TICK: Duration = Duration::from_millis(250);
/// Longest wait between attempts to append to a failing WAL.
const MAX_WAL_RETRY_DELAY: Duration = Duration::from_secs(5);
/// What replaces a value the dead-letter copy may not keep.
const REDACTED: &str = "<redacted>";
/// The topic of every RTTI dead letter: RTTI names no vehicle.
const RTTI_DEAD_LETTER_TOPIC: &str = "vehicles/<vehicle>/rtti";
/// The topic level under which a tenant's topics live (`/tenants/{O}/…`).
const TENANTS_LEVEL: &str = "tenants";
/// The deepest level a vehicle's VIN stands at (`/tenants/{O}/vehicles/{VIN}`).
const VIN_LEVEL_MAX: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
}

/// Everything a worker needs; cloned once per worker.
#[derive(Clone)]
pub struct WorkerContext {
    pub registry: Arc<Registry>,
    pub limits: Limits,
    pub dead_letter_payload_bytes: usize,
    pub privacy: Arc<PrivacyShared>,
    pub metrics: Arc<Metrics>,
    /// One sender per table, in [`Table::all`] order.
    pub writers: Vec<Sender<TableBatch>>,
    /// Where each worker reports what its fsyncs made durable, which decides
    /// when the broker acknowledges a publish.
    pub frontier: Arc<DurableFrontier>,
    /// fsync the WAL as soon as there is something to sync (acknowledgements
    /// wait for it), rather than by `wal.fsync_interval_ms` and `fsync_bytes`.
    pub sync_immediately: bool,
}

/// Starts worker `index`, which runs until its queue is closed and drained,
/// then returns its log for the server to close once the writers are done.
/// Most bytes of WAL entries a shard holds waiting for their copy to the
/// store before it stops taking publishes.
const MAX_COPY_BACKLOG_BYTES: usize = 64 << 20;

pub fn spawn_worker(
    index: usize,
    context: WorkerContext,
    queue: Receiver<Inbound>,
    wal: ShardWal,
) -> Result<JoinHandle<ShardWal>, PipelineError> {
    std::thread::Builder::new()
        .name(format!("worker-{index}"))
        .spawn(move || Worker::new(index, context, wal).run(queue))
        .map_err(PipelineError::Thread)
}

struct Worker {
    /// This worker's index among the shards.
    shard: usize,
    wal: ShardWal,
    /// The broker-log offset of the last publish handled since the last
    /// fsync: durable once the next fsync succeeds.
    handled_offset: Option<u64>,
    /// After a failed fsync, the last WAL entry whose durability is unknown:
    /// nothing more is reported durable until Parquet holds every entry up
    /// to it (a later successful fsync does not vouch for pages the failed
    /// one may have dropped).
    parquet_gate: Option<u64>,
    /// Whether the last fsync failed: the error is logged once per episode
    /// (each failure is counted), not once per batch of a failing disk.
    fsync_failing: bool,
    /// The publishes of the round being handled (kept for its capacity).
    round: Vec<Inbound>,
    /// Per stream, whether its records use the vehicle's keys (a pseudonym
    /// or an encrypted field).
    keyed: [bool; Stream::ALL.len()],
    /// Batches appended to the WAL this round, not yet handed to a writer.
    appended: Vec<(Table, TableBatch)>,
    /// `received_at` columns of batches appended since the last fsync.
    unsynced_receipts: Vec<ArrayRef>,
    batchers: Vec<StreamBatcher>,
    dead_letters: Vec<DeadLetter>,
    privacy: Privacy,
    /// The round's publishes decoded, one per publish (kept for capacity).
    decoded: Vec<Decoded>,
    /// Records received per stream this round, added to the metrics per round.
    received: [u64; Stream::ALL.len()],
    received_bytes: [u64; Stream::ALL.len()],
    ctx: WorkerContext,
}

impl Worker {
    fn new(shard: usize, ctx: WorkerContext, wal: ShardWal) -> Self {
        Self {
            shard,
            wal,
            handled_offset: None,
            parquet_gate: None,
            fsync_failing: false,
            round: Vec::with_capacity(DRAIN_MAX),
            keyed: Stream::ALL.map(|s| {
                ctx.registry
                    .get(s)
                    .fields
                    .iter()
                    .any(|f| matches!(f.transform, Transform::Pseudonym | Transform::Encrypt))
            }),
            appended: Vec::new(),
            unsynced_receipts: Vec::new(),
            batchers: Stream::ALL
                .iter()
                .map(|&s| StreamBatcher::new(ctx.registry.get(s)))
                .collect(),
            dead_letters: Vec::new(),
            privacy: Privacy::new(ctx.privacy.clone()),
            decoded: Vec::with_capacity(DRAIN_MAX),
            received: [0; Stream::ALL.len()],
            received_bytes: [0; Stream::ALL.len()],
            ctx,
        }
    }

    fn run(mut self, queue: Receiver<Inbound>) -> ShardWal {
        loop {
            if self.wal.copy_backlog_bytes() > MAX_COPY_BACKLOG_BYTES {
                // The store takes no copies (or the node is fenced): take no
                // more publishes until it does, so ingest backs up behind
                // this queue rather than the backlog growing (QoS 0
                // publishes wait for no acknowledgement).
                std::thread::sleep(IDLE_TICK.min(Duration::from_millis(50)));
                self.sync_wal(true);
                continue;
            }
            let wait = if self.wal.has_unsynced() {
                self.wal.until_sync_due()
            } else {
                IDLE_TICK
            };
            match queue.recv_timeout(wait) {
                Ok(first) => {
                    self.privacy.refresh();
                    let mut round = std::mem::take(&mut self.round);
                    round.push(first);
                    round.extend(queue.try_iter().take(DRAIN_MAX - 1));
                    self.decode_round(&round);
                    let mut decoded = std::mem::take(&mut self.decoded);
                    for (inbound, decoded) in round.drain(..).zip(decoded.iter_mut()) {
                        self.handle(inbound, decoded);
                    }
                    self.decoded = decoded;
                    self.round = round;
                    if let Err(e) = self.flush() {
                        tracing::error!(error = %e, "cannot build a record batch");
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Group commit. Acknowledging on durability, with no added wait:
            // whatever arrived while the previous fsync ran is synced now, as
            // one. Otherwise when the interval or the bytes say so.
            self.sync_wal(self.ctx.sync_immediately);
            // Only then to the writers, whose queues may be full: a slow
            // table commit must not hold back an fsync, nor the PUBACKs
            // waiting for it.
            self.hand_over();
        }
        self.sync_wal(true);
        self.wal
    }

    /// Group commit: fsyncs the log when due (or when `force`), records how
    /// long each row waited from receipt to durability, seals an old segment
    /// and deletes segments the writers no longer need.
    fn sync_wal(&mut self, force: bool) {
        if force || self.wal.sync_due() {
            let wal = &self.ctx.metrics.wal;
            match self.wal.sync() {
                Ok(Some(synced)) => {
                    if !synced.pending && std::mem::take(&mut self.fsync_failing) {
                        tracing::warn!("WAL group commits work again");
                    }
                    wal.syncs.fetch_add(1, Relaxed);
                    wal.bytes_synced.fetch_add(synced.bytes as u64, Relaxed);
                    if let Ok(mut h) = wal.fsync_micros.lock() {
                        h.saturating_record(synced.took.as_micros() as u64);
                    }
                    if let Some(took) = synced.copy_took
                        && let Ok(mut h) = wal.copy_micros.lock()
                    {
                        h.saturating_record(took.as_micros() as u64);
                    }
                    let now = crate::core::clock::now_ms();
                    // Fsync'd with its copy still due: not yet durable as promised.
                    if !synced.pending {
                        crate::metrics::record_since_receipt(
                            &wal.receipt_to_durable_ms,
                            now,
                            self.unsynced_receipts.iter().filter_map(|column| {
                                column
                                    .as_any()
                                    .downcast_ref::<TimestampMillisecondArray>()
                                    .map(|times| &times.values()[..])
                            }),
                        );
                        self.unsynced_receipts.clear();
                    }
                }
                Ok(None) => {}
                Err(e @ WalError::Copy { .. }) => {
                    // The copy stays due and is tried again: nothing since
                    // the last good copy is acknowledged until it is made.
                    wal.errors.fetch_add(1, Relaxed);
                    if !std::mem::replace(&mut self.fsync_failing, true) {
                        tracing::error!(error = %e, "WAL copy to the store failed; publishes wait for their acknowledgement until a copy is made");
                    }
                }
                Err(e) => {
                    wal.errors.fetch_add(1, Relaxed);
                    self.unsynced_receipts.clear();
                    self.parquet_gate = self.wal.last_seq();
                    if !std::mem::replace(&mut self.fsync_failing, true) {
                        tracing::error!(error = %e, "WAL group commit failed; the batches since the last good one are durable, and acknowledged, only once a table commit holds them");
                    }
                }
            }
            self.report_durable();
        }
        if let Err(e) = self.wal.rotate_if_old() {
            tracing::warn!(error = %e, "cannot seal an old WAL segment");
        }
        if let Err(e) = self.wal.truncate_covered() {
            tracing::warn!(error = %e, "cannot delete a WAL segment");
        }
    }

    /// Tells the frontier how far this shard is durable, unless a failed
    /// fsync left entries whose durability only Parquet can vouch for.
    fn report_durable(&mut self) {
        if let Some(gate) = self.parquet_gate {
            match self.wal.covered_through(gate) {
                Ok(true) => self.parquet_gate = None,
                Ok(false) | Err(_) => return,
            }
        }
        if self.wal.has_unsynced() {
            return;
        }
        if let Some(offset) = self.handled_offset.take() {
            self.ctx.frontier.durable(self.shard, offset);
            self.ctx.frontier.report();
        }
    }

    /// Decodes the round's publishes into `self.decoded` (one entry per
    /// publish, in order), then loads, at once, the keys of the vehicles
    /// whose records will use them: a stream that pseudonymises or
    /// encrypts (RTTI does neither), and a record past the consent gates,
    /// valid or not (a dead letter names the vehicle by pseudonym), or a
    /// publish whose topic is rejected but names the vehicle; never of a
    /// vehicle whose SIM is off (nor, for charging, whose charge history
    /// is). A vehicle whose records are all refused gets no key, as before.
    fn decode_round(&mut self, round: &[Inbound]) {
        if self.decoded.len() < round.len() {
            self.decoded.resize_with(round.len(), Decoded::default);
        }
        let registry = self.ctx.registry.clone();
        let mut vins = Vec::new();
        for (inbound, decoded) in round.iter().zip(self.decoded.iter_mut()) {
            decoded.clear();
            let (vin, stream) = match &inbound.route {
                Route::Vehicle { vin, stream } => (vin, stream),
                Route::Rejected { topic, .. } => {
                    vins.extend(topic_vins(topic));
                    continue;
                }
            };
            decode::decode(
                registry.get(*stream),
                &self.ctx.limits,
                vin,
                &inbound.payload,
                inbound.received_at_ms,
                decoded,
            );
            vins.push(vin.as_str());
        }
        // The round's consent in one vault read: one round trip to a shared vault.
        vins.sort_unstable();
        vins.dedup();
        self.privacy.load_consents(&vins);
        let mut keyed_vins = Vec::new();
        for (inbound, decoded) in round.iter().zip(self.decoded.iter()) {
            let (vin, stream) = match &inbound.route {
                Route::Vehicle { vin, stream } => (vin, stream),
                Route::Rejected { topic, stream, .. } => {
                    if *stream != Some(Stream::Rtti) && topic_collected(&mut self.privacy, topic) {
                        keyed_vins.extend(topic_vins(topic));
                    }
                    continue;
                }
            };
            if !self.keyed[stream.index()] {
                continue;
            }
            let schema = registry.get(*stream);
            let consent = self.privacy.consent(vin);
            let stored = decoded
                .valid
                .iter()
                .any(|record| refusing_gate(schema, &consent, record).is_none());
            let dead_lettered = decoded
                .rejected
                .iter()
                .any(|rejected| refusing_gate_of_rejected(schema, &consent, rejected).is_none());
            if collection_stopped(*stream, &consent).is_none() && (stored || dead_lettered) {
                keyed_vins.push(vin.as_str());
            }
        }
        self.privacy.load_keys(keyed_vins);
    }

    /// Appends to the log, retrying with back-off while the disk refuses:
    /// the worker stops taking publishes meanwhile, which stops ingest.
    fn append_to_wal(
        &mut self,
        table: Table,
        partition: PartitionKey,
        batch: &RecordBatch,
    ) -> EntryId {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.wal.append(table, partition, batch) {
                Ok(id) => {
                    if let Some(column) = batch.column_by_name(RECEIVED_AT_COLUMN) {
                        self.unsynced_receipts.push(column.clone());
                    }
                    return id;
                }
                Err(e) => {
                    self.ctx.metrics.wal.errors.fetch_add(1, Relaxed);
                    tracing::error!(error = %e, retry_in = ?delay, "WAL append failed; holding the batch and retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_WAL_RETRY_DELAY);
                }
            }
        }
    }

    /// Stores one publish, `decoded` by [`Self::decode_round`].
    fn handle(&mut self, inbound: Inbound, decoded: &mut Decoded) {
        let Inbound {
            route,
            payload,
            received_at_ms,
            offset,
        } = inbound;
        if offset.is_some() {
            self.handled_offset = offset;
        }
        let epoch = self.privacy.epoch(received_at_ms);
        let (vin, stream) = match route {
            Route::Vehicle { vin, stream } => (vin, stream),
            Route::Rejected {
                rejection,
                topic,
                stream,
            } => {
                if !topic_collected(&mut self.privacy, &topic) {
                    // Collection stops with the SIM (§1.6, §8.8): a publish
                    // under its VIN too, whatever its topic.
                    let dropped = match stream {
                        Some(s) => &self.ctx.metrics.stream(s).dropped_by_policy,
                        None => &self.ctx.metrics.unrouted_dropped,
                    };
                    dropped.add(PolicyDrop::SimDeactivated, 1);
                    return;
                }
                let counters = match stream {
                    Some(s) => &self.ctx.metrics.stream(s).rejected,
                    None => &self.ctx.metrics.unrouted,
                };
                counters.add(rejection.code, 1);
                // No schema shaped these bytes, so no copy is kept: only the
                // size, and the topic's levels fleetgate recognises.
                let topic = if stream == Some(Stream::Rtti) {
                    RTTI_DEAD_LETTER_TOPIC.to_owned()
                } else {
                    self.redact_topic(&topic, epoch)
                };
                self.dead_letters.push(DeadLetter {
                    received_at_ms,
                    topic,
                    stream: stream.map(Stream::name),
                    vehicle_id: None,
                    rejection,
                    record_index: None,
                    payload_size: payload.len(),
                    payload: Vec::new(),
                });
                return;
            }
        };
        let registry = self.ctx.registry.clone();
        let schema = registry.get(stream);
        self.received[stream.index()] += (decoded.valid.len() + decoded.rejected.len()) as u64;
        self.received_bytes[stream.index()] += payload.len() as u64;
        let consent = self.privacy.consent(&vin);
        let dropped = &self.ctx.metrics.stream(stream).dropped_by_policy;
        let stopped = collection_stopped(stream, &consent);
        if let Some(reason) = stopped {
            // Collection stops with the SIM (§1.6, §8.8), and the charge
            // history while it is off (L1082-1084): rejected records too.
            dropped.add(reason, decoded.rejected.len() as u64);
        }
        if !decoded.valid.is_empty() {
            for record in &decoded.valid {
                if let Some(reason) = stopped {
                    dropped.add(reason, 1);
                    continue;
                }
                if let Some(gate) = refusing_gate(schema, &consent, record) {
                    dropped.add(PolicyDrop::for_consent(&gate.consent), 1);
                    continue;
                }
                self.batchers[stream.index()].push(record, &vin, received_at_ms, &mut self.privacy);
            }
        }
        if stopped.is_some() {
            return;
        }
        // What a gate keeps out is not kept as a dead letter either.
        let mut dead = Vec::with_capacity(decoded.rejected.len());
        for rejected in &decoded.rejected {
            match refusing_gate_of_rejected(schema, &consent, rejected) {
                Some(gate) => dropped.add(PolicyDrop::for_consent(&gate.consent), 1),
                None => dead.push(rejected),
            }
        }
        if !dead.is_empty() {
            // RTTI is anonymous probe data (seed L2005): its dead letters name
            // no vehicle and keep no copy of a position.
            let anonymous = stream == Stream::Rtti;
            let vehicle_id =
                (!anonymous).then(|| self.privacy.vehicle_id(INTERNAL_DOMAIN, &vin, epoch));
            let topic = match &vehicle_id {
                Some(id) => format!("{TOPIC_ROOT}/vin:{id}/{stream}"),
                None => RTTI_DEAD_LETTER_TOPIC.to_owned(),
            };
            for rejected in dead {
                self.ctx
                    .metrics
                    .stream(stream)
                    .rejected
                    .add(rejected.rejection.code, 1);
                // Bytes that did not parse are never copied: no redaction
                // catches every encoding of an identifier (`\u0057MW…`).
                let (copy, size) = match &rejected.bytes {
                    RejectedBytes::Payload => (Vec::new(), payload.len()),
                    RejectedBytes::Json(json) => {
                        let size = serde_json::to_vec(json).map_or(0, |v| v.len());
                        let copy = if anonymous {
                            Vec::new()
                        } else {
                            self.redact_record(schema, json, &vin, epoch)
                        };
                        (copy, size)
                    }
                };
                self.dead_letters.push(DeadLetter {
                    received_at_ms,
                    topic: topic.clone(),
                    stream: Some(stream.name()),
                    vehicle_id: vehicle_id.clone(),
                    rejection: rejected.rejection.clone(),
                    record_index: rejected.index,
                    payload_size: size,
                    payload: self.cut(copy),
                });
            }
        }
    }

    /// Appends every buffered batch to the WAL, to be handed to its writer
    /// by [`Self::hand_over`].
    fn flush(&mut self) -> Result<(), StoreError> {
        for (i, stream) in Stream::ALL.iter().enumerate() {
            if self.received[i] > 0 {
                let counters = self.ctx.metrics.stream(*stream);
                counters
                    .records_received
                    .fetch_add(self.received[i], Relaxed);
                counters
                    .bytes_received
                    .fetch_add(self.received_bytes[i], Relaxed);
                self.received[i] = 0;
                self.received_bytes[i] = 0;
            }
            if self.batchers[i].is_empty() {
                continue;
            }
            for (partition, batch) in self.batchers[i].drain()? {
                let table = Table::Stream(*stream);
                let wal = self.append_to_wal(table, partition, &batch);
                let table_batch = TableBatch {
                    partition,
                    batch,
                    wal,
                };
                self.appended.push((table, table_batch));
            }
        }
        if !self.dead_letters.is_empty() {
            let mut rows = std::mem::take(&mut self.dead_letters);
            rows.sort_by_key(|d| PartitionKey::from_millis(d.received_at_ms));
            for group in rows.chunk_by(|a, b| {
                PartitionKey::from_millis(a.received_at_ms)
                    == PartitionKey::from_millis(b.received_at_ms)
            }) {
                let batch = dead_letter::to_batch(group)?;
                let partition = PartitionKey::from_millis(group[0].received_at_ms);
                let wal = self.append_to_wal(Table::DeadLetters, partition, &batch);
                let table_batch = TableBatch {
                    partition,
                    batch,
                    wal,
                };
                self.appended.push((Table::DeadLetters, table_batch));
            }
        }
        Ok(())
    }

    /// Hands every batch appended to the WAL to its table's writer; blocks
    /// while a writer's queue is full.
    fn hand_over(&mut self) {
        for (table, table_batch) in self.appended.drain(..) {
            // Writers outlive workers; a closed writer means it panicked,
            // and the batch stays in the WAL for the next start.
            let _ = self.ctx.writers[table.index()].send(table_batch);
        }
    }

    /// The topic a dead letter keeps: only the levels fleetgate recognises
    /// (the root, `tenants`, a stream name, the vehicle's slot as
    /// `vin:<pseudonym>`), every other level as `<N bytes>`: never text the
    /// sender chose.
    fn redact_topic(&mut self, topic: &str, epoch: i32) -> String {
        let mut levels = Vec::new();
        for (i, level) in topic.split('/').enumerate() {
            levels.push(
                if level.is_empty()
                    || level == TOPIC_ROOT
                    || level == TENANTS_LEVEL
                    || Stream::from_name(level).is_some()
                {
                    level.to_owned()
                } else if is_topic_vin(i, level) {
                    format!(
                        "vin:{}",
                        self.privacy.vehicle_id(INTERNAL_DOMAIN, level, epoch)
                    )
                } else {
                    format!("<{} bytes>", level.len())
                },
            );
        }
        levels.join("/")
    }

    /// A rejected record as JSON, keeping only values its schema lets the
    /// store keep as they are: pseudonymised fields as pseudonyms, every
    /// other transformed, dropped or unknown field as `<redacted>`; then any
    /// VIN-shaped token anywhere replaced.
    fn redact_record(
        &mut self,
        schema: &StreamSchema,
        json: &Json,
        vin: &str,
        epoch: i32,
    ) -> Vec<u8> {
        let redacted = match json {
            Json::Object(map) => Json::Object(
                map.iter()
                    .enumerate()
                    .map(|(i, (key, value))| {
                        let field = schema.fields.iter().find(|f| &f.name == key);
                        let kept = match (field, value) {
                            (Some(f), _)
                                if f.transform == Transform::Keep
                                    && decode::is_valid_value(f, value) =>
                            {
                                value.clone()
                            }
                            (Some(f), Json::String(raw)) if f.transform == Transform::Pseudonym => {
                                Json::String(if f.name == crate::schema::VIN_FIELD && raw == vin {
                                    self.privacy.vehicle_id(f.domain(), vin, epoch)
                                } else {
                                    REDACTED.to_owned()
                                })
                            }
                            _ => Json::String(REDACTED.to_owned()),
                        };
                        // A key the schema does not know is text the sender chose.
                        let key = match field {
                            Some(f) => f.name.clone(),
                            None => format!("<unknown field {i}>"),
                        };
                        (key, kept)
                    })
                    .collect(),
            ),
            _ => Json::String(REDACTED.to_owned()),
        };
        let bytes = serde_json::to_vec(&redacted).unwrap_or_default();
        self.privacy.redact(&bytes, Some((vin, epoch)))
    }

    fn cut(&self, mut copy: Vec<u8>) -> Vec<u8> {
        copy.truncate(self.ctx.dead_letter_payload_bytes);
        copy
    }
}

/// The gate `rejected` would not pass had it been valid, if any; a payload
/// that did not parse passes every gate (its bytes are never kept).
fn refusing_gate_of_rejected<'s>(
    schema: &'s StreamSchema,
    consent: &Consent,
    rejected: &RejectedRecord,
) -> Option<&'s ConsentGate> {
    let RejectedBytes::Json(json) = &rejected.bytes else {
        return None;
    };
    schema.consent_gates.iter().find(|g| {
        !consent.get(&g.consent)
            && json.get(&g.field).and_then(Json::as_str) == Some(g.equals.as_str())
    })
}

/// Why nothing of `stream` is collected from a vehicle with `consent`, if
/// so: its SIM is off, or (charging) its charge history is.
fn collection_stopped(stream: Stream, consent: &Consent) -> Option<PolicyDrop> {
    if !consent.sim_active {
        Some(PolicyDrop::SimDeactivated)
    } else if stream == Stream::Charging && !consent.charge_history {
        Some(PolicyDrop::ChargeHistoryOff)
    } else {
        None
    }
}

/// Whether every vehicle `topic` names has its SIM active: one that does
/// not has nothing stored, a rejected publish under its VIN included.
fn topic_collected(privacy: &mut Privacy, topic: &str) -> bool {
    topic_vins(topic).all(|vin| privacy.consent(vin).sim_active)
}

/// Whether level `i` of a topic holds a vehicle's VIN.
fn is_topic_vin(i: usize, level: &str) -> bool {
    is_vin(level) && i <= VIN_LEVEL_MAX
}

/// The VINs a topic names (a TLS vehicle's topic names its own and the
/// one it publishes for).
fn topic_vins(topic: &str) -> impl Iterator<Item = &str> {
    topic
        .split('/')
        .enumerate()
        .filter(|(i, level)| is_topic_vin(*i, level))
        .map(|(_, level)| level)
}

/// The consent gate that refuses `record` under `consent`, if any: a record
/// that needs a consent the vehicle has not given is not collected.
fn refusing_gate<'s>(
    schema: &'s StreamSchema,
    consent: &Consent,
    record: &Record,
) -> Option<&'s ConsentGate> {
    schema.consent_gates.iter().find(|g| {
        !consent.get(&g.consent) && record.get(schema, &g.field) == Some(g.equals.as_str())
    })
}
