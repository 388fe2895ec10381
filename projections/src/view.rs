//! What a fold reads ([`View`]) and where it writes ([`Tx`]).
//!
//! A [`Tx`] layers a batch's writes over a store's committed state: reads see the
//! batch's own writes first, so events later in a batch see the effects of earlier ones,
//! exactly as if they had been applied and committed one at a time.

use std::collections::{BTreeMap, BTreeSet};

use herald_schemas::events::Event;
pub use herald_schemas::partition::Scope;

use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::model::{
    App, Device, IdempotencyRecord, InboxEntry, InboxHead, MessageStatus, Payload, Presence,
};

/// Read access to committed projection state.
pub trait View {
    /// An app by id.
    fn app(&self, app_id: &str) -> Result<Option<App>, StoreError>;
    /// An app id by its OAuth2 client id.
    fn app_id_by_client(&self, client_id: &str) -> Result<Option<String>, StoreError>;
    /// An app id by its public app key.
    fn app_id_by_key(&self, app_key: &str) -> Result<Option<String>, StoreError>;
    /// A device by id.
    fn device(&self, device_id: &str) -> Result<Option<Device>, StoreError>;
    /// Up to `limit` device ids of an app, in id order, after `after` (exclusive).
    fn app_devices(
        &self,
        app_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    /// A device's inbox bookkeeping (the default for a device with no entries yet).
    fn inbox_head(&self, device_id: &str) -> Result<InboxHead, StoreError>;
    /// One unacknowledged inbox entry.
    fn inbox_entry(&self, device_id: &str, seq: u64) -> Result<Option<InboxEntry>, StoreError>;
    /// A message's status row in `partition` (its targets there; see
    /// [`Store::message_status`] for the whole message).
    fn message(
        &self,
        message_id: &str,
        partition: u32,
    ) -> Result<Option<MessageStatus>, StoreError>;
    /// A device's presence.
    fn presence(&self, device_id: &str) -> Result<Option<Presence>, StoreError>;
    /// What an app's Idempotency-Key stands for in `partition` (where the pushes with
    /// that key were folded; see [`Store::idempotency_record`] for any partition).
    fn idempotency(
        &self,
        app_id: &str,
        key: &str,
        partition: u32,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;
    /// The seq of the newest entry of a device with this collapse key.
    fn collapse(&self, device_id: &str, collapse_key: &str) -> Result<Option<u64>, StoreError>;
    /// How many devices of an app `partition` has registered (see
    /// [`Store::app_device_total`] for the whole app).
    fn app_device_count(&self, app_id: &str, partition: u32) -> Result<u64, StoreError>;
}

/// The writes of one batch, ready to be committed with their checkpoint. Every value is the row's
/// final value after the batch (never a delta), so applying the same `Writes` twice gives
/// the same state: the CQL store's journal relies on it. Serialized (maps as lists of
/// pairs) only by stores, for their own journal.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writes {
    /// Apps created.
    #[serde(with = "pairs")]
    pub apps: BTreeMap<String, App>,
    /// client id -> app id.
    #[serde(with = "pairs")]
    pub app_by_client: BTreeMap<String, String>,
    /// app key -> app id.
    #[serde(with = "pairs")]
    pub app_by_key: BTreeMap<String, String>,
    /// Devices registered.
    #[serde(with = "pairs")]
    pub devices: BTreeMap<String, Device>,
    /// (app id, device id) pairs added to the app's device index.
    pub app_devices: BTreeSet<(String, String)>,
    /// Inbox heads changed.
    #[serde(with = "pairs")]
    pub heads: BTreeMap<String, InboxHead>,
    /// Inbox entries put (`Some`) or removed (`None`).
    #[serde(with = "pairs")]
    pub entries: BTreeMap<(String, u64), Option<InboxEntry>>,
    /// Message status rows changed, of the batch's partition.
    #[serde(with = "pairs")]
    pub messages: BTreeMap<String, MessageStatus>,
    /// Payloads stored.
    #[serde(with = "pairs")]
    pub payloads: BTreeMap<String, Payload>,
    /// Presence changed.
    #[serde(with = "pairs")]
    pub presence: BTreeMap<String, Presence>,
    /// (app id, key) -> idempotency record, of the batch's partition.
    #[serde(with = "pairs")]
    pub idempotency: BTreeMap<(String, String), IdempotencyRecord>,
    /// (device id, collapse key) -> seq of the newest entry with that key.
    #[serde(with = "pairs")]
    pub collapse: BTreeMap<(String, String), u64>,
    /// app id -> devices registered in the batch's partition.
    #[serde(with = "pairs", default)]
    pub app_device_counts: BTreeMap<String, u64>,
}

/// Maps as lists of pairs: JSON has only string keys, and these maps have tuple keys.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, K: Serialize, V: Serialize>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// A new inbox entry made by a batch, for the delivery worker to forward live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// The device whose inbox it is in.
    pub device_id: String,
    /// The entry.
    pub entry: InboxEntry,
}

