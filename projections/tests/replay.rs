//! Replay == live: the same events give the same state however they are batched, and the
//! embedded store ends up equal to the in-memory reference.

#![allow(clippy::unwrap_used, missing_docs)]

use herald_projections::embedded::EmbeddedStore;
use herald_projections::fold::apply;
use herald_projections::memory::MemStore;
use herald_projections::view::{Store, Tx};
use herald_schemas::events::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    App(u8),
    Device(u8, u8),
    Push(u8, u8, u8),
    Broadcast(u8, u8),
    Ack(u8, u8, u8),
    Connect(u8, u8),
    Disconnect(u8, u8),
    Recall(u8, u8),
    Received(u8, u8, u8),
    Keyed(u8, u8, u8, u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3u8).prop_map(Op::App),
        (0..6u8, 0..3u8).prop_map(|(d, a)| Op::Device(d, a)),
        (0..3u8, 0..6u8, 0..50u8).prop_map(|(a, d, m)| Op::Push(a, d, m)),
        (0..3u8, 0..50u8).prop_map(|(a, m)| Op::Broadcast(a, m)),
        (0..6u8, 1..8u8, 0..50u8).prop_map(|(d, s, m)| Op::Ack(d, s, m)),
        (0..6u8, 0..2u8).prop_map(|(d, g)| Op::Connect(d, g)),
        (0..6u8, 0..2u8).prop_map(|(d, g)| Op::Disconnect(d, g)),
        (0..3u8, 0..50u8).prop_map(|(a, m)| Op::Recall(a, m)),
        (0..6u8, 1..8u8, 0..50u8).prop_map(|(d, s, m)| Op::Received(d, s, m)),
        (0..3u8, 0..6u8, 0..50u8, 0..3u8, 0..3u8)
            .prop_map(|(a, d, m, k, c)| Op::Keyed(a, d, m, k, c)),
    ]
}

fn event(i: usize, op: &Op) -> Event {
    // One second apart: idempotency windows (20 s) open and close within a run.
    let ts = 1_000 + 1_000 * i as u64;
    let kind = match op {
        Op::App(a) => Kind::AppCreated(AppCreated {
            app_id: format!("a{a}"),
            name: "n".into(),
            app_key: format!("k{a}"),
            client_id: format!("c{a}"),
            client_secret_sha256: vec![*a],
        }),
        Op::Device(d, a) => Kind::DeviceRegistered(DeviceRegistered {
            device_id: format!("d{d}"),
            app_id: format!("a{a}"),
            token_sha256: vec![*d],
            platform: "p".into(),
            network: "wifi".into(),
        }),
        Op::Push(a, d, m) | Op::Broadcast(a, m @ d) => Kind::PushAccepted(PushAccepted {
            message_id: format!("m{m}"),
            app_id: format!("a{a}"),
            target: Some(Target {
                to: Some(if matches!(op, Op::Push(..)) {
                    To::DeviceId(format!("d{d}"))
                } else {
                    To::Broadcast(true)
                }),
            }),
            payload: Some(SealedPayload {
                key_id: 1,
                nonce: vec![0; 12],
                ciphertext: vec![*m],
            }),
            ttl_s: 60,
            priority: 0,
            collapse_key: String::new(),
            ..Default::default()
        }),
        Op::Ack(d, s, m) => Kind::DeviceAcked(DeviceAcked {
            device_id: format!("d{d}"),
            seq: u64::from(*s),
            message_id: format!("m{m}"),
            gateway_id: "g".into(),
        }),
        Op::Connect(d, g) => Kind::DeviceConnected(DeviceConnected {
            device_id: format!("d{d}"),
            gateway_id: format!("g{g}"),
            keep_alive_s: 60,
        }),
        Op::Disconnect(d, g) => Kind::DeviceDisconnected(DeviceDisconnected {
            device_id: format!("d{d}"),
            gateway_id: format!("g{g}"),
            reason: "r".into(),
        }),
        Op::Recall(a, m) => Kind::MessageRecalled(MessageRecalled {
            message_id: format!("m{m}"),
            app_id: format!("a{a}"),
        }),
        Op::Received(d, s, m) => Kind::DeviceReceived(DeviceReceived {
            device_id: format!("d{d}"),
            seq: u64::from(*s),
            message_id: format!("m{m}"),
            gateway_id: "g".into(),
        }),
        // An idempotent push with a collapse key; message ids of these start at 100.
        Op::Keyed(a, d, m, k, c) => Kind::PushAccepted(PushAccepted {
            message_id: format!("m{}", 100 + u32::from(*m)),
            app_id: format!("a{a}"),
            target: Some(Target {
                to: Some(To::DeviceId(format!("d{d}"))),
            }),
            payload: Some(SealedPayload {
                key_id: 1,
                nonce: vec![0; 12],
                ciphertext: vec![*m],
            }),
            ttl_s: 60,
            priority: 0,
            collapse_key: if *c == 0 {
                String::new()
            } else {
                format!("c{c}")
            },
            idempotency_key: format!("k{k}"),
            request_sha256: vec![*m],
            idempotency_window_s: 20,
        }),
    };
    Event::new(ts, kind)
}

