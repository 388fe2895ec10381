//! The MQTT listener and one task per connection. The task only moves bytes, timers
//! and channel messages; every protocol decision is in [`crate::session::Session`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use herald_eventlog::{Append, Record};
use herald_net::{Caps, FdBudget, Gate, Ticket};
use herald_schemas::events::{
    self, DeviceAcked, DeviceConnected, DeviceDisconnected, DeviceReceived, Event,
    GatewayHeartbeat, Kind,
};
use herald_schemas::link::BacklogPage;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::codec::{
    self, CONNACK_ACCEPTED, CodecError, ConnAck, LEVEL_5, Packet, Properties, Value, properties,
    reason,
};
use crate::hub::{Command, Hub};
use crate::keepalive::KeepAlivePolicy;
use crate::session::{CloseReason, Peer, Session, SessionEvent, SessionLimits};
use crate::transport::{READ_CHUNK, Transport, accept_ws};

/// Why the directory could not answer.
#[derive(Debug, thiserror::Error)]
#[error("device directory unavailable: {0}")]
pub struct DirectoryError(pub String);

/// What the gateway learns of a device that authenticated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The network type it registered with (`wifi`, `4g`, ...; empty if unknown).
    pub network: String,
}

/// What the gateway needs to know about devices: who they are and what is in their
/// inbox. The gateway only reads; it never writes to a store.
pub trait DeviceDirectory: Send + Sync + 'static {
    /// The device, if `token` is the device token of `device_id`; `None` if it is not
    /// (or there is no such device).
    fn authenticate(
        &self,
        device_id: &str,
        token: &[u8],
    ) -> BoxFuture<'static, Result<Option<DeviceInfo>, DirectoryError>>;

    /// The next page of the device's unacknowledged, unexpired inbox entries after
    /// `after_seq`.
    fn backlog(
        &self,
        device_id: Arc<str>,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<BacklogPage, DirectoryError>>;
}

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This gateway's name in events.
    pub gateway_id: String,
    /// The largest packet a device may send, in bytes.
    pub max_packet_bytes: usize,
    /// How long a new connection may take to send CONNECT.
    pub connect_timeout: Duration,
    /// Caps on device connections over both listeners: held, not yet past CONNACK, and
    /// not yet past CONNACK from one source.
    pub caps: Caps,
    /// The process's descriptors for connections, if the gateway draws on a shared
    /// budget (see [`herald_net::FdBudget`]).
    pub fds: Option<FdBudget>,
    /// Per-session limits.
    pub limits: SessionLimits,
    /// How long a write to a device may take before the connection is closed.
    pub write_timeout: Duration,
    /// Where devices reach this gateway (in its heartbeats, for navigation).
    pub advertised_mqtt: String,
    /// Where devices reach this gateway over WebSocket.
    pub advertised_ws: String,
    /// How often the gateway writes a `GatewayHeartbeat` to the log.
    pub heartbeat: Duration,
    /// The keep-alive each device gets.
    pub keep_alive: KeepAlivePolicy,
    /// TLS on the device listeners (MQTT and WebSocket), when a certificate is set.
    pub tls: Option<Tls>,
}

/// The TLS acceptor of the device listeners (see [`crate::transport::tls_acceptor`]).
#[derive(Clone)]
pub struct Tls(pub tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            gateway_id: "gateway-1".into(),
            max_packet_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(10),
            caps: Caps {
                max_connections: 100_000,
                max_unauthenticated: 4096,
                max_unauthenticated_per_source: 64,
            },
            fds: None,
            limits: SessionLimits::default(),
            write_timeout: Duration::from_secs(30),
            advertised_mqtt: "mqtt://127.0.0.1:9493".into(),
            advertised_ws: "ws://127.0.0.1:8083/mqtt".into(),
            heartbeat: Duration::from_secs(5),
            keep_alive: KeepAlivePolicy::default(),
            tls: None,
        }
    }
}

/// Everything a connection task needs.
pub struct Gateway {
    config: GatewayConfig,
    hub: Arc<Hub>,
    directory: Arc<dyn DeviceDirectory>,
    events: mpsc::Sender<Event>,
    log: Arc<dyn Append>,
    /// Admission over both device listeners.
    gate: Arc<Gate>,
}

