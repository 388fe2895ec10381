//! What the projection tests share: operations that become events (arbitrary ones for
//! proptest, or a fixed mix), and live runs of them, batched or partitioned.

#![allow(clippy::unwrap_used, missing_docs, dead_code)]

use herald_projections::fold::apply;
use herald_projections::view::{Store, Tx};
use herald_schemas::events::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
pub enum Op {
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
    Limits(u8, u8),
}

pub fn op() -> impl Strategy<Value = Op> {
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
        (0..3u8, 0..4u8).prop_map(|(a, l)| Op::Limits(a, l)),
    ]
}

pub fn event(i: usize, op: &Op) -> Event {
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
            // Small inbox windows (0: none), so folds drop old entries too.
            max_inbox_entries: u32::from(*c) * 2,
        }),
        // Limits with some fields left to the default (0).
        Op::Limits(a, l) => Kind::AppLimitsSet(AppLimitsSet {
            app_id: format!("a{a}"),
            limits: Some(AppLimits {
                pushes_per_s: u32::from(*l) * 10,
                max_devices: u64::from(*l % 2),
                ..Default::default()
            }),
        }),
    };
    Event::new(ts, kind)
}

pub fn run_batched(store: &dyn Store, events: &[Event], cuts: &[usize]) {
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
pub fn key_of(ev: &Event, away: bool) -> String {
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
        Kind::AppSecretRotated(e) => e.app_id.clone(),
        Kind::AppLimitsSet(e) => e.app_id.clone(),
        Kind::FanOut(_) => unreachable!("appended by the worker"),
    }
}

/// A live run on a topic of `n` partitions: every event appended to its key's partition
/// (`key_of(_, away)`),
/// then the partitions folded in batches in the order `schedule` picks, each batch's
/// shares (`Tx::fan_out`) appended to their partitions before the batch commits (twice
/// when `twice`: a worker that crashed between appending and committing). Returns the
/// partitions' logs as they ended.
pub fn run_partitioned(
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

/// `n` operations of every kind from a seed (xorshift), for tests that fold one fixed
/// history rather than many arbitrary ones: the first few create the apps and devices
/// that the rest push to.
pub fn mixed_ops(mut seed: u64, n: usize) -> Vec<Op> {
    let mut next = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % below) as u8
    };
    let mut ops: Vec<Op> = (0..3).map(Op::App).collect();
    ops.extend((0..6).map(|d| Op::Device(d, d % 3)));
    while ops.len() < n {
        ops.push(match next(10) {
            0 | 1 => Op::Push(next(3), next(6), next(50)),
            2 => Op::Broadcast(next(3), next(50)),
            3 | 4 => Op::Ack(next(6), next(8).max(1), next(50)),
            5 => Op::Connect(next(6), next(2)),
            6 => Op::Disconnect(next(6), next(2)),
            7 => Op::Recall(next(3), next(50)),
            8 => Op::Received(next(6), next(8).max(1), next(50)),
            _ => Op::Keyed(next(3), next(6), next(50), next(3), next(3)),
        });
    }
    ops
}
