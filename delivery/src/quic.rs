//! The worker's end of the QUIC link: connects to every configured gateway, learns which
//! devices each holds (presence), routes new entries to the right one, and answers the
//! gateways' requests (device authentication, backlog pages, appends of their events).
//!
//! # Invariants
//! - Sending never blocks the worker: each link has a bounded queue, and an entry that
//!   does not fit is replaced by a resync of its device, which rereads its inbox.
//! - A device is wanted only while a linked gateway says it holds it; when a link breaks,
//!   its devices' entries wait in their inboxes, and the gateway resyncs every session
//!   when the link is back (see `herald_gateway::link`).
//! - Reconnects back off from 100 ms to 5 s.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use herald_eventlog::Append;
use herald_gateway::DeviceDirectory;
use herald_gateway::link::{self as gwlink, LINK_QUEUE, LINK_VERSION, LinkError, LinkTls};
use herald_schemas::link::wire::{self, down, reply, up};
use herald_schemas::link::{
    Delivery, Withdrawal, delivery_to_wire, page_to_wire, withdrawal_to_wire,
};
use tokio::sync::{Notify, mpsc, watch};

use crate::link::Link;

/// Where a worker's link goes.
#[derive(Debug, Clone)]
pub struct QuicLinkConfig {
    /// The gateways' link addresses, `host:port` (names are looked up at each connect).
    pub gateways: Vec<String>,
    /// The link's mutual-TLS files.
    pub tls: LinkTls,
    /// This worker's name, for the gateways' logs.
    pub worker_id: String,
}

/// One gateway, as the worker sees it.
struct Gateway {
    addr: String,
    /// The queue to its link, while it is up.
    /// The queue to its link while it is up, with the link's token (see `next_link`).
    tx: Mutex<Option<(u64, mpsc::Sender<wire::Down>)>>,
    /// Devices whose sessions must reread their inbox (their entries did not fit).
    resync: Mutex<HashSet<Arc<str>>>,
    /// Every session there must reread its inbox (a withdrawal for all did not fit).
    resync_all: AtomicBool,
    wake: Notify,
}

impl Gateway {
    fn send(&self, frame: wire::Down) -> Result<(), wire::Down> {
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, tx)| tx.clone());
        match tx {
            Some(tx) => tx.try_send(frame).map_err(|e| match e {
                mpsc::error::TrySendError::Full(f) | mpsc::error::TrySendError::Closed(f) => f,
            }),
            None => Err(frame),
        }
    }

    fn resync_later(&self, devices: impl IntoIterator<Item = Arc<str>>) {
        self.resync
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(devices);
        self.wake.notify_one();
    }
}

/// The worker's links to every gateway.
pub struct QuicLink {
    config: QuicLinkConfig,
    client: quinn::ClientConfig,
    endpoint: quinn::Endpoint,
    gateways: Vec<Arc<Gateway>>,
    /// Device -> the gateways that say they hold it, the newest claim last. Reports from
    /// different links arrive in any order: a stale "gone" from the gateway a device
    /// left removes only that gateway's claim.
    routes: RwLock<HashMap<Arc<str>, Claims>>,
    linked: watch::Sender<usize>,
    /// The partitions whose devices this worker serves, once set (`None`: every device).
    owns: watch::Sender<Option<wire::Owns>>,
    /// Tells links apart over activations: a link's cleanup clears only its own state.
    next_link: std::sync::atomic::AtomicU64,
}

/// The gateways claiming a device, the newest last (rarely more than one).
type Claims = Vec<usize>;

/// Most bytes of entries in one Deliver frame (well under the link's frame limit).
const DELIVER_FRAME_BYTES: usize = 1 << 20;

/// What answers the gateways' requests.
struct Answers {
    directory: Arc<dyn DeviceDirectory>,
    log: Arc<dyn Append>,
}

/// The first address `host:port` resolves to.
async fn resolve(addr: &str) -> Result<SocketAddr, LinkError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| LinkError::Protocol(format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| LinkError::Protocol(format!("{addr} resolves to no address")))
}

fn down(body: down::Body) -> wire::Down {
    wire::Down { body: Some(body) }
}

