//! herald's event log: the [`EventLog`] trait and its embedded backend.
//!
//! The log is the system of record. Every push, registration, connection and ack is an
//! immutable record in it; everything else (inboxes, the device registry, message status)
//! is a projection that can be rebuilt by replaying it.
//!
//! # Layout
//! - [`EventLog`]: the API boundary every role codes against (an append that resolves only
//!   once the records are durable, reads from an offset, and a watch on the durable end).
//! - [`embedded`]: the single-binary backend: checksummed segment files, group commit.
//! - `kafka` (feature `kafka`): the log as one Kafka topic partitioned by key, an
//!   idempotent `acks=all` producer and consumer-group members.
//!
//! # Invariants
//! - Offsets are dense and strictly increasing; an append's records get consecutive offsets
//!   in the order given.
//! - A reader never sees a record before it is durable: reads stop at the durable end.
//! - A failed fsync poisons the log. It never retries, because after a failed fsync the
//!   kernel may have dropped the dirty pages, and a retry that "succeeds" would lie.

pub mod embedded;
#[cfg(feature = "kafka")]
pub mod kafka;

use futures::future::BoxFuture;
use tokio::sync::watch;

/// The position of a record in the log. The first record has offset 0.
pub type Offset = u64;

/// One record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The partition key: everything about one device uses the device id, so that it
    /// stays in one partition, in order, on a partitioned backend.
    pub key: Vec<u8>,
    /// The encoded event.
    pub value: Vec<u8>,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its position.
    pub offset: Offset,
    /// Its partition key.
    pub key: Vec<u8>,
    /// The encoded event.
    pub value: Vec<u8>,
}

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The storage engine failed. Appends after this fail with [`Error::Poisoned`].
    #[error("event log storage failed: {0}")]
    Storage(String),
    /// An earlier write or fsync failed; the log accepts nothing more until restarted,
    /// when recovery decides what was durable.
    #[error("event log is poisoned by an earlier storage failure; restart to recover")]
    Poisoned,
    /// The log is shutting down.
    #[error("event log is closed")]
    Closed,
    /// The log's servers did not answer or acknowledge in time (Kafka). Unlike a local
    /// failure this does not poison the log; an append that failed this way may or may
    /// not have been written.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    /// A record is larger than the log accepts.
    #[error("record of {size} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge {
        /// The record's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A resource the log needed before writing anything could not be had (a file
    /// descriptor to start a segment, disk space for the records). Nothing was written
    /// and the log is not poisoned: appends succeed again once the resource is back.
    #[error("event log cannot take appends now: {0}; nothing was written")]
    Exhausted(String),
    /// A stored record failed its checksum or offset check: the log is corrupt.
    #[error("the event log is corrupt at offset {offset}: {reason}")]
    Corrupt {
        /// The offset of the first damaged record.
        offset: Offset,
        /// What was wrong, and where in which file.
        reason: String,
    },
}

/// Whether the log can take appends, for health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Appends succeed.
    Ok,
    /// The last append was refused for a reason that passes by itself (a resource the
    /// log lacked, brokers out of reach); the next may succeed.
    Degraded(String),
    /// The log accepts nothing until the process restarts (a failed write or fsync
    /// poisoned it).
    Failed(String),
}

impl Health {
    /// The worse of two.
    pub fn worst(self, other: Health) -> Health {
        match (self, other) {
            (f @ Health::Failed(_), _) | (_, f @ Health::Failed(_)) => f,
            (d @ Health::Degraded(_), _) | (_, d @ Health::Degraded(_)) => d,
            _ => Health::Ok,
        }
    }
}

/// Appending to the log: all a writer needs (ingest, a gateway). A gateway in its own
/// process appends through the link, which a delivery worker turns into log appends.
pub trait Append: Send + Sync + 'static {
    /// Appends `records` and resolves with their offsets once they are durable (fsync'd
    /// for the embedded backend). Concurrent appends share one fsync.
    fn append(&self, records: Vec<Record>) -> BoxFuture<'static, Result<Vec<Offset>, Error>>;
}

