//! The reconnecting device: [`Device`] and what it hands out.
//!
//! Two halves. The *driver* is a task per device, an explicit loop over connections: it
//! opens one MQTT connection at a time (a fresh rumqttc client and event loop each, so
//! an acknowledgement can never reach a connection other than the one that delivered
//! its entry), decodes each PUBLISH, acknowledges at once what [`Resume`] already knows
//! as shown (a resend, a repeat) or cannot decode, forwards the rest with its place in
//! that connection's [`AckOrder`], and after a break waits out the [`Backoff`] and
//! connects again. The *app side* is the [`Device`] itself: [`Device::next`] checks
//! again (an entry may have been shown while it waited in the buffer), records the entry
//! in `Resume`, saves the state file and hands out the [`Message`], all in the app's
//! task, so an entry counts as shown exactly when `next` returns it. Each connection
//! also has a small ack task that sends the acknowledgements that became ready, in
//! order.

use std::future::Future;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use herald_schemas::envelope::{self, Envelope};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, NetworkOptions, Outgoing,
    Packet, PingReq, Publish, QoS, Request, SubscribeReasonCode,
};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::acks::AckOrder;
use crate::backoff::{Backoff, BackoffOptions, random_seed};
use crate::heartbeat::{Heartbeat, HeartbeatOptions};
use crate::resume::{Resume, Verdict};
use crate::{DeviceCredentials, Error};

/// The topic every device subscribes to.
const INBOX_TOPIC: &str = "inbox";

/// Requests (subscribe, acknowledgements, disconnect) queued for one rumqttc event loop.
/// The ack task waits when it is full, so this only bounds memory.
const REQUEST_CAPACITY: usize = 64;

/// How long a clean shutdown waits for the DISCONNECT to be written.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The QoS at which the device subscribes to `inbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Qos {
    /// QoS 1: the acknowledgement is a PUBACK.
    #[default]
    AtLeastOnce,
    /// QoS 2: the acknowledgement is a PUBREC (the gateway grants QoS 1 until it supports
    /// exactly-once delivery; the device then acknowledges with PUBACK).
    ExactlyOnce,
}

/// How a [`Device`] connects, retries and resumes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeviceOptions {
    /// MQTT keep-alive: zero (none) or 1 s to 65 535 s. Unused with a
    /// [`heartbeat`](DeviceOptions::heartbeat), which decides when to ping.
    pub keep_alive: Duration,
    /// The adaptive heartbeat (see [`Heartbeat`]): ping as seldom as the network's NAT
    /// allows, learned per network. `None`: a ping every `keep_alive`.
    pub heartbeat: Option<HeartbeatOptions>,
    /// The QoS asked for on `inbox`.
    pub qos: Qos,
    /// Ask the gateway not to keep the session (herald keeps the inbox either way).
    pub clean_session: bool,
    /// Entries read from the connection and not yet taken by [`Device::next`]. When full,
    /// the device stops reading the socket. Keep it at least the gateway's in-flight
    /// window (`max_inflight`, 32 by default) so a slow app never stalls the connection.
    pub buffer: usize,
    /// Time allowed for the TCP connection and the CONNACK (rounded up to whole seconds,
    /// at least 1 s).
    pub connect_timeout: Duration,
    /// The largest PUBLISH accepted from the gateway, in bytes.
    pub max_packet_bytes: usize,
    /// The reconnect schedule.
    pub backoff: BackoffOptions,
    /// Where to keep the resume state across restarts; `None` keeps it in memory only.
    /// The file is loaded at start and replaced atomically before each new message is
    /// handed to the app.
    pub state_file: Option<PathBuf>,
    /// Sync the state file to the disk on each save (survives power loss, costs an
    /// fsync per message). Without it a save survives a crash of the process only.
    pub state_sync: bool,
    /// How many recent message ids are remembered to remove repeats under a new `seq`.
    pub max_recent_ids: usize,
    /// Connection events kept for a slow [`events`](Device::events) receiver before it
    /// lags (it then skips the oldest).
    pub events_capacity: usize,
    /// herald's navigation (`http://host:port`, the API or `herald nav`). When set, the
    /// device asks `GET /v1/nav` for its gateway before every reconnect, so it follows
    /// navigation when its gateway is gone; when navigation cannot be reached it retries
    /// the gateway it had.
    pub nav_url: Option<String>,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            keep_alive: Duration::from_secs(60),
            heartbeat: None,
            qos: Qos::AtLeastOnce,
            clean_session: false,
            buffer: 256,
            connect_timeout: Duration::from_secs(5),
            max_packet_bytes: 256 * 1024,
            backoff: BackoffOptions::default(),
            state_file: None,
            state_sync: true,
            max_recent_ids: 1024,
            events_capacity: 256,
            nav_url: None,
        }
    }
}

