//! The gateway's end of the link to delivery workers: QUIC with mutual TLS.
//!
//! A gateway listens (9494/udp by default); workers connect, each opening one
//! bidirectional stream. The worker speaks first (`WorkerHello`); the gateway answers with
//! its `Hello` and everything it holds (`Presence{full}`), then tells of every device that
//! connects or leaves. The worker sends entries, withdrawals and resyncs, which go to the
//! hub exactly as in-process ones do, and answers the gateway's requests: device
//! authentication, backlog pages, and appends of the gateway's events.
//!
//! # Invariants
//! - Only a peer whose certificate the link CA signed gets through the handshake.
//! - A malformed frame closes that link only; the gateway and its other links go on.
//! - When a link comes up, every session here rereads its inbox: entries in flight on a
//!   link that broke are sent again from the inbox, never lost.
//! - Requests wait at most [`REQUEST_TIMEOUT`]; without a link, they fail at once (the
//!   device is told the server is unavailable and retries).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use herald_eventlog::{Append, Offset, Record};
use herald_net::{Caps, Gate};
use herald_schemas::link::wire::{self, down, reply, up};
use herald_schemas::link::{self as frames, BacklogPage};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, oneshot, watch};

use crate::hub::{Hub, PresenceChange};
use crate::server::{DeviceDirectory, DeviceInfo, DirectoryError};

/// The ALPN protocol of the link.
pub const ALPN: &[u8] = b"herald-link/1";
/// The name every gateway certificate carries and every worker checks.
pub const SERVER_NAME: &str = "herald-gateway";
/// The revision of `link.proto` this build speaks.
pub const LINK_VERSION: u32 = 1;
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// How long a request to a worker may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for one link before the writer pushes back.
pub const LINK_QUEUE: usize = 1024;
/// QUIC application error code: the peer sent a frame that is not a link frame.
pub const CLOSE_MALFORMED: u32 = 1;
/// QUIC application error code: the peer closed the link on purpose.
pub const CLOSE_NORMAL: u32 = 0;

/// Why the link could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// A certificate or key file is missing or unreadable.
    #[error("link TLS: {0}")]
    Tls(String),
    /// The socket could not be bound.
    #[error("link socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol.
    #[error("link protocol: {0}")]
    Protocol(String),
}

/// The files of the link's mutual TLS: the CA every peer is checked against, and this
/// process's own certificate and key (signed by that CA). `herald certs` makes them.
#[derive(Debug, Clone)]
pub struct LinkTls {
    /// PEM file of the CA certificate.
    pub ca: std::path::PathBuf,
    /// PEM file of this process's certificate.
    pub cert: std::path::PathBuf,
    /// PEM file of this process's private key.
    pub key: std::path::PathBuf,
}

fn tls_err(what: &str, path: &Path, e: impl std::fmt::Display) -> LinkError {
    LinkError::Tls(format!("{what} {}: {e}", path.display()))
}

impl LinkTls {
    /// The files `herald certs --out dir` wrote for `role` (`gateway` or `worker`).
    pub fn in_dir(dir: &Path, role: &str) -> Self {
        LinkTls {
            ca: dir.join("ca.crt"),
            cert: dir.join(format!("{role}.crt")),
            key: dir.join(format!("{role}.key")),
        }
    }

