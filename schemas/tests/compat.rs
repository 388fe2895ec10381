//! Old events stay readable: decodes the committed sample events of every schema version
//! in `tests/fixtures/v<N>/` and checks each against its committed description.
//!
//! To add the samples of a new schema version, bump `CURRENT_SCHEMA_VERSION`, extend
//! `samples()` with the new kinds and fields, and run
//! `HERALD_WRITE_FIXTURES=1 cargo test -p herald-schemas --test compat`; commit the new
//! `v<N>` folder. Never rewrite an existing version's folder.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;

use herald_schemas::events::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn sealed() -> SealedPayload {
    SealedPayload {
        key_id: 1,
        nonce: vec![7; 12],
        ciphertext: b"sealed-bytes".to_vec(),
    }
}

/// One sample of every kind this build writes, with every field set.
fn samples() -> Vec<(&'static str, Event)> {
    let ts = 1_790_000_000_000;
    let mut v = vec![
        (
            "app_created",
            Event::new(
                ts,
                Kind::AppCreated(AppCreated {
                    app_id: "app-1".into(),
                    name: "demo".into(),
                    app_key: "key-1".into(),
                    client_id: "client-1".into(),
                    client_secret_sha256: vec![1; 32],
                }),
            ),
        ),
        (
            "device_registered",
            Event::new(
                ts,
                Kind::DeviceRegistered(DeviceRegistered {
                    device_id: "dev-1".into(),
                    app_id: "app-1".into(),
                    token_sha256: vec![2; 32],
                    platform: "android".into(),
                    network: "wifi".into(),
                }),
            ),
        ),
        (
            "push_unicast",
            Event::new(
                ts,
                Kind::PushAccepted(PushAccepted {
                    message_id: "msg-1".into(),
                    app_id: "app-1".into(),
                    target: Some(Target {
                        to: Some(To::DeviceId("dev-1".into())),
                    }),
                    payload: Some(sealed()),
                    ttl_s: 3600,
                    priority: 1,
                    collapse_key: "score".into(),
                    max_inbox_entries: 100,
                    ..Default::default()
                }),
            ),
        ),
        (
            "push_broadcast",
            Event::new(
                ts,
                Kind::PushAccepted(PushAccepted {
                    message_id: "msg-2".into(),
                    app_id: "app-1".into(),
                    target: Some(Target {
                        to: Some(To::Broadcast(true)),
                    }),
                    payload: Some(sealed()),
                    ttl_s: 60,
                    ..Default::default()
                }),
            ),
        ),
        (
            "device_connected",
            Event::new(
                ts,
                Kind::DeviceConnected(DeviceConnected {
                    device_id: "dev-1".into(),
                    gateway_id: "gw-1".into(),
                    keep_alive_s: 60,
                }),
            ),
        ),
        (
            "device_disconnected",
            Event::new(
                ts,
                Kind::DeviceDisconnected(DeviceDisconnected {
                    device_id: "dev-1".into(),
                    gateway_id: "gw-1".into(),
                    reason: "closed_by_device".into(),
                }),
            ),
        ),
        (
            "device_acked",
            Event::new(
                ts,
                Kind::DeviceAcked(DeviceAcked {
                    device_id: "dev-1".into(),
                    seq: 1,
                    message_id: "msg-1".into(),
                    gateway_id: "gw-1".into(),
                }),
            ),
        ),
    ];
    v.extend(newer_samples(ts));
    v
}

