//! The link from delivery workers to gateways.

use std::sync::Arc;

use herald_gateway::Hub;
use herald_schemas::link::{Delivery, Withdrawal};

/// Where a worker sends new entries. An API boundary: in-process in `herald serve`, QUIC
/// between processes ([`crate::quic::QuicLink`]), or both ([`Links`]).
pub trait Link: Send + Sync + 'static {
    /// Whether a device is connected somewhere this link reaches (entries for other
    /// devices are not prepared at all; they wait in the inbox).
    fn wants(&self, device_id: &str) -> bool;
    /// Hands entries to the gateways of their devices. Never blocks; an entry the
    /// gateway cannot take is read from the inbox later.
    fn deliver(&self, batch: Vec<Delivery>);
    /// Tells gateways to drop entries they hold unsent (recalled or replaced).
    fn withdraw(&self, withdrawals: Vec<Withdrawal>);
    /// Tells the gateways of these devices to read their inboxes from the store again:
    /// a live entry for them was not sent over the link.
    fn resync(&self, devices: Vec<Arc<str>>);
}

/// The in-process link: the gateway's hub lives in the same process.
impl Link for Hub {
    fn wants(&self, device_id: &str) -> bool {
        self.is_connected(device_id)
    }
    fn deliver(&self, batch: Vec<Delivery>) {
        Hub::deliver(self, batch);
    }
    fn withdraw(&self, withdrawals: Vec<Withdrawal>) {
        Hub::withdraw(self, withdrawals);
    }
    fn resync(&self, devices: Vec<Arc<str>>) {
        Hub::resync(self, &devices);
    }
}

/// Several links at once: the gateway inside this process and those linked over QUIC.
/// A device is held by at most one of them; each drops entries for devices it does not
/// hold.
pub struct Links(pub Vec<Arc<dyn Link>>);

impl Link for Links {
    fn wants(&self, device_id: &str) -> bool {
        self.0.iter().any(|l| l.wants(device_id))
    }
    fn deliver(&self, batch: Vec<Delivery>) {
        match self.0.as_slice() {
            [one] => one.deliver(batch),
            all => {
                for l in all {
                    let mine: Vec<Delivery> = batch
                        .iter()
                        .filter(|d| l.wants(&d.device_id))
                        .cloned()
                        .collect();
                    if !mine.is_empty() {
                        l.deliver(mine);
                    }
                }
            }
        }
    }
    fn withdraw(&self, withdrawals: Vec<Withdrawal>) {
        for l in &self.0 {
            l.withdraw(withdrawals.clone());
        }
    }
    fn resync(&self, devices: Vec<Arc<str>>) {
        for l in &self.0 {
            l.resync(devices.clone());
        }
    }
}

/// No gateway at all: a process that only follows the log to keep its projections (an
/// API process, navigation) forwards nothing.
pub struct NoLink;

impl Link for NoLink {
    fn wants(&self, _device_id: &str) -> bool {
        false
    }
    fn deliver(&self, _batch: Vec<Delivery>) {}
    fn withdraw(&self, _withdrawals: Vec<Withdrawal>) {}
    fn resync(&self, _devices: Vec<Arc<str>>) {}
}

/// A link that is used only while this worker is the active one of its group (a standby
/// folds the log but forwards nothing; when it takes over, the gateways' sessions reread
/// their inboxes from it).
pub struct Gated {
    inner: Arc<dyn Link>,
    active: std::sync::atomic::AtomicBool,
}

impl Gated {
    /// `inner`, closed until [`Gated::set_active`].
    pub fn new(inner: Arc<dyn Link>) -> Self {
        Gated {
            inner,
            active: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Opens or closes the link.
    pub fn set_active(&self, active: bool) {
        self.active
            .store(active, std::sync::atomic::Ordering::Release);
    }

    fn on(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Link for Gated {
    fn wants(&self, device_id: &str) -> bool {
        self.on() && self.inner.wants(device_id)
    }
    fn deliver(&self, batch: Vec<Delivery>) {
        if self.on() {
            self.inner.deliver(batch);
        }
    }
    fn withdraw(&self, withdrawals: Vec<Withdrawal>) {
        if self.on() {
            self.inner.withdraw(withdrawals);
        }
    }
    fn resync(&self, devices: Vec<Arc<str>>) {
        if self.on() {
            self.inner.resync(devices);
        }
    }
}