    fn load(
        &self,
    ) -> Result<
        (
            rustls::RootCertStore,
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
        ),
        LinkError,
    > {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca)
            .map_err(|e| tls_err("cannot read CA", &self.ca, e))?
        {
            let c = c.map_err(|e| tls_err("bad CA certificate in", &self.ca, e))?;
            roots
                .add(c)
                .map_err(|e| tls_err("unusable CA certificate in", &self.ca, e))?;
        }
        if roots.is_empty() {
            return Err(tls_err("no CA certificate in", &self.ca, "empty"));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| tls_err("cannot read certificate", &self.cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| tls_err("bad certificate in", &self.cert, e))?;
        if chain.is_empty() {
            return Err(tls_err("no certificate in", &self.cert, "empty"));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| tls_err("cannot read private key", &self.key, e))?;
        Ok((roots, chain, key))
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The QUIC server side: requires a client certificate signed by the CA.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, LinkError> {
        let (roots, chain, key) = self.load()?;
        let provider = Self::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| LinkError::Tls(format!("client verifier: {e}")))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| LinkError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| LinkError::Tls(format!("certificate and key: {e}")))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls).map_err(|e| LinkError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }

    /// The QUIC client side: checks the gateway against the CA and shows our certificate.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, LinkError> {
        let (roots, chain, key) = self.load()?;
        let mut tls = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| LinkError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| LinkError::Tls(format!("certificate and key: {e}")))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls).map_err(|e| LinkError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }
}

/// Link transport settings: a dead peer is noticed within seconds.
fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(5_000).into()));
    t
}

/// Writes one frame: a big-endian u32 length, then the message.
pub async fn write_frame(
    out: &mut quinn::SendStream,
    msg: &impl prost::Message,
) -> Result<(), LinkError> {
    let body = msg.encode_to_vec();
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    out.write_all(&buf)
        .await
        .map_err(|e| LinkError::Protocol(format!("write: {e}")))
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<M: prost::Message + Default>(
    input: &mut quinn::RecvStream,
) -> Result<Option<M>, LinkError> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(LinkError::Protocol(format!("read: {e}"))),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(LinkError::Protocol(format!(
            "frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    input
        .read_exact(&mut body)
        .await
        .map_err(|e| LinkError::Protocol(format!("read: {e}")))?;
    M::decode(body.as_slice())
        .map(Some)
        .map_err(|e| LinkError::Protocol(format!("malformed frame: {e}")))
}

/// One worker connected to this gateway.
struct Peer {
    id: u64,
    up: mpsc::Sender<wire::Up>,
    /// The partitions whose devices it serves (count, partitions), once it said so;
    /// `None`: every device.
    owns: Option<(u32, std::collections::BTreeSet<u32>)>,
}

impl Peer {
    fn serves(&self, device_id: &str) -> bool {
        match &self.owns {
            None => true,
            Some((count, parts)) => parts.contains(&herald_schemas::partition::for_key(
                device_id.as_bytes(),
                *count,
            )),
        }
    }
}

/// A request waiting for its reply: which link it went out on, and where the reply goes.
type Waiting = (u64, oneshot::Sender<reply::Body>);

/// What the gateway's links share: the open links, and the requests waiting for replies.
#[derive(Default)]
struct Links {
    peers: Mutex<Vec<Peer>>,
    pending: Mutex<HashMap<u64, Waiting>>,
    next_id: AtomicU64,
}

/// Removes a request from `pending` however its caller stops waiting.
struct PendingGuard<'a> {
    links: &'a Links,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.links
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Links {
    /// The newest linked worker that serves `device` (any, for no device).
    fn newest(&self, device: Option<&str>) -> Option<(u64, mpsc::Sender<wire::Up>)> {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|p| device.is_none_or(|d| p.serves(d)))
            .map(|p| (p.id, p.up.clone()))
    }

    /// Records the partitions a worker serves now; returns those it did not before.
    fn set_owns(&self, peer: u64, owns: wire::Owns) -> (u32, Vec<u32>) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = peers.iter_mut().find(|p| p.id == peer) else {
            return (owns.count, Vec::new());
        };
        let before = p.owns.take().map(|(_, s)| s).unwrap_or_default();
        let now: std::collections::BTreeSet<u32> = owns.partitions.into_iter().collect();
        let gained = now.difference(&before).copied().collect();
        p.owns = Some((owns.count, now));
        (owns.count, gained)
    }

    /// Sends a request to the newest worker that serves `device` (for an append: the
    /// newest worker) and waits for its reply.
    async fn request(
        &self,
        device: Option<&str>,
        body: wire::request::Body,
    ) -> Result<reply::Body, String> {
        let (peer, up) = self
            .newest(device)
            .ok_or("no linked delivery worker serves this device now")?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (peer, tx));
        let _guard = PendingGuard { links: self, id };
        let frame = wire::Up {
            body: Some(up::Body::Request(wire::Request {
                id,
                body: Some(body),
            })),
        };
        // The whole request, queueing included, is bounded: a peer that stops reading
        // cannot hold a device's connect or backlog forever.
        let exchange = async {
            up.send(frame)
                .await
                .map_err(|_| "the link closed".to_string())?;
            match rx.await {
                Ok(reply::Body::Error(e)) => Err(e),
                Ok(r) => Ok(r),
                Err(_) => Err("the link closed before the reply".to_string()),
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(r) => r,
            Err(_) => Err("the delivery worker did not answer in time".to_string()),
        }
    }

    /// Fails the requests that went out on link `peer` (it closed).
    fn fail_pending(&self, peer: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (p, _)| *p != peer);
    }

    fn answer(&self, r: wire::Reply) {
        let waiter = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&r.id);
        if let (Some((_, w)), Some(body)) = (waiter, r.body) {
            let _ = w.send(body);
        }
    }
}

