//! The log events and their byte encoding.
//!
//! Every record in the event log is one protobuf [`Event`]. [`encode`] stamps the current
//! schema version; [`decode`] accepts every version up to the current one and refuses
//! events written by a newer herald, rather than misreading them.

#![allow(missing_docs)] // The generated types are documented in the .proto file.

use prost::Message;

include!(concat!(env!("OUT_DIR"), "/herald.events.v1.rs"));

/// The network types a device may report (`DeviceRegistered.network`, and the MQTT 5
/// CONNECT user property `network`).
pub const NETWORKS: [&str; 6] = ["wifi", "5g", "4g", "3g", "2g", "unknown"];

pub use event::Kind;
pub use target::To;

/// The revision of `events.proto` this build writes.
pub const CURRENT_SCHEMA_VERSION: u32 = 6;

/// Why bytes could not be read as an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not a protobuf `Event`.
    #[error("malformed event: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The event was written by a newer herald than this one.
    #[error("event schema version {found} is newer than this build's {CURRENT_SCHEMA_VERSION}")]
    TooNew {
        /// The version found in the event.
        found: u32,
    },
    /// The event has no kind: nothing to apply.
    #[error("event has no kind")]
    Empty,
}

impl Event {
    /// A new event of the current schema version.
    pub fn new(ts_ms: u64, kind: Kind) -> Self {
        Event {
            schema_version: CURRENT_SCHEMA_VERSION,
            ts_ms,
            kind: Some(kind),
        }
    }

    /// A short name of the event's kind, for logs and `herald replay --type`.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            Some(Kind::AppCreated(_)) => "AppCreated",
            Some(Kind::DeviceRegistered(_)) => "DeviceRegistered",
            Some(Kind::PushAccepted(_)) => "PushAccepted",
            Some(Kind::DeviceConnected(_)) => "DeviceConnected",
            Some(Kind::DeviceDisconnected(_)) => "DeviceDisconnected",
            Some(Kind::DeviceAcked(_)) => "DeviceAcked",
            Some(Kind::MessageRecalled(_)) => "MessageRecalled",
            Some(Kind::DeviceReceived(_)) => "DeviceReceived",
            Some(Kind::GatewayHeartbeat(_)) => "GatewayHeartbeat",
            Some(Kind::FanOut(_)) => "FanOut",
            Some(Kind::AppSecretRotated(_)) => "AppSecretRotated",
            Some(Kind::AppLimitsSet(_)) => "AppLimitsSet",
            None => "Empty",
        }
    }
}

/// Encodes an event for the log.
pub fn encode(event: &Event) -> Vec<u8> {
    event.encode_to_vec()
}

/// Decodes an event read from the log.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let event = Event::decode(bytes)?;
    if event.schema_version > CURRENT_SCHEMA_VERSION {
        return Err(DecodeError::TooNew {
            found: event.schema_version,
        });
    }
    if event.kind.is_none() {
        return Err(DecodeError::Empty);
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version() {
        let ev = Event::new(
            7,
            Kind::DeviceAcked(DeviceAcked {
                device_id: "d".into(),
                seq: 3,
                message_id: "m".into(),
                gateway_id: "g".into(),
            }),
        );
        let back = decode(&encode(&ev)).expect("decodes");
        assert_eq!(back, ev);
        assert_eq!(back.type_name(), "DeviceAcked");

        let mut newer = ev.clone();
        newer.schema_version = CURRENT_SCHEMA_VERSION + 1;
        assert!(matches!(
            decode(&encode(&newer)),
            Err(DecodeError::TooNew { .. })
        ));
        assert!(matches!(
            decode(&[0xff, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
    }
}
