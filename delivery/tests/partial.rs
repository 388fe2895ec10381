//! A store that shows a batch part-way, as the CQL store can (it writes a batch's rows
//! one by one): the delivery worker retries a commit that failed after writing part of
//! its rows with the same writes, never folding it again over its own partial result;
//! and the gateway's backlog read never covers an entry it has not seen.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald_delivery::link::NoLink;
use herald_delivery::worker::Worker;
use herald_eventlog::embedded::EmbeddedLog;
use herald_eventlog::{Append, Record};
use herald_projections::StoreError;
use herald_projections::memory::MemStore;
use herald_projections::model::{
    App, Device, IdempotencyRecord, InboxEntry, InboxHead, MessageStatus, Payload, Presence,
};
use herald_projections::view::{Store, View, Writes};
use herald_schemas::events::*;
use herald_schemas::seal::Keyring;

/// A [`MemStore`] whose first commit of anything writes only the batch's inbox heads, then
/// fails as an unreachable server does.
#[derive(Default)]
struct HalfCommit {
    inner: MemStore,
    failed: AtomicBool,
}

impl View for HalfCommit {
    fn app(&self, id: &str) -> Result<Option<App>, StoreError> {
        self.inner.app(id)
    }
    fn app_id_by_client(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.inner.app_id_by_client(id)
    }
    fn app_id_by_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.app_id_by_key(key)
    }
    fn device(&self, id: &str) -> Result<Option<Device>, StoreError> {
        self.inner.device(id)
    }
    fn app_devices(
        &self,
        app: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.app_devices(app, after, limit)
    }
    fn inbox_head(&self, id: &str) -> Result<InboxHead, StoreError> {
        self.inner.inbox_head(id)
    }
    fn inbox_entry(&self, id: &str, seq: u64) -> Result<Option<InboxEntry>, StoreError> {
        self.inner.inbox_entry(id, seq)
    }
    fn message(&self, id: &str, p: u32) -> Result<Option<MessageStatus>, StoreError> {
        self.inner.message(id, p)
    }
    fn presence(&self, id: &str) -> Result<Option<Presence>, StoreError> {
        self.inner.presence(id)
    }
    fn idempotency(
        &self,
        app: &str,
        key: &str,
        p: u32,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.inner.idempotency(app, key, p)
    }
    fn collapse(&self, id: &str, key: &str) -> Result<Option<u64>, StoreError> {
        self.inner.collapse(id, key)
    }
    fn app_device_count(&self, app_id: &str, partition: u32) -> Result<u64, StoreError> {
        self.inner.app_device_count(app_id, partition)
    }
}

impl Store for HalfCommit {
    fn commit(&self, w: &Writes, p: u32, next: u64) -> Result<(), StoreError> {
        if !w.heads.is_empty() && !self.failed.swap(true, Ordering::SeqCst) {
            let part = Writes {
                heads: w.heads.clone(),
                ..Writes::default()
            };
            let at = self.inner.checkpoint(p)?;
            self.inner.commit(&part, p, at)?;
            return Err(StoreError::Unavailable("the server went away".into()));
        }
        self.inner.commit(w, p, next)
    }
    fn checkpoint(&self, p: u32) -> Result<u64, StoreError> {
        self.inner.checkpoint(p)
    }
    fn idempotency_record(
        &self,
        app: &str,
        key: &str,
        now: u64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.inner.idempotency_record(app, key, now)
    }
    fn message_status(&self, id: &str) -> Result<Option<MessageStatus>, StoreError> {
        self.inner.message_status(id)
    }
    fn apps(&self, limit: usize) -> Result<Vec<herald_projections::model::App>, StoreError> {
        self.inner.apps(limit)
    }
    fn app_device_total(&self, app_id: &str) -> Result<u64, StoreError> {
        self.inner.app_device_total(app_id)
    }
    fn inbox_page(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        self.inner.inbox_page(id, after, limit)
    }
    fn payload(&self, id: &str) -> Result<Option<Payload>, StoreError> {
        self.inner.payload(id)
    }
}

