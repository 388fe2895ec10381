//! The JSON envelope a device receives on its `inbox` topic:
//! `{"id": "<message id>", "seq": <n>, "ts": <ms>, "data": <the app's JSON>}`.
//!
//! `data` is the app's JSON exactly as accepted (validated at ingest), so it is spliced in
//! as raw text rather than parsed and printed again.

use serde::Deserialize;

/// Builds the envelope bytes. `data_json` must be one valid JSON value.
pub fn encode(message_id: &str, seq: u64, ts_ms: u64, data_json: &[u8]) -> Vec<u8> {
    let id = serde_json::Value::String(message_id.to_owned()).to_string();
    let mut out = Vec::with_capacity(data_json.len() + id.len() + 48);
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(format!(",\"seq\":{seq},\"ts\":{ts_ms},\"data\":").as_bytes());
    out.extend_from_slice(data_json);
    out.push(b'}');
    out
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