/// What the link listener admits: it is a UDP socket, so its connections hold no file
/// descriptor, but a handshake costs CPU and memory until it completes or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkLimits {
    /// Links held, handshakes that have not completed, and handshakes from one source.
    pub caps: Caps,
    /// How long a QUIC + TLS handshake (the worker's certificate checked) may take.
    pub handshake_timeout: Duration,
}

impl Default for LinkLimits {
    fn default() -> Self {
        LinkLimits {
            caps: Caps {
                max_connections: 256,
                max_unauthenticated: 64,
                max_unauthenticated_per_source: 8,
            },
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The gateway's link listener.
pub struct LinkServer {
    endpoint: quinn::Endpoint,
    gate: Arc<Gate>,
    handshake_timeout: Duration,
    hub: Arc<Hub>,
    gateway_id: String,
    links: Arc<Links>,
    next_peer: AtomicU64,
}

impl LinkServer {
    /// Listens on `addr` (UDP) with `tls`, admitting links within `limits`.
    pub fn bind(
        addr: SocketAddr,
        tls: &LinkTls,
        hub: Arc<Hub>,
        gateway_id: impl Into<String>,
        limits: LinkLimits,
    ) -> Result<Arc<Self>, LinkError> {
        let endpoint = quinn::Endpoint::server(tls.server_config()?, addr)?;
        Ok(Arc::new(LinkServer {
            endpoint,
            gate: Gate::new("link", limits.caps, None),
            handshake_timeout: limits.handshake_timeout,
            hub,
            gateway_id: gateway_id.into(),
            links: Arc::new(Links::default()),
            next_peer: AtomicU64::new(0),
        }))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Device authentication and backlog pages, asked of the linked workers.
    pub fn directory(self: &Arc<Self>) -> Arc<dyn DeviceDirectory> {
        Arc::new(LinkDirectory {
            links: self.links.clone(),
        })
    }

    /// Where the gateway's events go: appended by a linked worker.
    pub fn log(self: &Arc<Self>) -> Arc<dyn Append> {
        Arc::new(LinkDirectory {
            links: self.links.clone(),
        })
    }

    /// The admission state of the link listener (for `/readyz`).
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// How many workers are linked.
    pub fn linked(&self) -> usize {
        self.links
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Accepts links until `shutdown` turns true.
    pub async fn serve(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        self.gate.set_accepting(true);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let remote = incoming.remote_address();
                    let Ok(mut ticket) = self.gate.admit(remote) else {
                        // Over a cap: refused at once, before any cryptography.
                        incoming.refuse();
                        continue;
                    };
                    let server = self.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(server.handshake_timeout, incoming).await {
                            Ok(Ok(conn)) => {
                                // Mutual TLS checked the worker's certificate.
                                ticket.authenticated();
                                server.run_link(conn).await;
                            }
                            // Includes peers whose certificate the CA did not sign.
                            Ok(Err(e)) => {
                                herald_telemetry::metrics::listener_refused("link", "handshake_failed");
                                tracing::debug!(%remote, error = %e, "link refused");
                            }
                            Err(_) => {
                                herald_telemetry::metrics::listener_refused("link", "handshake_timeout");
                                tracing::debug!(%remote, "link handshake timed out");
                            }
                        }
                        drop(ticket);
                    });
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        self.endpoint.close(quinn::VarInt::from_u32(CLOSE_NORMAL), b"shutting down");
                        break;
                    }
                }
            }
        }
        self.gate.set_accepting(false);
    }

    async fn run_link(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "link closed before its stream opened");
                return;
            }
        };
        let hello = match read_frame::<wire::Down>(&mut recv).await {
            Ok(Some(wire::Down {
                body: Some(down::Body::WorkerHello(h)),
            })) => h,
            Ok(_) => {
                conn.close(
                    quinn::VarInt::from_u32(CLOSE_MALFORMED),
                    b"expected WorkerHello",
                );
                tracing::warn!(%remote, "link closed: the first frame was not WorkerHello");
                return;
            }
            Err(e) => {
                conn.close(quinn::VarInt::from_u32(CLOSE_MALFORMED), b"malformed frame");
                tracing::warn!(%remote, error = %e, "link closed");
                return;
            }
        };
        // Subscribe before the snapshot, so no change falls between them.
        let mut presence = self.hub.watch_presence();
        let connected: Vec<String> = self.hub.devices().iter().map(|d| d.to_string()).collect();
        let greeting = [
            wire::Up {
                body: Some(up::Body::Hello(wire::Hello {
                    gateway_id: self.gateway_id.clone(),
                    version: LINK_VERSION,
                })),
            },
            wire::Up {
                body: Some(up::Body::Presence(wire::Presence {
                    connected,
                    gone: Vec::new(),
                    full: true,
                })),
            },
        ];
        for f in &greeting {
            if let Err(e) = write_frame(&mut send, f).await {
                tracing::warn!(%remote, error = %e, "link closed during the greeting");
                return;
            }
        }
        let (up_tx, mut up_rx) = mpsc::channel::<wire::Up>(LINK_QUEUE);
        let peer_id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        self.links
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Peer {
                id: peer_id,
                up: up_tx.clone(),
                // From the first request on, only the partitions it says it serves.
                owns: hello
                    .owns
                    .as_ref()
                    .map(|o| (o.count, o.partitions.iter().copied().collect())),
            });
        tracing::info!(%remote, worker = %hello.worker_id, "delivery worker linked");
        // Whatever was in flight on an earlier link is read again from the inbox: every
        // session's, or for a worker of a partitioned topic, its partitions' sessions'.
        match hello.owns {
            Some(owns) => self.resync_partitions(owns.count, &owns.partitions),
            None => self.hub.resync_all(),
        }

        let writer = async {
            loop {
                // Presence first: a device's "connected" must reach the worker before any
                // request its session makes, or an entry stored meanwhile is never sent live.
                tokio::select! {
                    biased;
                    change = presence.recv() => {
                        let frame = match change {
                            Ok(PresenceChange { device_id, connected }) => wire::Presence {
                                connected: if connected { vec![device_id.to_string()] } else { Vec::new() },
                                gone: if connected { Vec::new() } else { vec![device_id.to_string()] },
                                full: false,
                            },
                            // Missed changes: drop the stale ones and say everything again.
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                                presence = presence.resubscribe();
                                wire::Presence {
                                    connected: self.hub.devices().iter().map(|d| d.to_string()).collect(),
                                    gone: Vec::new(),
                                    full: true,
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                        };
                        write_frame(&mut send, &wire::Up { body: Some(up::Body::Presence(frame)) }).await?;
                    }
                    f = up_rx.recv() => match f {
                        Some(f) => write_frame(&mut send, &f).await?,
                        None => return Ok::<(), LinkError>(()),
                    },
                }
            }
        };
        let reader = async {
            loop {
                match read_frame::<wire::Down>(&mut recv).await? {
                    None => return Ok::<(), LinkError>(()),
                    Some(f) => self.on_down(peer_id, f),
                }
            }
        };
        let outcome = tokio::select! {
            r = writer => r,
            r = reader => r,
        };
        self.links
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p.id != peer_id);
        self.links.fail_pending(peer_id);
        match outcome {
            Ok(()) => {
                conn.close(quinn::VarInt::from_u32(CLOSE_NORMAL), b"bye");
                tracing::info!(%remote, "delivery worker unlinked");
            }
            Err(e) => {
                conn.close(quinn::VarInt::from_u32(CLOSE_MALFORMED), b"link error");
                tracing::warn!(%remote, error = %e, "link closed");
            }
        }
    }

    /// A worker says which partitions it serves: the sessions of the devices of those
    /// new to it read their inboxes again from it (what the last owner had in flight).
    fn owns(&self, peer: u64, owns: wire::Owns) {
        let (count, gained) = self.links.set_owns(peer, owns);
        self.resync_partitions(count, &gained);
    }

    /// Makes the sessions of the devices in `partitions` read their inboxes again.
    fn resync_partitions(&self, count: u32, partitions: &[u32]) {
        if partitions.is_empty() {
            return;
        }
        let devices: Vec<Arc<str>> = self
            .hub
            .devices()
            .into_iter()
            .filter(|d| {
                partitions.contains(&herald_schemas::partition::for_key(d.as_bytes(), count))
            })
            .collect();
        self.hub.resync(&devices);
    }

    fn on_down(&self, peer: u64, f: wire::Down) {
        match f.body {
            Some(down::Body::Deliver(d)) => {
                self.hub.deliver(
                    d.entries
                        .into_iter()
                        .map(frames::delivery_from_wire)
                        .collect(),
                );
            }
            Some(down::Body::Withdraw(w)) => {
                self.hub.withdraw(
                    w.items
                        .into_iter()
                        .map(frames::withdrawal_from_wire)
                        .collect(),
                );
            }
            Some(down::Body::Resync(r)) => {
                if r.all {
                    self.hub.resync_all();
                } else {
                    let devices: Vec<Arc<str>> = r.device_ids.into_iter().map(Arc::from).collect();
                    self.hub.resync(&devices);
                }
            }
            Some(down::Body::Reply(r)) => self.links.answer(r),
            Some(down::Body::Owns(o)) => self.owns(peer, o),
            Some(down::Body::WorkerHello(_)) | None => {}
        }
    }
}

