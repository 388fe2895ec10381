//! Writes a realistic event log straight into a data dir, for `bench/replay.sh`: one app,
//! a thousand registered devices, then pushes with sealed 100-byte payloads, acks,
//! connections and disconnections, appended in batches of the log's group-commit size.
//!
//! Usage: `cargo run --release -p herald-ingest --example gen_log -- DATA_DIR [EVENTS]`
//! (default 1,000,000 events). DATA_DIR must not hold a log yet. The payload key is
//! written to `DATA_DIR/payload.key`, so `herald replay --decrypt` can open the payloads.
//!
//! Nonces are drawn from a counter, not the OS RNG: unique per key, which is all AES-GCM
//! needs, and the same log every run.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Instant;

use base64::Engine;
use herald_eventlog::embedded::{EmbeddedLog, MAX_BATCH_RECORDS};
use herald_eventlog::{Append, EventLog, Record};
use herald_schemas::events::{
    self, AppCreated, DeviceAcked, DeviceConnected, DeviceDisconnected, DeviceRegistered, Event,
    Kind, PushAccepted, Target, To,
};
use herald_schemas::seal::{KEY_BYTES, Keyring};

const DEVICES: u64 = 1000;
const APP_ID: &str = "0190c0de-0000-7000-8000-000000000001";
/// Start of the generated timeline: 2024-05-01T12:00:00Z.
const START_MS: u64 = 1_714_564_800_000;

fn device_id(i: u64) -> String {
    format!("00000000-0000-4000-8000-{:012}", i % DEVICES)
}

fn message_id(i: u64) -> String {
    format!("0190c0de-{:04x}-7000-8000-{:012x}", (i >> 48) & 0xffff, i)
}

/// The `i`-th event after the app and its devices, in rounds of ten: five pushes to five
/// devices, acks of the first three of them, and a connection and a disconnection.
fn event(i: u64, keyring: &Keyring) -> (String, Event) {
    let ts_ms = START_MS + DEVICES + 1 + i;
    let (round, slot) = (i / 10, i % 10);
    // An ack's device is the device of the push it acknowledges (slot - 5).
    let device = device_id(round * 5 + slot % 5);
    let kind = match slot {
        0..=4 => {
            let id = message_id(i);
            // About 100 bytes of JSON, as an app would send.
            let data = format!(
                r#"{{"title":"Order {i:08} shipped","body":"Your parcel is on its way.","n":{}}}"#,
                i % 97
            );
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&i.to_be_bytes());
            let payload = keyring.seal(nonce, &id, data.as_bytes()).unwrap();
            Kind::PushAccepted(PushAccepted {
                message_id: id,
                app_id: APP_ID.into(),
                target: Some(Target {
                    to: Some(To::DeviceId(device.clone())),
                }),
                payload: Some(payload),
                ttl_s: 86_400,
                ..PushAccepted::default()
            })
        }
        5..=7 => Kind::DeviceAcked(DeviceAcked {
            device_id: device.clone(),
            // Each device gets one push every DEVICES / 5 rounds.
            seq: round * 5 / DEVICES + 1,
            message_id: message_id(i - 5),
            gateway_id: "gateway-1".into(),
        }),
        8 => Kind::DeviceConnected(DeviceConnected {
            device_id: device.clone(),
            gateway_id: "gateway-1".into(),
            keep_alive_s: 60,
        }),
        _ => Kind::DeviceDisconnected(DeviceDisconnected {
            device_id: device.clone(),
            gateway_id: "gateway-1".into(),
            reason: "keep-alive timeout".into(),
        }),
    };
    (device, Event::new(ts_ms, kind))
}

fn record(key: &str, event: &Event) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        value: events::encode(event),
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: gen_log DATA_DIR [EVENTS]");
        std::process::exit(2);
    };
    let total: u64 = match args.next().map(|n| n.parse()) {
        None => 1_000_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("EVENTS must be a number: {e}");
            std::process::exit(2);
        }
    };
    std::fs::create_dir_all(&dir).unwrap();
    let key = [0x5au8; KEY_BYTES];
    std::fs::write(
        dir.join("payload.key"),
        base64::engine::general_purpose::STANDARD.encode(key),
    )
    .unwrap();
    let keyring = Keyring::new(1, &key);

    let log = EmbeddedLog::open(&dir.join("log")).unwrap();
    assert_eq!(
        *log.durable_end().borrow(),
        0,
        "{} already holds a log",
        dir.display()
    );
    let started = Instant::now();

    let mut head = vec![record(
        APP_ID,
        &Event::new(
            START_MS,
            Kind::AppCreated(AppCreated {
                app_id: APP_ID.into(),
                name: "bench".into(),
                app_key: "bench-app-key".into(),
                client_id: "bench-client".into(),
                client_secret_sha256: vec![0xab; 32],
            }),
        ),
    )];
    for d in 0..DEVICES {
        let id = device_id(d);
        head.push(record(
            &id,
            &Event::new(
                START_MS + 1 + d,
                Kind::DeviceRegistered(DeviceRegistered {
                    device_id: id.clone(),
                    app_id: APP_ID.into(),
                    token_sha256: vec![0xcd; 32],
                    platform: "android".into(),
                    network: "wifi".into(),
                }),
            ),
        ));
    }
    let head_len = head.len() as u64;
    log.append(head).await.unwrap();

    let mut i = 0;
    let rest = total.saturating_sub(head_len);
    while i < rest {
        let n = (MAX_BATCH_RECORDS as u64).min(rest - i);
        let batch = (i..i + n)
            .map(|j| {
                let (key, ev) = event(j, &keyring);
                record(&key, &ev)
            })
            .collect();
        log.append(batch).await.unwrap();
        i += n;
    }
    let written = head_len + rest;
    println!(
        "gen_log: wrote {written} events to {} in {:.2?}",
        dir.display(),
        started.elapsed()
    );
}
