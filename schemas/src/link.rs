//! What a delivery worker hands to the gateway that holds a device.
//!
//! In `herald serve` these travel over in-process channels; the QUIC link will carry the
//! same fields as protobuf frames.

use std::sync::Arc;

/// One inbox entry ready to be sent to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The device it is for.
    pub device_id: Arc<str>,
    /// Its position in the device's inbox.
    pub seq: u64,
    /// The message it carries.
    pub message_id: Arc<str>,
    /// After this instant (ms since the Unix epoch) it must not be sent.
    pub expires_at_ms: u64,
    /// The JSON envelope (see [`crate::envelope`]), ready for the wire.
    pub envelope: Arc<[u8]>,
    /// The device already confirmed receipt at QoS 2 (PUBREC): send only the PUBREL.
    pub released: bool,
}

/// An entry a gateway must drop if it still holds it unsent: its message was recalled,
/// or a newer push with the same collapse key replaced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withdrawal {
    /// The device, or `None` for every device (a recalled broadcast).
    pub device_id: Option<Arc<str>>,
    /// The message.
    pub message_id: Arc<str>,
}

/// A page of a device's backlog, read from its inbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BacklogPage {
    /// Unacknowledged, unexpired entries after the requested seq, in seq order.
    pub entries: Vec<Delivery>,
    /// Every seq up to and including this one has been looked at: it is either in
    /// `entries`, acknowledged, or expired.
    pub covered_through: u64,
    /// True when the inbox held nothing beyond `covered_through` at read time.
    pub complete: bool,
}
