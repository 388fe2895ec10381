//! The delivery worker: an explicit loop that reads the log from the store's checkpoint,
//! folds a batch of events, commits the batch's state with its checkpoint, publishes how
//! far it has applied, and forwards the batch's new inbox entries over the link.

use std::sync::Arc;

use herald_eventlog::{EventLog, Offset, Partitions, Record};
use herald_projections::fold;
use herald_projections::view::{NewEntry, Scope, Store, Tx, Withdrawn, Writes};
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
    scope: Scope,
    shares: Option<Shares>,
}

/// Where a worker of one partition of a partitioned topic appends the shares of
/// multi-target events for the other partitions.
struct Shares {
    topic: Partitions,
    /// Shares of records before this offset were appended by an earlier owner of the
    /// partition (it commits the group offset only after appending them).
    from: Offset,
}

impl Worker {
    /// A worker folding the one-partition `log` into `store` and forwarding over `link`.
    pub fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn Store>,
        link: Arc<dyn Link>,
        keyring: Keyring,
    ) -> Result<Self, WorkerError> {
        // Where the store stood, as a first guess; `run` says exactly once it has taken
        // the partition (a store that cannot answer now is waited for there).
        let (applied, _) = watch::channel(store.checkpoint(0).unwrap_or_default());
        Ok(Worker {
            log,
            store,
            link,
            keyring,
            applied,
            scope: Scope::SINGLE,
            shares: None,
        })
    }

    /// A worker folding partition `partition` of `topic` into `store`. With
    /// `share_from: Some(offset)` it owns the partition: before it commits a batch it
    /// appends the shares its multi-target events at `offset` or later ask for (the
    /// earlier ones' were appended by the owner before it); with `None` it only follows.
    pub fn for_partition(
        topic: &Partitions,
        partition: u32,
        store: Arc<dyn Store>,
        link: Arc<dyn Link>,
        keyring: Keyring,
        share_from: Option<Offset>,
    ) -> Result<Self, WorkerError> {
        let (applied, _) = watch::channel(store.checkpoint(partition).unwrap_or_default());
        Ok(Worker {
            log: topic.get(partition).clone(),
            store,
            link,
            keyring,
            applied,
            scope: Scope {
                partition,
                count: topic.count(),
            },
            shares: share_from.map(|from| Shares {
                topic: topic.clone(),
                from,
            }),
        })
    }

    /// How far the projections have applied the log: the first offset not yet applied.
    /// The API waits on this to read its own writes.
    pub fn applied(&self) -> watch::Receiver<Offset> {
        self.applied.subscribe()
    }

    /// Runs until `shutdown` turns true or the log or store fails. A store that is
    /// unavailable for a while (a CQL server stopped or overloaded) pauses the worker: it
    /// retries the same batch with backoff, and nothing is forwarded meanwhile.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let mut end = self.log.durable_end();
        let partition = self.scope.partition;
        // This worker becomes the partition's one writer (a shared store fences the one
        // before it and finishes a commit it left half done), then starts from the
        // checkpoint; after that, its position is the checkpoint it last committed.
        let store = self.store.clone();
        let Some(mut from) = self
            .retrying(&mut shutdown, move || Ok(store.take_partition(partition)?))
            .await?
        else {
            return Ok(());
        };
        self.applied.send_replace(from);
        herald_telemetry::metrics::delivery_lag(partition, end.borrow().saturating_sub(from));
        loop {
            if *shutdown.borrow() {
                tracing::debug!(partition, "worker stopped");
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
            let records = Arc::new(records);
            let store = self.store.clone();
            let scope = self.scope;
            let share_from = self.shares.as_ref().map_or(Offset::MAX, |s| s.from);
            let Some(batch) = self
                .retrying(&mut shutdown, move || {
                    fold_partition_batch(&*store, scope, from, &records, share_from)
                })
                .await?
            else {
                return Ok(());
            };
            if !batch.shares.is_empty() && !self.append_shares(&batch.shares, &mut shutdown).await {
                return Ok(());
            }
            // The batch is committed as it was folded, however many tries that takes: a
            // try that failed may have written some of its rows (a CQL store writes them
            // one by one), and folding the batch again over them would read part of its
            // own result (seqs skipped, acks counted twice). Committing the same writes
            // again is harmless: they are final values.
            let PartitionBatch {
                writes,
                next,
                new_entries,
                withdrawn,
                tally,
                records,
                ..
            } = batch;
            let store = self.store.clone();
            let writes = Arc::new(writes);
            if self
                .retrying(&mut shutdown, move || {
                    Ok(store.commit(&writes, partition, next)?)
                })
                .await?
                .is_none()
            {
                return Ok(());
            }
            tracing::debug!(
                partition,
                next,
                entries = new_entries.len(),
                "folded a batch"
            );
            self.applied.send_replace(next);
            from = next;
            Self::record_batch(
                partition,
                records,
                &tally,
                (*end.borrow()).saturating_sub(next),
            );
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

    /// Counts a committed batch in the metrics.
    fn record_batch(
        partition: u32,
        records: usize,
        tally: &herald_projections::view::Tally,
        lag: Offset,
    ) {
        use herald_telemetry::metrics;
        metrics::events_applied(records);
        for (app_id, n) in &tally.stored {
            metrics::entries_stored(app_id, *n);
        }
        for (app_id, latency_ms) in &tally.acked {
            metrics::delivered(app_id, *latency_ms);
        }
        metrics::delivery_lag(partition, lag);
    }

    /// Runs `work` on a blocking thread, again after a pause (100 ms, doubling to 5 s)
    /// for as long as the store is unavailable; `None` if shut down meanwhile. Any other
    /// error stops the worker ([`herald_projections::StoreError::Fenced`] among them: the
    /// partition has a newer writer).
    async fn retrying<T: Send + 'static>(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        work: impl Fn() -> Result<T, WorkerError> + Send + Sync + 'static,
    ) -> Result<Option<T>, WorkerError> {
        let work = Arc::new(work);
        let mut delay = std::time::Duration::from_millis(100);
        loop {
            let w = work.clone();
            match tokio::task::spawn_blocking(move || w())
                .await
                .map_err(|e| WorkerError::Task(e.to_string()))?
            {
                Err(WorkerError::Store(herald_projections::StoreError::Unavailable(e))) => {
                    tracing::warn!(partition = self.scope.partition, error = %e, retry_in = ?delay, "the projection store is unavailable; the worker waits");
                }
                other => return other.map(Some),
            }
            if !wait_to_retry(&mut delay, shutdown).await {
                return Ok(None);
            }
        }
    }

    /// Appends a batch's shares to their partitions, retrying until they are durable:
    /// the batch may not commit before (a crash would lose them). False if shut down
    /// meanwhile.
    async fn append_shares(
        &self,
        shares: &[(u32, events::Event)],
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let Some(Shares { topic, .. }) = &self.shares else {
            return true;
        };
        let mut by_partition: std::collections::BTreeMap<u32, Vec<Record>> = Default::default();
        for (p, ev) in shares {
            let key = match &ev.kind {
                Some(events::Kind::FanOut(f)) => match &f.event {
                    Some(events::fan_out::Event::Push(e)) => e.message_id.clone(),
                    Some(events::fan_out::Event::Recall(e)) => e.message_id.clone(),
                    None => String::new(),
                },
                _ => String::new(),
            };
            by_partition.entry(*p).or_default().push(Record {
                key: key.into_bytes(),
                value: events::encode(ev),
            });
        }
        let mut delay = std::time::Duration::from_millis(100);
        loop {
            let appends = by_partition
                .iter()
                .map(|(p, records)| topic.get(*p).append(records.clone()));
            let results = futures::future::join_all(appends).await;
            match results.into_iter().find_map(Result::err) {
                None => return true,
                Some(e) => {
                    tracing::warn!(error = %e, partition = self.scope.partition, "cannot append the shares of multi-target events; retrying");
                }
            }
            if !wait_to_retry(&mut delay, shutdown).await {
                return false;
            }
        }
    }

    fn forward(&self, new_entries: Vec<NewEntry>) -> Result<(), WorkerError> {
        let mut envelopes = Envelopes::new(&*self.store, &self.keyring, self.scope.count);
        let mut batch: Vec<Delivery> = Vec::new();
        let mut resync: Vec<Arc<str>> = Vec::new();
        for n in new_entries {
            if !self.link.wants(&n.device_id) {
                continue;
            }
            let device_id: Arc<str> = n.device_id.as_str().into();
            tracing::debug!(
                partition = self.scope.partition,
                device_id = %device_id,
                message_id = %n.entry.message_id,
                seq = n.entry.seq,
                "stored; forwarding to the gateway"
            );
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

/// Waits `delay` before the next try of something that failed, then doubles it (up to
/// 5 s); false if shut down meanwhile.
async fn wait_to_retry(
    delay: &mut std::time::Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(*delay) => {},
        _ = shutdown.changed() => return false,
    }
    *delay = (*delay * 2).min(std::time::Duration::from_secs(5));
    true
}

/// What a committed batch produced.
pub type Folded = (Offset, Vec<NewEntry>, Vec<Withdrawn>);

/// A folded batch of one partition, not committed yet.
pub struct PartitionBatch {
    /// The batch's state changes.
    pub writes: Writes,
    /// The partition's checkpoint after it.
    pub next: Offset,
    /// The entries it created.
    pub new_entries: Vec<NewEntry>,
    /// The entries it took back.
    pub withdrawn: Vec<Withdrawn>,
    /// Shares for other partitions, of records at `share_from` or later.
    pub shares: Vec<(u32, events::Event)>,
    /// What it did, for the metrics.
    pub tally: herald_projections::view::Tally,
    /// How many records it folded.
    pub records: usize,
}

/// Folds one batch of a one-partition log and commits it with its checkpoint. Returns
/// the new checkpoint, the entries the batch created and the entries it took back.
pub fn fold_batch(
    store: &dyn Store,
    from: Offset,
    records: &[herald_eventlog::Stored],
) -> Result<Folded, WorkerError> {
    let b = fold_partition_batch(store, Scope::SINGLE, from, records, Offset::MAX)?;
    store.commit(&b.writes, 0, b.next)?;
    Ok((b.next, b.new_entries, b.withdrawn))
}

/// Folds one batch of records of partition `scope` without committing it.
pub fn fold_partition_batch(
    store: &dyn Store,
    scope: Scope,
    from: Offset,
    records: &[herald_eventlog::Stored],
    share_from: Offset,
) -> Result<PartitionBatch, WorkerError> {
    let mut tx = Tx::scoped(store, scope);
    let mut next = from;
    let mut shares = Vec::new();
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
        if r.offset >= share_from {
            shares.append(&mut tx.fan_out);
        } else {
            tx.fan_out.clear();
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
        tally,
        ..
    } = tx;
    Ok(PartitionBatch {
        writes,
        next,
        new_entries,
        withdrawn,
        shares,
        tally,
        records: records.len(),
    })
}
