use crate::link::alerts::{self};
use crate::link::console::ConsoleLink;
use crate::link::network::{self, Network, N};
use crate::link::remote::{self, mqtt_connect, RemoteLink};
use crate::link::{bridge, timer};
use crate::local::LinkBuilder;
use crate::protocol::v4::V4;
use crate::protocol::v5::V5;
use crate::protocol::{Packet, Protocol};
#[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
use crate::server::tls::{self, TLSAcceptor};
use crate::{meters, ConnectionSettings, Meter};
use flume::{RecvError, SendError, Sender};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tracing::{debug, error, field, info, warn, Instrument};
use uuid::Uuid;

#[cfg(feature = "websocket")]
use async_tungstenite::tokio::accept_hdr_async;
#[cfg(feature = "websocket")]
use async_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
#[cfg(feature = "websocket")]
use async_tungstenite::tungstenite::http::HeaderValue;
#[cfg(feature = "websocket")]
use ws_stream_tungstenite::WsStream;

use metrics::gauge;
use metrics_exporter_prometheus::PrometheusBuilder;
use std::time::Duration;
use std::{io, thread};

use crate::link::console;
use crate::link::local::{self, LinkRx, LinkTx};
use crate::router::{Event, Router};
use crate::{Config, ConnectionId, ServerSettings};

use tokio::net::{TcpListener, TcpStream};
use tokio::time::error::Elapsed;
use tokio::{task, time};

