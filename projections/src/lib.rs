//! herald's projections: pure folds over the log's events, and the stores that keep
//! their state.
//!
//! # Layout
//! - [`model`]: the projected state (apps, devices, inbox entries, message status,
//!   presence).
//! - [`fold`]: `apply(tx, offset, event)`, the one place where events change state.
//! - [`view`]: the [`view::View`] a fold reads through, and [`view::Tx`], the overlay
//!   that collects a batch's writes so a store can commit them atomically with the
//!   checkpoint.
//! - [`memory`]: an in-memory store, used by tests to check replay == live.
//! - [`embedded`]: the fjall store `herald serve` uses.
//! - [`cql`] (feature `cql`): the store on ScyllaDB or Cassandra, shared by the delivery
//!   workers of a partitioned topic.
//! - [`settings`]: the CQL store's settings that configuration checks in every build.
//! - [`digest`]: store-independent digests of the projected state (`herald verify`).
//!
//! # Invariants
//! - Folds do no I/O, read no clock and draw no randomness: time arrives in events, and the
//!   same log always yields the same state. Input a fold must refuse (an ack for an entry
//!   that does not exist, a second registration of one id) is counted, never a panic.
//! - A device's inbox seqs are assigned by the fold, starting at 1, strictly increasing
//!   and dense.
//! - A store commits a batch's writes and the checkpoint (the next log offset to apply)
//!   so that after a crash the state matches its checkpoint exactly once the partition is
//!   taken again: in one atomic write (embedded), or by a redo journal that the next
//!   writer finishes (CQL).

#[cfg(feature = "cql")]
pub mod cql;
pub mod digest;
pub mod embedded;
pub mod fold;
pub mod memory;
pub mod model;
pub mod settings;
pub mod view;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The storage engine failed.
    #[error("projection store failed: {0}")]
    Storage(String),
    /// The store cannot be reached just now (a CQL server stopped, timed out or
    /// overloaded): the caller may retry, and the API answers 503.
    #[error("projection store unavailable: {0}")]
    Unavailable(String),
    /// Another worker took this partition over since this one claimed it: its commits
    /// are refused, and it must stop folding the partition.
    #[error("partition {partition} was taken over by another worker")]
    Fenced {
        /// The partition.
        partition: u32,
    },
    /// A stored value could not be decoded: the store is corrupt or from a newer herald.
    #[error("corrupt projection record in {keyspace}: {reason}")]
    Corrupt {
        /// Which keyspace.
        keyspace: &'static str,
        /// What was wrong.
        reason: String,
    },
}
