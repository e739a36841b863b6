//! Driving the load: C MQTT connections (rumqttc), each publishing for its
//! share of the fleet, counting what the broker acknowledged and how long
//! each acknowledgement took.
//!
//! In rate mode the schedule is open-loop: publish k of a connection is due
//! at `start + k / rate`, and its latency is measured from that due time,
//! not from when it was actually sent. A stalled broker therefore shows up
//! as latency instead of silently lowering the offered load (coordinated
//! omission). Without a rate each connection publishes as fast as its
//! in-flight window allows, and latency runs from the publish call.
//!
//! rumqttc names a publish's packet id only in its `Outgoing::Publish`
//! event, which comes in the order publishes were handed to it; so each
//! connection queues what it handed over and pairs the two up there. A
//! connection that fails is not reconnected: its unacknowledged publishes
//! are reported as such, never retried behind the report's back.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use fleetgate::schema::Stream;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};

use crate::acks::Acks;
use crate::fleet::{Mix, Vehicle};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "a run needs at least one vehicle and one connection, and no more connections than vehicles"
    )]
    Shape,
    #[error("latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error("a connection task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// When a run stops publishing.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this many publishes in all.
    Publishes(u64),
    /// After this long.
    Duration(Duration),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub host: String,
    pub port: u16,
    pub vehicles: u32,
    pub connections: u32,
    pub qos: QoS,
    pub stop: Stop,
    /// Publishes per second over all connections (open loop); `None` runs
    /// each connection as fast as its in-flight window allows.
    pub rate: Option<f64>,
    pub records_per_publish: u32,
    /// QoS 1 publishes a connection may have unacknowledged.
    pub inflight: u16,
    pub mix: Mix,
    pub seed: u64,
    /// How long to wait for outstanding acknowledgements after the last publish.
    pub drain_timeout: Duration,
}

/// Live counters, read by the progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
}

/// Per-stream totals of a run.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamTotals {
    pub publishes: u64,
    pub records: u64,
    pub bytes: u64,
}

/// Everything a run measured.
pub struct Outcome {
    pub run_tag: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    /// From the first publish to the last acknowledgement (QoS 1) or the
    /// last publish written (QoS 0).
    pub elapsed: Duration,
    pub publishes_sent: u64,
    pub publishes_acked: u64,
    pub records_sent: u64,
    pub records_acked: u64,
    pub errors: Vec<String>,
    pub sent_by_stream: [StreamTotals; Stream::ALL.len()],
    /// Microseconds from due (or publish) time to PUBACK (QoS 1) or to the
    /// write to the socket (QoS 0).
    pub latency_us: Histogram<u64>,
    pub acks: Acks,
}

/// A publish handed to rumqttc, waiting for its packet id and then its ack.
struct InFlight {
    due: Instant,
    vehicle: u32,
    stream: Stream,
    first_seq: u64,
    records: u32,
}

/// What one connection measured.
struct ConnectionOutcome {
    publishes_sent: u64,
    publishes_acked: u64,
    records_sent: u64,
    records_acked: u64,
    last_ack: Option<Instant>,
    error: Option<String>,
    sent_by_stream: [StreamTotals; Stream::ALL.len()],
    latency_us: Histogram<u64>,
    acks: Acks,
}