/// An entry taken back by a batch (replaced by a newer push with the same collapse key,
/// or recalled), for the worker to tell gateways that may hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withdrawn {
    /// The device, or `None` for every device (a recalled broadcast).
    pub device_id: Option<String>,
    /// The message.
    pub message_id: String,
}

/// A batch in progress: committed state underneath, this batch's writes on top.
pub struct Tx<'a> {
    base: &'a dyn View,
    /// The batch's writes.
    pub writes: Writes,
    /// Entries created by this batch, in the order they were created.
    pub new_entries: Vec<NewEntry>,
    /// Entries taken back by this batch.
    pub withdrawn: Vec<Withdrawn>,
    /// Events a fold refused (duplicates, unknown ids); counted, not fatal.
    pub rejected: u64,
    /// The partition being folded.
    pub scope: Scope,
    /// Shares of this batch's multi-target events for other partitions (`FanOut`
    /// events), for the worker to append before it commits the batch.
    pub fan_out: Vec<(u32, Event)>,
    /// What the batch did, for the worker's metrics once it is committed.
    pub tally: Tally,
}

/// What a batch did that operators count: entries stored and acknowledged, per app.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// (app id, entries created) per push folded.
    pub stored: Vec<(String, u64)>,
    /// (app id, ms from the push's acceptance to the ack) per ack folded.
    pub acked: Vec<(String, u64)>,
}

impl<'a> Tx<'a> {
    /// A batch of a one-partition log over `base`.
    pub fn new(base: &'a dyn View) -> Self {
        Tx::scoped(base, Scope::SINGLE)
    }

    /// A batch of partition `scope` over `base`.
    pub fn scoped(base: &'a dyn View, scope: Scope) -> Self {
        Tx {
            base,
            writes: Writes::default(),
            new_entries: Vec::new(),
            withdrawn: Vec::new(),
            rejected: 0,
            scope,
            fan_out: Vec::new(),
            tally: Tally::default(),
        }
    }

    /// A message's row in the partition being folded.
    pub fn local_message(&self, message_id: &str) -> Result<Option<MessageStatus>, StoreError> {
        self.message(message_id, self.scope.partition)
    }

    /// Puts an inbox entry and remembers it as new.
    pub(crate) fn put_new_entry(&mut self, device_id: &str, entry: InboxEntry) {
        self.writes
            .entries
            .insert((device_id.to_owned(), entry.seq), Some(entry.clone()));
        self.new_entries.push(NewEntry {
            device_id: device_id.to_owned(),
            entry,
        });
    }
}

