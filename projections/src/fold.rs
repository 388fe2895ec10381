//! The fold: how each event changes the projected state.
//!
//! `apply` is a pure function of (state, event): it reads through a [`View`], writes into
//! the [`Tx`], and takes time only from the event.
//!
//! # Partitions
//! On a topic of several partitions each partition is folded on its own, so a fold reads
//! only state that its own partition's events wrote: everything about a device is in the
//! device's partition; a message has a status row per partition (`View::message`); an
//! app is checked only where its own events are. A multi-target event (a broadcast, a
//! recall, a push keyed away from its device) is folded in its own partition for the
//! devices there, and asks [`Tx::fan_out`] for a `FanOut` share in each other partition,
//! which that partition's fold applies to its own devices, once. On a one-partition log
//! every device is local and nothing fans out.

use herald_schemas::events::{Event, FanOut, Kind, To, fan_out};

use crate::StoreError;
use crate::digest::INBOX_TTL_GRACE_MS;
use crate::model::{App, Device, IdempotencyRecord, InboxEntry, MessageStatus, Payload, Presence};
use crate::view::{Tx, View, Withdrawn};

/// How many device ids a broadcast reads from the app's index at a time.
pub const BROADCAST_PAGE: usize = 1024;

/// Applies one event to the state in `tx`.
///
/// Errors are storage failures only; an event the fold must refuse increments
/// `tx.rejected` and changes nothing.
pub fn apply(tx: &mut Tx<'_>, event: &Event) -> Result<(), StoreError> {
    let ts = event.ts_ms;
    let accepted = match &event.kind {
        Some(Kind::AppCreated(e)) => {
            // Client ids are random and unique; the index of another partition's apps is
            // not read on a partitioned topic.
            if tx.app(&e.app_id)?.is_some()
                || (!tx.scope.is_partitioned() && tx.app_id_by_client(&e.client_id)?.is_some())
            {
                false
            } else {
                let w = &mut tx.writes;
                w.app_by_client
                    .insert(e.client_id.clone(), e.app_id.clone());
                w.app_by_key.insert(e.app_key.clone(), e.app_id.clone());
                w.apps.insert(
                    e.app_id.clone(),
                    App {
                        app_id: e.app_id.clone(),
                        name: e.name.clone(),
                        app_key: e.app_key.clone(),
                        client_id: e.client_id.clone(),
                        client_secret_sha256: e.client_secret_sha256.clone(),
                        created_ms: ts,
                        limits: Default::default(),
                    },
                );
                true
            }
        }
        Some(Kind::DeviceRegistered(e)) => {
            // The app is checked where its events are; ingest checked it before appending.
            if tx.device(&e.device_id)?.is_some()
                || (tx.scope.holds(&e.app_id) && tx.app(&e.app_id)?.is_none())
            {
                false
            } else {
                let counted = tx.app_device_count(&e.app_id, tx.scope.partition)?;
                let w = &mut tx.writes;
                w.app_device_counts.insert(e.app_id.clone(), counted + 1);
                w.app_devices
                    .insert((e.app_id.clone(), e.device_id.clone()));
                w.devices.insert(
                    e.device_id.clone(),
                    Device {
                        device_id: e.device_id.clone(),
                        app_id: e.app_id.clone(),
                        token_sha256: e.token_sha256.clone(),
                        platform: e.platform.clone(),
                        network: e.network.clone(),
                        registered_ms: ts,
                    },
                );
                true
            }
        }
        Some(Kind::PushAccepted(e)) => {
            counting_stored(tx, &e.app_id, |tx| apply_push(tx, ts, e, Origin::Home))?
        }
        Some(Kind::MessageRecalled(e)) => {
            // A unicast recalled in its device's partition has nothing elsewhere.
            let scope = tx.scope;
            let only_here = tx.local_message(&e.message_id)?.is_some_and(|m| {
                !m.broadcast && m.unicast_device.as_deref().is_some_and(|d| scope.holds(d))
            });
            if scope.is_partitioned() && !only_here {
                let shares = others(tx.scope);
                share(tx, ts, shares, |p| {
                    fan_out::Event::Recall(e.clone()).into_fan_out(p)
                });
            }
            apply_recall(tx, e)? || tx.scope.is_partitioned()
        }
        Some(Kind::FanOut(FanOut { partition, event })) if *partition == tx.scope.partition => {
            match event {
                Some(fan_out::Event::Push(e)) => {
                    counting_stored(tx, &e.app_id, |tx| apply_push(tx, ts, e, Origin::Share))?
                }
                Some(fan_out::Event::Recall(e)) => apply_recall(tx, e)?,
                None => false,
            }
        }
        // A share found in another partition than the one it names.
        Some(Kind::FanOut(_)) => false,
        // Navigation's soft state (which gateways are alive), not a projection.
        Some(Kind::GatewayHeartbeat(_)) => true,
        Some(Kind::AppLimitsSet(e)) => match tx.app(&e.app_id)? {
            Some(mut app) => {
                app.limits = limits_of(e.limits.unwrap_or_default());
                tx.writes.apps.insert(e.app_id.clone(), app);
                true
            }
            None => false,
        },
        Some(Kind::AppSecretRotated(e)) => match tx.app(&e.app_id)? {
            Some(mut app) => {
                app.client_secret_sha256 = e.client_secret_sha256.clone();
                tx.writes.apps.insert(e.app_id.clone(), app);
                true
            }
            None => false,
        },
        Some(Kind::DeviceConnected(e)) => {
            tx.writes.presence.insert(
                e.device_id.clone(),
                Presence {
                    connected: true,
                    gateway_id: e.gateway_id.clone(),
                    since_ms: ts,
                    keep_alive_s: e.keep_alive_s,
                },
            );
            true
        }
        Some(Kind::DeviceDisconnected(e)) => {
            // A disconnect from a gateway that no longer holds the device (it was taken
            // over elsewhere) must not mark the newer session gone.
            match tx.presence(&e.device_id)? {
                Some(p) if p.connected && p.gateway_id == e.gateway_id => {
                    tx.writes.presence.insert(
                        e.device_id.clone(),
                        Presence {
                            connected: false,
                            since_ms: ts,
                            ..p
                        },
                    );
                    true
                }
                _ => false,
            }
        }
        Some(Kind::DeviceAcked(e)) => match live_entry(tx, &e.device_id, e.seq, ts)? {
            Some(entry) if entry.message_id == e.message_id => {
                tx.writes.entries.insert((e.device_id.clone(), e.seq), None);
                if let Some(mut m) = tx.local_message(&e.message_id)? {
                    m.acked += 1;
                    tx.tally
                        .acked
                        .push((m.app_id.clone(), ts.saturating_sub(entry.ts_ms)));
                    // An entry in flight when its message was recalled can still be
                    // acknowledged: the device did get it.
                    if m.recalled && m.recalled_targets > 0 {
                        m.recalled_targets -= 1;
                    }
                    assert!(
                        m.acked + m.replaced + m.dropped + m.recalled_targets <= m.targeted,
                        "each target is counted once"
                    );
                    tx.writes.messages.insert(e.message_id.clone(), m);
                }
                true
            }
            // Duplicate ack, or an ack for an entry that was never there.
            _ => false,
        },
        Some(Kind::DeviceReceived(e)) => match live_entry(tx, &e.device_id, e.seq, ts)? {
            Some(mut entry) if entry.message_id == e.message_id && !entry.received => {
                entry.received = true;
                tx.writes
                    .entries
                    .insert((e.device_id.clone(), e.seq), Some(entry));
                true
            }
            _ => false,
        },
        None => false,
    };
    if !accepted {
        tx.rejected += 1;
    }
    Ok(())
}