/// Directory and log through the link.
struct LinkDirectory {
    links: Arc<Links>,
}

impl DeviceDirectory for LinkDirectory {
    fn authenticate(
        &self,
        device_id: &str,
        token: &[u8],
    ) -> BoxFuture<'static, Result<Option<DeviceInfo>, DirectoryError>> {
        let links = self.links.clone();
        let device = device_id.to_string();
        let body = wire::request::Body::Auth(wire::Auth {
            device_id: device_id.to_string(),
            token: token.to_vec(),
        });
        Box::pin(async move {
            match links.request(Some(&device), body).await {
                Ok(reply::Body::Device(d)) => Ok(Some(DeviceInfo { network: d.network })),
                Ok(reply::Body::Authenticated(true)) => Ok(Some(DeviceInfo::default())),
                Ok(reply::Body::Authenticated(false)) => Ok(None),
                Ok(_) => Err(DirectoryError("unexpected reply to Auth".into())),
                Err(e) => Err(DirectoryError(e)),
            }
        })
    }

    fn backlog(
        &self,
        device_id: Arc<str>,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<BacklogPage, DirectoryError>> {
        let links = self.links.clone();
        let body = wire::request::Body::Backlog(wire::Backlog {
            device_id: device_id.to_string(),
            after_seq,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        });
        Box::pin(async move {
            match links.request(Some(&device_id), body).await {
                Ok(reply::Body::Backlog(page)) => Ok(frames::page_from_wire(page)),
                Ok(_) => Err(DirectoryError("unexpected reply to Backlog".into())),
                Err(e) => Err(DirectoryError(e)),
            }
        })
    }
}

