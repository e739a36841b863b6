//! The embedded MQTT broker: rumqttd, configured from `[broker]`, running on
//! its own threads inside the fleetgate process: plain MQTT 3.1.1 and 5
//! listeners (loopback unless `plain_remote`, passwords when
//! `credentials_file` is set), and a TLS listener for vehicles with client
//! certificates, whose topics rumqttd confines to `/tenants/{VIN}/`.
//!
//! fleetgate consumes through rumqttd's local link (no second TCP hop).
//! Each listener is bound here, before the broker starts, and handed to it
//! (`Broker::serve_on`, vendor/rumqttd/PATCHED.md 18): port 0 resolves to a
//! port that is fleetgate's from then on, and a port in use is an error at
//! start-up. rumqttd 0.20 has no shutdown, so its threads end with the
//! process (the pipeline drains separately, see `ingest`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

use crate::config::{Acknowledge, BrokerConfig};
use crate::ingest::auth::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot link to the embedded broker: {0}")]
    Link(Box<rumqttd::local::LinkError>),
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the broker did not start listening on {addr} (see the log)")]
    NotListening { addr: SocketAddr },
    #[error("broker.tls: cert_file, key_file or client_ca_file does not exist")]
    TlsFiles,
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

impl From<rumqttd::local::LinkError> for BrokerError {
    fn from(e: rumqttd::local::LinkError) -> Self {
        BrokerError::Link(Box::new(e))
    }
}

/// The user property in which the (patched) broker names a publish's
/// client id, whatever the client sent under that name.
pub const PUBLISHER_PROPERTY: &str = "fleetgate-publisher";

/// How long the broker may take to answer its first CONNECT.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Publishes the router hands the local link per sweep.
const LINK_BATCH: u64 = 1024;

/// A running embedded broker and fleetgate's link to it.
pub struct EmbeddedBroker {
    /// Where MQTT 3.1.1 clients connect.
    pub mqtt_addr: SocketAddr,
    /// Where MQTT 5 clients connect.
    pub mqtt5_addr: SocketAddr,
    /// Where vehicles with client certificates connect, if configured.
    pub tls_addr: Option<SocketAddr>,
    pub link_tx: LinkTx,
    pub link_rx: LinkRx,
    _thread: JoinHandle<()>,
}

/// The broker's listeners, bound by fleetgate before anything else starts,
/// so that a port in use stops start-up before it has done anything, and
/// handed to rumqttd (`Broker::serve_on`). Connections made before the
/// broker runs wait in the listeners' backlog.
pub struct Listeners {
    mqtt: (TcpListener, SocketAddr),
    mqtt5: (TcpListener, SocketAddr),
    tls: Option<(TcpListener, SocketAddr)>,
}

impl Listeners {
    /// Binds `mqtt_addr`, `mqtt5_addr` and, if configured, the TLS address
    /// (port 0: any free port).
    pub fn bind(config: &BrokerConfig) -> Result<Self> {
        Ok(Self {
            mqtt: bind(config.mqtt_addr)?,
            mqtt5: bind(config.mqtt5_addr)?,
            tls: config.tls.as_ref().map(|tls| bind(tls.addr)).transpose()?,
        })
    }
}