#[derive(Debug, thiserror::Error)]
#[error("Acceptor error")]
pub enum Error {
    #[error("I/O {0}")]
    Io(#[from] io::Error),
    #[error("Timeout")]
    Timeout(#[from] Elapsed),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
    #[error("Certs error = {0}")]
    Certs(#[from] tls::Error),
    #[error("Accept error = {0}")]
    Accept(String),
    #[error("Remote error = {0}")]
    Remote(#[from] remote::Error),
    #[error("Invalid configuration")]
    Config(String),
}

pub struct Broker {
    config: Arc<Config>,
    router_tx: Sender<(ConnectionId, Event)>,
    /// fleetgate patch: listeners the caller bound, by server name.
    listeners: HashMap<String, std::net::TcpListener>,
}

impl Broker {
    pub fn new(config: Config) -> Broker {
        let config = Arc::new(config);
        let router_config = config.router.clone();
        let router: Router = Router::new(config.id, router_config);

        // Setup cluster if cluster settings are configured.
        match config.cluster.clone() {
            Some(_cluster_config) => {
                // let node_id = cluster_config.node_id;
                // let listen = cluster_config.listen;
                // let seniors = cluster_config.seniors;
                // let mut cluster = RemoteCluster::new(node_id, &listen, seniors);
                // Broker::setup_remote_cluster(&mut router, node_id, &mut cluster);

                // Start router first and then cluster in the background
                let router_tx = router.spawn();
                // cluster.spawn();
                Broker {
                    config,
                    router_tx,
                    listeners: HashMap::new(),
                }
            }
            None => {
                let router_tx = router.spawn();
                Broker {
                    config,
                    router_tx,
                    listeners: HashMap::new(),
                }
            }
        }
    }

    // pub fn new_local_cluster(
    //     config: Config,
    //     node_id: NodeId,
    //     seniors: Vec<(NodeId, Sender<ReplicationData>)>,
    // ) -> (Broker, Sender<ReplicationData>) {
    //     let config = Arc::new(config);
    //     let router_config = config.router.clone();

    //     let mut router = Router::new(config.id, router_config);
    //     let (mut cluster, tx) = LocalCluster::new(node_id, seniors);
    //     Broker::setup_local_cluster(&mut router, node_id, &mut cluster);

    //     // Start router first and then cluster in the background
    //     let router_tx = router.spawn();
    //     cluster.spawn();

    //     (Broker { config, router_tx }, tx)
    // }

    // fn setup_remote_cluster(router: &mut Router, node_id: NodeId, cluster: &mut RemoteCluster) {
    //     // Retrieve pre-configured list of router <-> replica link from router
    //     // and add the link to cluster
    //     let nodes: Vec<NodeId> = (0..MAX_NODES).filter(|v| *v != node_id).collect();
    //     for node_id in nodes {
    //         let link = router.get_replica_handle(node_id);
    //         cluster.add_replica_router_handle(node_id, link);
    //     }
    // }

    // fn setup_local_cluster(router: &mut Router, node_id: NodeId, cluster: &mut LocalCluster) {
    //     // Retrieve pre-configured list of router <-> replica link from router
    //     // and add the link to cluster
    //     let nodes: Vec<NodeId> = (0..MAX_NODES).filter(|v| *v != node_id).collect();
    //     for node_id in nodes {
    //         let link = router.get_replica_handle(node_id);
    //         cluster.add_replica_router_handle(node_id, link);
    //     }
    // }

    // Link to get meters
    pub fn meters(&self) -> Result<meters::MetersLink, meters::LinkError> {
        let link = meters::MetersLink::new(self.router_tx.clone())?;
        Ok(link)
    }

    // Link to get alerts
    pub fn alerts(&self) -> Result<alerts::AlertsLink, alerts::LinkError> {
        let link = alerts::AlertsLink::new(self.router_tx.clone())?;
        Ok(link)
    }

    pub fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), local::LinkError> {
        // Register this connection with the router. Router replies with ack which if ok will
        // start the link. Router can sometimes reject the connection (ex. max connection limit).
        let (link_tx, link_rx, _ack) =
            LinkBuilder::new(client_id, self.router_tx.clone()).build()?;
        Ok((link_tx, link_rx))
    }

    /// fleetgate patch: the server named `server` accepts on `listener`,
    /// bound by the caller, instead of binding its `listen` address when it
    /// starts. The caller knows the port (port 0 included) and that it is
    /// its own before the broker runs; binding inside the server thread, a
    /// port in use was only logged there.
    pub fn serve_on(&mut self, server: &str, listener: std::net::TcpListener) {
        self.listeners.insert(server.to_owned(), listener);
    }

    #[tracing::instrument(skip(self))]
    pub fn start(&mut self) -> Result<(), Error> {
        if self.config.v4.is_none()
            && self.config.v5.is_none()
            && (cfg!(not(feature = "websocket")) || self.config.ws.is_none())
        {
            return Err(Error::Config(
                "Atleast one server config must be specified, \
                consider adding either of [v4.x]/[v5.x] or [ws.x] (if enabled) in config file."
                    .to_string(),
            ));
        }

        // we don't know which servers (v4/v5/ws) user will spawn
        // so we collect handles for all of the spawned servers
        let mut server_thread_handles = Vec::new();

        if let Some(metrics_config) = self.config.metrics.clone() {
            let timer_thread = thread::Builder::new().name("timer".to_owned());
            let router_tx = self.router_tx.clone();
            timer_thread.spawn(move || {
                let mut runtime = tokio::runtime::Builder::new_current_thread();
                let runtime = runtime.enable_all().build().unwrap();

                runtime.block_on(async move {
                    timer::start(metrics_config, router_tx).await;
                });
            })?;
        }

        // Spawn bridge in a separate thread.
        if let Some(bridge_config) = self.config.bridge.clone() {
            let bridge_thread = thread::Builder::new().name(bridge_config.name.clone());
            let router_tx = self.router_tx.clone();
            bridge_thread.spawn(move || {
                let mut runtime = tokio::runtime::Builder::new_current_thread();
                let runtime = runtime.enable_all().build().unwrap();

                runtime.block_on(async move {
                    if let Err(e) = bridge::start(bridge_config, router_tx, V4).await {
                        error!(error=?e, "Bridge Link error");
                    };
                });
            })?;
        }

        // Spawn servers in a separate thread.
        if let Some(v4_config) = &self.config.v4 {
            for (_, config) in v4_config.clone() {
                let server_thread = thread::Builder::new().name(config.name.clone());
                let listener = self.listeners.remove(&config.name);
                let mut server = Server::new(config, self.router_tx.clone(), V4);
                server.listener = listener;
                let handle = server_thread.spawn(move || {
                    let mut runtime = tokio::runtime::Builder::new_current_thread();
                    let runtime = runtime.enable_all().build().unwrap();

                    runtime.block_on(async {
                        if let Err(e) = server.start(LinkType::Remote).await {
                            error!(error=?e, "Server error - V4");
                        }
                    });
                })?;
                server_thread_handles.push(handle)
            }
        }

        if let Some(v5_config) = &self.config.v5 {
            for (_, config) in v5_config.clone() {
                let server_thread = thread::Builder::new().name(config.name.clone());
                let listener = self.listeners.remove(&config.name);
                let mut server = Server::new(config, self.router_tx.clone(), V5);
                server.listener = listener;
                let handle = server_thread.spawn(move || {
                    let mut runtime = tokio::runtime::Builder::new_current_thread();
                    let runtime = runtime.enable_all().build().unwrap();

                    runtime.block_on(async {
                        if let Err(e) = server.start(LinkType::Remote).await {
                            error!(error=?e, "Server error - V5");
                        }
                    });
                })?;
                server_thread_handles.push(handle)
            }
        }

        #[cfg(not(feature = "websocket"))]
        if self.config.ws.is_some() {
            warn!("websocket feature is disabled, [ws] config will be ignored.");
        }

        #[cfg(feature = "websocket")]
        if let Some(ws_config) = &self.config.ws {
            for (_, config) in ws_config.clone() {
                let server_thread = thread::Builder::new().name(config.name.clone());
                //TODO: Add support for V5 procotol with websockets. Registered in config or on ServerSettings
                let mut server = Server::new(config, self.router_tx.clone(), V4);
                let handle = server_thread.spawn(move || {
                    let mut runtime = tokio::runtime::Builder::new_current_thread();
                    let runtime = runtime.enable_all().build().unwrap();

                    runtime.block_on(async {
                        if let Err(e) = server.start(LinkType::Websocket).await {
                            error!(error=?e, "Server error - WS");
                        }
                    });
                })?;
                server_thread_handles.push(handle)
            }
        }

        if let Some(prometheus_setting) = &self.config.prometheus {
            let timeout = prometheus_setting.interval;
            // If port is specified use it instead of listen.
            // NOTE: This means listen is ignored when `port` is specified.
            // `port` will be removed in future release in favour of `listen`
            let addr = {
                #[allow(deprecated)]
                match prometheus_setting.port {
                    Some(port) => SocketAddr::new("127.0.0.1".parse().unwrap(), port),
                    None => prometheus_setting.listen.unwrap_or(SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
                        9042,
                    )),
                }
            };
            let metrics_thread = thread::Builder::new().name("Metrics".to_owned());
            let meter_link = self.meters().unwrap();
            metrics_thread.spawn(move || {
                let builder = PrometheusBuilder::new().with_http_listener(addr);
                builder.install().unwrap();

                let total_publishes = gauge!("metrics.router.total_publishes");
                let total_connections = gauge!("metrics.router.total_connections");
                let failed_publishes = gauge!("metrics.router.failed_publishes");
                loop {
                    if let Ok(metrics) = meter_link.recv() {
                        for m in metrics {
                            match m {
                                Meter::Router(_, ref r) => {
                                    total_connections.set(r.total_connections as f64);
                                    total_publishes.set(r.total_publishes as f64);
                                    failed_publishes.set(r.failed_publishes as f64);
                                }
                                _ => continue,
                            }
                        }
                    }

                    std::thread::sleep(Duration::from_secs(timeout));
                }
            })?;
        }

        if let Some(console) = self.config.console.clone() {
            let console_link = ConsoleLink::new(console, self.router_tx.clone());

            let console_link = Arc::new(console_link);
            let console_thread = thread::Builder::new().name("Console".to_string());
            console_thread.spawn(move || {
                let mut runtime = tokio::runtime::Builder::new_current_thread();
                let runtime = runtime.enable_all().build().unwrap();
                runtime.block_on(console::start(console_link));
            })?;
        }

        // in ideal case, where server doesn't crash, join() will never resolve
        // we still try to join threads so that we don't return from function
        // unless everything crashes.
        server_thread_handles.into_iter().for_each(|handle| {
            // join() might panic in case the thread panics
            // we just ignore it
            let _ = handle.join();
        });

        Ok(())
    }
}

#[derive(Copy, Clone)]
pub enum LinkType {
    #[cfg(feature = "websocket")]
    Websocket,
    Remote,
}

#[derive(PartialEq)]
enum AwaitingWill {
    Cancel,
    Fire,
}

pub struct Server<P> {
    config: ServerSettings,
    router_tx: Sender<(ConnectionId, Event)>,
    protocol: P,
    awaiting_will_handler: Arc<Mutex<HashMap<String, Sender<AwaitingWill>>>>,
    /// fleetgate patch: a listener bound by the caller (`Broker::serve_on`).
    listener: Option<std::net::TcpListener>,
}

impl<P: Protocol + Clone + Send + 'static> Server<P> {
    pub fn new(
        config: ServerSettings,
        router_tx: Sender<(ConnectionId, Event)>,
        protocol: P,
    ) -> Server<P> {
        Server {
            config,
            router_tx,
            protocol,
            awaiting_will_handler: Arc::new(Mutex::new(HashMap::default())),
            listener: None,
        }
    }

    pub async fn start(&mut self, link_type: LinkType) -> Result<(), Error> {
        let listener = match self.listener.take() {
            Some(listener) => {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)?
            }
            None => TcpListener::bind(&self.config.listen).await?,
        };
        let delay = Duration::from_millis(self.config.next_connection_delay_ms);
        let mut count: usize = 0;

        let config = Arc::new(self.config.connections.clone());
        info!(
            config = self.config.name,
            listen_addr = self.config.listen.to_string(),
            "Listening for remote connections",
        );
        loop {
            // Await new network connection.
            let (stream, addr) = match listener.accept().await {
                Ok((s, r)) => (s, r),
                Err(e) => {
                    error!(error=?e, "Unable to accept socket.");
                    continue;
                }
            };

            info!(name=?self.config.name, ?addr, count, "accept");

            let config = config.clone();
            let router_tx = self.router_tx.clone();
            count += 1;

            let protocol = self.protocol.clone();
            let tls = self.config.tls.clone();
            let will_handlers = self.awaiting_will_handler.clone();
            // fleetgate patch: the TLS handshake runs in the connection's own
            // task, within connection_timeout_ms. Upstream ran it here, in the
            // accept loop, without a limit: one client that opened a socket
            // and sent no ClientHello stopped every later TLS connection.
            task::spawn(async move {
                let limit = Duration::from_millis(config.connection_timeout_ms.into());
                let (network, tenant_id) = match time::timeout(limit, tls_accept(tls, stream)).await
                {
                    Ok(Ok(o)) => o,
                    Ok(Err(e)) => {
                        // fleetgate patch: a client's failed handshake is
                        // not the broker's error (a TCP probe of the TLS
                        // port closes at once).
                        match tls_failure(&e) {
                            Ok(None) => debug!("A connection closed before its TLS handshake"),
                            Ok(Some(failure)) => warn!(failure, "A TLS handshake failed"),
                            Err(e) => error!(error=?e, "Tls accept error"),
                        }
                        return;
                    }
                    Err(_) => {
                        warn!(?addr, "no TLS handshake within the connection timeout");
                        return;
                    }
                };
                match link_type {
                    #[cfg(feature = "websocket")]
                    LinkType::Websocket => {
                        let stream = match accept_hdr_async(network, WSCallback).await {
                            Ok(s) => Box::new(WsStream::new(s)),
                            Err(e) => {
                                error!(error=?e, "Websocket failed handshake");
                                return;
                            }
                        };
                        remote(config, tenant_id, router_tx, stream, protocol, will_handlers)
                            .instrument(tracing::info_span!(
                                "websocket_link",
                                client_id = field::Empty,
                                connection_id = field::Empty
                            ))
                            .await
                    }
                    LinkType::Remote => {
                        let span = tracing::error_span!(
                            "remote_link",
                            ?tenant_id,
                            client_id = field::Empty,
                            connection_id = field::Empty,
                        );
                        remote(config, tenant_id, router_tx, network, protocol, will_handlers)
                            .instrument(span)
                            .await
                    }
                }
            });

            // fleetgate patch: no sleep when there is no delay. A zero
            // sleep still waits for the timer's next tick (1 ms), which
            // held the listener to under 1,000 accepts a second.
            if !delay.is_zero() {
                time::sleep(delay).await;
            }
        }
    }
}

