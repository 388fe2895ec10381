//! The embedded projection store: fjall keyspaces, so a batch's state and its checkpoint
//! commit in one atomic fjall batch.
//!
//! Commits are written through to the operating system but not fsync'd: the log is the
//! durable record, and a projection batch lost to a power failure is folded again from
//! the log, because its checkpoint was lost with it.

use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use serde::de::DeserializeOwned;

use crate::StoreError;
use crate::memory::MemState;
use crate::model::{
    App, Device, IdempotencyRecord, InboxEntry, InboxHead, MessageStatus, Payload, Presence,
    decode, encode,
};
use crate::view::{Store, View, Writes};

/// `checkpoint` + the partition (u32, big-endian) in `meta`.
fn checkpoint_key(partition: u32) -> Vec<u8> {
    let mut k = b"checkpoint".to_vec();
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// An app's Idempotency-Key's record in a partition: the app id, a NUL, the key, a NUL,
/// the partition (u32, big-endian).
fn idempotency_key(app_id: &str, key: &str, partition: u32) -> Vec<u8> {
    let mut k = pair_key(app_id, key);
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// A message's status row in a partition: the id, a NUL, the partition (u32, big-endian).
fn message_key(message_id: &str, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(message_id.len() + 5);
    k.extend_from_slice(message_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// An app's device count in a partition: the app id, a NUL, the partition (u32,
/// big-endian). [`COUNTED_BEFORE`] is the row of devices a store held when it began to
/// keep counts.
fn count_key(app_id: &str, partition: u32) -> Vec<u8> {
    message_key(app_id, partition)
}

/// The partition of the row that counts the devices registered before the store kept
/// counts (no fold writes it: partitions are fewer than this).
pub const COUNTED_BEFORE: u32 = u32::MAX;

/// The `meta` key that says the store keeps device counts.
const COUNTS_MARKER: &[u8] = b"app-device-counts-v1";

/// Opens (or creates) the fjall database that holds the projections.
///
/// Each committed batch is handed to the operating system at once (fjall's default), so
/// a killed process loses nothing it committed; after a power loss fjall recovers a
/// prefix of the batches, whose checkpoint says where replay resumes.
pub fn open_database(dir: &std::path::Path) -> Result<Database, StoreError> {
    Database::builder(dir).open().map_err(|e| {
        StoreError::Storage(format!(
            "cannot open the projection store in {}: {e} (is herald serve running on it?)",
            dir.display()
        ))
    })
}

/// The fjall-backed [`Store`].
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Database,
    apps: Keyspace,
    app_by_client: Keyspace,
    app_by_key: Keyspace,
    devices: Keyspace,
    app_devices: Keyspace,
    heads: Keyspace,
    inbox: Keyspace,
    messages: Keyspace,
    payloads: Keyspace,
    presence: Keyspace,
    idempotency: Keyspace,
    collapse: Keyspace,
    app_device_counts: Keyspace,
    meta: Keyspace,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn inbox_key(device_id: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device_id.len() + 9);
    k.extend_from_slice(device_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl EmbeddedStore {
    /// Opens (or creates) the store's keyspaces in `db`, with `prefix` before each
    /// keyspace name (so `herald rebuild` can build a second copy beside the live one).
    pub fn open(db: Database, prefix: &str) -> Result<Self, StoreError> {
        let ks = |name: &str| {
            db.keyspace(&format!("{prefix}{name}"), KeyspaceCreateOptions::default)
                .map_err(storage)
        };
        Ok(EmbeddedStore {
            apps: ks("apps")?,
            app_by_client: ks("app_by_client")?,
            app_by_key: ks("app_by_key")?,
            devices: ks("devices")?,
            app_devices: ks("app_devices")?,
            heads: ks("inbox_heads")?,
            inbox: ks("inbox")?,
            messages: ks("messages")?,
            payloads: ks("payloads")?,
            presence: ks("presence")?,
            idempotency: ks("idempotency")?,
            collapse: ks("collapse")?,
            app_device_counts: ks("app_device_counts")?,
            meta: ks("meta")?,
            db,
        })
        .and_then(|s| {
            s.count_devices_held()?;
            Ok(s)
        })
    }

    /// Once per store: counts the devices it already holds per app into the
    /// [`COUNTED_BEFORE`] rows (a store written before herald kept counts), and marks
    /// the store as counting, in one batch.
    fn count_devices_held(&self) -> Result<(), StoreError> {
        if self.meta.get(COUNTS_MARKER).map_err(storage)?.is_some() {
            return Ok(());
        }
        let mut totals: std::collections::BTreeMap<String, u64> = Default::default();
        for g in self.app_devices.iter() {
            let k = g.key().map_err(storage)?;
            if let Some(app) = k.split(|b| *b == 0).next() {
                *totals
                    .entry(String::from_utf8_lossy(app).into_owned())
                    .or_insert(0) += 1;
            }
        }
        let mut b = self.db.batch();
        for (app, n) in &totals {
            b.insert(
                &self.app_device_counts,
                count_key(app, COUNTED_BEFORE),
                encode(n),
            );
        }
        b.insert(&self.meta, COUNTS_MARKER, b"".to_vec());
        b.commit().map_err(storage)?;
        if !totals.is_empty() {
            tracing::info!(
                apps = totals.len(),
                "counted the devices registered before device counts were kept"
            );
        }
        Ok(())
    }

    fn get<T: DeserializeOwned>(
        ks: &Keyspace,
        name: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match ks.get(key).map_err(storage)? {
            Some(v) => Ok(Some(decode(name, &v)?)),
            None => Ok(None),
        }
    }

    /// Every keyspace of this store with its name (without the prefix), in a fixed order.
    fn keyspaces(&self) -> [(&'static str, &Keyspace); 14] {
        [
            ("apps", &self.apps),
            ("app_by_client", &self.app_by_client),
            ("app_by_key", &self.app_by_key),
            ("devices", &self.devices),
            ("app_devices", &self.app_devices),
            ("inbox_heads", &self.heads),
            ("inbox", &self.inbox),
            ("collapse", &self.collapse),
            ("messages", &self.messages),
            ("payloads", &self.payloads),
            ("presence", &self.presence),
            ("idempotency", &self.idempotency),
            ("app_device_counts", &self.app_device_counts),
            ("meta", &self.meta),
        ]
    }

    /// The digest of each projection at `now_ms` ([`crate::digest::digests`]), the same
    /// for any store holding the same state. Reads the whole state into memory.
    pub fn digests(&self, now_ms: u64) -> Result<Vec<crate::digest::Digest>, StoreError> {
        Ok(crate::digest::digests(&self.to_mem_state()?, now_ms))
    }

    /// Deletes every keyspace of this store (used to drop a rebuilt copy).
    pub fn destroy(self) -> Result<(), StoreError> {
        let db = self.db.clone();
        let all: Vec<Keyspace> = self.keyspaces().iter().map(|(_, k)| (*k).clone()).collect();
        drop(self);
        for ks in all {
            db.delete_keyspace(ks).map_err(storage)?;
        }
        Ok(())
    }

    /// Every partition's row of one thing: the keys `id`, a NUL, a partition.
    fn partition_rows<T: DeserializeOwned>(
        ks: &Keyspace,
        name: &'static str,
        mut id: Vec<u8>,
    ) -> Result<Vec<T>, StoreError> {
        id.push(0);
        let mut rows = Vec::new();
        for g in ks.prefix(&id) {
            let v = g.value().map_err(storage)?;
            rows.push(decode(name, &v)?);
        }
        Ok(rows)
    }

    /// Whether the store was written by a herald before partitions (one `checkpoint` key,
    /// message rows without a partition): such a store is rebuilt from the log.
    pub fn has_legacy_layout(&self) -> Result<bool, StoreError> {
        Ok(self.meta.get(b"checkpoint").map_err(storage)?.is_some())
    }

    /// Reads the whole state into memory, for tests and digests.
    pub fn to_mem_state(&self) -> Result<MemState, StoreError> {
        fn all<T: DeserializeOwned>(
            ks: &Keyspace,
            name: &'static str,
        ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
            let mut out = Vec::new();
            for g in ks.iter() {
                let (k, v) = g.into_inner().map_err(storage)?;
                out.push((k.to_vec(), decode(name, &v)?));
            }
            Ok(out)
        }
        fn text(k: &[u8]) -> String {
            String::from_utf8_lossy(k).into_owned()
        }
        let mut s = MemState::default();
        for (k, v) in all::<App>(&self.apps, "apps")? {
            s.apps.insert(text(&k), v);
        }
        for (k, v) in all::<String>(&self.app_by_client, "app_by_client")? {
            s.app_by_client.insert(text(&k), v);
        }
        for (k, v) in all::<String>(&self.app_by_key, "app_by_key")? {
            s.app_by_key.insert(text(&k), v);
        }
        for (k, v) in all::<Device>(&self.devices, "devices")? {
            s.devices.insert(text(&k), v);
        }
        for g in self.app_devices.iter() {
            let k = g.key().map_err(storage)?;
            let text = text(&k);
            if let Some((a, d)) = text.split_once('\0') {
                s.app_devices.insert((a.to_owned(), d.to_owned()));
            }
        }
        for (k, v) in all::<InboxHead>(&self.heads, "inbox_heads")? {
            s.heads.insert(text(&k), v);
        }
        for (k, v) in all::<InboxEntry>(&self.inbox, "inbox")? {
            let device = k.get(..k.len().saturating_sub(9)).unwrap_or_default();
            s.entries.insert((text(device), v.seq), v);
        }
        for (k, v) in all::<MessageStatus>(&self.messages, "messages")? {
            let (id, p) = k.split_at(k.len().saturating_sub(5));
            let p = p.get(1..).and_then(|p| <[u8; 4]>::try_from(p).ok());
            s.messages
                .insert((text(id), p.map(u32::from_be_bytes).unwrap_or_default()), v);
        }
        for (k, v) in all::<Payload>(&self.payloads, "payloads")? {
            s.payloads.insert(text(&k), v);
        }
        for (k, v) in all::<Presence>(&self.presence, "presence")? {
            s.presence.insert(text(&k), v);
        }
        for (k, v) in all::<IdempotencyRecord>(&self.idempotency, "idempotency")? {
            let (pair, p) = k.split_at(k.len().saturating_sub(5));
            let p = p.get(1..).and_then(|p| <[u8; 4]>::try_from(p).ok());
            if let (Some((a, key)), Some(p)) = (text(pair).split_once('\0'), p) {
                s.idempotency
                    .insert((a.to_owned(), key.to_owned(), u32::from_be_bytes(p)), v);
            }
        }
        for (k, v) in all::<u64>(&self.collapse, "collapse")? {
            if let Some((d, key)) = text(&k).split_once('\0') {
                s.collapse.insert((d.to_owned(), key.to_owned()), v);
            }
        }
        for (k, v) in all::<u64>(&self.app_device_counts, "app_device_counts")? {
            let (app, p) = k.split_at(k.len().saturating_sub(5));
            let p = p.get(1..).and_then(|p| <[u8; 4]>::try_from(p).ok());
            if let Some(p) = p {
                s.app_device_counts
                    .insert((text(app), u32::from_be_bytes(p)), v);
            }
        }
        for g in self.meta.prefix(b"checkpoint") {
            let (k, v) = g.into_inner().map_err(storage)?;
            let p = k.get(10..).and_then(|p| <[u8; 4]>::try_from(p).ok());
            let v = <[u8; 8]>::try_from(v.as_ref()).ok();
            if let (Some(p), Some(v)) = (p, v) {
                s.checkpoints
                    .insert(u32::from_be_bytes(p), u64::from_be_bytes(v));
            }
        }
        Ok(s)
    }
}

impl View for EmbeddedStore {
    fn app(&self, app_id: &str) -> Result<Option<App>, StoreError> {
        Self::get(&self.apps, "apps", app_id.as_bytes())
    }
    fn app_id_by_client(&self, client_id: &str) -> Result<Option<String>, StoreError> {
        Self::get(&self.app_by_client, "app_by_client", client_id.as_bytes())
    }
    fn app_id_by_key(&self, app_key: &str) -> Result<Option<String>, StoreError> {
        Self::get(&self.app_by_key, "app_by_key", app_key.as_bytes())
    }
    fn device(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        Self::get(&self.devices, "devices", device_id.as_bytes())
    }
    fn app_devices(
        &self,
        app_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let prefix = pair_key(app_id, "");
        let start = match after {
            // The smallest key greater than (app, after): append a 0 byte.
            Some(after) => {
                let mut k = pair_key(app_id, after);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for g in self.app_devices.range(start..) {
            if out.len() >= limit {
                break;
            }
            let k = g.key().map_err(storage)?;
            let Some(device) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            out.push(String::from_utf8_lossy(device).into_owned());
        }
        Ok(out)
    }
    fn inbox_head(&self, device_id: &str) -> Result<InboxHead, StoreError> {
        Ok(Self::get(&self.heads, "inbox_heads", device_id.as_bytes())?.unwrap_or_default())
    }
    fn inbox_entry(&self, device_id: &str, seq: u64) -> Result<Option<InboxEntry>, StoreError> {
        Self::get(&self.inbox, "inbox", &inbox_key(device_id, seq))
    }
    fn message(
        &self,
        message_id: &str,
        partition: u32,
    ) -> Result<Option<MessageStatus>, StoreError> {
        Self::get(
            &self.messages,
            "messages",
            &message_key(message_id, partition),
        )
    }
    fn presence(&self, device_id: &str) -> Result<Option<Presence>, StoreError> {
        Self::get(&self.presence, "presence", device_id.as_bytes())
    }
    fn idempotency(
        &self,
        app_id: &str,
        key: &str,
        partition: u32,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        Self::get(
            &self.idempotency,
            "idempotency",
            &idempotency_key(app_id, key, partition),
        )
    }
    fn collapse(&self, device_id: &str, collapse_key: &str) -> Result<Option<u64>, StoreError> {
        Self::get(
            &self.collapse,
            "collapse",
            &pair_key(device_id, collapse_key),
        )
    }
    fn app_device_count(&self, app_id: &str, partition: u32) -> Result<u64, StoreError> {
        Ok(Self::get(
            &self.app_device_counts,
            "app_device_counts",
            &count_key(app_id, partition),
        )?
        .unwrap_or(0))
    }
}

impl Store for EmbeddedStore {
    fn commit(&self, w: &Writes, partition: u32, next_offset: u64) -> Result<(), StoreError> {
        let current = self.checkpoint(partition)?;
        assert!(
            next_offset >= current,
            "checkpoint must not go back ({next_offset} < {current})"
        );
        let mut b = self.db.batch();
        for (k, v) in &w.apps {
            b.insert(&self.apps, k.as_bytes(), encode(v));
        }
        for (k, v) in &w.app_by_client {
            b.insert(&self.app_by_client, k.as_bytes(), encode(v));
        }
        for (k, v) in &w.app_by_key {
            b.insert(&self.app_by_key, k.as_bytes(), encode(v));
        }
        for (k, v) in &w.devices {
            b.insert(&self.devices, k.as_bytes(), encode(v));
        }
        for (a, d) in &w.app_devices {
            b.insert(&self.app_devices, pair_key(a, d), b"".to_vec());
        }
        for (k, v) in &w.heads {
            b.insert(&self.heads, k.as_bytes(), encode(v));
        }
        for ((d, seq), e) in &w.entries {
            match e {
                Some(e) => b.insert(&self.inbox, inbox_key(d, *seq), encode(e)),
                None => b.remove(&self.inbox, inbox_key(d, *seq)),
            }
        }
        for (k, v) in &w.messages {
            b.insert(&self.messages, message_key(k, partition), encode(v));
        }
        for (k, v) in &w.payloads {
            b.insert(&self.payloads, k.as_bytes(), encode(v));
        }
        for (k, v) in &w.presence {
            b.insert(&self.presence, k.as_bytes(), encode(v));
        }
        for ((a, k), v) in &w.idempotency {
            b.insert(
                &self.idempotency,
                idempotency_key(a, k, partition),
                encode(v),
            );
        }
        for ((d, k), v) in &w.collapse {
            b.insert(&self.collapse, pair_key(d, k), encode(v));
        }
        for (a, n) in &w.app_device_counts {
            b.insert(&self.app_device_counts, count_key(a, partition), encode(n));
        }
        b.insert(
            &self.meta,
            checkpoint_key(partition),
            next_offset.to_be_bytes().to_vec(),
        );
        b.commit().map_err(storage)
    }

    fn idempotency_record(
        &self,
        app_id: &str,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let records =
            Self::partition_rows(&self.idempotency, "idempotency", pair_key(app_id, key))?;
        Ok(crate::model::earliest(records, now_ms))
    }

    fn app_device_total(&self, app_id: &str) -> Result<u64, StoreError> {
        let rows: Vec<u64> = Self::partition_rows(
            &self.app_device_counts,
            "app_device_counts",
            app_id.as_bytes().to_vec(),
        )?;
        Ok(rows.iter().sum())
    }

    fn apps(&self, limit: usize) -> Result<Vec<App>, StoreError> {
        let mut apps = Vec::new();
        for g in self.apps.iter().take(limit) {
            apps.push(decode("apps", &g.value().map_err(storage)?)?);
        }
        Ok(apps)
    }

    fn message_status(&self, message_id: &str) -> Result<Option<MessageStatus>, StoreError> {
        let rows =
            Self::partition_rows(&self.messages, "messages", message_id.as_bytes().to_vec())?;
        Ok(crate::model::merge_rows(rows))
    }

    fn checkpoint(&self, partition: u32) -> Result<u64, StoreError> {
        match self.meta.get(checkpoint_key(partition)).map_err(storage)? {
            None => Ok(0),
            Some(v) => {
                let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    keyspace: "meta",
                    reason: "checkpoint is not 8 bytes".into(),
                })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    fn inbox_page(
        &self,
        device_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let Some(first) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let start = inbox_key(device_id, first);
        let end = inbox_key(device_id, u64::MAX);
        let mut out = Vec::new();
        for g in self.inbox.range(start..=end) {
            if out.len() >= limit {
                break;
            }
            let v = g.value().map_err(storage)?;
            out.push(decode("inbox", &v)?);
        }
        Ok(out)
    }

    fn payload(&self, message_id: &str) -> Result<Option<Payload>, StoreError> {
        Self::get(&self.payloads, "payloads", message_id.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_store_from_before_device_counts_counts_what_it_holds_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_database(dir.path()).unwrap();
        let store = EmbeddedStore::open(db.clone(), "").unwrap();
        let mut w = Writes::default();
        for (a, d) in [("a1", "d1"), ("a1", "d2"), ("a2", "d3")] {
            w.app_devices.insert((a.into(), d.into()));
        }
        store.commit(&w, 0, 3).unwrap();
        // As a herald that kept no counts left it.
        store.meta.remove(COUNTS_MARKER).unwrap();
        drop(store);
        let store = EmbeddedStore::open(db.clone(), "").unwrap();
        assert_eq!(store.app_device_total("a1").unwrap(), 2);
        assert_eq!(store.app_device_total("a2").unwrap(), 1);
        // Folds count on from there, and opening again counts nothing twice.
        let mut w = Writes::default();
        w.app_device_counts.insert("a1".into(), 1);
        store.commit(&w, 0, 4).unwrap();
        drop(store);
        let store = EmbeddedStore::open(db, "").unwrap();
        assert_eq!(store.app_device_total("a1").unwrap(), 3);
    }

    #[test]
    fn a_store_of_the_layout_before_partitions_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_database(dir.path()).unwrap();
        let store = EmbeddedStore::open(db, "").unwrap();
        store.commit(&Writes::default(), 0, 5).unwrap();
        store.commit(&Writes::default(), 3, 7).unwrap();
        assert!(!store.has_legacy_layout().unwrap());
        assert_eq!(store.checkpoint(0).unwrap(), 5);
        assert_eq!(store.checkpoint(3).unwrap(), 7);
        assert_eq!(store.checkpoint(1).unwrap(), 0);
        // What an older herald wrote: one checkpoint, under the bare key.
        store
            .meta
            .insert(b"checkpoint", 9u64.to_be_bytes().to_vec())
            .unwrap();
        assert!(store.has_legacy_layout().unwrap());
    }
}