fn push(message_id: &str) -> Kind {
    Kind::PushAccepted(PushAccepted {
        message_id: message_id.into(),
        app_id: "a".into(),
        target: Some(Target {
            to: Some(To::DeviceId("d".into())),
        }),
        payload: Some(SealedPayload {
            key_id: 1,
            nonce: vec![0; 12],
            ciphertext: vec![1],
        }),
        ttl_s: 3600,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_failed_half_way_is_retried_not_folded_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path()).unwrap());
    let kinds = [
        Kind::AppCreated(AppCreated {
            app_id: "a".into(),
            name: "n".into(),
            app_key: "k".into(),
            client_id: "c".into(),
            client_secret_sha256: vec![1],
        }),
        Kind::DeviceRegistered(DeviceRegistered {
            device_id: "d".into(),
            app_id: "a".into(),
            token_sha256: vec![2],
            platform: "p".into(),
            network: "wifi".into(),
        }),
        push("m1"),
        push("m2"),
    ];
    let records = kinds
        .into_iter()
        .map(|k| Record {
            key: b"d".to_vec(),
            value: encode(&Event::new(1_000, k)),
        })
        .collect();
    log.append(records).await.unwrap();

    let store = Arc::new(HalfCommit::default());
    let worker = Worker::new(
        log.clone(),
        store.clone(),
        Arc::new(NoLink),
        Keyring::new(1, &[7; 32]),
    )
    .unwrap();
    let mut applied = worker.applied();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(worker.run(stopped));
    tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|a| *a >= 4))
        .await
        .unwrap()
        .unwrap();
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    assert!(
        store.failed.load(Ordering::SeqCst),
        "the first commit failed"
    );
    let state = store.inner.snapshot();
    let seqs: Vec<(u64, &str)> = state
        .entries
        .values()
        .map(|e| (e.seq, e.message_id.as_str()))
        .collect();
    assert_eq!(
        seqs,
        vec![(1, "m1"), (2, "m2")],
        "dense seqs, each push once"
    );
    assert_eq!(state.heads["d"].next_seq, 3);
    assert_eq!(state.checkpoints[&0], 4);
}

#[tokio::test]
async fn a_backlog_read_covers_only_entries_below_the_head_it_read() {
    use herald_gateway::DeviceDirectory;
    let keyring = Keyring::new(1, &[7; 32]);
    let store = Arc::new(MemStore::default());
    let mut w = Writes::default();
    // Entries 1 and 2 of a committed batch, and entry 5 of a batch still being written:
    // its entries 3 and 4 and its head have not landed yet.
    for seq in [1, 2, 5] {
        let id = format!("01890000-0000-7000-8000-00000000000{seq}");
        let sealed = keyring.seal([0; 12], &id, b"{}").unwrap();
        w.payloads.insert(
            id.clone(),
            Payload {
                key_id: sealed.key_id,
                nonce: sealed.nonce.clone(),
                ciphertext: sealed.ciphertext.clone(),
            },
        );
        w.entries.insert(
            ("d".into(), seq),
            Some(InboxEntry {
                seq,
                message_id: id,
                ts_ms: 1,
                expires_at_ms: u64::MAX / 2,
                received: false,
            }),
        );
    }
    w.heads.insert("d".into(), InboxHead { next_seq: 3 });
    store.commit(&w, 0, 1).unwrap();
    let directory = herald_delivery::directory::StoreDirectory::new(store, keyring);
    let page = directory.backlog("d".into(), 0, 10).await.unwrap();
    let seqs: Vec<u64> = page.entries.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    assert_eq!(
        page.covered_through, 2,
        "3 and 4 are not covered: they come live or with the next read"
    );
    assert!(page.complete, "everything below the head is in the page");
    // A full page of entries above the head only: nothing covered, nothing to read again.
    let page = directory.backlog("d".into(), 4, 1).await.unwrap();
    assert!(page.entries.is_empty());
    assert_eq!(page.covered_through, 4);
    assert!(page.complete);
}
