//! The fold: how each event changes the projected state.
//!
//! `apply` is a pure function of (state, event): it reads through a [`View`], writes into
//! the [`Tx`], and takes time only from the event.

use herald_schemas::events::{Event, Kind, To};

use crate::StoreError;
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
            if tx.app(&e.app_id)?.is_some() || tx.app_id_by_client(&e.client_id)?.is_some() {
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
                    },
                );
                true
            }
        }
        Some(Kind::DeviceRegistered(e)) => {
            if tx.device(&e.device_id)?.is_some() || tx.app(&e.app_id)?.is_none() {
                false
            } else {
                let w = &mut tx.writes;
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
        Some(Kind::PushAccepted(e)) => apply_push(tx, ts, e)?,
        // Navigation's soft state (which gateways are alive), not a projection.
        Some(Kind::GatewayHeartbeat(_)) => true,
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
        Some(Kind::DeviceAcked(e)) => match tx.inbox_entry(&e.device_id, e.seq)? {
            Some(entry) if entry.message_id == e.message_id => {
                tx.writes.entries.insert((e.device_id.clone(), e.seq), None);
                if let Some(mut m) = tx.message(&e.message_id)? {
                    m.acked += 1;
                    // An entry in flight when its message was recalled can still be
                    // acknowledged: the device did get it.
                    if m.recalled && m.recalled_targets > 0 {
                        m.recalled_targets -= 1;
                    }
                    assert!(
                        m.acked + m.replaced + m.recalled_targets <= m.targeted,
                        "each target is counted once"
                    );
                    tx.writes.messages.insert(e.message_id.clone(), m);
                }
                true
            }
            // Duplicate ack, or an ack for an entry that was never there.
            _ => false,
        },
        Some(Kind::DeviceReceived(e)) => match tx.inbox_entry(&e.device_id, e.seq)? {
            Some(mut entry) if entry.message_id == e.message_id && !entry.received => {
                entry.received = true;
                tx.writes
                    .entries
                    .insert((e.device_id.clone(), e.seq), Some(entry));
                true
            }
            _ => false,
        },
        Some(Kind::MessageRecalled(e)) => match tx.message(&e.message_id)? {
            Some(mut m) if m.app_id == e.app_id && !m.recalled => {
                m.recalled = true;
                m.recalled_targets = m.outstanding();
                let device_id = if m.broadcast {
                    None
                } else {
                    m.unicast_device.clone()
                };
                tx.writes.messages.insert(e.message_id.clone(), m);
                // Entries stay in the inboxes and are skipped when read; gateways drop
                // the ones they hold.
                tx.withdrawn.push(Withdrawn {
                    device_id,
                    message_id: e.message_id.clone(),
                });
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

fn apply_push(
    tx: &mut Tx<'_>,
    ts: u64,
    e: &herald_schemas::events::PushAccepted,
) -> Result<bool, StoreError> {
    if tx.message(&e.message_id)?.is_some() || tx.app(&e.app_id)?.is_none() {
        return Ok(false);
    }
    let Some(payload) = &e.payload else {
        return Ok(false);
    };
    if !e.idempotency_key.is_empty() {
        // A retry that reached the log twice (two ingests, or a lost race) is the same
        // message: the first one in the log wins, the later one changes nothing.
        if let Some(rec) = tx.idempotency(&e.app_id, &e.idempotency_key)?
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
        unicast_device: None,
    };
    let entry_for = |seq| InboxEntry {
        seq,
        message_id: e.message_id.clone(),
        ts_ms: ts,
        expires_at_ms,
        received: false,
    };
    match e.target.as_ref().and_then(|t| t.to.as_ref()) {
        Some(To::DeviceId(device_id)) => {
            // Ingest checked ownership before accepting; the fold checks again because the
            // log is the authority and may hold events from elsewhere.
            match tx.device(device_id)? {
                Some(d) if d.app_id == e.app_id => {
                    put_entry(tx, device_id, &e.collapse_key, &entry_for)?;
                    status.targeted = 1;
                    status.unicast_device = Some(device_id.clone());
                }
                _ => return Ok(false),
            }
        }
        Some(To::Broadcast(true)) => {
            status.broadcast = true;
            let mut after: Option<String> = None;
            loop {
                let page = tx.app_devices(&e.app_id, after.as_deref(), BROADCAST_PAGE)?;
                for device_id in &page {
                    put_entry(tx, device_id, &e.collapse_key, &entry_for)?;
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
    if !e.idempotency_key.is_empty() {
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

/// Puts the next entry of a device's inbox. With a collapse key, an older entry with the
/// same key that the device has not confirmed is removed and reported replaced.
fn put_entry(
    tx: &mut Tx<'_>,
    device_id: &str,
    collapse_key: &str,
    entry_for: &dyn Fn(u64) -> InboxEntry,
) -> Result<(), StoreError> {
    let mut head = tx.inbox_head(device_id)?;
    if !collapse_key.is_empty() {
        if let Some(old_seq) = tx.collapse(device_id, collapse_key)?
            && let Some(old) = tx.inbox_entry(device_id, old_seq)?
            && !old.received
        {
            tx.writes
                .entries
                .insert((device_id.to_owned(), old_seq), None);
            // A recalled message's open targets are already counted as recalled.
            if let Some(mut m) = tx.message(&old.message_id)?
                && !m.recalled
            {
                m.replaced += 1;
                tx.writes.messages.insert(old.message_id.clone(), m);
            }
            tx.withdrawn.push(Withdrawn {
                device_id: Some(device_id.to_owned()),
                message_id: old.message_id,
            });
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