// Depending on TLS or not create a new Network
async fn tls_accept(
    tls: Option<crate::TlsConfig>,
    stream: TcpStream,
) -> Result<(Box<dyn N>, Option<String>), Error> {
    #[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
    match &tls {
        Some(c) => {
            let (tenant_id, network) = TLSAcceptor::new(c)?.accept(stream).await?;
            Ok((network, tenant_id))
        }
        None => Ok((Box::new(stream), None)),
    }
    #[cfg(not(any(feature = "use-rustls", feature = "use-native-tls")))]
    {
        let _ = tls;
        Ok((Box::new(stream), None))
    }
}

/// Configures the Websocket connection to indicate the correct protocol
/// by adding the "sec-websocket-protocol" with value of "mqtt" to the response header
#[cfg(feature = "websocket")]
struct WSCallback;
#[cfg(feature = "websocket")]
impl Callback for WSCallback {
    fn on_request(
        self,
        _request: &Request,
        mut response: Response,
    ) -> Result<Response, ErrorResponse> {
        response
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        Ok(response)
    }
}

/// fleetgate patch: whether a connection ended because its peer went away
/// (closed, reset, or silent past its keep-alive): how a vehicle leaves a
/// cellular network, and how a TCP health check ends, not a broker fault.
fn peer_gone(e: &remote::Error) -> bool {
    use remote::Error as E;
    match e {
        E::Io(io) | E::Network(network::Error::Io(io)) => io_peer_gone(io),
        E::Network(network::Error::KeepAlive(_)) => true,
        _ => false,
    }
}

