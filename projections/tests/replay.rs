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
        store.commit(&writes, end as u64).unwrap();
        start = end;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
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
