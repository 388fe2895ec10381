//! The delivery worker: an explicit loop that reads the log from the store's checkpoint,
//! folds a batch of events, commits the batch's state with its checkpoint, publishes how
//! far it has applied, and forwards the batch's new inbox entries over the link.

use std::sync::Arc;

use herald_eventlog::{EventLog, Offset};
use herald_projections::fold;
use herald_projections::view::{NewEntry, Store, Tx, Withdrawn};
use herald_schemas::events;
use herald_schemas::link::{Delivery, Withdrawal};
use herald_schemas::seal::Keyring;
use tokio::sync::watch;

use crate::directory::Envelopes;
use crate::link::Link;

/// Most log records folded in one batch.
pub const MAX_BATCH_RECORDS: usize = 2048;

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] herald_eventlog::Error),
    /// The projection store failed.
    #[error(transparent)]
    Store(#[from] herald_projections::StoreError),
    /// A blocking task panicked.
    #[error("worker task failed: {0}")]
    Task(String),
}

/// A delivery worker.
pub struct Worker {
    log: Arc<dyn EventLog>,
    store: Arc<dyn Store>,
    link: Arc<dyn Link>,
    keyring: Keyring,
    applied: watch::Sender<Offset>,
}

impl Worker {
    /// A worker folding `log` into `store` and forwarding over `link`.
    pub fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn Store>,
        link: Arc<dyn Link>,
        keyring: Keyring,
    ) -> Result<Self, WorkerError> {
        let (applied, _) = watch::channel(store.checkpoint()?);
        Ok(Worker {
            log,
            store,
            link,
            keyring,
            applied,
        })
    }

    /// How far the projections have applied the log: the first offset not yet applied.
    /// The API waits on this to read its own writes.
    pub fn applied(&self) -> watch::Receiver<Offset> {
        self.applied.subscribe()
    }

    /// Runs until `shutdown` turns true or the log or store fails.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let mut end = self.log.durable_end();
        // This worker is the store's only writer: after the first read, its position is
        // the checkpoint it last committed.
        let mut from = self.store.checkpoint()?;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            // The end as it was before the read: marked seen, so `changed` below wakes for
            // any append after it.
            let end_before = *end.borrow_and_update();
            let records = self.log.read(from, MAX_BATCH_RECORDS).await?;
            if records.is_empty() {
                if end_before > from {
                    // Durable records the log could not hand over just now (a remote log
                    // whose server is away): try again shortly rather than wait for an
                    // append that may never come.
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {},
                        _ = shutdown.changed() => {},
                    }
                } else {
                    tokio::select! {
                        r = end.changed() => if r.is_err() { return Ok(()) },
                        _ = shutdown.changed() => {},
                    }
                }
                continue;
            }
            let store = self.store.clone();
            let (next, new_entries, withdrawn) =
                tokio::task::spawn_blocking(move || fold_batch(&*store, from, &records))
                    .await
                    .map_err(|e| WorkerError::Task(e.to_string()))??;
            self.applied.send_replace(next);
            from = next;
            // An entry created and taken back in the same batch is not forwarded.
            let taken_back: std::collections::HashSet<(Option<&str>, &str)> = withdrawn
                .iter()
                .map(|w| (w.device_id.as_deref(), w.message_id.as_str()))
                .collect();
            let new_entries: Vec<NewEntry> = new_entries
                .into_iter()
                .filter(|n| {
                    !taken_back.contains(&(None, n.entry.message_id.as_str()))
                        && !taken_back
                            .contains(&(Some(n.device_id.as_str()), n.entry.message_id.as_str()))
                })
                .collect();
            if !withdrawn.is_empty() {
                self.link.withdraw(
                    withdrawn
                        .into_iter()
                        .map(|w| Withdrawal {
                            device_id: w.device_id.map(|d| d.as_str().into()),
                            message_id: w.message_id.as_str().into(),
                        })
                        .collect(),
                );
            }
            self.forward(new_entries)?;
        }
    }

    fn forward(&self, new_entries: Vec<NewEntry>) -> Result<(), WorkerError> {
        let mut envelopes = Envelopes::new(&*self.store, &self.keyring);
        let mut batch: Vec<Delivery> = Vec::new();
        let mut resync: Vec<Arc<str>> = Vec::new();
        for n in new_entries {
            if !self.link.wants(&n.device_id) {
                continue;
            }
            let device_id: Arc<str> = n.device_id.as_str().into();
            match envelopes.delivery(&device_id, &n.entry) {
                Ok(Some(d)) => batch.push(d),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prepare a live entry; the session rereads its inbox");
                    resync.push(device_id);
                }
            }
        }
        if !batch.is_empty() {
            self.link.deliver(batch);
        }
        if !resync.is_empty() {
            self.link.resync(resync);
        }
        Ok(())
    }
}

/// What a committed batch produced.
pub type Folded = (Offset, Vec<NewEntry>, Vec<Withdrawn>);

/// Folds one batch of records and commits it with its checkpoint. Returns the new
/// checkpoint, the entries the batch created and the entries it took back.
pub fn fold_batch(
    store: &dyn Store,
    from: Offset,
    records: &[herald_eventlog::Stored],
) -> Result<Folded, WorkerError> {
    let mut tx = Tx::new(store);
    let mut next = from;
    for r in records {
        assert_eq!(r.offset, next, "the log hands out dense offsets");
        match events::decode(&r.value) {
            Ok(ev) => fold::apply(&mut tx, &ev)?,
            Err(e) => {
                // An event this build cannot read is skipped, loudly; replay with a newer
                // build applies it.
                tracing::error!(offset = r.offset, error = %e, "skipping undecodable event");
                tx.rejected += 1;
            }
        }
        next = r.offset + 1;
    }
    if tx.rejected > 0 {
        tracing::debug!(rejected = tx.rejected, "events refused by the folds");
    }
    let Tx {
        writes,
        new_entries,
        withdrawn,
        ..
    } = tx;
    store.commit(&writes, next)?;
    Ok((next, new_entries, withdrawn))
}
