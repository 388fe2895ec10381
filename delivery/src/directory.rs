//! The gateway's view of devices and inboxes, read from the projection store.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use herald_gateway::{DeviceDirectory, DirectoryError};
use herald_projections::model::InboxEntry;
use herald_projections::view::Store;
use herald_schemas::envelope;
use herald_schemas::events::SealedPayload;
use herald_schemas::link::{BacklogPage, Delivery};
use herald_schemas::seal::{Keyring, constant_time_eq};
use sha2::{Digest, Sha256};

/// Reads devices and backlogs from a [`Store`], and opens payloads for the wire.
pub struct StoreDirectory {
    store: Arc<dyn Store>,
    keyring: Keyring,
}

impl StoreDirectory {
    /// A directory over `store`, opening payloads with `keyring`.
    pub fn new(store: Arc<dyn Store>, keyring: Keyring) -> Self {
        StoreDirectory { store, keyring }
    }
}

/// Builds wire-ready deliveries for inbox entries, opening each message's payload once.
pub struct Envelopes<'a> {
    store: &'a dyn Store,
    keyring: &'a Keyring,
    opened: HashMap<String, Option<Arc<[u8]>>>,
}

impl<'a> Envelopes<'a> {
    /// A builder reading payloads from `store`.
    pub fn new(store: &'a dyn Store, keyring: &'a Keyring) -> Self {
        Envelopes {
            store,
            keyring,
            opened: HashMap::new(),
        }
    }

    /// The delivery for one entry, or `None` if its payload is missing or cannot be
    /// opened (logged: that is a key or storage problem, not the device's).
    pub fn delivery(
        &mut self,
        device_id: &Arc<str>,
        entry: &InboxEntry,
    ) -> Result<Option<Delivery>, DirectoryError> {
        if !self.opened.contains_key(&entry.message_id) {
            let data = match self
                .store
                .payload(&entry.message_id)
                .map_err(|e| DirectoryError(e.to_string()))?
            {
                Some(p) => {
                    let sealed = SealedPayload {
                        key_id: p.key_id,
                        nonce: p.nonce,
                        ciphertext: p.ciphertext,
                    };
                    match self.keyring.open(&sealed, &entry.message_id) {
                        Ok(plain) => Some(Arc::<[u8]>::from(plain)),
                        Err(e) => {
                            tracing::error!(message_id = %entry.message_id, error = %e, "cannot open payload");
                            None
                        }
                    }
                }
                None => {
                    tracing::error!(message_id = %entry.message_id, "payload missing");
                    None
                }
            };
            self.opened.insert(entry.message_id.clone(), data);
        }
        let Some(Some(data)) = self.opened.get(&entry.message_id) else {
            return Ok(None);
        };
        Ok(Some(Delivery {
            device_id: device_id.clone(),
            seq: entry.seq,
            message_id: entry.message_id.as_str().into(),
            expires_at_ms: entry.expires_at_ms,
            envelope: envelope::encode(&entry.message_id, entry.seq, entry.ts_ms, data).into(),
        }))
    }
}

impl StoreDirectory {
    fn read_backlog(
        &self,
        device_id: &Arc<str>,
        after_seq: u64,
        limit: usize,
    ) -> Result<BacklogPage, DirectoryError> {
        let err = |e: herald_projections::StoreError| DirectoryError(e.to_string());
        // The head first: anything committed after it may show up in the page, which is
        // harmless, but nothing before it can be missed.
        let head = self.store.inbox_head(device_id).map_err(err)?;
        let entries = self
            .store
            .inbox_page(device_id, after_seq, limit)
            .map_err(err)?;
        let full = entries.len() >= limit;
        let now = crate::now_ms();
        let mut page = BacklogPage {
            entries: Vec::with_capacity(entries.len()),
            covered_through: after_seq,
            complete: !full,
        };
        let mut envelopes = Envelopes::new(&*self.store, &self.keyring);
        for e in &entries {
            page.covered_through = page.covered_through.max(e.seq);
            if e.expires_at_ms <= now {
                continue;
            }
            if let Some(d) = envelopes.delivery(device_id, e)? {
                page.entries.push(d);
            }
        }
        if !full {
            page.covered_through = page.covered_through.max(head.next_seq.saturating_sub(1));
        }
        Ok(page)
    }
}

impl DeviceDirectory for StoreDirectory {
    fn authenticate(
        &self,
        device_id: &str,
        token: &[u8],
    ) -> BoxFuture<'static, Result<bool, DirectoryError>> {
        let result = self
            .store
            .device(device_id)
            .map_err(|e| DirectoryError(e.to_string()))
            .map(|d| d.is_some_and(|d| constant_time_eq(&Sha256::digest(token), &d.token_sha256)));
        Box::pin(async move { result })
    }

    fn backlog(
        &self,
        device_id: Arc<str>,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<BacklogPage, DirectoryError>> {
        let result = self.read_backlog(&device_id, after_seq, limit);
        Box::pin(async move { result })
    }
}