/// Runs the load and returns what it measured. `progress` is updated live.
pub async fn run(
    config: &RunConfig,
    run_tag: &str,
    progress: Arc<Progress>,
) -> Result<Outcome, RunError> {
    if config.vehicles == 0 || config.connections == 0 || config.connections > config.vehicles {
        return Err(RunError::Shape);
    }
    let started_ms = fleetgate::core::clock::now_ms();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..config.connections {
        let mut rng = fastrand::Rng::with_seed(
            config.seed ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let vehicles: Vec<Vehicle> = (index..config.vehicles)
            .step_by(config.connections as usize)
            .map(|v| Vehicle::new(run_tag, v, &mut rng))
            .collect();
        let share = Share {
            publishes: match config.stop {
                Stop::Publishes(n) => {
                    let c = u64::from(config.connections);
                    Some(n / c + u64::from(u64::from(index) < n % c))
                }
                Stop::Duration(_) => None,
            },
            until: match config.stop {
                Stop::Duration(d) => Some(start + d),
                Stop::Publishes(_) => None,
            },
            interval: config
                .rate
                .map(|r| Duration::from_secs_f64(f64::from(config.connections) / r)),
        };
        let client_id = format!("loadgen-{run_tag}-{index}");
        tasks.push(tokio::spawn(connection(
            config.clone(),
            client_id,
            vehicles,
            rng,
            share,
            start,
            progress.clone(),
        )));
    }
    let mut outcome = Outcome {
        run_tag: run_tag.to_owned(),
        started_ms,
        finished_ms: 0,
        elapsed: Duration::ZERO,
        publishes_sent: 0,
        publishes_acked: 0,
        records_sent: 0,
        records_acked: 0,
        errors: Vec::new(),
        sent_by_stream: Default::default(),
        latency_us: new_histogram()?,
        acks: Acks::default(),
    };
    let mut last = start;
    for task in tasks {
        let c = task.await??;
        outcome.publishes_sent += c.publishes_sent;
        outcome.publishes_acked += c.publishes_acked;
        outcome.records_sent += c.records_sent;
        outcome.records_acked += c.records_acked;
        outcome.errors.extend(c.error);
        for (total, part) in outcome.sent_by_stream.iter_mut().zip(c.sent_by_stream) {
            total.publishes += part.publishes;
            total.records += part.records;
            total.bytes += part.bytes;
        }
        // Both histograms share bounds, so adding cannot fail.
        let _ = outcome.latency_us.add(&c.latency_us);
        outcome.acks.merge(c.acks);
        last = last.max(c.last_ack.unwrap_or(start));
    }
    outcome.elapsed = last - start;
    outcome.finished_ms = fleetgate::core::clock::now_ms();
    Ok(outcome)
}

/// A connection's part of the run.
#[derive(Debug, Clone, Copy)]
struct Share {
    publishes: Option<u64>,
    until: Option<Instant>,
    /// Time between two due publishes (open loop), if rate-limited.
    interval: Option<Duration>,
}

impl Share {
    fn done(&self, sent: u64, now: Instant) -> bool {
        self.publishes.is_some_and(|n| sent >= n) || self.until.is_some_and(|t| now >= t)
    }
}

/// A latency histogram (µs) as the JSON reports give it, in milliseconds.
#[derive(Debug, serde::Serialize)]
pub struct LatencySummary {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl From<&Histogram<u64>> for LatencySummary {
    fn from(micros: &Histogram<u64>) -> Self {
        let ms = |q: f64| micros.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            max_ms: micros.max() as f64 / 1000.0,
        }
    }
}

pub(crate) fn new_histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    // 1 µs to 10 minutes at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3)
}