impl View for Tx<'_> {
    fn app(&self, app_id: &str) -> Result<Option<App>, StoreError> {
        match self.writes.apps.get(app_id) {
            Some(a) => Ok(Some(a.clone())),
            None => self.base.app(app_id),
        }
    }

    fn app_id_by_client(&self, client_id: &str) -> Result<Option<String>, StoreError> {
        match self.writes.app_by_client.get(client_id) {
            Some(a) => Ok(Some(a.clone())),
            None => self.base.app_id_by_client(client_id),
        }
    }

    fn app_id_by_key(&self, app_key: &str) -> Result<Option<String>, StoreError> {
        match self.writes.app_by_key.get(app_key) {
            Some(a) => Ok(Some(a.clone())),
            None => self.base.app_id_by_key(app_key),
        }
    }

    fn device(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        match self.writes.devices.get(device_id) {
            Some(d) => Ok(Some(d.clone())),
            None => self.base.device(device_id),
        }
    }

    fn app_devices(
        &self,
        app_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        // Merge the committed page with this batch's additions in the same range. Devices
        // are never removed from the index, so a merge of two sorted sets is exact.
        let mut ids: BTreeSet<String> = self
            .base
            .app_devices(app_id, after, limit)?
            .into_iter()
            .collect();
        let from = (app_id.to_owned(), after.unwrap_or("").to_owned());
        for (a, d) in self.writes.app_devices.range(from..) {
            if a != app_id {
                break;
            }
            if after.is_some_and(|after| d.as_str() <= after) {
                continue;
            }
            ids.insert(d.clone());
        }
        Ok(ids.into_iter().take(limit).collect())
    }

    fn inbox_head(&self, device_id: &str) -> Result<InboxHead, StoreError> {
        match self.writes.heads.get(device_id) {
            Some(h) => Ok(*h),
            None => self.base.inbox_head(device_id),
        }
    }

    fn inbox_entry(&self, device_id: &str, seq: u64) -> Result<Option<InboxEntry>, StoreError> {
        match self.writes.entries.get(&(device_id.to_owned(), seq)) {
            Some(e) => Ok(e.clone()),
            None => self.base.inbox_entry(device_id, seq),
        }
    }

    fn message(
        &self,
        message_id: &str,
        partition: u32,
    ) -> Result<Option<MessageStatus>, StoreError> {
        match self.writes.messages.get(message_id) {
            Some(m) if partition == self.scope.partition => Ok(Some(m.clone())),
            _ => self.base.message(message_id, partition),
        }
    }

    fn presence(&self, device_id: &str) -> Result<Option<Presence>, StoreError> {
        match self.writes.presence.get(device_id) {
            Some(p) => Ok(Some(p.clone())),
            None => self.base.presence(device_id),
        }
    }

    fn idempotency(
        &self,
        app_id: &str,
        key: &str,
        partition: u32,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        match self
            .writes
            .idempotency
            .get(&(app_id.to_owned(), key.to_owned()))
        {
            Some(r) if partition == self.scope.partition => Ok(Some(r.clone())),
            _ => self.base.idempotency(app_id, key, partition),
        }
    }

    fn collapse(&self, device_id: &str, collapse_key: &str) -> Result<Option<u64>, StoreError> {
        match self
            .writes
            .collapse
            .get(&(device_id.to_owned(), collapse_key.to_owned()))
        {
            Some(s) => Ok(Some(*s)),
            None => self.base.collapse(device_id, collapse_key),
        }
    }

    fn app_device_count(&self, app_id: &str, partition: u32) -> Result<u64, StoreError> {
        match self.writes.app_device_counts.get(app_id) {
            Some(n) if partition == self.scope.partition => Ok(*n),
            _ => self.base.app_device_count(app_id, partition),
        }
    }
}

/// A projection store: committed state, plus what readers outside the folds need. An API
/// boundary: the embedded store and the CQL store implement it.
pub trait Store: View + Send + Sync {
    /// Commits a batch's writes of `partition` together with that partition's checkpoint
    /// `next_offset` (the first offset not yet applied): all of it or, after a failure,
    /// none of it as far as a fold that starts after [`Store::take_partition`] can tell
    /// (atomically in the embedded store; the CQL store finishes a half-done commit when
    /// the partition is taken). A failed commit may be retried with the same writes.
    fn commit(&self, writes: &Writes, partition: u32, next_offset: u64) -> Result<(), StoreError>;
    /// The first offset of `partition` not yet applied.
    fn checkpoint(&self, partition: u32) -> Result<u64, StoreError>;
    /// The checkpoints of partitions `0..count`, in order.
    fn checkpoints(&self, count: u32) -> Result<Vec<u64>, StoreError> {
        (0..count).map(|p| self.checkpoint(p)).collect()
    }
    /// Makes the caller the one writer of `partition`, and returns the checkpoint it
    /// folds from. A store that several processes share (CQL) records the claim, so
    /// commits of an earlier writer of the partition are refused from now on
    /// ([`StoreError::Fenced`]), and completes a commit that writer left half done. A
    /// store of one process only reads the checkpoint.
    fn take_partition(&self, partition: u32) -> Result<u64, StoreError> {
        self.checkpoint(partition)
    }
    /// What an app's Idempotency-Key stands for at `now_ms`: of its records in every
    /// partition (more than one when one key was used for pushes keyed to different
    /// partitions), the earliest that still holds.
    fn idempotency_record(
        &self,
        app_id: &str,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;
    /// A message's whole status: the sum of its rows in every partition.
    fn message_status(&self, message_id: &str) -> Result<Option<MessageStatus>, StoreError>;
    /// How many devices an app has registered: the sum over every partition (and, in a
    /// store that counted from before it kept counts, what it counted then).
    fn app_device_total(&self, app_id: &str) -> Result<u64, StoreError>;
    /// Up to `limit` apps (for the admin console; in no promised order on CQL).
    fn apps(&self, limit: usize) -> Result<Vec<App>, StoreError>;
    /// Up to `limit` unacknowledged entries of a device with seq > `after_seq`, in order.
    fn inbox_page(
        &self,
        device_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError>;
    /// A message's sealed payload.
    fn payload(&self, message_id: &str) -> Result<Option<Payload>, StoreError>;
}