impl Append for LinkDirectory {
    fn append(
        &self,
        records: Vec<Record>,
    ) -> BoxFuture<'static, Result<Vec<Offset>, herald_eventlog::Error>> {
        let links = self.links.clone();
        let body = wire::request::Body::Append(wire::Append {
            records: records
                .into_iter()
                .map(|r| wire::Record {
                    key: r.key,
                    value: r.value,
                })
                .collect(),
        });
        Box::pin(async move {
            match links.request(None, body).await {
                Ok(reply::Body::Appended(a)) => Ok(a.offsets),
                Ok(_) => Err(herald_eventlog::Error::Unavailable(
                    "unexpected reply to Append".into(),
                )),
                Err(e) => Err(herald_eventlog::Error::Unavailable(e)),
            }
        })
    }
}

/// Connects to a gateway's link as a worker (used by delivery workers and tests).
pub async fn connect(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    worker_id: &str,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), LinkError> {
    connect_with_hello(
        endpoint,
        config,
        addr,
        wire::WorkerHello {
            worker_id: worker_id.to_string(),
            version: LINK_VERSION,
            owns: None,
        },
    )
    .await
}

/// [`connect`], with the `WorkerHello` to send (a worker of a partitioned topic says
/// which partitions it serves).
pub async fn connect_with_hello(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    hello: wire::WorkerHello,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), LinkError> {
    let conn = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .map_err(|e| LinkError::Protocol(format!("connect: {e}")))?
        .await
        .map_err(|e| LinkError::Protocol(format!("handshake: {e}")))?;
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| LinkError::Protocol(format!("open stream: {e}")))?;
    write_frame(
        &mut send,
        &wire::Down {
            body: Some(down::Body::WorkerHello(hello)),
        },
    )
    .await?;
    Ok((conn, send, recv))
}