impl DeviceOptions {
    fn validate(&self) -> Result<(), Error> {
        let invalid = |name, reason: &str| {
            Err(Error::InvalidOption {
                name,
                reason: reason.to_owned(),
            })
        };
        if !self.keep_alive.is_zero()
            && (self.keep_alive < Duration::from_secs(1)
                || self.keep_alive > Duration::from_secs(u64::from(u16::MAX)))
        {
            return invalid("keep_alive", "must be zero or between 1 s and 65535 s");
        }
        if let Some(hb) = &self.heartbeat {
            hb.validate()
                .or_else(|reason| invalid("heartbeat", &reason))?;
        }
        if self.buffer == 0 {
            return invalid("buffer", "must be at least 1");
        }
        if self.max_packet_bytes < 1024 {
            return invalid("max_packet_bytes", "must be at least 1024");
        }
        if self.max_recent_ids == 0 {
            return invalid("max_recent_ids", "must be at least 1");
        }
        if self.events_capacity == 0 {
            return invalid("events_capacity", "must be at least 1");
        }
        if self.backoff.max_delay < self.backoff.initial_delay {
            return invalid(
                "backoff.max_delay",
                "must be at least backoff.initial_delay",
            );
        }
        Ok(())
    }
}

/// Something that happened to the device's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// Connected and subscribed; `connection` counts from 1.
    Connected {
        /// This connection's number.
        connection: u64,
    },
    /// An established connection ended; the device retries after `retry_in`.
    Disconnected {
        /// The number of the connection that ended.
        connection: u64,
        /// Why it ended.
        reason: DisconnectReason,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
    /// An attempt failed before it was established (no server, timeout, refused
    /// subscription, gateway unavailable); the device retries after `retry_in`.
    ConnectFailed {
        /// What went wrong.
        error: String,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
    /// The gateway refused the credentials; the device stops.
    Refused {
        /// The CONNACK return code (for example `NotAuthorized`).
        code: String,
    },
    /// An entry that is not a valid envelope was acknowledged and skipped.
    MalformedEntry {
        /// Why it could not be decoded.
        error: String,
    },
    /// The device stopped: shut down, dropped, refused, or its state file failed. The
    /// last event.
    Stopped,
}

/// Why an established connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// [`kill_connection`](DeviceHandle::kill_connection) dropped it.
    Killed,
    /// The network or the gateway ended it (a newer connection of the same device takes
    /// over by closing the older one; a gateway restart looks the same).
    Lost(String),
    /// A heartbeat went unanswered: the path died silently (a NAT forgot the
    /// connection). The device reconnects at once.
    DeadPath,
}

/// The device's connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Status {
    /// Connected and subscribed now.
    pub connected: bool,
    /// Connections established so far.
    pub connections: u64,
    /// The device has stopped and will not connect again.
    pub stopped: bool,
    /// With the adaptive heartbeat: the interval in force (in the heartbeat's time,
    /// before `time_scale`).
    pub heartbeat: Option<Duration>,
    /// With the adaptive heartbeat: the interval is learned for this network.
    pub heartbeat_settled: bool,
}

/// What the app side, its handles and the driver share.
struct Control {
    device_id: String,
    kill: Notify,
    shutdown: watch::Sender<bool>,
    status: watch::Sender<Status>,
    events: broadcast::Sender<DeviceEvent>,
}

impl Control {
    fn emit(&self, event: DeviceEvent) {
        // No receiver is not an error: events are for whoever listens.
        let _ = self.events.send(event);
    }
}

/// One connection's acknowledgement state, shared by its driver, its ack task and the
/// messages it delivered.
pub(crate) struct Link {
    client: AsyncClient,
    order: Mutex<AckOrder<Publish>>,
    ready: Notify,
}

impl Link {
    fn done(&self, token: u64) {
        lock(&self.order).done(token);
        self.ready.notify_one();
    }
}

/// An entry read from a connection and new when it was read, not yet looked at by the
/// app side.
struct Incoming {
    link: Arc<Link>,
    token: u64,
    envelope: Envelope,
}

/// The resume state, shared by the app side (which records) and the driver (which
/// removes known duplicates on arrival).
type SharedResume = Arc<Mutex<Resume>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A device connected to its gateway for as long as it runs: reconnects by itself,
/// removes duplicates, resumes where it left off, and acknowledges each entry after the
/// app is done with it. See the [crate docs](crate) for the delivery guarantee.
///
/// Dropping the device stops it (without a DISCONNECT); [`close`](Device::close) stops it
/// cleanly.
pub struct Device {
    control: Arc<Control>,
    first_events: Option<broadcast::Receiver<DeviceEvent>>,
    incoming: mpsc::Receiver<Incoming>,
    driver: Option<JoinHandle<Option<Error>>>,
    resume: SharedResume,
    state_file: Option<PathBuf>,
    state_sync: bool,
    saves: Arc<Mutex<u64>>,
    save_generation: u64,
    /// A new entry already recorded in `resume` whose state is not yet saved.
    unsaved: Option<(Incoming, u64)>,
    stopped: bool,
    error: Option<Error>,
}

