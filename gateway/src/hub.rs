//! The registry of live sessions on this gateway: who is connected, takeover, and the
//! entry point for live deliveries.
//!
//! Each connection registers its device; a second registration of the same device kicks
//! the first (never two live connections for one device). Deliveries are handed to the
//! connection's bounded queue without waiting: when it is full the connection is told it
//! overflowed and reads its inbox from the store instead, so a slow device never slows a
//! delivery worker and nothing is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use herald_schemas::link::{Delivery, Withdrawal};
use tokio::sync::{Notify, mpsc};

/// How many delivery batches a connection's queue holds.
pub const CONN_QUEUE_BATCHES: usize = 64;

/// What the hub sends a connection.
#[derive(Debug)]
pub enum Command {
    /// New entries.
    Deliver(Vec<Delivery>),
    /// Drop these messages' entries if still unsent.
    Withdraw(Vec<Arc<str>>),
}

struct Handle {
    conn_id: u64,
    tx: mpsc::Sender<Command>,
    overflow: Arc<Notify>,
    kick: Arc<Notify>,
}

/// What a connection gets when it registers.
pub struct Registration {
    /// Identifies this connection among the device's connections over time.
    pub conn_id: u64,
    /// Live deliveries and withdrawals for the device.
    pub deliveries: mpsc::Receiver<Command>,
    /// Notified when deliveries were dropped because the queue was full.
    pub overflow: Arc<Notify>,
    /// Notified when a newer connection of the same device takes over.
    pub kick: Arc<Notify>,
}

/// The live sessions of one gateway.
#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<Arc<str>, Handle>>,
    next_conn: AtomicU64,
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
        let (tx, deliveries) = mpsc::channel(CONN_QUEUE_BATCHES);
        let overflow = Arc::new(Notify::new());
        let kick = Arc::new(Notify::new());
        let old = self.lock().insert(
            device_id,
            Handle {
                conn_id,
                tx,
                overflow: overflow.clone(),
                kick: kick.clone(),
            },
        );
        if let Some(old) = old {
            old.kick.notify_one();
        }
        Registration {
            conn_id,
            deliveries,
            overflow,
            kick,
        }
    }

    /// Removes a connection, unless a newer one of the same device replaced it.
    pub fn unregister(&self, device_id: &str, conn_id: u64) {
        let mut sessions = self.lock();
        if sessions
            .get(device_id)
            .is_some_and(|h| h.conn_id == conn_id)
        {
            sessions.remove(device_id);
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
            if let Some(h) = sessions.get(&device)
                && h.tx.try_send(Command::Deliver(entries)).is_err()
            {
                h.overflow.notify_one();
            }
        }
    }

    /// Tells sessions to drop entries of withdrawn messages that they still hold unsent.
    /// A withdrawal for every device goes to every session; a session that misses one
    /// (its queue is full) rereads the store, where the entry is skipped.
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
        let send = |h: &Handle, ids: Vec<Arc<str>>| {
            if h.tx.try_send(Command::Withdraw(ids)).is_err() {
                h.overflow.notify_one();
            }
        };
        if !everyone.is_empty() {
            for h in sessions.values() {
                send(h, everyone.clone());
            }
        }
        for (device, ids) in by_device {
            if let Some(h) = sessions.get(&device) {
                send(h, ids);
            }
        }
    }
}
