//! One connection per vehicle, as a fleet connects: N vehicles, each on its
//! own MQTT 3.1.1 connection from its own loopback source address
//! (127.x.y.z), held open for a while, each publishing one record every
//! so often or only keeping its connection alive. Measures how fast the
//! broker accepts them (the first connect to the last CONNACK) and, given
//! the server's process id, its resident set before and after: the memory
//! one idle vehicle costs. Run it beside `loadgen run` to see whether a
//! connected fleet slows ingest.
//!
//! The client is a few lines over rumqttc's packet codec rather than
//! rumqttc's event loop: thousands of event loops (each with its request
//! channel, buffers and state) would make loadgen, not the broker, the
//! thing measured.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use rumqttc::{ConnectReturnCode, Packet, QoS};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use crate::fleet::{Mix, Vehicle};

/// Descriptors loadgen keeps for itself besides the connections.
const RESERVED_FDS: u64 = 64;
/// The largest packet a vehicle expects from the broker (acks, pings).
const MAX_INCOMING: usize = 1024;
/// How long a released vehicle waits for its last publish's PUBACK.
const DRAIN: Duration = Duration::from_secs(10);
/// How long a vehicle waits for the TCP connection and its CONNACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectionsError {
    #[error(
        "{wanted} connections need {needed} file descriptors, but this process may open {limit} \
         (raise the hard limit: ulimit -Hn, or LimitNOFILE= for a service)"
    )]
    FdLimit {
        wanted: u32,
        needed: u64,
        limit: u64,
    },
    #[error("latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error("writing {path}: {reason}")]
    Ready { path: PathBuf, reason: String },
    #[error("a vehicle task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Where to connect, how many vehicles, and how they behave once connected.
#[derive(Debug, Clone)]
pub struct Connections {
    pub server: SocketAddr,
    pub vehicles: u32,
    /// CONNECTs in flight at once (a fleet reconnecting after an outage
    /// comes all at once; this bounds how hard).
    pub parallel: usize,
    /// How long to hold the connections once all have answered.
    pub hold: Duration,
    /// Each vehicle publishes one QoS 1 record this often; `None`: idle.
    pub every: Option<Duration>,
    pub keep_alive_secs: u16,
    /// The broker's process, whose resident set is read before and after.
    pub server_pid: Option<u32>,
    /// Written (with the connect phase's figures) once every vehicle has
    /// answered, so that a script can start its next step then.
    pub ready_file: Option<PathBuf>,
    pub mix: Mix,
    pub seed: u64,
}

/// What the connect phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectPhase {
    pub vehicles: u32,
    pub connected: u64,
    /// Answered with a CONNACK code other than success.
    pub refused: u64,
    /// No CONNACK: the connection failed, timed out or was closed (rumqttd
    /// closes a connection it has no room for without a CONNACK).
    pub failed: u64,
    pub first_error: Option<String>,
    /// From the first connect to the last vehicle's answer (CONNACK or
    /// failure).
    pub seconds: f64,
    pub accepted_per_second: f64,
    pub server_rss_before_kib: Option<u64>,
    /// One second after the last CONNACK.
    pub server_rss_connected_kib: Option<u64>,
    /// (connected − before) / connected.
    pub server_kib_per_connection: Option<f64>,
}

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct ConnectionsReport {
    #[serde(flatten)]
    pub connect: ConnectPhase,
    pub held_seconds: f64,
    /// Connections the broker closed while they were held.
    pub dropped: u64,
    pub publishes_sent: u64,
    pub publishes_acked: u64,
    /// Publish → PUBACK, when vehicles published.
    pub puback: Option<crate::run::LatencySummary>,
    /// At the end of the hold, before the vehicles leave.
    pub server_rss_end_kib: Option<u64>,
    /// (end − before) / connected: the same after the vehicles' pings and
    /// whatever else the server did meanwhile.
    pub server_kib_per_connection_end: Option<f64>,
}

/// How one vehicle's connection went.
#[derive(Debug, Default)]
struct Tally {
    connected: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    /// Publish → PUBACK (µs) of all vehicles: one histogram, not one each,
    /// so that loadgen stays small beside thousands of vehicles.
    puback_us: std::sync::Mutex<Option<Histogram<u64>>>,
}

