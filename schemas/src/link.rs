//! What a delivery worker hands to the gateway that holds a device.
//!
//! In `herald serve` these travel over in-process channels; between processes the QUIC
//! link carries the same fields as the protobuf frames of [`wire`] (`proto/link.proto`).

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

/// The link's frames as they cross between processes (generated from
/// `proto/link.proto`), and conversions to and from the in-process types above.
pub mod wire {
    #![allow(missing_docs)] // The generated types are documented in the .proto file.
    include!(concat!(env!("OUT_DIR"), "/herald.link.v1.rs"));
}

/// An entry for the wire.
pub fn delivery_to_wire(d: &Delivery) -> wire::Entry {
    wire::Entry {
        device_id: d.device_id.to_string(),
        seq: d.seq,
        message_id: d.message_id.to_string(),
        expires_at_ms: d.expires_at_ms,
        envelope: d.envelope.to_vec(),
        released: d.released,
    }
}

/// An entry from the wire.
pub fn delivery_from_wire(e: wire::Entry) -> Delivery {
    Delivery {
        device_id: e.device_id.into(),
        seq: e.seq,
        message_id: e.message_id.into(),
        expires_at_ms: e.expires_at_ms,
        envelope: e.envelope.into(),
        released: e.released,
    }
}

/// A withdrawal for the wire (an empty device id means every device).
pub fn withdrawal_to_wire(w: &Withdrawal) -> wire::Withdrawal {
    wire::Withdrawal {
        device_id: w.device_id.as_deref().unwrap_or("").to_string(),
        message_id: w.message_id.to_string(),
    }
}

/// A withdrawal from the wire.
pub fn withdrawal_from_wire(w: wire::Withdrawal) -> Withdrawal {
    Withdrawal {
        device_id: (!w.device_id.is_empty()).then(|| w.device_id.into()),
        message_id: w.message_id.into(),
    }
}

/// A backlog page for the wire.
pub fn page_to_wire(p: &BacklogPage) -> wire::BacklogPage {
    wire::BacklogPage {
        entries: p.entries.iter().map(delivery_to_wire).collect(),
        covered_through: p.covered_through,
        complete: p.complete,
    }
}

/// A backlog page from the wire.
pub fn page_from_wire(p: wire::BacklogPage) -> BacklogPage {
    BacklogPage {
        entries: p.entries.into_iter().map(delivery_from_wire).collect(),
        covered_through: p.covered_through,
        complete: p.complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn entries_withdrawals_and_pages_survive_the_wire() {
        let d = Delivery {
            device_id: "dev".into(),
            seq: 7,
            message_id: "msg".into(),
            expires_at_ms: 99,
            envelope: Arc::from(&b"{\"id\":\"msg\"}"[..]),
            released: true,
        };
        let page = BacklogPage {
            entries: vec![d.clone()],
            covered_through: 9,
            complete: true,
        };
        let bytes = page_to_wire(&page).encode_to_vec();
        let back = wire::BacklogPage::decode(bytes.as_slice()).map(page_from_wire);
        assert_eq!(back.ok(), Some(page));
        for w in [
            Withdrawal {
                device_id: None,
                message_id: "m".into(),
            },
            Withdrawal {
                device_id: Some("d".into()),
                message_id: "m".into(),
            },
        ] {
            assert_eq!(withdrawal_from_wire(withdrawal_to_wire(&w)), w);
        }
    }
}