impl Device {
    /// Validates the options, loads the state file (a missing one is a fresh start),
    /// and starts connecting in the background. Returns at once; watch
    /// [`events`](Device::events) or [`DeviceHandle::wait_status`] to know when it is
    /// connected. Must be called within a tokio runtime.
    pub async fn start(creds: &DeviceCredentials, opts: DeviceOptions) -> Result<Device, Error> {
        opts.validate()?;
        if creds.device_id.is_empty() {
            return Err(Error::InvalidOption {
                name: "device_id",
                reason: "is empty".into(),
            });
        }
        let resume = match &opts.state_file {
            Some(path) => {
                let (path, id, max) = (path.clone(), creds.device_id.clone(), opts.max_recent_ids);
                tokio::task::spawn_blocking(move || Resume::load(&path, &id, max))
                    .await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?
            }
            None => Resume::new(&creds.device_id, opts.max_recent_ids),
        };
        let (events, first_events) = broadcast::channel(opts.events_capacity);
        let control = Arc::new(Control {
            device_id: creds.device_id.clone(),
            kill: Notify::new(),
            shutdown: watch::channel(false).0,
            status: watch::channel(Status::default()).0,
            events,
        });
        let resume = Arc::new(Mutex::new(resume));
        let (tx, incoming) = mpsc::channel(opts.buffer);
        let seed = opts.backoff.jitter_seed.unwrap_or_else(random_seed);
        let driver = Driver {
            heartbeat: opts.heartbeat.clone().map(Heartbeat::new),
            backoff: Backoff::new(opts.backoff.initial_delay, opts.backoff.max_delay, seed),
            shutdown: control.shutdown.subscribe(),
            control: control.clone(),
            creds: creds.clone(),
            opts: opts.clone(),
            tx,
            resume: resume.clone(),
            connections: 0,
        };
        Ok(Device {
            control,
            first_events: Some(first_events),
            incoming,
            driver: Some(tokio::spawn(driver.run())),
            resume,
            state_file: opts.state_file,
            state_sync: opts.state_sync,
            saves: Arc::new(Mutex::new(0)),
            save_generation: 0,
            unsaved: None,
            stopped: false,
            error: None,
        })
    }