fn io_peer_gone(io: &io::Error) -> bool {
    matches!(
        io.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::TimedOut
    )
}

/// fleetgate patch: whether the client broke the protocol (a malformed or
/// unexpected packet, a zero keep-alive, an id it may not use).
fn client_fault(e: &remote::Error) -> bool {
    use remote::Error as E;
    matches!(
        e,
        E::Network(network::Error::Protocol(_))
            | E::NotConnectPacket(_)
            | E::ZeroKeepAlive
            | E::InvalidClientId
    )
}

/// fleetgate patch: a connection that ended before it was connected is
/// logged by whose doing that was, never with what the client sent. A peer
/// that goes away is debug; one that sends no CONNECT in time (a silent
/// socket holding a connection slot), a broken protocol or a CONNECT
/// without a login warn; a refused login is debug here because the
/// authentication handler logs it, with its reason, and counts it; only the
/// router being gone is the broker's error.
fn log_failed_connect(e: &remote::Error) {
    if peer_gone(e) {
        debug!(error=?e, "A connection closed before its CONNECT");
    } else if matches!(e, remote::Error::InvalidAuth) {
        debug!("A client's login was refused");
    } else if matches!(e, remote::Error::NoLogin) {
        warn!("A client sent a CONNECT without a user name and password");
    } else if matches!(e, remote::Error::Timeout(_)) {
        // As the TLS listener's: silent sockets hold connection slots.
        warn!("A client sent no CONNECT in time");
    } else if client_fault(e) {
        warn!(error=?e, "A client broke the protocol before its CONNECT");
    } else {
        error!(error=?e, "Error while handling MQTT connect packet");
    }
}