/// Whether an event is folded where it was appended, or is a share of one from another
/// partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Home,
    Share,
}

/// Every partition but the one being folded.
fn others(scope: herald_schemas::partition::Scope) -> Vec<u32> {
    (0..scope.count).filter(|p| *p != scope.partition).collect()
}

/// Asks the worker for a share of the event at `ts` in each of `partitions`.
fn share(tx: &mut Tx<'_>, ts: u64, partitions: Vec<u32>, make: impl Fn(u32) -> FanOut) {
    for p in partitions {
        tx.fan_out.push((p, Event::new(ts, Kind::FanOut(make(p)))));
    }
}

trait IntoFanOut {
    fn into_fan_out(self, partition: u32) -> FanOut;
}

impl IntoFanOut for fan_out::Event {
    fn into_fan_out(self, partition: u32) -> FanOut {
        FanOut {
            partition,
            event: Some(self),
        }
    }
}

/// Recalls a message's entries in this partition. False if it has none here or is
/// recalled already.
fn apply_recall(
    tx: &mut Tx<'_>,
    e: &herald_schemas::events::MessageRecalled,
) -> Result<bool, StoreError> {
    match tx.local_message(&e.message_id)? {
        Some(mut m) if m.app_id == e.app_id && !m.recalled => {
            m.recalled = true;
            m.recalled_targets = m.outstanding();
            let device_id = if m.broadcast {
                None
            } else {
                m.unicast_device.clone()
            };
            tx.writes.messages.insert(e.message_id.clone(), m);
            // Entries stay in the inboxes and are skipped when read; gateways drop the
            // ones they hold.
            tx.withdrawn.push(Withdrawn {
                device_id,
                message_id: e.message_id.clone(),
            });
            Ok(true)
        }
        // On a partitioned topic a recall can reach a partition before the push's share
        // does (they come from different partitions' workers, and a worker that crashed
        // appends its shares again): it leaves a tombstone, so the share that comes later
        // is refused as a duplicate and the outcome depends only on which came first.
        None if tx.scope.is_partitioned() => {
            tx.writes.messages.insert(
                e.message_id.clone(),
                MessageStatus {
                    message_id: e.message_id.clone(),
                    app_id: e.app_id.clone(),
                    ts_ms: 0,
                    expires_at_ms: 0,
                    broadcast: false,
                    targeted: 0,
                    acked: 0,
                    recalled: true,
                    recalled_targets: 0,
                    replaced: 0,
                    dropped: 0,
                    unicast_device: None,
                },
            );
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Runs a push's fold and tallies the entries it created for `app_id`.
fn counting_stored(
    tx: &mut Tx<'_>,
    app_id: &str,
    fold: impl FnOnce(&mut Tx<'_>) -> Result<bool, StoreError>,
) -> Result<bool, StoreError> {
    let before = tx.new_entries.len();
    let accepted = fold(tx)?;
    let created = (tx.new_entries.len() - before) as u64;
    if created > 0 {
        tx.tally.stored.push((app_id.to_owned(), created));
    }
    Ok(accepted)
}

fn apply_push(
    tx: &mut Tx<'_>,
    ts: u64,
    e: &herald_schemas::events::PushAccepted,
    origin: Origin,
) -> Result<bool, StoreError> {
    // A share folded twice (its worker appended it again after a crash) is refused here.
    if tx.local_message(&e.message_id)?.is_some()
        || (tx.scope.holds(&e.app_id) && tx.app(&e.app_id)?.is_none())
    {
        return Ok(false);
    }
    let Some(payload) = &e.payload else {
        return Ok(false);
    };
    if origin == Origin::Home && !e.idempotency_key.is_empty() {
        // A retry that reached the log twice (two ingests, or a lost race) is the same
        // message: the first one in the log wins, the later one changes nothing.
        if let Some(rec) = tx.idempotency(&e.app_id, &e.idempotency_key, tx.scope.partition)?
            && rec.holds_at(ts)
        {
            return Ok(false);
        }
    }
    let expires_at_ms = ts.saturating_add(u64::from(e.ttl_s).saturating_mul(1000));
    let mut status = MessageStatus {
        message_id: e.message_id.clone(),
        app_id: e.app_id.clone(),
        ts_ms: ts,
        expires_at_ms,
        broadcast: false,
        targeted: 0,
        acked: 0,
        recalled: false,
        recalled_targets: 0,
        replaced: 0,
        dropped: 0,
        unicast_device: None,
    };
    let window = u64::from(e.max_inbox_entries);
    let entry_for = |seq| InboxEntry {
        seq,
        message_id: e.message_id.clone(),
        ts_ms: ts,
        expires_at_ms,
        received: false,
    };
    match e.target.as_ref().and_then(|t| t.to.as_ref()) {
        Some(To::DeviceId(device_id)) if !tx.scope.holds(device_id) => {
            // Keyed away from its device: the device's partition folds it.
            if origin == Origin::Share {
                return Ok(false);
            }
            let p = herald_schemas::partition::for_key(device_id.as_bytes(), tx.scope.count);
            share(tx, ts, vec![p], |p| {
                fan_out::Event::Push(e.clone()).into_fan_out(p)
            });
        }
        Some(To::DeviceId(device_id)) => {
            // Ingest checked ownership before accepting; the fold checks again because the
            // log is the authority and may hold events from elsewhere.
            match tx.device(device_id)? {
                Some(d) if d.app_id == e.app_id => {
                    put_entry(tx, ts, device_id, &e.collapse_key, window, &entry_for)?;
                    status.targeted = 1;
                    status.unicast_device = Some(device_id.clone());
                }
                _ => return Ok(false),
            }
        }
        Some(To::Broadcast(true)) => {
            status.broadcast = true;
            if origin == Origin::Home && tx.scope.is_partitioned() {
                let shares = others(tx.scope);
                share(tx, ts, shares, |p| {
                    fan_out::Event::Push(e.clone()).into_fan_out(p)
                });
            }
            let mut after: Option<String> = None;
            loop {
                let page = tx.app_devices(&e.app_id, after.as_deref(), BROADCAST_PAGE)?;
                // The app's index holds every partition's devices a store has folded.
                let scope = tx.scope;
                for device_id in page.iter().filter(|d| scope.holds(d)) {
                    put_entry(tx, ts, device_id, &e.collapse_key, window, &entry_for)?;
                    status.targeted += 1;
                }
                if page.len() < BROADCAST_PAGE {
                    break;
                }
                after = page.last().cloned();
            }
        }
        _ => return Ok(false),
    }
    tx.writes.payloads.insert(
        e.message_id.clone(),
        Payload {
            key_id: payload.key_id,
            nonce: payload.nonce.clone(),
            ciphertext: payload.ciphertext.clone(),
        },
    );
    tx.writes.messages.insert(e.message_id.clone(), status);
    if origin == Origin::Home && !e.idempotency_key.is_empty() {
        tx.writes.idempotency.insert(
            (e.app_id.clone(), e.idempotency_key.clone()),
            IdempotencyRecord {
                message_id: e.message_id.clone(),
                request_sha256: e.request_sha256.clone(),
                ts_ms: ts,
                window_s: e.idempotency_window_s,
            },
        );
    }
    Ok(true)
}

/// An inbox entry as a fold may see it at `ts_ms` (the event's time): an entry more than
/// [`INBOX_TTL_GRACE_MS`] past its expiry is gone, whether or not the store still holds
/// it (the CQL store lets such rows expire), so every store folds the same way.
fn live_entry(
    tx: &Tx<'_>,
    device_id: &str,
    seq: u64,
    ts_ms: u64,
) -> Result<Option<InboxEntry>, StoreError> {
    Ok(tx
        .inbox_entry(device_id, seq)?
        .filter(|e| e.expires_at_ms.saturating_add(INBOX_TTL_GRACE_MS) > ts_ms))
}

/// Puts the next entry of a device's inbox. With a collapse key, an older entry with the
/// same key that the device has not confirmed is removed and reported replaced.
/// Why an entry leaves a device's inbox before receipt.
#[derive(Clone, Copy)]
enum Loss {
    /// A newer push with the same collapse key took its place.
    Replaced,
    /// The inbox keeps only the app's limit of the newest entries.
    Dropped,
}

/// Takes the entry `seq` of `device_id` out of the inbox if it is still waiting (live,
/// unexpired, not received), counting it on its message as `loss`, and tells the
/// gateways to withdraw it.
fn take_back(
    tx: &mut Tx<'_>,
    ts: u64,
    device_id: &str,
    seq: u64,
    loss: Loss,
) -> Result<(), StoreError> {
    let Some(old) = live_entry(tx, device_id, seq, ts)? else {
        return Ok(());
    };
    if old.received || (matches!(loss, Loss::Dropped) && old.expires_at_ms <= ts) {
        // Received: the device has it. Expired: readers skip it already.
        return Ok(());
    }
    tx.writes.entries.insert((device_id.to_owned(), seq), None);
    // A recalled message's open targets are already counted as recalled.
    if let Some(mut m) = tx.local_message(&old.message_id)?
        && !m.recalled
    {
        match loss {
            Loss::Replaced => m.replaced += 1,
            Loss::Dropped => m.dropped += 1,
        }
        tx.writes.messages.insert(old.message_id.clone(), m);
    }
    tx.withdrawn.push(Withdrawn {
        device_id: Some(device_id.to_owned()),
        message_id: old.message_id,
    });
    Ok(())
}

/// Stores an entry for `device_id` with the next seq. A collapse key takes the place of
/// the device's last entry with that key; a `window` (the app's limit of entries waiting
/// per device; 0: none) drops the entry `window` seqs older if it is still waiting, so a
/// device's inbox holds at most its newest `window` entries. The device sees the gap in
/// its seqs; the dropped message's status counts it as `dropped`.
fn put_entry(
    tx: &mut Tx<'_>,
    ts: u64,
    device_id: &str,
    collapse_key: &str,
    window: u64,
    entry_for: &dyn Fn(u64) -> InboxEntry,
) -> Result<(), StoreError> {
    let mut head = tx.inbox_head(device_id)?;
    if window > 0
        && let Some(old_seq) = head.next_seq.checked_sub(window)
        && old_seq >= 1
    {
        take_back(tx, ts, device_id, old_seq, Loss::Dropped)?;
    }
    if !collapse_key.is_empty() {
        if let Some(old_seq) = tx.collapse(device_id, collapse_key)? {
            take_back(tx, ts, device_id, old_seq, Loss::Replaced)?;
        }
        tx.writes.collapse.insert(
            (device_id.to_owned(), collapse_key.to_owned()),
            head.next_seq,
        );
    }
    let seq = head.next_seq;
    assert!(seq >= 1, "inbox seqs start at 1");
    head.next_seq = seq + 1;
    tx.writes.heads.insert(device_id.to_owned(), head);
    tx.put_new_entry(device_id, entry_for(seq));
    Ok(())
}

/// The event's limits as the model keeps them: 0 is "the default".
fn limits_of(l: herald_schemas::events::AppLimits) -> crate::model::AppLimits {
    let set32 = |v: u32| (v > 0).then_some(v);
    crate::model::AppLimits {
        pushes_per_s: set32(l.pushes_per_s),
        broadcasts_per_min: set32(l.broadcasts_per_min),
        max_devices: (l.max_devices > 0).then_some(l.max_devices),
        max_data_bytes: set32(l.max_data_bytes),
        max_inbox_entries: set32(l.max_inbox_entries),
    }
}