async fn connection(
    config: RunConfig,
    client_id: String,
    mut vehicles: Vec<Vehicle>,
    mut rng: fastrand::Rng,
    share: Share,
    start: Instant,
    progress: Arc<Progress>,
) -> Result<ConnectionOutcome, RunError> {
    let mut options = MqttOptions::new(client_id, config.host.clone(), config.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(config.inflight.max(1));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, usize::from(config.inflight.max(1)));
    let (handed_tx, handed_rx) = std::sync::mpsc::channel::<InFlight>();
    let publishing_done = Arc::new(AtomicBool::new(false));
    let handed = Arc::new(AtomicU64::new(0));

    let publisher = {
        let progress = progress.clone();
        let done = publishing_done.clone();
        let handed = handed.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let mut out = [StreamTotals::default(); Stream::ALL.len()];
            let mut sent = 0u64;
            while !share.done(sent, Instant::now()) {
                let due = match share.interval {
                    Some(interval) => {
                        let due = start + interval.mul_f64(sent as f64);
                        if due > Instant::now() {
                            tokio::time::sleep_until(due.into()).await;
                        }
                        due
                    }
                    None => Instant::now(),
                };
                let fleet_size = vehicles.len() as u64;
                let vehicle = &mut vehicles[(sent % fleet_size) as usize];
                let now_ms = fleetgate::core::clock::now_ms();
                let publish =
                    vehicle.publish(&config.mix, config.records_per_publish, now_ms, &mut rng);
                let totals = &mut out[publish.stream.index()];
                totals.publishes += 1;
                totals.records += u64::from(publish.records);
                totals.bytes += publish.payload.len() as u64;
                let _ = handed_tx.send(InFlight {
                    due,
                    vehicle: vehicle.index,
                    stream: publish.stream,
                    first_seq: publish.first_seq,
                    records: publish.records,
                });
                handed.fetch_add(1, Relaxed);
                if client
                    .publish(publish.topic, config.qos, false, publish.payload)
                    .await
                    .is_err()
                {
                    // The event loop has stopped; it reports why.
                    break;
                }
                sent += 1;
                progress.sent.fetch_add(1, Relaxed);
            }
            done.store(true, Relaxed);
            (out, sent, client)
        })
    };

    let mut outcome = ConnectionOutcome {
        publishes_sent: 0,
        publishes_acked: 0,
        records_sent: 0,
        records_acked: 0,
        last_ack: None,
        error: None,
        sent_by_stream: Default::default(),
        latency_us: new_histogram()?,
        acks: Acks::default(),
    };
    let mut waiting: HashMap<u16, InFlight> = HashMap::new();
    let mut collided: Option<InFlight> = None;
    let mut written = 0u64;
    let mut drain_deadline: Option<Instant> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    // rumqttc's `poll` is not cancel-safe while it connects: dropped by the
    // select below after its CONNECT went out (the ticker fires every 50 ms;
    // a loaded broker answers later), the next poll connects again under
    // the same client id, and the broker drops one of the two connections.
    // So the connection is made first, with nothing racing it.
    let connection = connected(&mut eventloop).await;
    if let Err(e) = &connection {
        outcome.error = Some(format!("connection failed: {e}"));
        progress.errors.fetch_add(1, Relaxed);
    }
    while connection.is_ok() {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let Some(handed) = collided.take().or_else(|| handed_rx.try_recv().ok()) else {
                        continue;
                    };
                    written += 1;
                    if config.qos == QoS::AtMostOnce {
                        let now = Instant::now();
                        record(&mut outcome.latency_us, now - handed.due);
                        outcome.last_ack = Some(now);
                    } else {
                        waiting.insert(pkid, handed);
                    }
                }
                // rumqttc holds a publish whose packet id is still in flight
                // and sends it, under that id, after the id's ack.
                Ok(Event::Outgoing(Outgoing::AwaitAck(_))) => collided = handed_rx.try_recv().ok(),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(handed) = waiting.remove(&ack.pkid) {
                        let now = Instant::now();
                        record(&mut outcome.latency_us, now - handed.due);
                        outcome.last_ack = Some(now);
                        outcome.publishes_acked += 1;
                        outcome.records_acked += u64::from(handed.records);
                        outcome.acks.add(handed.stream, handed.vehicle, handed.first_seq, handed.records);
                        progress.acked.fetch_add(1, Relaxed);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    outcome.error = Some(format!("connection failed: {e}"));
                    progress.errors.fetch_add(1, Relaxed);
                    break;
                }
            },
            _ = ticker.tick() => {
                if !publishing_done.load(Relaxed) {
                    continue;
                }
                let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + config.drain_timeout);
                let all_written = written == handed.load(Relaxed);
                if (all_written && waiting.is_empty()) || Instant::now() > deadline {
                    break;
                }
            }
        }
    }
    publishing_done.store(true, Relaxed);
    // The publisher ends on its own once the event loop's channel is gone.
    drop(eventloop);
    let (sent_by_stream, sent, client) = publisher.await?;
    let _ = client.try_disconnect();
    outcome.sent_by_stream = sent_by_stream;
    outcome.publishes_sent = sent;
    outcome.records_sent = sent_by_stream.iter().map(|t| t.records).sum();
    Ok(outcome)
}

/// Polls until the broker accepted the connection (its CONNACK) or it
/// failed; rumqttc's own connection timeout bounds the wait.
async fn connected(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
            return Ok(());
        }
    }
}

fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    histogram.saturating_record(latency.as_micros().try_into().unwrap_or(u64::MAX));
}