/// fleetgate patch: why a client's TLS handshake failed (`None`: the peer
/// closed it, as a TCP probe does), without what its certificate holds (a
/// tenant id is its organisation: a VIN); `Err` for the broker's own failure
/// (a server certificate or key the acceptor cannot use, `TLSAcceptor::new`).
#[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
fn tls_failure(e: &Error) -> Result<Option<&'static str>, &Error> {
    match e {
        Error::Io(io) | Error::Certs(tls::Error::Io(io)) if io_peer_gone(io) => Ok(None),
        // tokio-rustls reports the client's failures (an expired or unknown
        // certificate, a bad message) as I/O errors around rustls's error.
        #[cfg(feature = "use-rustls")]
        Error::Io(io) | Error::Certs(tls::Error::Io(io)) => Ok(Some(
            io.get_ref()
                .and_then(|inner| inner.downcast_ref::<tokio_rustls::rustls::Error>())
                .map_or("I/O error", rustls_failure),
        )),
        Error::Certs(tls::Error::NoPeerCertificate) => Ok(Some("no client certificate")),
        Error::Certs(tls::Error::InvalidTenantId(_) | tls::Error::InvalidTenant) => {
            Ok(Some("invalid tenant certificate"))
        }
        _ => Err(e),
    }
}

/// fleetgate patch: which check of a client's TLS handshake failed, from a
/// fixed set: rustls's own text may quote names a certificate holds.
#[cfg(feature = "use-rustls")]
fn rustls_failure(e: &tokio_rustls::rustls::Error) -> &'static str {
    use tokio_rustls::rustls::{CertificateError, Error as E};
    match e {
        E::InvalidCertificate(CertificateError::Expired) => "client certificate expired",
        E::InvalidCertificate(CertificateError::NotValidYet) => "client certificate not yet valid",
        E::InvalidCertificate(CertificateError::Revoked) => "client certificate revoked",
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "client certificate from an unknown CA"
        }
        E::InvalidCertificate(CertificateError::BadSignature) => {
            "client certificate with a bad signature"
        }
        E::InvalidCertificate(_) => "client certificate invalid",
        E::NoCertificatesPresented => "no client certificate",
        E::PeerIncompatible(_) => "client's TLS incompatible",
        E::InvalidMessage(_) | E::PeerMisbehaved(_) | E::InappropriateMessage { .. } => {
            "client broke the TLS protocol"
        }
        E::AlertReceived(_) => "client sent a TLS alert",
        _ => "handshake failed",
    }
}