/// Writes a fresh link CA and the certificates it signs into `dir`: `ca.crt` and
/// `ca.key`, `gateway.crt`/`gateway.key` (for every gateway; its names are
/// [`SERVER_NAME`], `localhost`, 127.0.0.1 and `extra_names`) and `worker.crt`/`worker.key`
/// (for every delivery worker or `herald serve`). Keys are written readable by the owner
/// only. Existing files are overwritten.
pub fn generate_certs(dir: &Path, extra_names: &[String]) -> Result<(), LinkError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let fail = |e: rcgen::Error| LinkError::Tls(format!("cannot make certificates: {e}"));
    std::fs::create_dir_all(dir)?;

    let ca_key = KeyPair::generate().map_err(fail)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca.distinguished_name
        .push(DnType::CommonName, "herald link CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let mut names = vec![
        SERVER_NAME.to_string(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    names.extend(extra_names.iter().cloned());
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(fail)?;
        let mut p = CertificateParams::new(names).map_err(fail)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &issuer).map_err(fail)?;
        Ok::<_, LinkError>((cert.pem(), key.serialize_pem()))
    };
    let gateway = leaf(names, "herald gateway", ExtendedKeyUsagePurpose::ServerAuth)?;
    let worker = leaf(
        vec!["herald-worker".into()],
        "herald worker",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    let write = |name: &str, body: &str, secret: bool| -> Result<(), LinkError> {
        let path = dir.join(name);
        std::fs::write(&path, body)?;
        if secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    };
    write("ca.crt", &ca_cert.pem(), false)?;
    write("ca.key", &ca_key.serialize_pem(), true)?;
    write("gateway.crt", &gateway.0, false)?;
    write("gateway.key", &gateway.1, true)?;
    write("worker.crt", &worker.0, false)?;
    write("worker.key", &worker.1, true)?;
    Ok(())
}
