//! The MQTT listener and one task per connection. The task only moves bytes, timers
//! and channel messages; every protocol decision is in [`crate::session::Session`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use herald_eventlog::{Append, Record};
use herald_schemas::events::{
    self, DeviceAcked, DeviceConnected, DeviceDisconnected, DeviceReceived, Event,
    GatewayHeartbeat, Kind,
};
use herald_schemas::link::BacklogPage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::codec::{self, CodecError, ConnAck, Packet};
use crate::hub::{Command, Hub};
use crate::session::{Session, SessionEvent, SessionLimits};

/// Why the directory could not answer.
#[derive(Debug, thiserror::Error)]
#[error("device directory unavailable: {0}")]
pub struct DirectoryError(pub String);

/// What the gateway needs to know about devices: who they are and what is in their
/// inbox. The gateway only reads; it never writes to a store.
pub trait DeviceDirectory: Send + Sync + 'static {
    /// Whether `token` is the device token of `device_id`.
    fn authenticate(
        &self,
        device_id: &str,
        token: &[u8],
    ) -> BoxFuture<'static, Result<bool, DirectoryError>>;

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
    /// Most connections held at once.
    pub max_connections: usize,
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
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            gateway_id: "gateway-1".into(),
            max_packet_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            limits: SessionLimits::default(),
            write_timeout: Duration::from_secs(30),
            advertised_mqtt: "mqtt://127.0.0.1:9493".into(),
            advertised_ws: "ws://127.0.0.1:8083/mqtt".into(),
            heartbeat: Duration::from_secs(5),
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
            config,
            hub,
            directory,
            events: tx,
            log,
        })
    }

    /// Accepts connections until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let permits = Arc::new(Semaphore::new(self.config.max_connections));
        tokio::spawn(self.clone().heartbeats(shutdown.clone()));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "connection limit reached; refusing");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                gw.connection(stream, shutdown).await;
                drop(permit);
            });
        }
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

    async fn connection(&self, mut stream: TcpStream, mut shutdown: watch::Receiver<bool>) {
        let mut buf = BytesMut::new();
        let max = self.config.max_packet_bytes;
        let first = tokio::time::timeout(
            self.config.connect_timeout,
            read_packet(&mut stream, &mut buf, max),
        )
        .await;
        let connect = match first {
            Ok(Ok(Packet::Connect(c))) => c,
            Ok(Err(ReadError::Codec(CodecError::UnsupportedProtocol(level)))) => {
                tracing::debug!(level, "refusing unsupported protocol level");
                let _ = send_connack(&mut stream, codec::CONNACK_BAD_PROTOCOL).await;
                return;
            }
            Ok(Ok(other)) => {
                tracing::debug!(packet = ?other, "first packet is not CONNECT; closing");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "bad CONNECT; closing");
                return;
            }
            Err(_) => {
                tracing::debug!("no CONNECT in time; closing");
                return;
            }
        };
        if connect.client_id.is_empty() {
            let _ = send_connack(&mut stream, codec::CONNACK_ID_REJECTED).await;
            return;
        }
        let device_id: Arc<str> = connect.client_id.as_str().into();
        let authentic = match (&connect.username, &connect.password) {
            (Some(user), Some(pass)) if *user == connect.client_id => {
                self.directory.authenticate(&device_id, pass).await
            }
            _ => Ok(false),
        };
        match authentic {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(device_id = %device_id, "device refused: not authorized");
                let _ = send_connack(&mut stream, codec::CONNACK_NOT_AUTHORIZED).await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot authenticate device");
                let _ = send_connack(&mut stream, codec::CONNACK_UNAVAILABLE).await;
                return;
            }
        }

        let reg = self.hub.register(device_id.clone());
        if send_connack(&mut stream, codec::CONNACK_ACCEPTED)
            .await
            .is_err()
        {
            self.hub.unregister(&device_id, reg.conn_id);
            return;
        }
        let keep_alive_s = connect.keep_alive_s;
        drop(connect);
        self.emit(Event::new(
            now_ms(),
            Kind::DeviceConnected(DeviceConnected {
                device_id: device_id.to_string(),
                gateway_id: self.config.gateway_id.clone(),
                keep_alive_s: u32::from(keep_alive_s),
            }),
        ))
        .await;
        tracing::debug!(device_id = %device_id, keep_alive_s, "device connected");

        let mut session = Session::new(keep_alive_s, now_ms(), self.config.limits);
        // At most one backlog read is outstanding (the session asks for the next page
        // only when the last one arrived), and QoS 2 receipts being made durable live in a
        // set created only when a QoS 2 exchange happens: an idle connection holds neither.
        let mut fetch: Option<BoxFuture<'static, Result<BacklogPage, DirectoryError>>> = None;
        let mut receipts: Option<FuturesUnordered<BoxFuture<'static, Option<u64>>>> = None;
        // Bytes that arrived after CONNECT in the same read belong to the session.
        let mut closing: Option<&'static str> = drain_frames(&mut buf, max, &mut session);
        let reason = loop {
            while let Some(ev) = session.poll_event() {
                match ev {
                    SessionEvent::Acked { seq, message_id } => {
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
                match tokio::time::timeout(self.config.write_timeout, stream.write_all(&out)).await
                {
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
                r = stream.readable() => {
                    if r.is_err() {
                        break "read_failed";
                    }
                    // Read into a buffer that exists only while bytes are in hand.
                    buf.reserve(READ_CHUNK);
                    match stream.try_read_buf(&mut buf) {
                        Ok(0) => break "closed_by_device",
                        Ok(_) => closing = drain_frames(&mut buf, max, &mut session),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break "read_failed",
                    }
                    if buf.is_empty() {
                        buf = BytesMut::new();
                    }
                },
                _ = reg.mailbox.wait() => {
                    if reg.mailbox.kicked() {
                        break "taken_over";
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
                _ = shutdown.changed() => break "server_shutdown",
            }
        };
        self.hub.unregister(&device_id, reg.conn_id);
        let _ = stream.shutdown().await;
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

/// How much a read takes from the socket at a time.
const READ_CHUNK: usize = 4096;

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

/// Feeds every complete frame in `buf` to the session. Returns a close reason if a frame
/// is malformed: that closes this connection only.
fn drain_frames(buf: &mut BytesMut, max: usize, session: &mut Session) -> Option<&'static str> {
    loop {
        match codec::check(buf, max) {
            Ok(Some(n)) => {
                let frame = buf.split_to(n);
                match codec::decode(&frame) {
                    Ok(p) => session.handle_packet(p, now_ms()),
                    Err(e) => {
                        tracing::debug!(error = %e, "malformed packet; closing");
                        return Some("malformed_packet");
                    }
                }
            }
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "malformed packet; closing");
                return Some(match e {
                    CodecError::PacketTooLarge { .. } => "packet_too_large",
                    _ => "malformed_packet",
                });
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

async fn read_packet(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Packet, ReadError> {
    loop {
        if let Some(n) = codec::check(buf, max)? {
            let frame = buf.split_to(n);
            return Ok(codec::decode(&frame)?);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

async fn send_connack(stream: &mut TcpStream, code: u8) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(4);
    codec::encode(
        &Packet::ConnAck(ConnAck {
            session_present: false,
            code,
        }),
        &mut out,
    );
    stream.write_all(&out).await
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
