//! The gateway's view of devices and inboxes, read from the projection store.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use herald_gateway::{DeviceDirectory, DeviceInfo, DirectoryError};
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
    /// The topic's partition count.
    partitions: u32,
    /// Per partition served here: where its log ends and how far it is applied. Without
    /// any (`None`), reads are not checked for freshness and every partition is served.
    freshness: Option<Arc<std::sync::RwLock<HashMap<u32, Freshness>>>>,
    /// Set where devices register through another process (the roles): bounds how many
    /// connects with an unknown id wait for the log at once.
    unknown_waits: Option<Arc<tokio::sync::Semaphore>>,
    /// Registrations may come from other processes: an id still unknown once caught up
    /// may yet appear (wait out the 2 s).
    registrations_elsewhere: bool,
}

/// Connects with an unknown id that may wait for the log at once; more are answered
/// "unavailable" (the device retries).
const UNKNOWN_WAITERS: usize = 64;

/// Where the log ends and how far the projections have applied it.
#[derive(Clone)]
struct Freshness {
    log_end: tokio::sync::watch::Receiver<u64>,
    applied: tokio::sync::watch::Receiver<u64>,
}

/// How long a backlog read waits for the projections to catch up with the log.
const FRESHNESS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl StoreDirectory {
    /// A directory over `store`, opening payloads with `keyring`.
    pub fn new(store: Arc<dyn Store>, keyring: Keyring) -> Self {
        StoreDirectory {
            store,
            keyring,
            partitions: 1,
            freshness: None,
            unknown_waits: None,
            registrations_elsewhere: false,
        }
    }

    /// Serves the partitions of a topic of `count` that are added with
    /// [`StoreDirectory::serve_partition`], and refuses the others' devices ("not here";
    /// the gateway asks the partition's owner).
    pub fn partitioned(mut self, count: u32) -> Self {
        self.partitions = count.max(1);
        self.freshness = Some(Default::default());
        self
    }

    /// Starts (`Some`: the partition's log end and applied watches) or stops (`None`)
    /// serving the devices of `partition`.
    pub fn serve_partition(
        &self,
        partition: u32,
        watches: Option<(
            tokio::sync::watch::Receiver<u64>,
            tokio::sync::watch::Receiver<u64>,
        )>,
    ) {
        let Some(f) = &self.freshness else { return };
        let mut f = f.write().unwrap_or_else(|e| e.into_inner());
        match watches {
            Some((log_end, applied)) => {
                f.insert(partition, Freshness { log_end, applied });
            }
            None => {
                f.remove(&partition);
            }
        }
    }

    /// The freshness watches of a device's partition: `Ok(None)` when reads are not
    /// checked, an error when the partition is not served here.
    fn freshness_of(&self, device_id: &str) -> Result<Option<Freshness>, DirectoryError> {
        let Some(f) = &self.freshness else {
            return Ok(None);
        };
        let p = herald_schemas::partition::for_key(device_id.as_bytes(), self.partitions);
        match f.read().unwrap_or_else(|e| e.into_inner()).get(&p) {
            Some(f) => Ok(Some(f.clone())),
            None => Err(DirectoryError(format!(
                "partition {p} of device {device_id} is not served by this worker"
            ))),
        }
    }

    /// Makes every backlog read wait until the projections have applied everything that
    /// was durable in the log when the read was asked for. Without this, a device that
    /// reconnects right after a restart (or right after acknowledging on another
    /// connection) could be sent entries whose acknowledgement or QoS 2 receipt is in the
    /// log but not yet applied.
    pub fn with_freshness(
        mut self,
        log_end: tokio::sync::watch::Receiver<u64>,
        applied: tokio::sync::watch::Receiver<u64>,
    ) -> Self {
        self.freshness = Some(Default::default());
        self.serve_partition(0, Some((log_end, applied)));
        self
    }

    /// Devices register through another process: a connect with an id this store does
    /// not know yet waits (up to 2 s) for the log to show its registration.
    pub fn waiting_for_registrations(mut self) -> Self {
        self.unknown_waits = Some(Arc::new(tokio::sync::Semaphore::new(UNKNOWN_WAITERS)));
        self.registrations_elsewhere = true;
        self
    }

    /// Devices register through this process, but the projections may be behind the log
    /// (right after start-up, when a damaged store is rebuilt): a connect with an id this
    /// store does not know waits until they have caught up (up to 2 s), and is answered
    /// "unavailable" rather than refused if they have not.
    pub fn waiting_for_catch_up(mut self) -> Self {
        self.unknown_waits = Some(Arc::new(tokio::sync::Semaphore::new(UNKNOWN_WAITERS)));
        self
    }
}