    /// The next message not shown before, in `seq` order; `None` once the device has
    /// stopped (see [`error`](Device::error) for why).
    ///
    /// The message's `seq` counts as seen from the moment this returns it (saved to the
    /// state file first, if there is one); it is acknowledged when the [`Message`] is
    /// acknowledged or dropped. Duplicates are acknowledged here without being returned.
    ///
    /// Cancel-safe: if the future is dropped before it returns, no message is lost or
    /// marked seen without being returned by a later call.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            if self.stopped {
                return None;
            }
            if self.unsaved.is_some() {
                if let Err(e) = self.save().await {
                    self.fail(e);
                    return None;
                }
                let (
                    Incoming {
                        link,
                        token,
                        envelope,
                    },
                    missed,
                ) = self.unsaved.take()?;
                return Some(Message {
                    envelope,
                    missed,
                    ack: Ack::new(link, token),
                });
            }
            // `recv` is cancel-safe, and nothing below awaits before the entry is either
            // acknowledged as a duplicate or parked in `unsaved`.
            let Some(incoming) = self.incoming.recv().await else {
                self.finish().await;
                return None;
            };
            let (verdict, missed) = {
                let mut resume = lock(&self.resume);
                let env = &incoming.envelope;
                let verdict = resume.check(env.seq, &env.id);
                let missed = env.seq.saturating_sub(resume.last_seq() + 1);
                if verdict != Verdict::SeenSeq {
                    resume.record(env.seq, &env.id);
                }
                (verdict, missed)
            };
            if verdict == Verdict::New {
                if self.state_file.is_some() {
                    self.save_generation += 1;
                }
                self.unsaved = Some((incoming, missed));
            } else {
                incoming.link.done(incoming.token);
            }
        }
    }

    /// Runs `handler` on each message until the device stops, acknowledging each entry
    /// when its handler returns. Returns `Ok` after [`DeviceHandle::shutdown`], or the
    /// error that stopped the device.
    ///
    /// An entry whose handler panics, or is still running when this future is dropped,
    /// is not acknowledged; the gateway keeps it and sends it again to the next
    /// connection, where it counts as a duplicate if the device remembers it (the same
    /// process, or a state file).
    ///
    /// Take a [`handle`](Device::handle) first to kill the connection, watch events or
    /// shut down while this runs.
    pub async fn run<F, Fut>(mut self, mut handler: F) -> Result<(), Error>
    where
        F: FnMut(Envelope) -> Fut,
        Fut: Future<Output = ()>,
    {
        while let Some(msg) = self.next().await {
            let (envelope, mut ack) = msg.into_parts();
            ack.on_drop = false;
            handler(envelope).await;
            ack.ack();
        }
        self.error.take().map_or(Ok(()), Err)
    }

    /// Stops the device cleanly (DISCONNECT) and waits for its driver. Entries read but
    /// not yet returned by [`next`](Device::next) are neither shown nor acknowledged; the
    /// gateway sends them again next time. Returns the error that had stopped the device,
    /// if any.
    pub async fn close(mut self) -> Result<(), Error> {
        self.control.shutdown.send_replace(true);
        self.finish().await;
        self.error.take().map_or(Ok(()), Err)
    }

    /// A handle to control and observe the device from other tasks.
    pub fn handle(&self) -> DeviceHandle {
        DeviceHandle {
            control: self.control.clone(),
        }
    }

    /// Connection events. The first call returns a receiver that has seen every event
    /// since [`start`](Device::start); later calls see events from then on.
    pub fn events(&mut self) -> broadcast::Receiver<DeviceEvent> {
        self.first_events
            .take()
            .unwrap_or_else(|| self.control.events.subscribe())
    }

    /// Drops the current connection abruptly (no DISCONNECT); the device reconnects by
    /// itself. See [`DeviceHandle::kill_connection`].
    pub fn kill_connection(&self) {
        self.control.kill.notify_one();
    }

    /// The connection state now.
    pub fn status(&self) -> Status {
        *self.control.status.borrow()
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.control.device_id
    }

    /// The last `seq` shown to the app (0 before the first).
    pub fn last_seq(&self) -> u64 {
        lock(&self.resume).last_seq()
    }

    /// Why the device stopped, once [`next`](Device::next) has returned `None`: `None`
    /// after a shutdown, the refusal or the state file error otherwise.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Saves the resume state, unless a later save already covered it.
    async fn save(&mut self) -> Result<(), Error> {
        let Some(path) = self.state_file.clone() else {
            return Ok(());
        };
        let (snapshot, generation, saves, sync) = (
            lock(&self.resume).clone(),
            self.save_generation,
            self.saves.clone(),
            self.state_sync,
        );
        // A save from a cancelled `next` may still be running; the generation keeps an
        // older snapshot from replacing a newer one.
        tokio::task::spawn_blocking(move || {
            let mut saved = saves.lock().unwrap_or_else(PoisonError::into_inner);
            if *saved >= generation {
                return Ok(());
            }
            snapshot.save(&path, sync)?;
            *saved = generation;
            Ok(())
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    fn fail(&mut self, error: Error) {
        self.error = Some(error);
        self.stopped = true;
        self.control.shutdown.send_replace(true);
    }

    /// Collects the driver's outcome once it has ended.
    async fn finish(&mut self) {
        self.stopped = true;
        if let Some(driver) = self.driver.take() {
            match driver.await {
                Ok(Some(e)) => {
                    self.error.get_or_insert(e);
                }
                Ok(None) => {}
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            }
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("device_id", &self.control.device_id)
            .field("status", &self.status())
            .field("last_seq", &self.last_seq())
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

/// A cheap, cloneable handle to a [`Device`]: kill its connection, shut it down, watch
/// its events and status. Outliving the device is harmless.
#[derive(Clone)]
pub struct DeviceHandle {
    control: Arc<Control>,
}

impl DeviceHandle {
    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.control.device_id
    }

    /// Drops the current connection abruptly, closing the socket without a DISCONNECT,
    /// as a crash of the network would; the device reports
    /// [`DisconnectReason::Killed`] and reconnects after the initial backoff delay.
    /// Entries being handled are acknowledged on the next connection instead (as
    /// duplicates). A kill while no connection is established abandons the attempt in
    /// progress, if any.
    pub fn kill_connection(&self) {
        self.control.kill.notify_one();
    }

    /// Asks the device to stop cleanly: it sends DISCONNECT, and
    /// [`Device::next`] returns `None` once the entries it already read are taken.
    pub fn shutdown(&self) {
        self.control.shutdown.send_replace(true);
    }

    /// Connection events from now on.
    pub fn events(&self) -> broadcast::Receiver<DeviceEvent> {
        self.control.events.subscribe()
    }

    /// The connection state now.
    pub fn status(&self) -> Status {
        *self.control.status.borrow()
    }

    /// Waits until `until` holds for the status, or the device stops; returns that
    /// status. For example, `wait_status(|s| s.connected && s.connections > n)` waits for
    /// a reconnect.
    pub async fn wait_status(&self, mut until: impl FnMut(&Status) -> bool) -> Status {
        let mut rx = self.control.status.subscribe();
        match rx.wait_for(|s| s.stopped || until(s)).await {
            Ok(s) => *s,
            Err(_) => *self.control.status.borrow(),
        }
    }
}

impl std::fmt::Debug for DeviceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHandle")
            .field("device_id", &self.control.device_id)
            .field("status", &self.status())
            .finish()
    }
}

/// A message shown to the app: the [`Envelope`] (also reachable through `Deref`) and its
/// pending acknowledgement. Acknowledge it with [`ack`](Message::ack) or by dropping it;
/// see [`Ack`].
#[derive(Debug)]
pub struct Message {
    envelope: Envelope,
    missed: u64,
    ack: Ack,
}

impl Message {
    /// The envelope: id, seq, ts and data.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// How many entries before this one the device will never be shown: the gap
    /// between the last seq it remembers (in memory, or in its state file) and this
    /// one's. Entries leave an inbox unseen when they expire, are recalled, are replaced
    /// by a newer push with the same collapse key, or are dropped because the inbox
    /// held the app's limit of newer entries (`max_inbox_entries`). An app that keeps
    /// its own copy of what it was sent can resynchronise when this is not 0.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Acknowledges the entry (the same as dropping the message).
    pub fn ack(self) {
        self.ack.ack();
    }

    /// Separates the envelope from its acknowledgement, to hand the data on and
    /// acknowledge later.
    pub fn into_parts(self) -> (Envelope, Ack) {
        (self.envelope, self.ack)
    }
}

impl Deref for Message {
    type Target = Envelope;

    fn deref(&self) -> &Envelope {
        &self.envelope
    }
}

/// The pending acknowledgement of one entry. Sent when [`ack`](Ack::ack) is called or the
/// `Ack` is dropped, except when dropped while the thread panics (a handler that
/// panicked did not handle the entry; it stays unacknowledged on the gateway). The
/// acknowledgement goes out once every earlier entry of the same connection is
/// acknowledged; if that connection has ended, nothing is sent and the gateway's resend
/// is acknowledged as a duplicate instead.
///
/// Hold it only as long as the work takes: one held back holds back the
/// acknowledgements of every later entry, and the gateway sends at most its in-flight
/// window (32 entries by default) without an acknowledgement.
pub struct Ack {
    link: Arc<Link>,
    token: u64,
    /// Whether dropping acknowledges; [`Device::run`] turns it off while the handler runs.
    on_drop: bool,
    sent: bool,
}

impl Ack {
    fn new(link: Arc<Link>, token: u64) -> Ack {
        Ack {
            link,
            token,
            on_drop: true,
            sent: false,
        }
    }

    /// Acknowledges the entry (the same as dropping this).
    pub fn ack(mut self) {
        self.send();
    }

    fn send(&mut self) {
        if !self.sent {
            self.sent = true;
            self.link.done(self.token);
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if self.on_drop && !std::thread::panicking() {
            self.send();
        }
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ack").field("token", &self.token).finish()
    }
}

/// How one connection ended.
enum Outcome {
    /// Shut down by the app, or the app dropped the device.
    Stop,
    /// The gateway refused the credentials.
    Refused(String),
    /// Never established.
    Failed { error: String, killed: bool },
    /// Established, then lost.
    Lost {
        reason: DisconnectReason,
        lasted: Duration,
    },
}

/// The connection loop of one device.
struct Driver {
    creds: DeviceCredentials,
    opts: DeviceOptions,
    control: Arc<Control>,
    shutdown: watch::Receiver<bool>,
    tx: mpsc::Sender<Incoming>,
    resume: SharedResume,
    backoff: Backoff,
    connections: u64,
    heartbeat: Option<Heartbeat>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Driver {
    async fn run(mut self) -> Option<Error> {
        let stopped_by = loop {
            let outcome = self.connection().await;
            self.control.status.send_modify(|s| s.connected = false);
            let delay = match outcome {
                Outcome::Stop => break None,
                Outcome::Refused(code) => {
                    self.control
                        .emit(DeviceEvent::Refused { code: code.clone() });
                    break Some(Error::Refused { code });
                }
                Outcome::Failed { error, killed } => {
                    if killed {
                        self.backoff.reset();
                    }
                    let retry_in = self.backoff.next_delay();
                    self.control
                        .emit(DeviceEvent::ConnectFailed { error, retry_in });
                    retry_in
                }
                Outcome::Lost { reason, lasted } => {
                    if reason == DisconnectReason::Killed || lasted >= self.opts.backoff.reset_after
                    {
                        self.backoff.reset();
                    }
                    // A dead path is found by the device itself: reconnect at once (the
                    // backoff applies if that fails).
                    let retry_in = if reason == DisconnectReason::DeadPath {
                        self.backoff.reset();
                        Duration::ZERO
                    } else {
                        self.backoff.next_delay()
                    };
                    self.control.emit(DeviceEvent::Disconnected {
                        connection: self.connections,
                        reason,
                        retry_in,
                    });
                    retry_in
                }
            };
            if !self.pause(delay).await {
                break None;
            }
            self.navigate().await;
        };
        self.control.status.send_modify(|s| {
            s.connected = false;
            s.stopped = true;
        });
        self.control.emit(DeviceEvent::Stopped);
        stopped_by
    }

    /// Asks navigation where to reconnect (when a nav URL is set); keeps the gateway it
    /// had if navigation cannot answer.
    async fn navigate(&mut self) {
        let Some(base) = &self.opts.nav_url else {
            return;
        };
        let url = format!("{}/v1/nav", base.trim_end_matches('/'));
        let device_id = self.creds.device_id.clone();
        let timeout = self.opts.connect_timeout;
        let answer = async move {
            let r = reqwest::Client::new()
                .get(&url)
                .query(&[("device_id", device_id.as_str())])
                .timeout(timeout)
                .send()
                .await?
                .error_for_status()?;
            let v: serde_json::Value = r.json().await?;
            let mqtt = v["mqtt"].as_str().unwrap_or_default().to_string();
            anyhow::Ok(crate::parse_mqtt_url(&mqtt)?)
        };
        let answer = tokio::select! {
            a = answer => a,
            () = shutdown_requested(&mut self.shutdown) => return,
        };
        match answer {
            Ok((host, port)) => {
                if (host.as_str(), port) != (self.creds.mqtt_host.as_str(), self.creds.mqtt_port) {
                    tracing::info!(%host, port, "navigation moved this device to another gateway");
                }
                self.creds.mqtt_host = host;
                self.creds.mqtt_port = port;
            }
            Err(e) => tracing::debug!(error = %e, "navigation did not answer; keeping the gateway"),
        }
    }

    /// Waits before the next attempt; `false` if the device is to stop instead. A kill
    /// meanwhile has no connection to kill and is ignored.
    async fn pause(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                () = shutdown_requested(&mut self.shutdown) => return false,
                _ = self.tx.closed() => return false,
                _ = self.control.kill.notified() => {}
            }
        }
    }

    /// Publishes the heartbeat's state in the status.
    fn show_heartbeat(&self) {
        if let Some(hb) = &self.heartbeat {
            let (interval, settled) = (hb.interval(), hb.learned().settled);
            self.control.status.send_modify(|s| {
                s.heartbeat = Some(interval);
                s.heartbeat_settled = settled;
            });
        }
    }

    fn mqtt_options(&self) -> MqttOptions {
        let c = &self.creds;
        let mut mqtt = MqttOptions::new(&c.device_id, &c.mqtt_host, c.mqtt_port);
        // With the adaptive heartbeat the keep-alive asked for is its longest interval,
        // so that the gateway never closes a connection the heartbeat keeps alive.
        let keep_alive = match &self.heartbeat {
            Some(hb) => {
                let o = hb.options();
                Duration::from_secs(o.real(o.max).as_secs_f64().ceil().max(1.0) as u64)
            }
            None => self.opts.keep_alive,
        };
        mqtt.set_credentials(&c.device_id, &c.device_token)
            .set_keep_alive(keep_alive)
            .set_clean_session(self.opts.clean_session)
            .set_manual_acks(true)
            .set_max_packet_size(self.opts.max_packet_bytes, 64 * 1024);
        mqtt
    }

    /// One connection, from the attempt to its end.
    async fn connection(&mut self) -> Outcome {
        let (client, mut eventloop) = AsyncClient::new(self.mqtt_options(), REQUEST_CAPACITY);
        let mut network = NetworkOptions::new();
        let timeout_s = self.opts.connect_timeout.as_secs_f64().ceil().max(1.0) as u64;
        network.set_connection_timeout(timeout_s);
        eventloop.set_network_options(network);
        let qos = match self.opts.qos {
            Qos::AtLeastOnce => QoS::AtLeastOnce,
            Qos::ExactlyOnce => {
                // A few milliseconds of work: kept off the runtime's threads.
                eventloop = match tokio::task::spawn_blocking(move || {
                    answer_every_pubrel(&mut eventloop);
                    eventloop
                })
                .await
                {
                    Ok(e) => e,
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                };
                QoS::ExactlyOnce
            }
        };
        // Queued now, sent right after the CONNACK.
        if let Err(e) = client.try_subscribe(INBOX_TOPIC, qos) {
            return Outcome::Failed {
                error: format!("cannot queue the subscription: {e}"),
                killed: false,
            };
        }
        let link = Arc::new(Link {
            client,
            order: Mutex::new(AckOrder::new()),
            ready: Notify::new(),
        });
        let _acker = AbortOnDrop(tokio::spawn(send_acks(link.clone())));
        let mut up_since: Option<Instant> = None;
        // The adaptive heartbeat's clock. A NAT forgets a connection after a stretch with
        // no packet either way, so a ping is due one interval after the last packet (a
        // push refreshes the mapping as well as a ping does), and an answered ping proves
        // that the path survives exactly that much silence.
        let mut heartbeat_on = false;
        let mut last_activity = tokio::time::Instant::now();
        let mut pong_deadline: Option<tokio::time::Instant> = None;
        let killed = |up_since: Option<Instant>| match up_since {
            Some(t) => Outcome::Lost {
                reason: DisconnectReason::Killed,
                lasted: t.elapsed(),
            },
            None => Outcome::Failed {
                error: "connection killed while connecting".into(),
                killed: true,
            },
        };
        loop {
            let ping_due = match &self.heartbeat {
                Some(hb) if heartbeat_on && pong_deadline.is_none() => {
                    Some(last_activity + hb.real_interval())
                }
                _ => None,
            };
            // Cancelling `poll` is safe here: every other branch drops the event loop.
            let polled = tokio::select! {
                biased;
                () = shutdown_requested(&mut self.shutdown) => {
                    if up_since.is_some() {
                        disconnect(&link.client, &mut eventloop).await;
                    }
                    return Outcome::Stop;
                }
                _ = self.tx.closed() => return Outcome::Stop,
                _ = self.control.kill.notified() => return killed(up_since),
                () = sleep_until(pong_deadline) => {
                    if let Some(hb) = &mut self.heartbeat {
                        let next = hb.on_dead();
                        tracing::info!(device_id = %self.creds.device_id, next = ?next, "heartbeat unanswered: the path is dead; reconnecting");
                        self.show_heartbeat();
                    }
                    return Outcome::Lost {
                        reason: DisconnectReason::DeadPath,
                        lasted: up_since.map(|t| t.elapsed()).unwrap_or_default(),
                    };
                }
                () = sleep_until(ping_due) => {
                    // Into the event loop's own queue: its next poll writes it.
                    eventloop.pending.push_back(Request::PingReq(PingReq));
                    if let Some(hb) = &self.heartbeat {
                        let o = hb.options();
                        pong_deadline = Some(tokio::time::Instant::now() + o.real(o.pong_timeout));
                    }
                    continue;
                }
                polled = eventloop.poll() => polled,
            };
            if polled.is_ok() {
                last_activity = tokio::time::Instant::now();
            }
            match polled {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        return Outcome::Failed {
                            error: "the gateway refused the inbox subscription".into(),
                            killed: false,
                        };
                    }
                    if up_since.is_none() {
                        up_since = Some(Instant::now());
                        self.connections += 1;
                        let connection = self.connections;
                        self.control.status.send_modify(|s| {
                            s.connected = true;
                            s.connections = connection;
                        });
                        self.control.emit(DeviceEvent::Connected { connection });
                        if let Some(hb) = &mut self.heartbeat {
                            let suggestion = self
                                .creds
                                .keep_alive_s
                                .map(|s| Duration::from_secs(u64::from(s)));
                            hb.start(suggestion);
                            // The heartbeat pings from here on: a zero keep-alive (after
                            // the CONNECT asked for the longest interval) turns the event
                            // loop's own pings off.
                            eventloop.mqtt_options.set_keep_alive(Duration::ZERO);
                            heartbeat_on = true;
                            self.show_heartbeat();
                        }
                    }
                }
                Ok(Event::Incoming(Packet::PingResp)) => {
                    if let (Some(hb), Some(_)) = (&mut self.heartbeat, pong_deadline.take()) {
                        hb.on_pong();
                        self.show_heartbeat();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    // Only the packet id and QoS are needed to acknowledge.
                    let mut ack_form = Publish::new(INBOX_TOPIC, publish.qos, Vec::new());
                    ack_form.pkid = publish.pkid;
                    let token = lock(&link.order).push(ack_form);
                    let envelope = match envelope::decode(&publish.payload) {
                        Ok(e) => e,
                        Err(e) => {
                            self.control.emit(DeviceEvent::MalformedEntry {
                                error: e.to_string(),
                            });
                            link.done(token);
                            continue;
                        }
                    };
                    // A resend of an entry already shown is acknowledged now, not after
                    // the app has taken every entry queued before it. Only the app side
                    // records: moving `last_seq` on here could pass over an entry still
                    // waiting in the buffer, which would then count as a duplicate.
                    let verdict = lock(&self.resume).check(envelope.seq, &envelope.id);
                    if verdict != Verdict::New {
                        link.done(token);
                        continue;
                    }
                    let incoming = Incoming {
                        link: link.clone(),
                        token,
                        envelope,
                    };
                    // A full buffer stops the reading here, but never a kill or shutdown.
                    tokio::select! {
                        biased;
                        () = shutdown_requested(&mut self.shutdown) => {
                            disconnect(&link.client, &mut eventloop).await;
                            return Outcome::Stop;
                        }
                        _ = self.control.kill.notified() => return killed(up_since),
                        sent = self.tx.send(incoming) => if sent.is_err() {
                            return Outcome::Stop;
                        },
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable)) => {
                    return Outcome::Failed {
                        error: "the gateway is unavailable".into(),
                        killed: false,
                    };
                }
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Outcome::Refused(format!("{code:?}"));
                }
                Err(e) => {
                    return match up_since {
                        Some(t) => Outcome::Lost {
                            reason: DisconnectReason::Lost(e.to_string()),
                            lasted: t.elapsed(),
                        },
                        None => Outcome::Failed {
                            error: e.to_string(),
                            killed: false,
                        },
                    };
                }
            }
        }
    }
}

