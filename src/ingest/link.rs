//! Ingest: the one thread that consumes the embedded broker's local link,
//! parses each topic into (vehicle, stream), and hands the payload, without
//! copying it, to the worker shard that owns the vehicle.
//!
//! Sharding by VIN keeps one vehicle's records in order on one worker.
//! When the workers fall behind, this thread blocks on their bounded queues
//! and stops reading the link; rumqttd then pauses delivery to it.
//!
//! Clean shutdown is a barrier, not a timeout: this thread publishes a
//! marker with a random nonce through its own link. Everything the broker
//! acknowledged before that sits ahead of the marker in the same log, so when
//! the marker comes back, every record acknowledged before shutdown began has
//! been handed to a worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam::channel::Sender;
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};

use crate::core::clock::{now_ms, random_nonce};
use crate::core::reject::{RejectCode, Rejection};
use crate::ingest::broker::PUBLISHER_PROPERTY;
use crate::ingest::durable::DurableFrontier;
use crate::metrics::Metrics;
use crate::privacy::pseudo::is_vin;
use crate::schema::Stream;

/// First topic level of vehicle topics: `vehicles/{VIN}/{stream}`.
pub const TOPIC_ROOT: &str = "vehicles";
/// Topic filter fleetgate subscribes to: every topic, so that publishes to
/// unknown topics are dead-lettered rather than silently dropped.
const SUBSCRIPTION: &str = "#";
/// Topic prefix of the shutdown marker.
const DRAIN_TOPIC: &str = "fleetgate/drain";
/// How long shutdown waits for the marker before giving up (logged).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the loop looks at the stop flag while the link is idle.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("embedded broker link: {0}")]
    Link(Box<LinkError>),
    #[error("cannot start the ingest thread: {0}")]
    Thread(std::io::Error),
}

pub type Result<T, E = IngestError> = std::result::Result<T, E>;

impl From<LinkError> for IngestError {
    fn from(e: LinkError) -> Self {
        IngestError::Link(Box::new(e))
    }
}

/// Where a publish goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Vehicle {
        vin: String,
        stream: Stream,
    },
    /// The topic itself is unacceptable; the whole payload is dead-lettered.
    Rejected {
        rejection: Rejection,
        /// The raw topic, to be pseudonymised before it is stored.
        topic: String,
        stream: Option<Stream>,
    },
}

/// One publish on its way to a worker.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub route: Route,
    pub payload: Bytes,
    pub received_at_ms: i64,
    /// The publish's offset in the broker's log, for the durable watermark
    /// (see [`crate::ingest::durable`]).
    pub offset: Option<u64>,
}

/// Where rumqttd puts the topics of a TLS client: `/tenants/{O}/…`, with O
/// the subject organisation of its certificate, checked by rumqttd.
const TENANT_PREFIX: &str = "/tenants/";

/// Parses `vehicles/{VIN}/{stream}`, or, from a TLS vehicle,
/// `/tenants/{VIN}/vehicles/{VIN}/{stream}`, whose two VINs must agree.
pub fn route(topic: &str) -> Route {
    route_from(topic, None)
}

/// [`route`], for a publish whose client id the broker reported: a client
/// whose id is a VIN (a password-authenticated vehicle logs in with its VIN
/// as username and client id) publishes only to its own topic.
pub fn route_from(topic: &str, publisher: Option<&str>) -> Route {
    let routed = parse_topic(topic);
    match (&routed, publisher) {
        (Route::Vehicle { vin, stream }, Some(client)) if is_vin(client) && client != vin => {
            Route::Rejected {
                rejection: Rejection::new(
                    RejectCode::ForeignTopic,
                    "the vehicle logged in publishes to another vehicle's topic",
                ),
                topic: topic.to_owned(),
                stream: Some(*stream),
            }
        }
        _ => routed,
    }
}

