//! The projected state. These are herald's domain types; the store encodes them with
//! serde, which is private to the store (no other process reads these bytes).

use serde::{Deserialize, Serialize};

/// An app account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    /// Its id (a UUID).
    pub app_id: String,
    /// A human name.
    pub name: String,
    /// The public key devices register with.
    pub app_key: String,
    /// The OAuth2 client id.
    pub client_id: String,
    /// SHA-256 of the OAuth2 client secret.
    pub client_secret_sha256: Vec<u8>,
    /// When it was created (ms since the Unix epoch).
    pub created_ms: u64,
    /// The limits the admin set (`AppLimitsSet`); unset fields follow the deployment's
    /// defaults.
    #[serde(default)]
    pub limits: AppLimits,
}

/// What an app may use, as the admin set it. `None`: the deployment's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppLimits {
    /// Pushes accepted per second.
    pub pushes_per_s: Option<u32>,
    /// Broadcasts accepted per minute.
    pub broadcasts_per_min: Option<u32>,
    /// Devices registered.
    pub max_devices: Option<u64>,
    /// Largest push `data`, in bytes of compact JSON.
    pub max_data_bytes: Option<u32>,
    /// Entries waiting in one device's inbox.
    pub max_inbox_entries: Option<u32>,
}

impl AppLimits {
    /// These limits with every unset one taken from `defaults`.
    pub fn or(self, defaults: AppLimits) -> AppLimits {
        AppLimits {
            pushes_per_s: self.pushes_per_s.or(defaults.pushes_per_s),
            broadcasts_per_min: self.broadcasts_per_min.or(defaults.broadcasts_per_min),
            max_devices: self.max_devices.or(defaults.max_devices),
            max_data_bytes: self.max_data_bytes.or(defaults.max_data_bytes),
            max_inbox_entries: self.max_inbox_entries.or(defaults.max_inbox_entries),
        }
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Its id (a UUID).
    pub device_id: String,
    /// The app it belongs to.
    pub app_id: String,
    /// SHA-256 of its device token.
    pub token_sha256: Vec<u8>,
    /// What the device said it runs on.
    pub platform: String,
    /// The network type it reported at registration.
    pub network: String,
    /// When it registered (ms since the Unix epoch).
    pub registered_ms: u64,
}

/// One unacknowledged entry of a device's inbox. Acknowledged entries are removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// Its position in the inbox.
    pub seq: u64,
    /// The message it carries (the payload is kept once per message).
    pub message_id: String,
    /// When the push was accepted (ms since the Unix epoch).
    pub ts_ms: u64,
    /// After this instant it is never sent.
    pub expires_at_ms: u64,
    /// The device confirmed receipt at QoS 2 (PUBREC): only the PUBREL is ever sent again.
    #[serde(default)]
    pub received: bool,
}

/// Per-device inbox bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxHead {
    /// The seq the next entry gets. Starts at 1.
    pub next_seq: u64,
}

impl Default for InboxHead {
    fn default() -> Self {
        InboxHead { next_seq: 1 }
    }
}

/// A message's delivery status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageStatus {
    /// Its id.
    pub message_id: String,
    /// The app that published it.
    pub app_id: String,
    /// When it was accepted (ms since the Unix epoch).
    pub ts_ms: u64,
    /// When it expires.
    pub expires_at_ms: u64,
    /// Whether it went to every device of the app.
    pub broadcast: bool,
    /// How many devices it was put in the inbox of.
    pub targeted: u64,
    /// How many of them confirmed receipt.
    pub acked: u64,
    /// Whether the app recalled it.
    #[serde(default)]
    pub recalled: bool,
    /// Targets that had not confirmed receipt when it was recalled (an in-flight entry
    /// acknowledged after the recall moves from here to `acked`).
    #[serde(default)]
    pub recalled_targets: u64,
    /// Targets where a newer push with the same collapse key replaced it before receipt.
    #[serde(default)]
    pub replaced: u64,
    /// Targets whose inbox dropped it before receipt to keep within the app's limit of
    /// entries waiting per device.
    #[serde(default)]
    pub dropped: u64,
    /// The device of a unicast message.
    #[serde(default)]
    pub unicast_device: Option<String>,
}