/// Resolves at `at`; never when there is none.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Makes a fresh event loop answer a PUBREL for any packet id with PUBCOMP.
///
/// rumqttc answers a PUBREL only for a packet id whose QoS 2 PUBLISH arrived on the same
/// event loop; any other PUBREL is a protocol error that drops the connection. But MQTT
/// requires a server to resend the PUBREL of an entry whose PUBREC it had on an earlier
/// connection (herald sends the PUBREL alone then), and the receiver to answer every
/// PUBREL with PUBCOMP. Each connection here has a fresh event loop that knows no
/// packet id, so without this the connection would break on that PUBREL, again on every
/// reconnect. Feeding it a QoS 2 PUBLISH for each id marks every id as awaiting its
/// PUBREL; with manual acks these produce no packet, and the events they queue are
/// dropped in batches to keep memory small.
fn answer_every_pubrel(eventloop: &mut rumqttc::EventLoop) {
    let mut publish = Publish::new("", QoS::ExactlyOnce, Vec::new());
    for pkid in 1..=u16::MAX {
        publish.pkid = pkid;
        let _ = eventloop
            .state
            .handle_incoming_packet(Packet::Publish(publish.clone()));
        if pkid % 256 == 0 {
            eventloop.state.events.clear();
        }
    }
    eventloop.state.events.clear();
}