impl QuicLink {
    /// Starts linking to every gateway of `config`, answering their requests from
    /// `directory` and appending their events to `log`. Runs until `shutdown`.
    pub fn start(
        config: QuicLinkConfig,
        directory: Arc<dyn DeviceDirectory>,
        log: Arc<dyn Append>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, LinkError> {
        let link = Self::new(config)?;
        link.run(directory, log, shutdown);
        Ok(link)
    }

    /// A link that does not connect yet: hand it to a worker, then [`QuicLink::run`] it
    /// with the directory that worker keeps fresh.
    pub fn new(config: QuicLinkConfig) -> Result<Arc<Self>, LinkError> {
        let client = config.tls.client_config()?;
        // One socket for IPv4 and IPv6 peers where the system allows it.
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([0u16; 8], 0)))
            .or_else(|_| quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))))?;
        let gateways = config
            .gateways
            .iter()
            .map(|addr| {
                Arc::new(Gateway {
                    addr: addr.clone(),
                    tx: Mutex::new(None),
                    resync: Mutex::new(HashSet::new()),
                    resync_all: AtomicBool::new(false),
                    wake: Notify::new(),
                })
            })
            .collect();
        Ok(Arc::new(QuicLink {
            config,
            client,
            endpoint,
            gateways,
            routes: RwLock::new(HashMap::new()),
            linked: watch::channel(0).0,
            next_link: std::sync::atomic::AtomicU64::new(0),
            owns: watch::channel(None).0,
        }))
    }

    /// Connects to every gateway (and reconnects, until `shutdown`), answering their
    /// requests from `directory` and appending their events to `log`.
    pub fn run(
        self: &Arc<Self>,
        directory: Arc<dyn DeviceDirectory>,
        log: Arc<dyn Append>,
        shutdown: watch::Receiver<bool>,
    ) {
        let answers = Arc::new(Answers { directory, log });
        for idx in 0..self.gateways.len() {
            tokio::spawn(
                self.clone()
                    .keep_linked(idx, answers.clone(), shutdown.clone()),
            );
        }
    }

    /// Tells every gateway (now and on every link) which partitions of a topic of
    /// `count` this worker serves: their devices' requests come here, and their sessions
    /// read their inboxes again when a partition is new here.
    pub fn set_owned(&self, count: u32, partitions: Vec<u32>) {
        self.owns
            .send_replace(Some(wire::Owns { count, partitions }));
    }

    /// Makes the sessions of the devices of `partition` (of a topic of `count`) that the
    /// gateways report read their inboxes again.
    pub fn resync_partition(&self, count: u32, partition: u32) {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let mut per_gateway: HashMap<usize, Vec<Arc<str>>> = HashMap::new();
        for (device, claims) in routes.iter() {
            if herald_schemas::partition::for_key(device.as_bytes(), count) == partition
                && let Some(&g) = claims.last()
            {
                per_gateway.entry(g).or_default().push(device.clone());
            }
        }
        drop(routes);
        for (g, devices) in per_gateway {
            self.gateways[g].resync_later(devices);
        }
    }

    /// How many gateways are linked now; changes as links come and go.
    pub fn linked(&self) -> watch::Receiver<usize> {
        self.linked.subscribe()
    }

    fn routes_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Arc<str>, Claims>> {
        self.routes.write().unwrap_or_else(|e| e.into_inner())
    }

    fn route(&self, device_id: &str) -> Option<usize> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(device_id)
            .and_then(|c| c.last().copied())
    }

    /// Drops every claim of gateway `idx` (its link went, or it said everything again).
    fn forget_gateway(routes: &mut HashMap<Arc<str>, Claims>, idx: usize) {
        routes.retain(|_, c| {
            c.retain(|g| *g != idx);
            !c.is_empty()
        });
    }

    async fn keep_linked(
        self: Arc<Self>,
        idx: usize,
        answers: Arc<Answers>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let addr = self.gateways[idx].addr.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let connected = match resolve(&addr).await {
                Ok(sock) => {
                    let owns = self.owns.borrow().clone();
                    gwlink::connect_with_hello(
                        &self.endpoint,
                        self.client.clone(),
                        sock,
                        wire::WorkerHello {
                            worker_id: self.config.worker_id.clone(),
                            version: LINK_VERSION,
                            owns,
                        },
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match connected {
                Ok((conn, send, recv)) => {
                    if *shutdown.borrow() {
                        // Stopped while connecting (this activation is over).
                        conn.close(quinn::VarInt::from_u32(gwlink::CLOSE_NORMAL), b"bye");
                        return;
                    }
                    backoff = Duration::from_millis(100);
                    let token = self.next_link.fetch_add(1, Ordering::Relaxed);
                    self.linked.send_modify(|n| *n += 1);
                    let outcome = tokio::select! {
                        r = self.clone().serve(idx, token, send, recv, &answers) => r,
                        _ = shutdown.wait_for(|s| *s) => Ok(()),
                    };
                    self.linked.send_modify(|n| *n = n.saturating_sub(1));
                    // Clear the gateway's queue and routes only if they are still this
                    // link's (a newer link to the same gateway may be up already).
                    let mine = {
                        let mut tx = self.gateways[idx]
                            .tx
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        let mine = tx.as_ref().is_some_and(|(t, _)| *t == token);
                        if mine {
                            *tx = None;
                        }
                        mine
                    };
                    if mine {
                        Self::forget_gateway(&mut self.routes_write(), idx);
                    }
                    match outcome {
                        Ok(()) => {
                            conn.close(quinn::VarInt::from_u32(gwlink::CLOSE_NORMAL), b"bye");
                            tracing::info!(%addr, "gateway unlinked");
                        }
                        Err(e) => {
                            conn.close(
                                quinn::VarInt::from_u32(gwlink::CLOSE_MALFORMED),
                                b"link error",
                            );
                            tracing::warn!(%addr, error = %e, "gateway link broke");
                        }
                    }
                }
                Err(e) => tracing::debug!(%addr, error = %e, "cannot link to gateway"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn serve(
        self: Arc<Self>,
        idx: usize,
        token: u64,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        answers: &Arc<Answers>,
    ) -> Result<(), LinkError> {
        let gw = self.gateways[idx].clone();
        match gwlink::read_frame::<wire::Up>(&mut recv).await? {
            Some(wire::Up {
                body: Some(up::Body::Hello(h)),
            }) if h.version <= LINK_VERSION => {
                tracing::info!(addr = %gw.addr, gateway = %h.gateway_id, "gateway linked");
            }
            other => {
                return Err(LinkError::Protocol(format!(
                    "expected a Hello of version <= {LINK_VERSION}, got {other:?}"
                )));
            }
        }
        let mut owns = self.owns.subscribe();
        let first = owns.borrow_and_update().clone();
        if let Some(o) = first {
            gwlink::write_frame(&mut send, &down(down::Body::Owns(o))).await?;
        }
        let (tx, mut rx) = mpsc::channel::<wire::Down>(LINK_QUEUE);
        *gw.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some((token, tx.clone()));
        let writer = async {
            loop {
                // Ownership first: a gateway told to resync asks the owner it knows of.
                tokio::select! {
                    biased;
                    Ok(()) = owns.changed() => {
                        let o = owns.borrow_and_update().clone();
                        if let Some(o) = o {
                            gwlink::write_frame(&mut send, &down(down::Body::Owns(o))).await?;
                        }
                    }
                    f = rx.recv() => match f {
                        Some(f) => gwlink::write_frame(&mut send, &f).await?,
                        None => return Ok::<(), LinkError>(()),
                    },
                    _ = gw.wake.notified() => {
                        let all = gw.resync_all.swap(false, Ordering::AcqRel);
                        let devices: Vec<String> = std::mem::take(
                            &mut *gw.resync.lock().unwrap_or_else(|e| e.into_inner()),
                        )
                        .iter()
                        .map(|d| d.to_string())
                        .collect();
                        if all || !devices.is_empty() {
                            let f = down(down::Body::Resync(wire::Resync { device_ids: devices, all }));
                            gwlink::write_frame(&mut send, &f).await?;
                        }
                    }
                }
            }
        };
        let reader = async {
            loop {
                match gwlink::read_frame::<wire::Up>(&mut recv).await? {
                    None => return Ok::<(), LinkError>(()),
                    Some(f) => self.on_up(idx, f, &tx, answers),
                }
            }
        };
        tokio::select! {
            r = writer => r,
            r = reader => r,
        }
    }

    fn on_up(
        &self,
        idx: usize,
        f: wire::Up,
        tx: &mpsc::Sender<wire::Down>,
        answers: &Arc<Answers>,
    ) {
        match f.body {
            Some(up::Body::Presence(p)) => {
                let mut routes = self.routes_write();
                if p.full {
                    Self::forget_gateway(&mut routes, idx);
                }
                for d in p.connected {
                    let claims = routes.entry(d.into()).or_default();
                    claims.retain(|g| *g != idx);
                    claims.push(idx);
                }
                for d in p.gone {
                    if let Some(claims) = routes.get_mut(d.as_str()) {
                        claims.retain(|g| *g != idx);
                        if claims.is_empty() {
                            routes.remove(d.as_str());
                        }
                    }
                }
            }
            Some(up::Body::Request(r)) => {
                let answers = answers.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let body = answers.answer(r.body).await;
                    // Replies wait for room: the gateway bounds its open requests.
                    let _ = tx
                        .send(down(down::Body::Reply(wire::Reply {
                            id: r.id,
                            body: Some(body),
                        })))
                        .await;
                });
            }
            Some(up::Body::Hello(_)) | None => {}
        }
    }
}

impl Answers {
    async fn answer(&self, request: Option<wire::request::Body>) -> reply::Body {
        match request {
            Some(wire::request::Body::Auth(a)) => {
                match self.directory.authenticate(&a.device_id, &a.token).await {
                    Ok(Some(device)) => reply::Body::Device(wire::Device {
                        network: device.network,
                    }),
                    Ok(None) => reply::Body::Authenticated(false),
                    Err(e) => reply::Body::Error(e.0),
                }
            }
            Some(wire::request::Body::Backlog(b)) => {
                match self
                    .directory
                    .backlog(b.device_id.into(), b.after_seq, b.limit as usize)
                    .await
                {
                    Ok(page) => reply::Body::Backlog(page_to_wire(&page)),
                    Err(e) => reply::Body::Error(e.0),
                }
            }
            Some(wire::request::Body::Append(a)) => {
                let records = a
                    .records
                    .into_iter()
                    .map(|r| herald_eventlog::Record {
                        key: r.key,
                        value: r.value,
                    })
                    .collect();
                match self.log.append(records).await {
                    Ok(offsets) => reply::Body::Appended(wire::Appended { offsets }),
                    Err(e) => reply::Body::Error(e.to_string()),
                }
            }
            None => reply::Body::Error("empty request".into()),
        }
    }
}

impl Link for QuicLink {
    fn wants(&self, device_id: &str) -> bool {
        self.route(device_id).is_some()
    }

    fn deliver(&self, batch: Vec<Delivery>) {
        let mut by_gateway: HashMap<usize, Vec<Delivery>> = HashMap::new();
        {
            let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
            for d in batch {
                if let Some(&g) = routes.get(&d.device_id).and_then(|c| c.last()) {
                    by_gateway.entry(g).or_default().push(d);
                }
            }
        }
        for (g, entries) in by_gateway {
            // Frames of at most about DELIVER_FRAME_BYTES: a broadcast to many devices on
            // one gateway must not exceed the link's frame limit.
            let mut rest = entries.as_slice();
            while !rest.is_empty() {
                let mut bytes = 0;
                let n = rest
                    .iter()
                    .take_while(|d| {
                        bytes += d.envelope.len() + d.device_id.len() + d.message_id.len() + 32;
                        bytes <= DELIVER_FRAME_BYTES
                    })
                    .count()
                    .max(1);
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                let frame = down(down::Body::Deliver(wire::Deliver {
                    entries: chunk.iter().map(delivery_to_wire).collect(),
                }));
                if self.gateways[g].send(frame).is_err() {
                    self.gateways[g].resync_later(chunk.iter().map(|d| d.device_id.clone()));
                }
            }
        }
    }

    fn withdraw(&self, withdrawals: Vec<Withdrawal>) {
        for (g, gw) in self.gateways.iter().enumerate() {
            let mine: Vec<&Withdrawal> = withdrawals
                .iter()
                .filter(|w| match &w.device_id {
                    None => true,
                    Some(d) => self.route(d) == Some(g),
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            let frame = down(down::Body::Withdraw(wire::Withdraw {
                items: mine.iter().map(|w| withdrawal_to_wire(w)).collect(),
            }));
            if gw.send(frame).is_err() {
                // Rereading the inbox skips withdrawn entries.
                if mine.iter().any(|w| w.device_id.is_none()) {
                    gw.resync_all.store(true, Ordering::Release);
                    gw.wake.notify_one();
                } else {
                    gw.resync_later(mine.iter().filter_map(|w| w.device_id.clone()));
                }
            }
        }
    }

    fn resync(&self, devices: Vec<Arc<str>>) {
        let mut by_gateway: HashMap<usize, Vec<Arc<str>>> = HashMap::new();
        for d in devices {
            if let Some(g) = self.route(&d) {
                by_gateway.entry(g).or_default().push(d);
            }
        }
        for (g, devices) in by_gateway {
            self.gateways[g].resync_later(devices);
        }
    }
}