impl MessageStatus {
    /// Targets that have neither confirmed receipt nor lost it to a replacement, a drop
    /// or a recall.
    pub fn outstanding(&self) -> u64 {
        self.targeted
            .saturating_sub(self.acked + self.replaced + self.dropped + self.recalled_targets)
    }

    /// Adds another partition's row of the same message: a message whose targets are in
    /// several partitions has one row in each, and its status is their sum.
    pub fn merge(&mut self, other: &MessageStatus) {
        self.targeted += other.targeted;
        self.acked += other.acked;
        self.recalled |= other.recalled;
        self.recalled_targets += other.recalled_targets;
        self.replaced += other.replaced;
        self.dropped += other.dropped;
        self.broadcast |= other.broadcast;
        if self.unicast_device.is_none() {
            self.unicast_device.clone_from(&other.unicast_device);
        }
    }
}

/// A stored value as the stores keep it: JSON, private to the stores (no other process
/// reads these bytes).
pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// A stored value read back; what does not decode is a corrupt record of `keyspace`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    keyspace: &'static str,
    bytes: &[u8],
) -> Result<T, crate::StoreError> {
    serde_json::from_slice(bytes).map_err(|e| crate::StoreError::Corrupt {
        keyspace,
        reason: e.to_string(),
    })
}

/// One message's status from its rows in each partition, or `None` when it has none.
pub fn merge_rows(rows: impl IntoIterator<Item = MessageStatus>) -> Option<MessageStatus> {
    let mut rows: Vec<MessageStatus> = rows.into_iter().collect();
    // A recall's tombstone (a partition the recall reached before the push, `ts_ms` 0)
    // has no time of its own: the times come from a row the push wrote.
    rows.sort_by_key(|r| r.ts_ms == 0);
    let mut rows = rows.into_iter();
    let mut m = rows.next()?;
    for r in rows {
        m.merge(&r);
    }
    Some(m)
}

/// Of an Idempotency-Key's records in several partitions, the earliest that still holds
/// at `now_ms` (its push was accepted first); an expired record never hides a newer one.
pub fn earliest(
    records: impl IntoIterator<Item = IdempotencyRecord>,
    now_ms: u64,
) -> Option<IdempotencyRecord> {
    records
        .into_iter()
        .filter(|r| r.holds_at(now_ms))
        .min_by_key(|r| r.ts_ms)
}

/// What an Idempotency-Key of an app stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The message the key produced.
    pub message_id: String,
    /// SHA-256 of the canonical request it came with.
    pub request_sha256: Vec<u8>,
    /// When that message was accepted (ms since the Unix epoch).
    pub ts_ms: u64,
    /// How long the key holds, in seconds from `ts_ms`.
    pub window_s: u32,
}

impl IdempotencyRecord {
    /// Whether the key still holds at `ts_ms`.
    pub fn holds_at(&self, ts_ms: u64) -> bool {
        ts_ms < self.ts_ms.saturating_add(u64::from(self.window_s) * 1000)
    }
}

/// Where a device is connected, as reported by gateways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Whether a session is open.
    pub connected: bool,
    /// The gateway of the last session.
    pub gateway_id: String,
    /// When the last session started or ended.
    pub since_ms: u64,
    /// The keep-alive of the last session, in seconds.
    pub keep_alive_s: u32,
}

/// A message's sealed payload, kept once per message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// The key that sealed it.
    pub key_id: u32,
    /// The AES-GCM nonce.
    pub nonce: Vec<u8>,
    /// The ciphertext with its tag.
    pub ciphertext: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, ts_ms: u64) -> IdempotencyRecord {
        IdempotencyRecord {
            message_id: id.into(),
            request_sha256: Vec::new(),
            ts_ms,
            window_s: 10,
        }
    }

    #[test]
    fn an_expired_idempotency_record_never_hides_a_newer_one() {
        let rows = || [record("new", 50_000), record("old", 1_000)];
        // Both hold: the first accepted wins.
        assert_eq!(
            earliest(rows(), 5_000).map(|r| r.message_id),
            Some("old".into())
        );
        // The old one expired at 11 s: the newer one stands.
        assert_eq!(
            earliest(rows(), 55_000).map(|r| r.message_id),
            Some("new".into())
        );
        // Both expired: the key is free.
        assert_eq!(earliest(rows(), 70_000), None);
    }
}