/// Connects the fleet, holds it, and reports.
pub async fn run(config: &Connections) -> Result<ConnectionsReport, ConnectionsError> {
    let limit = fleetgate::core::fsio::raise_open_file_limit().unwrap_or(u64::MAX);
    let needed = u64::from(config.vehicles) + RESERVED_FDS;
    if needed > limit {
        return Err(ConnectionsError::FdLimit {
            wanted: config.vehicles,
            needed,
            limit,
        });
    }
    let rss_before = config.server_pid.and_then(resident_kib);
    let tally = Arc::new(Tally {
        puback_us: std::sync::Mutex::new(Some(crate::run::new_histogram()?)),
        ..Tally::default()
    });
    let handshakes = Arc::new(Semaphore::new(config.parallel.max(1)));
    let (answered_tx, mut answered_rx) = tokio::sync::mpsc::unbounded_channel();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let run_tag = crate::fleet::run_tag(&mut fastrand::Rng::with_seed(config.seed));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(config.vehicles as usize);
    for index in 0..config.vehicles {
        let vehicle = Vehicle::new(
            &run_tag,
            index,
            &mut fastrand::Rng::with_seed(config.seed ^ u64::from(index)),
        );
        tasks.push(tokio::spawn(one_vehicle(
            config.clone(),
            vehicle,
            handshakes.clone(),
            tally.clone(),
            answered_tx.clone(),
            release_rx.clone(),
        )));
    }
    drop(answered_tx);
    let mut first_error = None;
    let mut last_answer = start;
    for _ in 0..config.vehicles {
        let Some(answer) = answered_rx.recv().await else {
            break;
        };
        last_answer = Instant::now();
        if let Err(e) = answer {
            first_error.get_or_insert(e);
        }
    }
    let seconds = (last_answer - start).as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = config.server_pid.and_then(resident_kib);
    let connected = tally.connected.load(Relaxed);
    let connect = ConnectPhase {
        vehicles: config.vehicles,
        connected,
        refused: tally.refused.load(Relaxed),
        failed: tally.failed.load(Relaxed),
        first_error,
        seconds,
        accepted_per_second: if seconds > 0.0 {
            connected as f64 / seconds
        } else {
            0.0
        },
        server_rss_before_kib: rss_before,
        server_rss_connected_kib: rss_connected,
        server_kib_per_connection: per_connection(rss_before, rss_connected, connected),
    };
    eprintln!(
        "connected {connected} of {} vehicles in {seconds:.1} s",
        config.vehicles
    );
    if let Some(path) = &config.ready_file {
        let text = serde_json::to_string_pretty(&connect).unwrap_or_default();
        std::fs::write(path, text).map_err(|e| ConnectionsError::Ready {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }

    let held_from = Instant::now();
    tokio::time::sleep(config.hold).await;
    let held_seconds = held_from.elapsed().as_secs_f64();
    let rss_end = config.server_pid.and_then(resident_kib);
    let _ = release_tx.send(true);
    for task in tasks {
        task.await?;
    }
    let latency = tally
        .puback_us
        .lock()
        .ok()
        .and_then(|mut h| h.take())
        .filter(|h| !h.is_empty());
    Ok(ConnectionsReport {
        connect,
        held_seconds,
        dropped: tally.dropped.load(Relaxed),
        publishes_sent: tally.sent.load(Relaxed),
        publishes_acked: tally.acked.load(Relaxed),
        puback: latency.as_ref().map(Into::into),
        server_rss_end_kib: rss_end,
        server_kib_per_connection_end: per_connection(rss_before, rss_end, connected),
    })
}

/// How much a resident set grew per connection.
fn per_connection(before: Option<u64>, after: Option<u64>, connections: u64) -> Option<f64> {
    match (before, after) {
        (Some(before), Some(after)) if connections > 0 => {
            Some((after as f64 - before as f64) / connections as f64)
        }
        _ => None,
    }
}

/// The loopback address vehicle `index` connects from: one per vehicle,
/// skipping host parts 0 and 255.
pub fn source_address(index: u32) -> Ipv4Addr {
    let host = (index % 254 + 1) as u8;
    let middle = ((index / 254) % 256) as u8;
    let high = (1 + index / (254 * 256)).min(254) as u8;
    Ipv4Addr::new(127, high, middle, host)
}

/// One vehicle: connect, answer, then hold (publishing or pinging) until
/// released.
async fn one_vehicle(
    config: Connections,
    mut vehicle: Vehicle,
    handshakes: Arc<Semaphore>,
    tally: Arc<Tally>,
    answered: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
    mut release: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(permit) = handshakes.acquire_owned().await else {
        return;
    };
    let handshake = tokio::time::timeout(CONNECT_TIMEOUT, connect(&config, &vehicle))
        .await
        .unwrap_or_else(|_| Err(format!("no CONNACK within {CONNECT_TIMEOUT:?}")));
    drop(permit);
    let (mut stream, mut buffer) = match handshake {
        Ok(Ok(connected)) => {
            tally.connected.fetch_add(1, Relaxed);
            let _ = answered.send(Ok(()));
            connected
        }
        Ok(Err(code)) => {
            tally.refused.fetch_add(1, Relaxed);
            let _ = answered.send(Err(format!("CONNACK {code:?}")));
            return;
        }
        Err(e) => {
            tally.failed.fetch_add(1, Relaxed);
            let _ = answered.send(Err(e));
            return;
        }
    };
    drop(answered);

    let mut rng = fastrand::Rng::with_seed(config.seed ^ u64::from(vehicle.index) << 32);
    // Publishes start at a random point of the first interval, so that the
    // fleet's publishes spread out instead of coming in one burst.
    let ping_every = Duration::from_secs(u64::from(config.keep_alive_secs.max(2)) / 2);
    let mut next_publish = config
        .every
        .map(|every| Instant::now() + every.mul_f64(rng.f64()));
    let mut next_ping = Instant::now() + ping_every;
    let mut waiting: Option<(u16, Instant)> = None;
    let mut pkid = 0u16;
    let mut out = BytesMut::new();
    let mut drain_until: Option<Instant> = None;
    loop {
        if drain_until.is_some() && waiting.is_none() {
            break;
        }
        let wake = match drain_until {
            Some(until) => until,
            None => next_publish.map_or(next_ping, |p| p.min(next_ping)),
        };
        tokio::select! {
            // Released: no more publishes, but the one in flight is waited for.
            _ = release.changed(), if drain_until.is_none() => {
                drain_until = Some(Instant::now() + DRAIN);
            }
            read = stream.read_buf(&mut buffer) => {
                if !matches!(read, Ok(n) if n > 0) {
                    tally.dropped.fetch_add(1, Relaxed);
                    return;
                }
                loop {
                    let packet = match Packet::read(&mut buffer, MAX_INCOMING) {
                        Ok(packet) => packet,
                        Err(rumqttc::Error::InsufficientBytes(_)) => break,
                        // Not MQTT from the broker: this connection is done.
                        Err(_) => {
                            tally.dropped.fetch_add(1, Relaxed);
                            return;
                        }
                    };
                    if let (Packet::PubAck(ack), Some((id, sent))) = (&packet, waiting)
                        && ack.pkid == id
                    {
                        waiting = None;
                        tally.acked.fetch_add(1, Relaxed);
                        let micros = sent.elapsed().as_micros().try_into().unwrap_or(u64::MAX);
                        if let Ok(mut guard) = tally.puback_us.lock()
                            && let Some(h) = guard.as_mut()
                        {
                            h.saturating_record(micros);
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                if drain_until.is_some_and(|until| until <= now) {
                    break;
                }
                out.clear();
                if let (Some(due), Some(every), None) = (next_publish, config.every, drain_until) {
                    if due <= now && waiting.is_none() {
                        pkid = pkid % u16::MAX + 1;
                        let record = vehicle.publish(&config.mix, 1, fleetgate::core::clock::now_ms(), &mut rng);
                        let mut publish = rumqttc::Publish::new(record.topic, QoS::AtLeastOnce, record.payload);
                        publish.pkid = pkid;
                        let _ = publish.write(&mut out);
                        waiting = Some((pkid, now));
                        tally.sent.fetch_add(1, Relaxed);
                        next_publish = Some(due + every);
                    } else if due <= now {
                        // The last one is still unacknowledged: one in flight per vehicle.
                        next_publish = Some(now + every);
                    }
                }
                if next_ping <= now {
                    let _ = rumqttc::PingReq.write(&mut out);
                    next_ping = now + ping_every;
                }
                if !out.is_empty() && stream.write_all(&out).await.is_err() {
                    tally.dropped.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    }
    out.clear();
    let _ = rumqttc::Disconnect.write(&mut out);
    let _ = stream.write_all(&out).await;
}

/// TCP connect from the vehicle's own source address, CONNECT, CONNACK.
/// The outer error is a failure; the inner one a refusal.
async fn connect(
    config: &Connections,
    vehicle: &Vehicle,
) -> Result<Result<(TcpStream, BytesMut), ConnectReturnCode>, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    let source = SocketAddr::new(IpAddr::V4(source_address(vehicle.index)), 0);
    socket
        .bind(source)
        .map_err(|e| format!("binding {source}: {e}"))?;
    let mut stream = socket
        .connect(config.server)
        .await
        .map_err(|e| format!("connecting from {source}: {e}"))?;
    let mut connect = rumqttc::Connect::new(vehicle.vin());
    connect.keep_alive = config.keep_alive_secs;
    let mut out = BytesMut::new();
    connect
        .write(&mut out)
        .map_err(|e| format!("encoding CONNECT: {e:?}"))?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut buffer = BytesMut::with_capacity(64);
    loop {
        match Packet::read(&mut buffer, MAX_INCOMING) {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                return Ok(Ok((stream, buffer)));
            }
            Ok(Packet::ConnAck(ack)) => return Ok(Err(ack.code)),
            Ok(other) => return Err(format!("expected CONNACK, got {other:?}")),
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("reading CONNACK: {e:?}")),
        }
        match stream.read_buf(&mut buffer).await {
            Ok(0) => return Err("closed before CONNACK".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading CONNACK: {e}")),
        }
    }
}

/// A process's resident set in KiB, from /proc.
pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vehicle_gets_its_own_loopback_address() {
        let mut seen = std::collections::HashSet::new();
        for index in 0..200_000 {
            let address = source_address(index);
            assert!(address.is_loopback(), "{address}");
            let host = address.octets()[3];
            assert!(host != 0 && host != 255, "{address}");
            assert!(seen.insert(address), "{address} given twice");
        }
    }
}
