//! Replay == live: the same events give the same state however they are batched, and the
//! embedded store ends up equal to the in-memory reference.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{event, op, run_batched, run_partitioned};
use herald_projections::embedded::EmbeddedStore;
use herald_projections::fold::apply;
use herald_projections::memory::MemStore;
use herald_projections::view::{Store, Tx};
use herald_schemas::events::*;
use proptest::prelude::*;

/// Replays complete partition logs, one partition after another; the shares the folds
/// ask for again are appended and folded too, and must change nothing.
fn replay_partitions(store: &dyn Store, mut logs: Vec<Vec<Event>>) {
    let n = logs.len() as u32;
    for p in 0..n {
        let mut tx = Tx::scoped(
            store,
            herald_schemas::partition::Scope {
                partition: p,
                count: n,
            },
        );
        for ev in &logs[p as usize] {
            apply(&mut tx, ev).unwrap();
        }
        for (to, ev) in std::mem::take(&mut tx.fan_out) {
            logs[to as usize].push(ev);
        }
        store
            .commit(&tx.writes, p, logs[p as usize].len() as u64)
            .unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// On a partitioned topic the folds stay exact: replaying the partitions' logs as
    /// they ended (from scratch, in another order and batching, with every share asked
    /// for again) gives the state the live run had, shares appended twice change
    /// nothing, and per-device seqs stay dense.
    #[test]
    fn partitioned_folds_replay_exactly(
        ops in prop::collection::vec(op(), 0..80),
        schedule in prop::collection::vec((any::<u8>(), any::<u8>()), 0..60),
        n in 2..5u32,
        twice in any::<bool>(),
    ) {
        let events: Vec<Event> = ops.iter().enumerate().map(|(i, o)| event(i, o)).collect();
        let live = MemStore::default();
        let logs = run_partitioned(&live, &events, n, &schedule, twice, true);
        let replayed = MemStore::default();
        replay_partitions(&replayed, logs);
        let (mut a, mut b) = (live.snapshot(), replayed.snapshot());
        a.checkpoints.clear();
        b.checkpoints.clear();
        prop_assert_eq!(&a, &b);
        for (device, seq) in a.entries.keys() {
            prop_assert!(*seq >= 1 && *seq < a.heads[device].next_seq);
        }
        // Every entry's message has a status row in the entry's partition.
        for ((device, _), e) in &a.entries {
            let p = herald_schemas::partition::for_key(device.as_bytes(), n);
            prop_assert!(a.messages.contains_key(&(e.message_id.clone(), p)));
        }

        let dir = tempfile::tempdir().unwrap();
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let emb = EmbeddedStore::open(db, "").unwrap();
        run_partitioned(&emb, &events, n, &schedule, twice, true);
        prop_assert_eq!(emb.to_mem_state().unwrap(), live.snapshot());
    }

    /// A unicast push reaches the same devices however many partitions the topic has.
    #[test]
    fn unicast_targets_do_not_depend_on_partitions(
        ops in prop::collection::vec(op(), 0..80),
        n in 2..5u32,
    ) {
        let events: Vec<Event> = ops.iter().enumerate().map(|(i, o)| event(i, o)).collect();
        // Only what ingest would append: devices of apps that exist, pushes to devices
        // of the pushing app, each with a message id of its own, and no second push with
        // an Idempotency-Key already used (ingest answers it from the first). Two ingests
        // racing with one key for devices in different partitions are the case this
        // leaves out (ARCHITECTURE, "Departures").
        let mut apps = std::collections::BTreeSet::new();
        let mut devices = std::collections::BTreeMap::new();
        let mut message_ids = std::collections::BTreeSet::new();
        let mut keys = std::collections::BTreeSet::new();
        let unicast_only: Vec<Event> = events
            .into_iter()
            .filter(|e| match e.kind.as_ref().unwrap() {
                Kind::PushAccepted(p) => match p.target.as_ref().and_then(|t| t.to.as_ref()) {
                    Some(To::DeviceId(d)) => {
                        devices.get(d) == Some(&p.app_id)
                            && message_ids.insert(p.message_id.clone())
                            && (p.idempotency_key.is_empty()
                                || keys.insert((p.app_id.clone(), p.idempotency_key.clone())))
                    }
                    _ => false,
                },
                Kind::AppCreated(a) => apps.insert(a.app_id.clone()),
                Kind::DeviceRegistered(d) => {
                    apps.contains(&d.app_id)
                        && devices.insert(d.device_id.clone(), d.app_id.clone()).is_none()
                }
                _ => false,
            })
            .collect();
        let one = MemStore::default();
        run_batched(&one, &unicast_only, &[]);
        let many = MemStore::default();
        // Keyed as ingest keys them: a unicast by its device, so that it keeps its order
        // with the device's other pushes (collapse keys depend on that order).
        run_partitioned(&many, &unicast_only, n, &[], false, false);
        let targets = |s: &herald_projections::memory::MemState| {
            s.entries
                .iter()
                .map(|((d, _), e)| (d.clone(), e.message_id.clone()))
                .collect::<std::collections::BTreeSet<_>>()
        };
        prop_assert_eq!(targets(&one.snapshot()), targets(&many.snapshot()));
    }

    #[test]
    fn batching_does_not_change_state(ops in prop::collection::vec(op(), 0..80), cuts in prop::collection::vec(any::<usize>(), 0..10)) {
        let events: Vec<Event> = ops.iter().enumerate().map(|(i, o)| event(i, o)).collect();
        let one = MemStore::default();
        run_batched(&one, &events, &[]);
        let many = MemStore::default();
        run_batched(&many, &events, &cuts);
        prop_assert_eq!(one.snapshot(), many.snapshot());

        let dir = tempfile::tempdir().unwrap();
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let emb = EmbeddedStore::open(db, "").unwrap();
        run_batched(&emb, &events, &cuts);
        prop_assert_eq!(emb.to_mem_state().unwrap(), one.snapshot());

        // Per-device seqs are dense from 1: the head is one past the highest seq given.
        let s = one.snapshot();
        for (device, seq) in s.entries.keys() {
            prop_assert!(*seq >= 1 && *seq < s.heads[device].next_seq);
        }
    }
}