/// How many events the gateway queues for the log before connections wait.
const EVENT_QUEUE: usize = 65_536;
/// Most events in one append.
const EVENT_BATCH: usize = 4096;
/// How long a batch of gateway events is retried before it is dropped.
const EVENT_RETRY: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn device_record(device_id: &str, event: &Event) -> Record {
    Record {
        key: device_id.as_bytes().to_vec(),
        value: events::encode(event),
    }
}

fn event_device(e: &Event) -> &str {
    match &e.kind {
        Some(Kind::DeviceAcked(a)) => &a.device_id,
        Some(Kind::DeviceConnected(c)) => &c.device_id,
        Some(Kind::DeviceDisconnected(d)) => &d.device_id,
        _ => "",
    }
}

impl Gateway {
    /// A gateway over `hub`, appending its events (acks, presence) to `log`.
    pub fn new(
        config: GatewayConfig,
        hub: Arc<Hub>,
        directory: Arc<dyn DeviceDirectory>,
        log: Arc<dyn Append>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(append_events(rx, log.clone()));
        Arc::new(Gateway {
            gate: Gate::new("devices", config.caps, config.fds.clone()),
            config,
            hub,
            directory,
            events: tx,
            log,
        })
    }

    /// Accepts MQTT connections (over TLS when configured) until `shutdown` turns true,
    /// and tells navigation that this gateway is alive meanwhile.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        tokio::spawn(self.clone().heartbeats(shutdown.clone()));
        self.listen(listener, false, shutdown).await;
    }

    /// Accepts MQTT over WebSocket connections at [`crate::transport::WS_PATH`] (over
    /// TLS when configured) until `shutdown` turns true.
    pub async fn serve_ws(self: Arc<Self>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        self.listen(listener, true, shutdown).await;
    }

    /// The admission state of the device listeners (for `/readyz`).
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    async fn listen(
        self: Arc<Self>,
        listener: TcpListener,
        ws: bool,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let accepted = tokio::select! {
                a = herald_net::accept(&listener, &self.gate) => a,
                _ = shutdown.changed() => break,
            };
            let _ = accepted.stream.set_nodelay(true);
            let gw = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                gw.accept(accepted.stream, ws, accepted.ticket, shutdown)
                    .await;
            });
        }
        self.gate.set_accepting(false);
    }

    /// Tells navigation, through the log, that this gateway is alive, every
    /// `config.heartbeat` until `shutdown`.
    async fn heartbeats(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(self.config.heartbeat);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.changed() => return,
            }
            let event = Event::new(
                now_ms(),
                Kind::GatewayHeartbeat(GatewayHeartbeat {
                    gateway_id: self.config.gateway_id.clone(),
                    mqtt_url: self.config.advertised_mqtt.clone(),
                    ws_url: self.config.advertised_ws.clone(),
                    connected: self.hub.connected() as u64,
                    interval_ms: u32::try_from(self.config.heartbeat.as_millis())
                        .unwrap_or(u32::MAX),
                }),
            );
            let record = Record {
                key: self.config.gateway_id.as_bytes().to_vec(),
                value: events::encode(&event),
            };
            if let Err(e) = self.log.append(vec![record]).await {
                tracing::warn!(error = %e, "cannot write the gateway heartbeat");
            }
        }
    }

    async fn emit(&self, event: Event) {
        // The queue closes only when the runtime shuts down.
        let _ = self.events.send(event).await;
    }

    /// Sets up a new connection's transport (TLS, WebSocket), then serves it; the
    /// handshakes and the CONNECT together must take less than `connect_timeout`.
    async fn accept(
        &self,
        stream: TcpStream,
        ws: bool,
        mut ticket: Ticket,
        shutdown: watch::Receiver<bool>,
    ) {
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout;
        // A WebSocket message holds at most one packet's worth more than the limit.
        let max_message = self.config.max_packet_bytes + READ_CHUNK;
        // Boxed: the TLS and WebSocket handshakes' state is large and lives only until the
        // connection is set up; inline it would size every connection's task for life.
        let setup = Box::pin(async {
            Ok::<_, std::io::Error>(match (&self.config.tls, ws) {
                (None, false) => Transport::Tcp(stream),
                (Some(tls), false) => Transport::Tls(Box::new(tls.0.accept(stream).await?)),
                (None, true) => Transport::Ws(Box::new(accept_ws(stream, max_message).await?)),
                (Some(tls), true) => {
                    let stream = tls.0.accept(stream).await?;
                    Transport::Wss(Box::new(accept_ws(stream, max_message).await?))
                }
            })
        });
        match tokio::time::timeout_at(deadline, setup).await {
            Ok(Ok(transport)) => {
                // Every event of the session carries the device (once it is known).
                let span = tracing::debug_span!("device", device_id = tracing::field::Empty, ws);
                tracing::Instrument::instrument(
                    self.connection(transport, deadline, &mut ticket, shutdown),
                    span,
                )
                .await
            }
            Ok(Err(e)) => {
                herald_telemetry::metrics::gateway_refused("handshake_failed");
                tracing::debug!(error = %e, ws, "handshake failed; closing");
            }
            Err(_) => {
                herald_telemetry::metrics::gateway_refused("handshake_timeout");
                tracing::debug!(ws, "no handshake in time; closing");
            }
        }
    }

    /// Reads the CONNECT and answers it. `Some` when the device is in: its id, what it
    /// asked for, and the read buffer (bytes after the CONNECT belong to the session).
    async fn handshake(
        &self,
        stream: &mut Transport,
        deadline: tokio::time::Instant,
    ) -> Option<(Arc<str>, Peer, String, BytesMut)> {
        let mut buf = BytesMut::new();
        let max = self.config.max_packet_bytes;
        let first = tokio::time::timeout_at(deadline, read_packet(stream, &mut buf, max)).await;
        let connect = match first {
            Ok(Ok(Packet::Connect(c))) => c,
            Ok(Err(ReadError::Codec(e, level))) => {
                herald_telemetry::metrics::gateway_refused("malformed_connect");
                tracing::debug!(error = %e, "bad CONNECT; closing");
                // A level this codec does not speak gets the 3.1.1 answer; a bad MQTT 5
                // CONNECT the reason code of what is wrong with it.
                let code = match (&e, level) {
                    (CodecError::UnsupportedProtocol(_), _) => Some(codec::CONNACK_BAD_PROTOCOL),
                    (_, Some(LEVEL_5)) => Some(e.reason_code()),
                    _ => None,
                };
                if let Some(code) = code {
                    let level = level.filter(|_| code != codec::CONNACK_BAD_PROTOCOL);
                    let _ =
                        send_connack(stream, level.unwrap_or(codec::LEVEL_311), code, None).await;
                }
                return None;
            }
            Ok(Ok(other)) => {
                herald_telemetry::metrics::gateway_refused("not_connect");
                tracing::debug!(packet = ?other, "first packet is not CONNECT; closing");
                return None;
            }
            Ok(Err(e)) => {
                herald_telemetry::metrics::gateway_refused("no_connect");
                tracing::debug!(error = %e, "no CONNECT; closing");
                return None;
            }
            Err(_) => {
                herald_telemetry::metrics::gateway_refused("connect_timeout");
                tracing::debug!("no CONNECT in time; closing");
                return None;
            }
        };
        let level = connect.protocol_level;
        let v5 = level == LEVEL_5;
        let refuse = |v311: u8, v5_code: u8| if v5 { v5_code } else { v311 };
        if v5 && connect.properties.has(properties::AUTH_METHOD) {
            // Enhanced authentication is not offered: the device token is the password.
            herald_telemetry::metrics::gateway_refused("auth_method");
            let _ = send_connack(stream, level, reason::BAD_AUTH_METHOD, None).await;
            return None;
        }
        if connect.client_id.is_empty() {
            herald_telemetry::metrics::gateway_refused("client_id");
            let code = refuse(codec::CONNACK_ID_REJECTED, reason::CLIENT_ID_NOT_VALID);
            let _ = send_connack(stream, level, code, None).await;
            return None;
        }
        let device_id: Arc<str> = connect.client_id.as_str().into();
        let authentic = match (&connect.username, &connect.password) {
            (Some(user), Some(pass)) if *user == connect.client_id => {
                self.directory.authenticate(&device_id, pass).await
            }
            _ => Ok(None),
        };
        let device = match authentic {
            Ok(Some(device)) => device,
            Ok(None) => {
                herald_telemetry::metrics::gateway_refused("not_authorized");
                tracing::debug!(device_id = %device_id, "device refused: not authorized");
                let code = refuse(codec::CONNACK_NOT_AUTHORIZED, reason::NOT_AUTHORIZED);
                let _ = send_connack(stream, level, code, None).await;
                return None;
            }
            Err(e) => {
                herald_telemetry::metrics::gateway_refused("unavailable");
                tracing::warn!(error = %e, "cannot authenticate device");
                let code = refuse(codec::CONNACK_UNAVAILABLE, reason::SERVER_UNAVAILABLE);
                let _ = send_connack(stream, level, code, None).await;
                return None;
            }
        };
        // The network the device is on now (an MQTT 5 CONNECT user property) wins over
        // the one it registered with.
        let policy = &self.config.keep_alive;
        let network = KeepAlivePolicy::network(
            connect
                .properties
                .user_value("network")
                .or(Some(device.network.as_str())),
        );
        let (peer, connack_props) = if v5 {
            let keep_alive_s = policy.settle(connect.keep_alive_s, network);
            let mut props = Properties::new();
            // herald keeps the inbox, not MQTT session state: the device subscribes
            // again on every connection, so no session outlives it.
            if connect
                .properties
                .u32(properties::SESSION_EXPIRY)
                .unwrap_or(0)
                != 0
            {
                props.push(properties::SESSION_EXPIRY, Value::U32(0));
            }
            props
                .push(
                    properties::RECEIVE_MAXIMUM,
                    Value::U16(self.config.limits.receive_maximum),
                )
                .push(
                    properties::MAXIMUM_PACKET_SIZE,
                    Value::U32(u32::try_from(max).unwrap_or(u32::MAX)),
                )
                .push(properties::SERVER_KEEP_ALIVE, Value::U16(keep_alive_s))
                .push(properties::RETAIN_AVAILABLE, Value::Byte(0))
                .push(properties::WILDCARD_SUB_AVAILABLE, Value::Byte(0))
                .push(properties::SUB_ID_AVAILABLE, Value::Byte(0))
                .push(properties::SHARED_SUB_AVAILABLE, Value::Byte(0));
            (Peer::v5(&connect.properties, keep_alive_s), Some(props))
        } else {
            (Peer::v311(policy.settle_v311(connect.keep_alive_s)), None)
        };
        if send_connack(stream, level, CONNACK_ACCEPTED, connack_props)
            .await
            .is_err()
        {
            return None;
        }
        // The read reserved a whole chunk; an idle device must not keep it for life.
        if buf.is_empty() {
            buf = BytesMut::new();
        }
        Some((device_id, peer, network.to_owned(), buf))
    }

    async fn connection(
        &self,
        mut stream: Transport,
        deadline: tokio::time::Instant,
        ticket: &mut Ticket,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Boxed for the same reason: the CONNECT's state is not kept for the connection's
        // life.
        let Some((device_id, peer, network, mut buf)) =
            Box::pin(self.handshake(&mut stream, deadline)).await
        else {
            stream.close().await;
            return;
        };
        // Past CONNACK: no longer counted against the unauthenticated caps.
        ticket.authenticated();
        tracing::Span::current().record("device_id", &*device_id);
        let reg = self.hub.register(device_id.clone());
        herald_telemetry::metrics::connected();
        let max = self.config.max_packet_bytes;
        self.emit(Event::new(
            now_ms(),
            Kind::DeviceConnected(DeviceConnected {
                device_id: device_id.to_string(),
                gateway_id: self.config.gateway_id.clone(),
                keep_alive_s: u32::from(peer.keep_alive_s),
            }),
        ))
        .await;
        tracing::debug!(device_id = %device_id, level = peer.level, keep_alive_s = peer.keep_alive_s, network, "device connected");

        let mut session = Session::new(peer, now_ms(), self.config.limits);
        // At most one backlog read is outstanding (the session asks for the next page
        // only when the last one arrived), and QoS 2 receipts being made durable live in a
        // set created only when a QoS 2 exchange happens: an idle connection holds neither.
        let mut fetch: Option<BoxFuture<'static, Result<BacklogPage, DirectoryError>>> = None;
        let mut receipts: Option<FuturesUnordered<BoxFuture<'static, Option<u64>>>> = None;
        // Bytes that arrived after CONNECT in the same read belong to the session.
        drain_frames(&mut buf, max, &mut session);
        let mut closing: Option<&'static str> = None;
        let reason = loop {
            while let Some(ev) = session.poll_event() {
                match ev {
                    SessionEvent::Acked { seq, message_id } => {
                        tracing::debug!(message_id = %message_id, seq, "acked");
                        self.emit(Event::new(
                            now_ms(),
                            Kind::DeviceAcked(DeviceAcked {
                                device_id: device_id.to_string(),
                                seq,
                                message_id: message_id.to_string(),
                                gateway_id: self.config.gateway_id.clone(),
                            }),
                        ))
                        .await;
                    }
                    SessionEvent::Received { seq, message_id } => {
                        let event = Event::new(
                            now_ms(),
                            Kind::DeviceReceived(DeviceReceived {
                                device_id: device_id.to_string(),
                                seq,
                                message_id: message_id.to_string(),
                                gateway_id: self.config.gateway_id.clone(),
                            }),
                        );
                        let append = self.log.append(vec![device_record(&device_id, &event)]);
                        receipts
                            .get_or_insert_with(FuturesUnordered::new)
                            .push(Box::pin(async move {
                                match append.await {
                                    Ok(_) => Some(seq),
                                    // No PUBREL without a durable receipt; the device gets
                                    // the PUBLISH again (same packet id) next connection.
                                    Err(e) => {
                                        tracing::error!(error = %e, "cannot record a QoS 2 receipt");
                                        None
                                    }
                                }
                            }));
                    }
                    SessionEvent::FetchBacklog { after_seq, limit } => {
                        let page = self.directory.backlog(device_id.clone(), after_seq, limit);
                        fetch = Some(Box::pin(async move {
                            let page = page.await;
                            if page.is_err() {
                                // Do not spin on a failing store.
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            page
                        }));
                    }
                    SessionEvent::Close(r) => closing = Some(r.as_str()),
                }
            }
            if session.has_transmit() {
                let out = session.take_transmit_buf();
                // A device that stops reading must not hold its task (and a takeover, a
                // shutdown, its mailbox) forever.
                match tokio::time::timeout(self.config.write_timeout, stream.write_all(out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break "write_failed",
                    Err(_) => break "write_timeout",
                }
            }
            if let Some(r) = closing {
                break r;
            }
            let deadline = session.poll_timeout();
            let sleep = async move {
                match deadline {
                    Some(d) => {
                        tokio::time::sleep(Duration::from_millis(d.saturating_sub(now_ms()))).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = stream.read_into(&mut buf) => {
                    match r {
                        Ok(0) => break "closed_by_device",
                        Ok(_) => drain_frames(&mut buf, max, &mut session),
                        Err(_) => break "read_failed",
                    }
                    // Keep a buffer only while a partial packet is in it.
                    if buf.is_empty() {
                        buf = BytesMut::new();
                    }
                },
                _ = reg.mailbox.wait() => {
                    if reg.mailbox.kicked() {
                        session.handle_close(CloseReason::TakenOver);
                        continue;
                    }
                    if reg.mailbox.take_overflow() {
                        session.handle_overflow(now_ms());
                    }
                    for cmd in reg.mailbox.take() {
                        match cmd {
                            Command::Deliver(batch) => session.handle_deliveries(batch, now_ms()),
                            Command::Withdraw(ids) => session.handle_withdraw(&ids, now_ms()),
                        }
                    }
                },
                page = next_page(&mut fetch) => match page {
                    Ok(p) => {
                        tracing::debug!(device_id = %device_id, entries = p.entries.len(), covered_through = p.covered_through, complete = p.complete, "backlog page");
                        session.handle_backlog(p, now_ms());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "backlog read failed; retrying");
                        session.handle_backlog_failed(now_ms());
                    }
                },
                seq = next_receipt(&mut receipts) => {
                    if let Some(seq) = seq {
                        session.handle_received_durable(seq, now_ms());
                    }
                },
                _ = sleep => session.handle_timeout(now_ms()),
                _ = shutdown.changed() => session.handle_close(CloseReason::ServerShutdown),
            }
        };
        self.hub.unregister(&device_id, reg.conn_id);
        herald_telemetry::metrics::disconnected(reason);
        stream.close().await;
        tracing::debug!(device_id = %device_id, reason, inflight = session.inflight_len(), "device disconnected");
        self.emit(Event::new(
            now_ms(),
            Kind::DeviceDisconnected(DeviceDisconnected {
                device_id: device_id.to_string(),
                gateway_id: self.config.gateway_id.clone(),
                reason: reason.to_owned(),
            }),
        ))
        .await;
    }
}

/// The outstanding backlog read, if any; pending forever when there is none.
async fn next_page(
    fetch: &mut Option<BoxFuture<'static, Result<BacklogPage, DirectoryError>>>,
) -> Result<BacklogPage, DirectoryError> {
    match fetch {
        Some(f) => {
            let page = f.await;
            *fetch = None;
            page
        }
        None => std::future::pending().await,
    }
}

/// The next QoS 2 receipt made durable (`None` if it failed); pending while there is none.
async fn next_receipt(
    receipts: &mut Option<FuturesUnordered<BoxFuture<'static, Option<u64>>>>,
) -> Option<u64> {
    match receipts {
        Some(set) if !set.is_empty() => {
            let r = set.next().await.flatten();
            if set.is_empty() {
                *receipts = None;
            }
            r
        }
        _ => std::future::pending().await,
    }
}

/// Feeds every complete frame in `buf` to the session, which ends itself on a
/// malformed one (that closes this connection only).
fn drain_frames(buf: &mut BytesMut, max: usize, session: &mut Session) {
    let level = session.level();
    loop {
        match codec::check(buf, max) {
            Ok(Some(n)) => {
                let frame = buf.split_to(n);
                match codec::decode_as(&frame, level) {
                    Ok(p) => session.handle_packet(p, now_ms()),
                    Err(e) => {
                        tracing::debug!(error = %e, "malformed packet; closing");
                        session.handle_codec_error(&e);
                        return;
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "malformed packet; closing");
                session.handle_codec_error(&e);
                return;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// The bytes are not a packet; with the protocol level of the CONNECT they began,
    /// when that much was readable.
    #[error("{0}")]
    Codec(CodecError, Option<u8>),
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

async fn read_packet(
    stream: &mut Transport,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Packet, ReadError> {
    loop {
        match codec::check(buf, max) {
            Ok(Some(n)) => {
                let frame = buf.split_to(n);
                return codec::decode(&frame)
                    .map_err(|e| ReadError::Codec(e, codec::connect_level(&frame)));
            }
            Ok(None) => {}
            Err(e) => return Err(ReadError::Codec(e, codec::connect_level(buf))),
        }
        if stream.read_into(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

async fn send_connack(
    stream: &mut Transport,
    level: u8,
    code: u8,
    properties: Option<Properties>,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(64);
    codec::encode_as(
        &Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: properties.unwrap_or_default(),
        }),
        level,
        &mut out,
    );
    stream.write_all(out).await
}

/// Appends the gateway's events to the log in batches. Acks are not awaited one by one:
/// a lost ack only means the entry is sent again, which the device deduplicates.
async fn append_events(mut rx: mpsc::Receiver<Event>, log: Arc<dyn Append>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, EVENT_BATCH).await > 0 {
        let records: Vec<Record> = batch
            .drain(..)
            .map(|e| device_record(event_device(&e), &e))
            .collect();
        // Retried for a while (a link to the worker may be coming back, a broker
        // restarting): an ack that is lost only means a resend, but a stock client at
        // QoS 1 shows a resend twice.
        let mut wait = Duration::from_millis(100);
        let started = tokio::time::Instant::now();
        loop {
            match log.append(records.clone()).await {
                Ok(_) => break,
                Err(e) if started.elapsed() < EVENT_RETRY => {
                    tracing::debug!(error = %e, "gateway events not appended yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::error!(error = %e, events = records.len(), "cannot append gateway events; dropping them");
                    break;
                }
            }
        }
    }
}