fn run_batched(store: &dyn Store, events: &[Event], cuts: &[usize]) {
    let mut start = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (events.len() + 1)).collect();
    bounds.push(events.len());
    bounds.sort_unstable();
    for end in bounds {
        if end < start {
            continue;
        }
        let mut tx = Tx::new(store);
        for ev in &events[start..end] {
            apply(&mut tx, ev).unwrap();
        }
        let writes = tx.writes;
        store.commit(&writes, 0, end as u64).unwrap();
        start = end;
    }
}

/// The record key each event is appended with (as ingest and the gateways key them):
/// everything about a device by the device, an app by the app, a broadcast and a recall
/// by the message. With `away`, the idempotent pushes are keyed by their Idempotency-Key
/// instead (ingest keys only broadcasts so), to cover a unicast keyed away from its
/// device.
fn key_of(ev: &Event, away: bool) -> String {
    match ev.kind.as_ref().unwrap() {
        Kind::AppCreated(e) => e.app_id.clone(),
        Kind::DeviceRegistered(e) => e.device_id.clone(),
        Kind::PushAccepted(e) if away && !e.idempotency_key.is_empty() => {
            format!("{}:{}", e.app_id, e.idempotency_key)
        }
        Kind::PushAccepted(e) => match e.target.as_ref().and_then(|t| t.to.as_ref()) {
            Some(To::DeviceId(d)) => d.clone(),
            _ => e.message_id.clone(),
        },
        Kind::DeviceAcked(e) => e.device_id.clone(),
        Kind::DeviceReceived(e) => e.device_id.clone(),
        Kind::DeviceConnected(e) => e.device_id.clone(),
        Kind::DeviceDisconnected(e) => e.device_id.clone(),
        Kind::MessageRecalled(e) => e.message_id.clone(),
        Kind::GatewayHeartbeat(e) => e.gateway_id.clone(),
        Kind::FanOut(_) => unreachable!("appended by the worker"),
    }
}

/// A live run on a topic of `n` partitions: every event appended to its key's partition
/// (`key_of(_, away)`),
/// then the partitions folded in batches in the order `schedule` picks, each batch's
/// shares (`Tx::fan_out`) appended to their partitions before the batch commits (twice
/// when `twice`: a worker that crashed between appending and committing). Returns the
/// partitions' logs as they ended.
fn run_partitioned(
    store: &dyn Store,
    events: &[Event],
    n: u32,
    schedule: &[(u8, u8)],
    twice: bool,
    away: bool,
) -> Vec<Vec<Event>> {
    let mut logs: Vec<Vec<Event>> = vec![Vec::new(); n as usize];
    for ev in events {
        let p = herald_schemas::partition::for_key(key_of(ev, away).as_bytes(), n);
        logs[p as usize].push(ev.clone());
    }
    let mut pos = vec![0usize; n as usize];
    let mut turns = schedule
        .iter()
        .copied()
        .chain((0..).map(|i| ((i % n) as u8, 255)));
    while pos.iter().zip(&logs).any(|(p, l)| *p < l.len()) {
        let (p, size) = turns.next().unwrap();
        let p = u32::from(p) % n;
        let from = pos[p as usize];
        let end = (from + usize::from(size) % 7 + 1).min(logs[p as usize].len());
        let mut tx = Tx::scoped(
            store,
            herald_schemas::partition::Scope {
                partition: p,
                count: n,
            },
        );
        for ev in &logs[p as usize][from..end] {
            apply(&mut tx, ev).unwrap();
        }
        for (to, ev) in std::mem::take(&mut tx.fan_out) {
            assert_ne!(to, p, "a share is for another partition");
            logs[to as usize].push(ev.clone());
            if twice {
                logs[to as usize].push(ev);
            }
        }
        store.commit(&tx.writes, p, end as u64).unwrap();
        pos[p as usize] = end;
    }
    logs
}

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