/// A new network connection should wait for a mqtt connect packet. This should be handled
/// asynchronously to avoid blocking other new connections while this connection is
/// waiting for mqtt connect packet. Also this honours connection wait time as per config to prevent
/// denial of service attacks (rogue clients which only establish network connections without
/// sending a mqtt connection packet to make the server reach its concurrent connection limit).
async fn remote<P: Protocol>(
    config: Arc<ConnectionSettings>,
    tenant_id: Option<String>,
    router_tx: Sender<(ConnectionId, Event)>,
    stream: Box<dyn N>,
    protocol: P,
    will_handlers: Arc<Mutex<HashMap<String, Sender<AwaitingWill>>>>,
) {
    let mut network = Network::new(
        stream,
        config.max_payload_size,
        config.max_inflight_count,
        protocol,
    );

    let dynamic_filters = config.dynamic_filters;

    // fleetgate patch: the set-up steps are boxed, so that their futures
    // (the CONNECT packet, the router's connect event) are freed once the
    // connection runs instead of sizing its task for as long as it lives.
    let connect_packet = match Box::pin(mqtt_connect(config, &mut network)).await {
        Ok(p) => p,
        Err(e) => {
            log_failed_connect(&e);
            return;
        }
    };

    let (mut client_id, clean_session) = match &connect_packet {
        Packet::Connect(ref connect, _, _, _, _) => {
            (connect.client_id.clone(), connect.clean_session)
        }
        _ => unreachable!(),
    };

    let mut assigned_client_id = None;
    if client_id.is_empty() {
        let uuid = Uuid::new_v4().simple();
        client_id = format!("rumqtt-{uuid}");
        assigned_client_id = Some(client_id.clone());
    }

    if let Some(tenant_id) = &tenant_id {
        // client_id is set to "tenant_id.client_id"
        // this is to make sure we are consistent,
        // as Connection uses this format of client_id
        client_id = format!("{tenant_id}.{client_id}");
    }

    if let Some(sender) = will_handlers.lock().unwrap().remove(&client_id) {
        let awaiting_will = if clean_session {
            AwaitingWill::Fire
        } else {
            AwaitingWill::Cancel
        };
        // fleetgate patch: the previous connection of this client id may
        // have ended during set-up (client id refused by the router, no room
        // at max_connections) without waiting for its will; its receiver is
        // gone, there is nothing to cancel, and unwrapping here panicked
        // while holding the mutex, poisoning it for every later connection.
        let _ = sender.try_send(awaiting_will);
    }

    let (will_tx, will_rx) = flume::bounded::<AwaitingWill>(1);
    will_handlers
        .lock()
        .unwrap()
        .insert(client_id.clone(), will_tx);

    // Start the link
    let mut link = match Box::pin(RemoteLink::new(
        router_tx.clone(),
        tenant_id.clone(),
        network,
        connect_packet,
        dynamic_filters,
        assigned_client_id,
    ))
    .await
    {
        Ok(l) => l,
        Err(e) => {
            // fleetgate patch: the router refusing the client (its id; the
            // router logged why) and a peer gone before its CONNACK are not
            // the broker's errors.
            match &e {
                e if peer_gone(e) => info!(error=?e, "A connection closed before its CONNACK"),
                remote::Error::Link(_) | remote::Error::NotConnectionAck => {
                    warn!("The router refused a connection")
                }
                e => error!(error=?e, "Remote link error"),
            }
            return;
        }
    };

    let connection_id = link.connection_id;
    let will_delay_interval = link.will_delay_interval;
    let mut send_disconnect = true;

    match link.start().await {
        // Connection got closed. This shouldn't usually happen.
        Ok(_) => error!("connection-stop"),
        // No need to send a disconnect message when disconnection
        // originated internally in the router.
        // fleetgate patch: logged as info, not error: the router closes a
        // link on a client's own DISCONNECT and on every refusal it already
        // logged, so this is how most connections end.
        Err(remote::Error::Link(e)) => {
            info!(reason=?e, "closed by the router");
            send_disconnect = false;
        }
        // fleetgate patch: a vehicle that closes, resets or goes silent
        // (it lost its network) is routine, a broken protocol the client's
        // fault; only the rest is the broker's error.
        Err(e) if peer_gone(&e) => {
            info!(error=?e, "disconnected");
        }
        Err(e) if client_fault(&e) => {
            warn!(error=?e, "disconnected: the client broke the protocol");
        }
        // Any other error
        Err(e) => {
            error!(error=?e, "disconnected");
        }
    };

    if send_disconnect {
        let disconnect = Event::Disconnect;
        let message = (connection_id, disconnect);
        // fleetgate patch: awaited, not a blocking send (see build_async).
        router_tx.send_async(message).await.ok();
    }

    // this is important to stop the connection
    drop(link);

    let publish_will = match tokio::time::timeout(
        Duration::from_secs(will_delay_interval as u64),
        will_rx.recv_async(),
    )
    .await
    {
        Ok(w) => w.is_ok_and(|k| k == AwaitingWill::Fire),
        Err(_) => {
            // no need to keep the sender after timeout
            will_handlers.lock().unwrap().remove(&client_id);
            // as will delay interval has passed, publish the will message
            true
        }
    };

    if publish_will {
        let message = Event::PublishWill((client_id, tenant_id));
        // is this connection_id really correct at this point?
        // as we have disconnected already, some other connection
        // might be using this connection ID!
        // It won't matter in this case as we don't use it
        // but might affect logs?
        router_tx.send_async((connection_id, message)).await.ok();
    }
}