/// Starts rumqttd on `listeners` and waits until it answers MQTT CONNECTs. With
/// `credentials`, every CONNECT on the plain listeners must log in (see
/// [`crate::ingest::auth`]); `rate_limited` counts the seconds in which a
/// connection hit `max_publishes_per_second`.
pub fn start(
    config: &BrokerConfig,
    listeners: Listeners,
    link_name: &str,
    credentials: Option<Arc<Credentials>>,
    rate_limited: Arc<std::sync::atomic::AtomicU64>,
) -> Result<EmbeddedBroker> {
    let Listeners { mqtt, mqtt5, tls } = listeners;
    let (mqtt_addr, mqtt5_addr) = (mqtt.1, mqtt5.1);
    let mut handed = vec![(MQTT_V4_SERVER, mqtt.0), (MQTT_V5_SERVER, mqtt5.0)];
    let mut connections = ConnectionSettings {
        connection_timeout_ms: config.connect_timeout_ms,
        max_payload_size: config.max_packet_bytes,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let certificate_connections = connections.clone();
    let stamp_publishers = credentials.is_some();
    if let Some(credentials) = credentials {
        connections.set_auth_handler(
            move |client_id: String, username: String, password: String| {
                let accepted = credentials.check(&client_id, &username, &password);
                std::future::ready(accepted)
            },
        );
    }
    let settings =
        |name: &str, listen, tls: Option<TlsConfig>, connections: &ConnectionSettings| {
            (
                name.to_owned(),
                ServerSettings {
                    name: name.to_owned(),
                    listen,
                    tls,
                    next_connection_delay_ms: 0,
                    connections: connections.clone(),
                },
            )
        };
    let mut v4 = HashMap::from([settings(MQTT_V4_SERVER, mqtt_addr, None, &connections)]);
    let tls_addr = match (&config.tls, tls) {
        (Some(tls), Some((listener, addr))) => {
            let path = |p: &std::path::Path| p.display().to_string();
            let rustls = TlsConfig::Rustls {
                capath: Some(path(&tls.client_ca_file)),
                certpath: path(&tls.cert_file),
                keypath: path(&tls.key_file),
            };
            if !rustls.validate_paths() {
                return Err(BrokerError::TlsFiles);
            }
            handed.push((MQTT_TLS_SERVER, listener));
            // Certificates identify these clients; no password on top.
            v4.extend([settings(
                MQTT_TLS_SERVER,
                addr,
                Some(rustls),
                &certificate_connections,
            )]);
            Some(addr)
        }
        _ => None,
    };
    let rumqttd_config = rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections: config.max_connections,
            max_outgoing_packet_count: LINK_BATCH,
            max_segment_size: config.segment_bytes,
            max_segment_count: config.segment_count,
            // Patched rumqttd: hold publishers back rather than drop what
            // fleetgate's link has not read (vendor/rumqttd/PATCHED.md).
            lossless_subscribers: vec![link_name.to_owned()],
            // Patched rumqttd: each publish names its publisher, for ingest's
            // topic rule for password-authenticated vehicles. Without
            // passwords no rule applies, and the router is spared the cost.
            publisher_property: stamp_publishers.then(|| PUBLISHER_PROPERTY.to_owned()),
            max_publishes_per_second: config.max_publishes_per_second,
            rate_limited: Some(rate_limited),
            // Vehicles publish; only fleetgate's link reads. A subscriber
            // would see raw records, VINs and personal fields included.
            allowed_subscribers: Some(vec![link_name.to_owned()]),
            // A will is published after its client left, past the topic
            // rule and the backpressure a live publish goes through.
            drop_last_wills: true,
            // Vehicles publish QoS 0 or 1. A QoS 2 publish would be appended
            // at its PUBREL, past backpressure and the rate limit: refused.
            refuse_qos2: true,
            // A PUBACK only once the publish is in the fsync'd WAL: the
            // link reports the durable watermark (crate::ingest::durable).
            ack_when_durable: config.acknowledge == Acknowledge::Durable,
            max_held_acks: config.max_held_acks,
            ..RouterConfig::default()
        },
        v4: Some(v4),
        v5: Some(HashMap::from([settings(
            MQTT_V5_SERVER,
            mqtt5_addr,
            None,
            &connections,
        )])),
        ..rumqttd::Config::default()
    };
    let mut broker = Broker::new(rumqttd_config);
    for (server, listener) in handed {
        broker.serve_on(server, listener);
    }
    let (link_tx, link_rx) = broker.link(link_name)?;
    let thread = std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    // The TLS listener is not probed: a handshake needs a client
    // certificate. It is bound, and the broker runs once the plain ones answer.
    wait_until_listening(mqtt_addr, MQTT_V4, &thread)?;
    wait_until_listening(mqtt5_addr, MQTT_V5, &thread)?;
    Ok(EmbeddedBroker {
        mqtt_addr,
        mqtt5_addr,
        tls_addr,
        link_tx,
        link_rx,
        _thread: thread,
    })
}

/// rumqttd's names of the listeners, which `Broker::serve_on` goes by.
const MQTT_V4_SERVER: &str = "mqtt-v4";
const MQTT_V5_SERVER: &str = "mqtt-v5";
const MQTT_TLS_SERVER: &str = "mqtt-v4-tls";

/// Binds a listener for the broker, and the address it got (port 0: any
/// free port).
fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let failed = |source| BrokerError::Bind { addr, source };
    let listener = TcpListener::bind(addr).map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    Ok((listener, bound))
}

/// MQTT protocol levels of the two listeners.
const MQTT_V4: u8 = 4;
const MQTT_V5: u8 = 5;

/// Waits for the broker to answer an MQTT CONNECT with a CONNACK (any return
/// code: the broker is up even if it refuses this anonymous probe), or to
/// close it unanswered, as upstream rumqttd does with a refused login. The
/// listener is bound, so the probe connects at once and its CONNECT waits in
/// the backlog until the broker runs: one probe waits for the whole
/// start-up rather than leaving unanswered ones behind for the broker to
/// find later.
fn wait_until_listening(addr: SocketAddr, level: u8, broker_thread: &JoinHandle<()>) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || broker_thread.is_finished() {
            return Err(BrokerError::NotListening { addr });
        }
        if probe(addr, level, left).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One CONNECT / CONNACK / DISCONNECT exchange, waiting for the broker to
/// close the connection. Every probe uses a fresh
/// client id: rumqttd 0.20 panics, and poisons its listener for good, when a
/// client id whose previous connection failed during set-up connects again
/// (`will_handlers` in its server/broker.rs).
fn probe(addr: SocketAddr, level: u8, wait: Duration) -> std::io::Result<()> {
    let client_id = format!(
        "fleetgate-probe-{:016x}",
        crate::core::clock::random_nonce()
    );
    let mut variable = Vec::with_capacity(32);
    variable.extend_from_slice(b"\x00\x04MQTT");
    variable.push(level);
    variable.extend_from_slice(&[0x02, 0x00, 0x0a]); // clean session, keep-alive 10 s
    if level == MQTT_V5 {
        variable.push(0x00); // no properties
    }
    variable.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    variable.extend_from_slice(client_id.as_bytes());
    let mut connect = vec![0x10, variable.len() as u8];
    connect.extend_from_slice(&variable);

    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(wait))?;
    stream.write_all(&connect)?;
    let mut connack = [0u8; 4];
    match stream.read_exact(&mut connack) {
        // Upstream rumqttd closes a refused CONNECT without a CONNACK (the
        // patched one answers); either way it read and judged it: listening.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        other => other?,
    }
    if connack[0] != 0x20 {
        return Err(std::io::Error::other("not a CONNACK"));
    }
    stream.write_all(b"\xe0\x00")?;
    // Wait until rumqttd closes the connection. On a DISCONNECT it tells its
    // router twice that the connection is gone, and the router reuses the
    // connection's id meanwhile: a client that connected between the two
    // would be disconnected by the second (seen as "connection closed
    // abruptly" in tests). rumqttd closes the socket only after sending both.
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => Ok(()),
        Err(e) => Err(e),
    }
}
