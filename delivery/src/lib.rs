//! herald's delivery workers: consume the log, apply the folds, and route new inbox
//! entries to the gateways that hold their devices.
//!
//! # Layout
//! - [`worker`]: the consume → fold → commit → forward loop.
//! - [`link`]: the [`link::Link`] to gateways (in-process, or several combined) and the
//!   [`directory::StoreDirectory`] gateways read devices and backlogs through.
//! - [`quic`]: the link to gateways in other processes, over QUIC with mutual TLS.
//!
//! # Invariants
//! - An entry is forwarded only after the batch that created it is committed with its
//!   checkpoint, so a gateway that reads the store after seeing an entry finds it there.
//! - The checkpoint is committed with the state it covers (`Store::commit`); a commit
//!   that fails is retried with the same writes, never folded again.

pub mod directory;
pub mod link;
pub mod quic;
pub mod worker;

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