fn parse_topic(topic: &str) -> Route {
    let rejected = |code, message: String, stream| Route::Rejected {
        rejection: Rejection::new(code, message),
        topic: topic.to_owned(),
        stream,
    };
    let (tenant, vehicle_topic) = match topic
        .strip_prefix(TENANT_PREFIX)
        .and_then(|rest| rest.split_once('/'))
    {
        Some((tenant, rest)) => (Some(tenant), rest),
        None => (None, topic),
    };
    let mut parts = vehicle_topic.split('/');
    let (Some(TOPIC_ROOT), Some(vin), Some(stream_name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return rejected(
            RejectCode::UnknownTopic,
            format!("topic is not {TOPIC_ROOT}/{{VIN}}/{{stream}}"),
            None,
        );
    };
    let Some(stream) = Stream::from_name(stream_name) else {
        return rejected(
            RejectCode::UnknownStream,
            format!(
                "the topic's stream level ({} bytes) names no stream",
                stream_name.len()
            ),
            None,
        );
    };
    if !is_vin(vin) {
        return rejected(
            RejectCode::InvalidVin,
            "the topic's VIN is not 17 characters of the VIN alphabet".to_owned(),
            Some(stream),
        );
    }
    if tenant.is_some_and(|tenant| !tenant.eq_ignore_ascii_case(vin)) {
        return rejected(
            RejectCode::ForeignTopic,
            "the certificate names another vehicle than the topic".to_owned(),
            Some(stream),
        );
    }
    Route::Vehicle {
        vin: vin.to_owned(),
        stream,
    }
}

/// Where ingest hands each publish.
pub enum Sink {
    /// To the worker shards, which decode and store it.
    Shards(Vec<Sender<Inbound>>),
    /// Nowhere: it is counted and dropped unread. Measures the embedded
    /// broker's ceiling in benchmarks; never a production setting.
    Discard(Arc<Metrics>),
}

/// Starts the ingest thread. It runs until `stop` is set and the drain
/// barrier has passed, then drops the shard senders, which lets the workers
/// finish.
pub fn spawn(
    mut link_tx: LinkTx,
    mut link_rx: LinkRx,
    sink: Sink,
    frontier: Arc<DurableFrontier>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    link_tx.subscribe(SUBSCRIPTION)?;
    frontier.connect(link_tx.durability());
    std::thread::Builder::new()
        .name("ingest".into())
        .spawn(move || {
            if let Err(e) = run(&mut link_tx, &mut link_rx, &sink, &frontier, &stop) {
                tracing::error!(error = %e, "ingest stopped on a link error");
            }
        })
        .map_err(IngestError::Thread)
}

fn run(
    link_tx: &mut LinkTx,
    link_rx: &mut LinkRx,
    sink: &Sink,
    frontier: &DurableFrontier,
    stop: &AtomicBool,
) -> Result<()> {
    let mut drain: Option<(String, Instant)> = None;
    loop {
        if drain.is_none() && stop.load(Ordering::Relaxed) {
            let marker = format!("{DRAIN_TOPIC}/{:016x}", random_nonce());
            link_tx.publish(marker.clone(), Vec::new())?;
            drain = Some((marker, Instant::now() + DRAIN_TIMEOUT));
        }
        match link_rx.recv_deadline(Instant::now() + POLL) {
            Ok(Some(Notification::Forward(forward))) => {
                // None only for retained messages sent at subscription, which
                // the broker started with this process has none of.
                let offset = forward.cursor.map(|(_, offset)| offset);
                let topic = String::from_utf8_lossy(&forward.publish.topic);
                if drain.as_ref().is_some_and(|(marker, _)| *marker == topic) {
                    return Ok(());
                }
                let shards = match sink {
                    Sink::Shards(shards) => shards,
                    Sink::Discard(metrics) => {
                        metrics.publishes_discarded.fetch_add(1, Ordering::Relaxed);
                        if let Some(offset) = offset {
                            frontier.passed(offset);
                            frontier.report();
                        }
                        continue;
                    }
                };
                let publisher = forward.properties.as_ref().and_then(|p| {
                    p.user_properties
                        .iter()
                        .find(|(key, _)| key == PUBLISHER_PROPERTY)
                        .map(|(_, client)| client.as_str())
                });
                let inbound = Inbound {
                    route: route_from(&topic, publisher),
                    payload: forward.publish.payload,
                    received_at_ms: now_ms(),
                    offset,
                };
                let index = shard_of(&inbound.route, shards.len());
                if let Some(offset) = offset {
                    frontier.handed(index, offset);
                }
                if shards[index].send(inbound).is_err() {
                    tracing::error!("a worker has stopped; ingest stops too");
                    return Ok(());
                }
            }
            // The router paused delivery because our buffer was full; we have
            // emptied it, so ask for more.
            Ok(Some(Notification::Unschedule)) => link_rx.ready()?,
            Ok(_) => {}
            Err(LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => {}
            Err(e) => return Err(e.into()),
        }
        if drain
            .as_ref()
            .is_some_and(|(_, deadline)| Instant::now() > *deadline)
        {
            tracing::warn!(
                "shutdown marker did not come back within {DRAIN_TIMEOUT:?}; \
                 records still queued in the broker are not stored"
            );
            return Ok(());
        }
    }
}

/// The worker shard of a route: by a hash of the VIN (of the topic for a
/// rejected publish) under keys drawn once per process, so that a
/// vehicle's records stay in order within a run, and the shard stored with
/// each row (`wal_app`) links a vehicle's rows of one run only, and only
/// as one in N does.
fn shard_of(route: &Route, shards: usize) -> usize {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(std::collections::hash_map::RandomState::new);
    let hash = match route {
        Route::Vehicle { vin, .. } => keys.hash_one(vin),
        Route::Rejected { topic, .. } => keys.hash_one(topic),
    };
    (hash % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(route: Route) -> Option<RejectCode> {
        match route {
            Route::Rejected { rejection, .. } => Some(rejection.code),
            Route::Vehicle { .. } => None,
        }
    }

    #[test]
    fn vehicle_topics_route_to_their_stream() {
        assert_eq!(
            route("vehicles/WMW11DJ04N2T00001/rtti"),
            Route::Vehicle {
                vin: "WMW11DJ04N2T00001".into(),
                stream: Stream::Rtti
            }
        );
    }

    #[test]
    fn rejections_quote_no_topic_text() {
        for topic in [
            "vehicles/WMW11DJ04N2T00001/AnnaSvensson",
            "vehicles/WMW11DJ04N2T00001/WMW21GD07P2S00002",
            "AnnaSvensson/x",
        ] {
            let Route::Rejected { rejection, .. } = route(topic) else {
                panic!("{topic} routed");
            };
            for secret in ["AnnaSvensson", "WMW21GD07P2S00002"] {
                assert!(!rejection.message.contains(secret), "{}", rejection.message);
            }
        }
    }

    #[test]
    fn bad_topics_are_rejected_with_their_reason() {
        assert_eq!(
            code(route("vehicles/WMW11DJ04N2T00001/radio")),
            Some(RejectCode::UnknownStream)
        );
        assert_eq!(
            code(route("vehicles/NOT-A-VIN/rtti")),
            Some(RejectCode::InvalidVin)
        );
        assert_eq!(
            code(route("vehicles/WMW11DJ04N2T00001/rtti/x")),
            Some(RejectCode::UnknownTopic)
        );
        assert_eq!(
            code(route("cars/WMW11DJ04N2T00001/rtti")),
            Some(RejectCode::UnknownTopic)
        );
        assert_eq!(code(route("")), Some(RejectCode::UnknownTopic));
    }

    #[test]
    fn a_tls_vehicle_routes_only_its_own_topic() {
        assert_eq!(
            route("/tenants/WMW11DJ04N2T00001/vehicles/WMW11DJ04N2T00001/rtti"),
            Route::Vehicle {
                vin: "WMW11DJ04N2T00001".into(),
                stream: Stream::Rtti
            }
        );
        assert_eq!(
            code(route(
                "/tenants/WMW11DJ04N2T00001/vehicles/WMW21GD07P2S00002/rtti"
            )),
            Some(RejectCode::ForeignTopic)
        );
        assert_eq!(
            code(route("/tenants/WMW11DJ04N2T00001/rtti")),
            Some(RejectCode::UnknownTopic)
        );
    }

    #[test]
    fn a_logged_in_vehicle_routes_only_its_own_topic() {
        let own = "vehicles/WMW11DJ04N2T00001/rtti";
        let other = "vehicles/WMW21GD07P2S00002/rtti";
        let a = Some("WMW11DJ04N2T00001");
        assert!(matches!(route_from(own, a), Route::Vehicle { .. }));
        assert_eq!(code(route_from(other, a)), Some(RejectCode::ForeignTopic));
        // Clients not logged in as a vehicle (development) are not bound.
        assert!(matches!(
            route_from(other, Some("loadgen-1")),
            Route::Vehicle { .. }
        ));
        assert!(matches!(route_from(other, None), Route::Vehicle { .. }));
    }

    #[test]
    fn one_vehicle_always_lands_on_one_shard() {
        let a = route("vehicles/WMW11DJ04N2T00001/rtti");
        let b = route("vehicles/WMW11DJ04N2T00001/charging");
        assert_eq!(shard_of(&a, 7), shard_of(&b, 7));
    }
}
