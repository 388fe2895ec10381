//! An in-memory [`Store`], for tests: the reference the other stores are compared with.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::StoreError;
use crate::model::{
    App, Device, IdempotencyRecord, InboxEntry, InboxHead, MessageStatus, Payload, Presence,
};
use crate::view::{Store, View, Writes};

/// All state in ordered maps, so two stores compare equal when their states are equal.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemState {
    /// Apps by id.
    pub apps: BTreeMap<String, App>,
    /// client id -> app id.
    pub app_by_client: BTreeMap<String, String>,
    /// app key -> app id.
    pub app_by_key: BTreeMap<String, String>,
    /// Devices by id.
    pub devices: BTreeMap<String, Device>,
    /// (app id, device id).
    pub app_devices: BTreeSet<(String, String)>,
    /// Inbox heads.
    pub heads: BTreeMap<String, InboxHead>,
    /// Unacknowledged entries.
    pub entries: BTreeMap<(String, u64), InboxEntry>,
    /// Message status rows by (message id, partition).
    pub messages: BTreeMap<(String, u32), MessageStatus>,
    /// Payloads.
    pub payloads: BTreeMap<String, Payload>,
    /// Presence.
    pub presence: BTreeMap<String, Presence>,
    /// Idempotency records.
    pub idempotency: BTreeMap<(String, String, u32), IdempotencyRecord>,
    /// Collapse keys.
    pub collapse: BTreeMap<(String, String), u64>,
    /// Devices registered per (app id, partition).
    pub app_device_counts: BTreeMap<(String, u32), u64>,
    /// The checkpoint of each partition that has one.
    pub checkpoints: BTreeMap<u32, u64>,
}

/// A [`Store`] over a [`MemState`].
#[derive(Debug, Default)]
pub struct MemStore {
    state: Mutex<MemState>,
}

impl MemStore {
    /// A copy of the whole state.
    pub fn snapshot(&self) -> MemState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        // A panic while holding this lock is a test failure already; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl View for MemStore {
    fn app(&self, app_id: &str) -> Result<Option<App>, StoreError> {
        Ok(self.lock().apps.get(app_id).cloned())
    }
    fn app_id_by_client(&self, client_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().app_by_client.get(client_id).cloned())
    }
    fn app_id_by_key(&self, app_key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().app_by_key.get(app_key).cloned())
    }
    fn device(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        Ok(self.lock().devices.get(device_id).cloned())
    }
    fn app_devices(
        &self,
        app_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let s = self.lock();
        let from = (app_id.to_owned(), after.unwrap_or("").to_owned());
        Ok(s.app_devices
            .range(from..)
            .take_while(|(a, _)| a == app_id)
            .filter(|(_, d)| after.is_none_or(|after| d.as_str() > after))
            .take(limit)
            .map(|(_, d)| d.clone())
            .collect())
    }
    fn inbox_head(&self, device_id: &str) -> Result<InboxHead, StoreError> {
        Ok(self
            .lock()
            .heads
            .get(device_id)
            .copied()
            .unwrap_or_default())
    }
    fn inbox_entry(&self, device_id: &str, seq: u64) -> Result<Option<InboxEntry>, StoreError> {
        Ok(self
            .lock()
            .entries
            .get(&(device_id.to_owned(), seq))
            .cloned())
    }
    fn message(
        &self,
        message_id: &str,
        partition: u32,
    ) -> Result<Option<MessageStatus>, StoreError> {
        Ok(self
            .lock()
            .messages
            .get(&(message_id.to_owned(), partition))
            .cloned())
    }
    fn presence(&self, device_id: &str) -> Result<Option<Presence>, StoreError> {
        Ok(self.lock().presence.get(device_id).cloned())
    }
    fn idempotency(
        &self,
        app_id: &str,
        key: &str,
        partition: u32,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self
            .lock()
            .idempotency
            .get(&(app_id.to_owned(), key.to_owned(), partition))
            .cloned())
    }
    fn collapse(&self, device_id: &str, collapse_key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .lock()
            .collapse
            .get(&(device_id.to_owned(), collapse_key.to_owned()))
            .copied())
    }
    fn app_device_count(&self, app_id: &str, partition: u32) -> Result<u64, StoreError> {
        Ok(self
            .lock()
            .app_device_counts
            .get(&(app_id.to_owned(), partition))
            .copied()
            .unwrap_or(0))
    }
}

impl Store for MemStore {
    fn commit(&self, w: &Writes, partition: u32, next_offset: u64) -> Result<(), StoreError> {
        let mut s = self.lock();
        s.apps.extend(w.apps.clone());
        s.app_by_client.extend(w.app_by_client.clone());
        s.app_by_key.extend(w.app_by_key.clone());
        s.devices.extend(w.devices.clone());
        s.app_devices.extend(w.app_devices.iter().cloned());
        s.heads.extend(w.heads.clone());
        for (k, e) in &w.entries {
            match e {
                Some(e) => s.entries.insert(k.clone(), e.clone()),
                None => s.entries.remove(k),
            };
        }
        s.messages.extend(
            w.messages
                .iter()
                .map(|(k, v)| ((k.clone(), partition), v.clone())),
        );
        s.payloads.extend(w.payloads.clone());
        s.presence.extend(w.presence.clone());
        s.idempotency.extend(
            w.idempotency
                .iter()
                .map(|((a, k), v)| ((a.clone(), k.clone(), partition), v.clone())),
        );
        s.collapse.extend(w.collapse.clone());
        s.app_device_counts.extend(
            w.app_device_counts
                .iter()
                .map(|(a, n)| ((a.clone(), partition), *n)),
        );
        let checkpoint = s.checkpoints.entry(partition).or_default();
        assert!(next_offset >= *checkpoint, "checkpoints never go back");
        *checkpoint = next_offset;
        Ok(())
    }
    fn checkpoint(&self, partition: u32) -> Result<u64, StoreError> {
        Ok(self
            .lock()
            .checkpoints
            .get(&partition)
            .copied()
            .unwrap_or_default())
    }
    fn idempotency_record(
        &self,
        app_id: &str,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let (a, k) = (app_id.to_owned(), key.to_owned());
        Ok(crate::model::earliest(
            self.lock()
                .idempotency
                .range((a.clone(), k.clone(), 0)..=(a, k, u32::MAX))
                .map(|(_, r)| r.clone()),
            now_ms,
        ))
    }
    fn apps(&self, limit: usize) -> Result<Vec<App>, StoreError> {
        Ok(self.lock().apps.values().take(limit).cloned().collect())
    }
    fn app_device_total(&self, app_id: &str) -> Result<u64, StoreError> {
        let a = app_id.to_owned();
        Ok(self
            .lock()
            .app_device_counts
            .range((a.clone(), 0)..=(a, u32::MAX))
            .map(|(_, n)| n)
            .sum())
    }
    fn message_status(&self, message_id: &str) -> Result<Option<MessageStatus>, StoreError> {
        let s = self.lock();
        Ok(crate::model::merge_rows(
            s.messages
                .range((message_id.to_owned(), 0)..=(message_id.to_owned(), u32::MAX))
                .map(|(_, m)| m.clone()),
        ))
    }
    fn inbox_page(
        &self,
        device_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let s = self.lock();
        let from = (device_id.to_owned(), after_seq.saturating_add(1));
        Ok(s.entries
            .range(from..)
            .take_while(|((d, _), _)| d == device_id)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }
    fn payload(&self, message_id: &str) -> Result<Option<Payload>, StoreError> {
        Ok(self.lock().payloads.get(message_id).cloned())
    }
}