/// Samples of kinds and fields added after version 1.
fn newer_samples(ts: u64) -> Vec<(&'static str, Event)> {
    vec![
        (
            "push_idempotent",
            Event::new(
                ts,
                Kind::PushAccepted(PushAccepted {
                    message_id: "msg-3".into(),
                    app_id: "app-1".into(),
                    target: Some(Target {
                        to: Some(To::DeviceId("dev-1".into())),
                    }),
                    payload: Some(sealed()),
                    ttl_s: 3600,
                    idempotency_key: "order-42".into(),
                    request_sha256: vec![3; 32],
                    idempotency_window_s: 86_400,
                    ..Default::default()
                }),
            ),
        ),
        (
            "message_recalled",
            Event::new(
                ts,
                Kind::MessageRecalled(MessageRecalled {
                    message_id: "msg-1".into(),
                    app_id: "app-1".into(),
                }),
            ),
        ),
        (
            "device_received",
            Event::new(
                ts,
                Kind::DeviceReceived(DeviceReceived {
                    device_id: "dev-1".into(),
                    seq: 2,
                    message_id: "msg-2".into(),
                    gateway_id: "gw-1".into(),
                }),
            ),
        ),
        (
            "app_secret_rotated",
            Event::new(
                ts,
                Kind::AppSecretRotated(AppSecretRotated {
                    app_id: "app-1".into(),
                    client_secret_sha256: vec![9; 32],
                }),
            ),
        ),
        (
            "gateway_heartbeat",
            Event::new(
                ts,
                Kind::GatewayHeartbeat(GatewayHeartbeat {
                    gateway_id: "gw-1".into(),
                    mqtt_url: "mqtt://10.0.0.1:9493".into(),
                    ws_url: "ws://10.0.0.1:8083/mqtt".into(),
                    connected: 1234,
                    interval_ms: 5000,
                }),
            ),
        ),
        (
            "fan_out_push",
            Event::new(
                ts,
                Kind::FanOut(FanOut {
                    partition: 3,
                    event: Some(fan_out::Event::Push(PushAccepted {
                        message_id: "msg-2".into(),
                        app_id: "app-1".into(),
                        target: Some(Target {
                            to: Some(To::Broadcast(true)),
                        }),
                        payload: Some(sealed()),
                        ttl_s: 3600,
                        priority: 0,
                        collapse_key: String::new(),
                        idempotency_key: String::new(),
                        request_sha256: Vec::new(),
                        idempotency_window_s: 0,
                        max_inbox_entries: 0,
                    })),
                }),
            ),
        ),
        (
            "app_limits_set",
            Event::new(
                ts,
                Kind::AppLimitsSet(AppLimitsSet {
                    app_id: "app-1".into(),
                    limits: Some(AppLimits {
                        pushes_per_s: 100,
                        broadcasts_per_min: 2,
                        max_devices: 5000,
                        max_data_bytes: 2048,
                        max_inbox_entries: 300,
                    }),
                }),
            ),
        ),
        (
            "fan_out_recall",
            Event::new(
                ts,
                Kind::FanOut(FanOut {
                    partition: 5,
                    event: Some(fan_out::Event::Recall(MessageRecalled {
                        message_id: "msg-1".into(),
                        app_id: "app-1".into(),
                    })),
                }),
            ),
        ),
    ]
}

#[test]
fn every_committed_version_decodes() {
    let dir = fixtures().join(format!("v{CURRENT_SCHEMA_VERSION}"));
    if std::env::var("HERALD_WRITE_FIXTURES").is_ok_and(|v| v == "1") && !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, event) in samples() {
            std::fs::write(dir.join(format!("{name}.bin")), encode(&event)).unwrap();
            std::fs::write(dir.join(format!("{name}.txt")), format!("{event:#?}\n")).unwrap();
        }
    }
    let mut versions = 0;
    let mut checked = 0;
    for version in 1..=CURRENT_SCHEMA_VERSION {
        let dir = fixtures().join(format!("v{version}"));
        assert!(
            dir.is_dir(),
            "no fixtures for schema version {version} in {}",
            dir.display()
        );
        versions += 1;
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .collect();
        names.sort();
        assert!(!names.is_empty());
        for bin in names {
            let bytes = std::fs::read(&bin).unwrap();
            let event = decode(&bytes)
                .unwrap_or_else(|e| panic!("{} no longer decodes: {e}", bin.display()));
            assert_eq!(event.schema_version, version, "{}", bin.display());
            // The committed description is what the event meant when it was written.
            let expected = std::fs::read_to_string(bin.with_extension("txt")).unwrap();
            let mut now = format!("{event:#?}\n");
            if version < CURRENT_SCHEMA_VERSION {
                now = strip_defaults_added_later(&now, &expected);
            }
            assert_eq!(now, expected, "{} decodes differently now", bin.display());
            checked += 1;
        }
    }
    assert!(
        versions >= 1 && checked >= 7,
        "{versions} versions, {checked} events"
    );
}

/// Fields added after an event was written decode to their defaults; drop those lines
/// from today's rendering so it can be compared with the old description.
fn strip_defaults_added_later(now: &str, expected: &str) -> String {
    now.lines()
        .filter(|l| expected.contains(l.trim()) || !is_default_field(l))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn is_default_field(line: &str) -> bool {
    let l = line.trim();
    l.ends_with(": \"\",")
        || l.ends_with(": 0,")
        || l.ends_with(": [],")
        || l.ends_with(": false,")
        || l.ends_with(": None,")
}
