//! The embedded event log: one fjall keyspace, keyed by big-endian offset, with group
//! commit.
//!
//! # Durability
//! An append is durable when its future resolves `Ok`: its records were written to the
//! journal and the journal was fsync'd (`PersistMode::SyncAll`). One committer thread
//! takes every append that is waiting, writes them in one batch and syncs once, so N
//! concurrent appends cost one fsync, not N. The projections share the same fjall
//! database (see `herald-projections`), so this fsync also makes every projection batch
//! written before it durable.
//!
//! A failed write or sync poisons the log (fjall does the same internally): every
//! append after it fails with [`Error::Poisoned`].

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use futures::future::BoxFuture;
use tokio::sync::{oneshot, watch};

use crate::{Error, EventLog, Offset, Record, Stored};

/// The largest record the embedded log accepts.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// The most records one group commit writes before syncing.
pub const MAX_BATCH_RECORDS: usize = 8192;

const KEYSPACE: &str = "log";

struct AppendRequest {
    records: Vec<Record>,
    reply: oneshot::Sender<Result<Vec<Offset>, Error>>,
}

/// The embedded log. Cheap to clone handles are not offered; share it in an `Arc`.
pub struct EmbeddedLog {
    keyspace: Keyspace,
    requests: std_mpsc::SyncSender<AppendRequest>,
    end: watch::Receiver<Offset>,
    poisoned: Arc<AtomicBool>,
    fsyncs: Arc<AtomicU64>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("durable_end", &*self.end.borrow())
            .finish()
    }
}

/// Opens the fjall database herald keeps in `dir`, configured for the log: journal
/// writes are persisted only by the log's explicit syncs (group commit).
pub fn open_database(dir: &Path) -> Result<Database, Error> {
    Database::builder(dir)
        .manual_journal_persist(true)
        .open()
        .map_err(storage)
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `db` and starts its committer thread.
    pub fn open(db: Database) -> Result<Self, Error> {
        let keyspace = db
            .keyspace(KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(storage)?;
        let next = match keyspace.last_key_value() {
            None => 0,
            Some(guard) => {
                let key = guard.key().map_err(storage)?;
                decode_offset(&key).ok_or(Error::Corrupt {
                    offset: 0,
                    reason: "log key is not an 8-byte offset",
                })? + 1
            }
        };
        let (end_tx, end) = watch::channel(next);
        // Bounded: when the disk cannot keep up, appenders wait here instead of queueing
        // without limit.
        let (requests, rx) = std_mpsc::sync_channel(4096);
        let poisoned = Arc::new(AtomicBool::new(false));
        let fsyncs = Arc::new(AtomicU64::new(0));
        let committer = Committer {
            fsyncs: fsyncs.clone(),
            db,
            keyspace: keyspace.clone(),
            next,
            end: end_tx,
            poisoned: poisoned.clone(),
        };
        std::thread::Builder::new()
            .name("herald-log-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(storage)?;
        Ok(EmbeddedLog {
            keyspace,
            requests,
            end,
            poisoned,
            fsyncs,
        })
    }

    /// How many fsyncs the log has done since it was opened (group commit makes this
    /// smaller than the number of appends under concurrency).
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }
}

impl EventLog for EmbeddedLog {
    fn append(&self, records: Vec<Record>) -> BoxFuture<'static, Result<Vec<Offset>, Error>> {
        if self.poisoned.load(Ordering::Acquire) {
            return Box::pin(async { Err(Error::Poisoned) });
        }
        if let Some(big) = records
            .iter()
            .find(|r| r.key.len() + r.value.len() + 4 > MAX_RECORD_BYTES)
        {
            let size = big.key.len() + big.value.len() + 4;
            return Box::pin(async move {
                Err(Error::RecordTooLarge {
                    size,
                    max: MAX_RECORD_BYTES,
                })
            });
        }
        let (reply, rx) = oneshot::channel();
        let requests = self.requests.clone();
        Box::pin(async move {
            if records.is_empty() {
                return Ok(Vec::new());
            }
            // The queue is bounded; waiting for room must not block the runtime.
            tokio::task::spawn_blocking(move || requests.send(AppendRequest { records, reply }))
                .await
                .map_err(|_| Error::Closed)?
                .map_err(|_| Error::Closed)?;
            rx.await.map_err(|_| Error::Closed)?
        })
    }

    fn read(&self, from: Offset, max: usize) -> BoxFuture<'_, Result<Vec<Stored>, Error>> {
        let end = *self.end.borrow();
        let keyspace = self.keyspace.clone();
        Box::pin(async move {
            if from >= end || max == 0 {
                return Ok(Vec::new());
            }
            let to = end.min(from.saturating_add(max as u64));
            tokio::task::spawn_blocking(move || read_range(&keyspace, from, to))
                .await
                .map_err(|_| Error::Closed)?
        })
    }

    fn durable_end(&self) -> watch::Receiver<Offset> {
        self.end.clone()
    }
}

