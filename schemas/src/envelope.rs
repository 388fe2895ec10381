//! The JSON envelope a device receives on its `inbox` topic:
//! `{"id": "<message id>", "seq": <n>, "ts": <ms>, "data": <the app's JSON>}`.
//!
//! `data` is the app's JSON exactly as accepted (validated at ingest), so it is spliced in
//! as raw text rather than parsed and printed again.

use std::sync::Arc;

use serde::Deserialize;

/// Builds the envelope bytes. `data_json` must be one valid JSON value.
pub fn encode(message_id: &str, seq: u64, ts_ms: u64, data_json: &[u8]) -> Vec<u8> {
    Shared::new(message_id, ts_ms, data_json)
        .with_seq(seq)
        .to_vec()
}

/// The part of a message's envelope that is the same for every device: encoded once per
/// message (a broadcast reaches many devices), then completed with each device's `seq`
/// in a single allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// `{"id":"…","seq":`
    head: Vec<u8>,
    /// `,"ts":…,"data":…}`
    tail: Vec<u8>,
    ts_ms: u64,
}

impl Shared {
    /// The shared part of the envelope of `message_id`, accepted at `ts_ms`.
    pub fn new(message_id: &str, ts_ms: u64, data_json: &[u8]) -> Self {
        let id = serde_json::Value::String(message_id.to_owned()).to_string();
        let mut head = Vec::with_capacity(id.len() + 14);
        head.extend_from_slice(b"{\"id\":");
        head.extend_from_slice(id.as_bytes());
        head.extend_from_slice(b",\"seq\":");
        let mut tail = Vec::with_capacity(data_json.len() + 40);
        tail.extend_from_slice(format!(",\"ts\":{ts_ms},\"data\":").as_bytes());
        tail.extend_from_slice(data_json);
        tail.push(b'}');
        Shared { head, tail, ts_ms }
    }

    /// When the message was accepted.
    pub fn ts_ms(&self) -> u64 {
        self.ts_ms
    }

    /// The whole envelope for one device's entry.
    pub fn with_seq(&self, seq: u64) -> Arc<[u8]> {
        let mut digits = [0u8; 20];
        let mut n = seq;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        // Slice iterators chained have an exact length: one allocation.
        self.head
            .iter()
            .chain(&digits[i..])
            .chain(&self.tail)
            .copied()
            .collect()
    }
}

/// A decoded envelope, as a device or test sees it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Envelope {
    /// The message id.
    pub id: String,
    /// The entry's position in the device's inbox; strictly increasing per device.
    pub seq: u64,
    /// When the push was accepted, in milliseconds since the Unix epoch.
    pub ts: u64,
    /// The app's data.
    pub data: serde_json::Value,
}

/// Parses envelope bytes.
pub fn decode(bytes: &[u8]) -> Result<Envelope, serde_json::Error> {
    serde_json::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(id in "[a-z0-9\"\\\\-]{0,40}", seq: u64, ts: u64, s in ".{0,64}", n: i64) {
            let data = serde_json::json!({"s": s, "n": n});
            let bytes = encode(&id, seq, ts, data.to_string().as_bytes());
            let env = decode(&bytes).expect("valid JSON");
            prop_assert_eq!(env, Envelope { id, seq, ts, data });
        }
    }
}