/// The event log. An API boundary: every backend (embedded, Kafka) implements it, and
/// every role reaches the log only through it.
pub trait EventLog: Append {
    /// Reads up to `max` durable records starting at `from`. Returns fewer (possibly none)
    /// when the durable end is reached.
    fn read(&self, from: Offset, max: usize) -> BoxFuture<'_, Result<Vec<Stored>, Error>>;

    /// The durable end: the offset the next record will get. Changes whenever an append
    /// becomes durable, so followers can wait on it to tail the log.
    fn durable_end(&self) -> watch::Receiver<Offset>;

    /// Whether appends succeed now, as far as the log knows without trying one.
    fn health(&self) -> Health {
        Health::Ok
    }
}

/// The log as a topic of partitions, each an [`EventLog`] with offsets of its own.
/// Records are routed by key with [`herald_schemas::partition::for_key`], the Java Kafka
/// client's partitioner, so every role agrees where a key lives. The embedded log, and
/// `herald serve` on Kafka, are a topic of one partition.
#[derive(Clone)]
pub struct Partitions {
    logs: Vec<std::sync::Arc<dyn EventLog>>,
}

impl Partitions {
    /// A topic of the one partition `log`.
    pub fn single(log: std::sync::Arc<dyn EventLog>) -> Self {
        Partitions { logs: vec![log] }
    }

    /// A topic whose partition `i` is `logs[i]`.
    ///
    /// # Panics
    /// If `logs` is empty.
    pub fn new(logs: Vec<std::sync::Arc<dyn EventLog>>) -> Self {
        assert!(!logs.is_empty(), "a topic has at least one partition");
        Partitions { logs }
    }

    /// How many partitions.
    pub fn count(&self) -> u32 {
        u32::try_from(self.logs.len()).unwrap_or(u32::MAX)
    }

    /// The partition records keyed `key` go to.
    pub fn of(&self, key: &[u8]) -> u32 {
        herald_schemas::partition::for_key(key, self.count())
    }

    /// Partition `p`.
    ///
    /// # Panics
    /// If there is no partition `p`.
    pub fn get(&self, p: u32) -> &std::sync::Arc<dyn EventLog> {
        &self.logs[p as usize]
    }

    /// Every partition, in order.
    pub fn all(&self) -> &[std::sync::Arc<dyn EventLog>] {
        &self.logs
    }

    /// The worst health of any partition.
    pub fn health(&self) -> Health {
        self.logs
            .iter()
            .fold(Health::Ok, |h, log| h.worst(log.health()))
    }
}

impl Append for Partitions {
    /// Appends each record to its key's partition (records of one partition in one
    /// append, the partitions concurrently) and resolves with each record's offset in its
    /// partition once all are durable.
    fn append(&self, records: Vec<Record>) -> BoxFuture<'static, Result<Vec<Offset>, Error>> {
        if self.logs.len() == 1 {
            return self.logs[0].append(records);
        }
        let n = records.len();
        let mut groups: std::collections::BTreeMap<u32, (Vec<usize>, Vec<Record>)> =
            std::collections::BTreeMap::new();
        for (i, r) in records.into_iter().enumerate() {
            let g = groups.entry(self.of(&r.key)).or_default();
            g.0.push(i);
            g.1.push(r);
        }
        let pending: Vec<_> = groups
            .into_iter()
            .map(|(p, (index, records))| (index, self.logs[p as usize].append(records)))
            .collect();
        Box::pin(async move {
            let mut out = vec![0; n];
            let (indexes, futures): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
            for (index, offsets) in indexes
                .into_iter()
                .zip(futures::future::join_all(futures).await)
            {
                for (i, o) in index.into_iter().zip(offsets?) {
                    out[i] = o;
                }
            }
            Ok(out)
        })
    }
}
