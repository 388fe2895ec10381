//! The registry of live sessions on this gateway: who is connected, takeover, and the
//! entry point for live deliveries.
//!
//! Each connection registers its device and gets a [`Mailbox`]; a second registration of
//! the same device kicks the first (never two live connections for one device).
//! Deliveries are put in the connection's bounded mailbox without waiting: when it is full
//! the connection is told it overflowed and reads its inbox from the store instead, so a
//! slow device never slows a delivery worker and nothing is lost. An idle connection's
//! mailbox holds no allocation beyond itself.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use herald_schemas::link::{Delivery, Withdrawal};
use tokio::sync::{Notify, broadcast};

/// How many presence changes wait for a slow link before it is told everything again.
const PRESENCE_BACKLOG: usize = 8192;

/// A device came or went on this gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    /// The device.
    pub device_id: Arc<str>,
    /// True when it connected, false when it left.
    pub connected: bool,
}

/// How many commands a connection's mailbox holds before it overflows.
pub const MAILBOX_COMMANDS: usize = 64;

/// What the hub sends a connection.
#[derive(Debug)]
pub enum Command {
    /// New entries.
    Deliver(Vec<Delivery>),
    /// Drop these messages' entries if still unsent.
    Withdraw(Vec<Arc<str>>),
}

/// A connection's mailbox: commands, and the flags a connection acts on when woken.
#[derive(Debug, Default)]
pub struct Mailbox {
    queue: Mutex<VecDeque<Command>>,
    overflowed: AtomicBool,
    kicked: AtomicBool,
    notify: Notify,
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Command>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn post(&self, cmd: Command) {
        let mut q = self.lock();
        if q.len() >= MAILBOX_COMMANDS {
            drop(q);
            self.overflowed.store(true, Ordering::Release);
        } else {
            q.push_back(cmd);
        }
        self.notify.notify_one();
    }

    fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Waits until something was posted (a permit is kept if nobody waits, so no wake-up
    /// is lost).
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Whether a newer connection of the same device took over.
    pub fn kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    /// Whether commands were dropped because the mailbox was full (and clears it).
    pub fn take_overflow(&self) -> bool {
        self.overflowed.swap(false, Ordering::AcqRel)
    }

    /// Takes every waiting command, releasing the queue's memory.
    pub fn take(&self) -> VecDeque<Command> {
        std::mem::take(&mut *self.lock())
    }
}

struct Handle {
    conn_id: u64,
    mailbox: Arc<Mailbox>,
}

/// What a connection gets when it registers.
pub struct Registration {
    /// Identifies this connection among the device's connections over time.
    pub conn_id: u64,
    /// Live deliveries, withdrawals, overflow and takeover for this connection.
    pub mailbox: Arc<Mailbox>,
}

/// The live sessions of one gateway.
pub struct Hub {
    sessions: Mutex<HashMap<Arc<str>, Handle>>,
    next_conn: AtomicU64,
    presence: broadcast::Sender<PresenceChange>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            sessions: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            presence: broadcast::channel(PRESENCE_BACKLOG).0,
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("connected", &self.connected())
            .finish()
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Handle>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection for `device_id`, kicking any older one.
    pub fn register(&self, device_id: Arc<str>) -> Registration {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::default());
        // Presence is told under the lock, so "connected" and "gone" of one device are
        // sent in the order they happened.
        let mut sessions = self.lock();
        let old = sessions.insert(
            device_id.clone(),
            Handle {
                conn_id,
                mailbox: mailbox.clone(),
            },
        );
        match old {
            Some(old) => old.mailbox.kick(),
            None => {
                // Nobody listening (one process) is fine.
                let _ = self.presence.send(PresenceChange {
                    device_id,
                    connected: true,
                });
            }
        }
        drop(sessions);
        Registration { conn_id, mailbox }
    }

    /// Removes a connection, unless a newer one of the same device replaced it.
    pub fn unregister(&self, device_id: &str, conn_id: u64) {
        let mut sessions = self.lock();
        if sessions
            .get(device_id)
            .is_some_and(|h| h.conn_id == conn_id)
            && let Some((device_id, _)) = sessions.remove_entry(device_id)
        {
            let _ = self.presence.send(PresenceChange {
                device_id,
                connected: false,
            });
        }
    }

    /// Presence changes from now on (a link tells its worker). A receiver that falls more
    /// than a few thousand changes behind gets `Lagged` and must take [`Hub::devices`].
    pub fn watch_presence(&self) -> broadcast::Receiver<PresenceChange> {
        self.presence.subscribe()
    }

    /// Every device connected now.
    pub fn devices(&self) -> Vec<Arc<str>> {
        self.lock().keys().cloned().collect()
    }

    /// Tells every session to read its inbox from the store again (a link came up:
    /// whatever was in flight on an earlier one is sent again).
    pub fn resync_all(&self) {
        for h in self.lock().values() {
            h.mailbox.overflowed.store(true, Ordering::Release);
            h.mailbox.notify.notify_one();
        }
    }

    /// Whether the device has a session here.
    pub fn is_connected(&self, device_id: &str) -> bool {
        self.lock().contains_key(device_id)
    }

    /// How many devices are connected.
    pub fn connected(&self) -> usize {
        self.lock().len()
    }

    /// Hands live deliveries to the sessions of their devices. Entries for devices not
    /// connected here are dropped: they wait in the inbox for the next connection.
    pub fn deliver(&self, batch: Vec<Delivery>) {
        let mut by_device: HashMap<Arc<str>, Vec<Delivery>> = HashMap::new();
        for d in batch {
            by_device.entry(d.device_id.clone()).or_default().push(d);
        }
        let sessions = self.lock();
        for (device, entries) in by_device {
            if let Some(h) = sessions.get(&device) {
                h.mailbox.post(Command::Deliver(entries));
            }
        }
    }

    /// Tells the sessions of these devices to read their inboxes from the store again
    /// (a live entry for them could not be prepared).
    pub fn resync(&self, devices: &[Arc<str>]) {
        let sessions = self.lock();
        for d in devices {
            if let Some(h) = sessions.get(d) {
                h.mailbox.overflowed.store(true, Ordering::Release);
                h.mailbox.notify.notify_one();
            }
        }
    }

    /// Tells sessions to drop entries of withdrawn messages that they still hold unsent.
    /// A withdrawal for every device goes to every session; a session that misses one
    /// (its mailbox is full) rereads the store, where the entry is skipped.
    pub fn withdraw(&self, withdrawals: Vec<Withdrawal>) {
        let mut everyone: Vec<Arc<str>> = Vec::new();
        let mut by_device: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
        for w in withdrawals {
            match w.device_id {
                Some(d) => by_device.entry(d).or_default().push(w.message_id),
                None => everyone.push(w.message_id),
            }
        }
        let sessions = self.lock();
        if !everyone.is_empty() {
            for h in sessions.values() {
                h.mailbox.post(Command::Withdraw(everyone.clone()));
            }
        }
        for (device, ids) in by_device {
            if let Some(h) = sessions.get(&device) {
                h.mailbox.post(Command::Withdraw(ids));
            }
        }
    }
}