fn read_range(keyspace: &Keyspace, from: Offset, to: Offset) -> Result<Vec<Stored>, Error> {
    let mut out = Vec::with_capacity((to - from) as usize);
    let mut expected = from;
    for guard in keyspace.range(from.to_be_bytes()..to.to_be_bytes()) {
        let (key, value) = guard.into_inner().map_err(storage)?;
        let offset = decode_offset(&key).ok_or(Error::Corrupt {
            offset: expected,
            reason: "log key is not an 8-byte offset",
        })?;
        // Offsets are dense: a hole below the durable end means lost data.
        if offset != expected {
            return Err(Error::Corrupt {
                offset: expected,
                reason: "missing record below the durable end",
            });
        }
        let (rkey, rvalue) = split_value(&value).ok_or(Error::Corrupt {
            offset,
            reason: "record framing is invalid",
        })?;
        out.push(Stored {
            offset,
            key: rkey.to_vec(),
            value: rvalue.to_vec(),
        });
        expected += 1;
    }
    if expected != to {
        return Err(Error::Corrupt {
            offset: expected,
            reason: "missing record below the durable end",
        });
    }
    Ok(out)
}

fn decode_offset(key: &[u8]) -> Option<Offset> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// A stored value is `[key length: u32 BE][key][value]`.
fn frame_value(record: &Record) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + record.key.len() + record.value.len());
    v.extend_from_slice(&(record.key.len() as u32).to_be_bytes());
    v.extend_from_slice(&record.key);
    v.extend_from_slice(&record.value);
    v
}

fn split_value(v: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(v.get(..4)?.try_into().ok()?) as usize;
    let key = v.get(4..4usize.checked_add(len)?)?;
    let value = v.get(4 + len..)?;
    Some((key, value))
}

struct Committer {
    db: Database,
    keyspace: Keyspace,
    next: Offset,
    end: watch::Sender<Offset>,
    poisoned: Arc<AtomicBool>,
    fsyncs: Arc<AtomicU64>,
}

impl Committer {
    fn run(mut self, rx: std_mpsc::Receiver<AppendRequest>) {
        // Block for the first waiting append, then take every other one already waiting:
        // they all share the one sync below.
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            let mut count = group[0].records.len();
            while count < MAX_BATCH_RECORDS {
                match rx.try_recv() {
                    Ok(req) => {
                        count += req.records.len();
                        group.push(req);
                    }
                    Err(_) => break,
                }
            }
            if self.poisoned.load(Ordering::Acquire) {
                for req in group {
                    let _ = req.reply.send(Err(Error::Poisoned));
                }
                continue;
            }
            let start = self.next;
            match self.commit(&group) {
                Ok(()) => {
                    let mut offset = start;
                    for req in group {
                        let n = req.records.len() as u64;
                        let _ = req.reply.send(Ok((offset..offset + n).collect()));
                        offset += n;
                    }
                    assert_eq!(offset, self.next, "group commit assigned offsets densely");
                    self.end.send_replace(self.next);
                }
                Err(e) => {
                    tracing::error!(error = %e, "event log write failed; poisoning the log");
                    self.poisoned.store(true, Ordering::Release);
                    for req in group {
                        let _ = req.reply.send(Err(Error::Poisoned));
                    }
                }
            }
        }
    }

    fn commit(&mut self, group: &[AppendRequest]) -> Result<(), Error> {
        let mut batch = self.db.batch();
        let mut offset = self.next;
        for req in group {
            for record in &req.records {
                batch.insert(&self.keyspace, offset.to_be_bytes(), frame_value(record));
                offset += 1;
            }
        }
        batch.commit().map_err(storage)?;
        self.db.persist(PersistMode::SyncAll).map_err(storage)?;
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.next = offset;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(i: u32) -> Record {
        Record {
            key: format!("k{i}").into_bytes(),
            value: i.to_be_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn append_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(open_database(dir.path()).unwrap()).unwrap();
            assert_eq!(log.append(vec![rec(0), rec(1)]).await.unwrap(), vec![0, 1]);
            assert_eq!(log.append(vec![rec(2)]).await.unwrap(), vec![2]);
            let got = log.read(1, 10).await.unwrap();
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].offset, 1);
            assert_eq!(got[0].key, b"k1");
            assert_eq!(got[1].value, 2u32.to_be_bytes());
            assert!(log.read(3, 10).await.unwrap().is_empty());
        }
        let log = EmbeddedLog::open(open_database(dir.path()).unwrap()).unwrap();
        assert_eq!(*log.durable_end().borrow(), 3);
        assert_eq!(log.append(vec![rec(3)]).await.unwrap(), vec![3]);
        assert_eq!(log.read(0, 100).await.unwrap().len(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_get_dense_distinct_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(open_database(dir.path()).unwrap()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move { log.append(vec![rec(i)]).await }));
        }
        let mut offsets = Vec::new();
        for t in tasks {
            offsets.extend(t.await.unwrap().unwrap());
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..200).collect::<Vec<_>>());
        assert_eq!(*log.durable_end().borrow(), 200);
        // Group commit: 200 concurrent appends shared far fewer than 200 fsyncs.
        assert!(log.fsyncs() < 200, "fsyncs: {}", log.fsyncs());
    }

    #[tokio::test]
    async fn oversized_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(open_database(dir.path()).unwrap()).unwrap();
        let big = Record {
            key: vec![],
            value: vec![0; MAX_RECORD_BYTES],
        };
        assert!(matches!(
            log.append(vec![big]).await,
            Err(Error::RecordTooLarge { .. })
        ));
        assert_eq!(log.append(vec![rec(0)]).await.unwrap(), vec![0]);
    }
}