/// Resolves once a shutdown is requested (or can no longer be, which does not happen
/// while the driver holds the control block).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    // The `Ref` that `wait_for` returns is not `Send`; drop it here.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Sends DISCONNECT and waits briefly for it to be written.
async fn disconnect(client: &AsyncClient, eventloop: &mut rumqttc::EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A connection's ack task: sends the acknowledgements that became ready, in order,
/// until the connection's event loop is gone.
async fn send_acks(link: Arc<Link>) {
    loop {
        link.ready.notified().await;
        let ready = lock(&link.order).take_ready();
        for publish in ready {
            if link.client.ack(&publish).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::PubRel;

    #[test]
    fn after_answer_every_pubrel_any_pubrel_gets_a_pubcomp() {
        let mut opts = MqttOptions::new("d", "127.0.0.1", 1);
        opts.set_manual_acks(true);
        let mut eventloop = rumqttc::EventLoop::new(opts, 1);
        let started = Instant::now();
        answer_every_pubrel(&mut eventloop);
        eprintln!("answer_every_pubrel took {:?}", started.elapsed());
        assert!(eventloop.state.events.is_empty());
        for pkid in [1, 7, 500, u16::MAX] {
            match eventloop
                .state
                .handle_incoming_packet(Packet::PubRel(PubRel::new(pkid)))
            {
                Ok(Some(Packet::PubComp(c))) => assert_eq!(c.pkid, pkid),
                other => panic!("PUBREL {pkid}: {other:?}"),
            }
        }
        // Without it, rumqttc refuses the PUBREL (and would drop the connection).
        let mut fresh = rumqttc::EventLoop::new(MqttOptions::new("d", "127.0.0.1", 1), 1);
        assert!(
            fresh
                .state
                .handle_incoming_packet(Packet::PubRel(PubRel::new(7)))
                .is_err()
        );
    }
}