/// Builds wire-ready deliveries for inbox entries, opening each message's payload once.
pub struct Envelopes<'a> {
    store: &'a dyn Store,
    keyring: &'a Keyring,
    partitions: u32,
    /// Per message: its id (shared by every delivery), its payload, and the envelope's
    /// shared part; `None` if its payload cannot be opened.
    opened: HashMap<String, Option<Opened>>,
    recalled: HashMap<(String, u32), bool>,
}

/// A message's opened payload and what every delivery of it shares.
struct Opened {
    message_id: Arc<str>,
    data: Vec<u8>,
    shared: envelope::Shared,
}

impl<'a> Envelopes<'a> {
    /// A builder reading payloads from `store`, whose devices are spread over a topic of
    /// `partitions`.
    pub fn new(store: &'a dyn Store, keyring: &'a Keyring, partitions: u32) -> Self {
        Envelopes {
            store,
            keyring,
            partitions,
            opened: HashMap::new(),
            recalled: HashMap::new(),
        }
    }

    /// Whether a device's entry's message was recalled (looked up once per message and
    /// partition: a recall reaches each partition's devices with that partition's share).
    pub fn is_recalled(
        &mut self,
        device_id: &str,
        message_id: &str,
    ) -> Result<bool, DirectoryError> {
        let p = herald_schemas::partition::for_key(device_id.as_bytes(), self.partitions);
        let key = (message_id.to_owned(), p);
        if let Some(r) = self.recalled.get(&key) {
            return Ok(*r);
        }
        let r = self
            .store
            .message(message_id, p)
            .map_err(|e| DirectoryError(e.to_string()))?
            .is_some_and(|m| m.recalled);
        self.recalled.insert(key, r);
        Ok(r)
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
                        Ok(plain) => Some(Opened {
                            message_id: entry.message_id.as_str().into(),
                            shared: envelope::Shared::new(&entry.message_id, entry.ts_ms, &plain),
                            data: plain,
                        }),
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
        let Some(Some(o)) = self.opened.get_mut(&entry.message_id) else {
            return Ok(None);
        };
        if o.shared.ts_ms() != entry.ts_ms {
            o.shared = envelope::Shared::new(&o.message_id, entry.ts_ms, &o.data);
        }
        Ok(Some(Delivery {
            device_id: device_id.clone(),
            seq: entry.seq,
            message_id: o.message_id.clone(),
            expires_at_ms: entry.expires_at_ms,
            envelope: o.shared.with_seq(entry.seq),
            released: entry.received,
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
        // The head first, and only entries below it: a store that writes a batch's rows
        // one by one (CQL) writes its entries before its heads, so every entry below a
        // head it shows is there, while entries above may still be arriving with gaps
        // between them. Those come live, or with the next read.
        let head = self.store.inbox_head(device_id).map_err(err)?;
        let mut entries = self
            .store
            .inbox_page(device_id, after_seq, limit)
            .map_err(err)?;
        let read = entries.len();
        entries.retain(|e| e.seq < head.next_seq);
        // Complete when the read reached the end, or reached entries above the head: all
        // below it are in the page.
        let full = read >= limit && entries.len() == read;
        let now = crate::now_ms();
        let mut page = BacklogPage {
            entries: Vec::with_capacity(entries.len()),
            covered_through: after_seq,
            complete: !full,
        };
        let mut envelopes = Envelopes::new(&*self.store, &self.keyring, self.partitions);
        for e in &entries {
            page.covered_through = page.covered_through.max(e.seq);
            // Expired and recalled entries are never sent again, except to finish one the
            // device already received at QoS 2 (its PUBREL).
            if !e.received
                && (e.expires_at_ms <= now || envelopes.is_recalled(device_id, &e.message_id)?)
            {
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

/// How long a connect with an unknown device id waits for the log to show its
/// registration (it may come from another process).
const UNKNOWN_DEVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl DeviceDirectory for StoreDirectory {
    fn authenticate(
        &self,
        device_id: &str,
        token: &[u8],
    ) -> BoxFuture<'static, Result<Option<DeviceInfo>, DirectoryError>> {
        // Some(None): the device exists and the token is not its.
        let check = |store: &dyn Store, device_id: &str, token: &[u8]| {
            store
                .device(device_id)
                .map_err(|e| DirectoryError(e.to_string()))
                .map(|d| {
                    d.map(|d| {
                        constant_time_eq(&Sha256::digest(token), &d.token_sha256)
                            .then_some(DeviceInfo { network: d.network })
                    })
                })
        };
        let f = match self.freshness_of(device_id) {
            Ok(f) => f,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let result = check(&*self.store, device_id, token);
        let (Some(f), Some(waits), Ok(None)) = (&f, &self.unknown_waits, &result) else {
            return Box::pin(async move { Ok(result?.flatten()) });
        };
        // An unknown device may be one registered a moment ago through another process
        // (its registration is in the log, not yet folded here): look again once the
        // projections have caught up with the log, for a short while. If they have not
        // caught up by then, the answer is "unavailable" (the device retries), never a
        // refusal of a device that may well exist.
        let Ok(permit) = waits.clone().try_acquire_owned() else {
            return Box::pin(async {
                Err(DirectoryError(
                    "too many connects with unknown ids at once".into(),
                ))
            });
        };
        let (log_end, mut applied) = (f.log_end.clone(), f.applied.clone());
        let elsewhere = self.registrations_elsewhere;
        let (store, device_id, token) = (self.store.clone(), device_id.to_string(), token.to_vec());
        Box::pin(async move {
            let _permit = permit;
            let deadline = tokio::time::Instant::now() + UNKNOWN_DEVICE_WAIT;
            loop {
                let target = *log_end.borrow();
                let caught_up =
                    tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= target))
                        .await
                        .is_ok_and(|r| r.is_ok());
                if let Some(ok) = check(&*store, &device_id, &token)? {
                    return Ok(ok);
                }
                if caught_up && !elsewhere {
                    return Ok(None);
                }
                if tokio::time::Instant::now() >= deadline {
                    return if caught_up {
                        Ok(None)
                    } else {
                        Err(DirectoryError(
                            "the projections have not caught up with the log".into(),
                        ))
                    };
                }
                // Wait for the log's end to move (another process's append) or a moment.
                let mut end = log_end.clone();
                let _ = tokio::time::timeout(std::time::Duration::from_millis(250), end.changed())
                    .await;
            }
        })
    }

    fn backlog(
        &self,
        device_id: Arc<str>,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<BacklogPage, DirectoryError>> {
        let f = match self.freshness_of(&device_id) {
            Ok(Some(f)) => f,
            Ok(None) => {
                let result = self.read_backlog(&device_id, after_seq, limit);
                return Box::pin(async move { result });
            }
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let target = *f.log_end.borrow();
        let mut applied = f.applied.clone();
        let this = StoreDirectory {
            store: self.store.clone(),
            keyring: self.keyring.clone(),
            partitions: self.partitions,
            freshness: None,
            unknown_waits: None,
            registrations_elsewhere: false,
        };
        Box::pin(async move {
            let caught_up =
                tokio::time::timeout(FRESHNESS_WAIT, applied.wait_for(|a| *a >= target)).await;
            if !matches!(caught_up, Ok(Ok(_))) {
                return Err(DirectoryError(format!(
                    "the projections have not caught up with the log (offset {target})"
                )));
            }
            this.read_backlog(&device_id, after_seq, limit)
        })
    }
}
