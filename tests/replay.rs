//! End-to-end tests of `herald replay`: through a running server's API, and from its
//! data dir once it has stopped, with the same lines either way.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use serde_json::{Value, json};

/// Runs the built `herald replay` with `args`, without the caller's HERALD_* settings.
fn replay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("replay")
        .args(args)
        .env_remove("HERALD_ADMIN_TOKEN")
        .env_remove("HERALD_PAYLOAD_KEY")
        .env_remove("HERALD_DATA_DIR")
        .env("HERALD_LOG", "warn")
        .output()
        .unwrap()
}

/// The lines of a successful run.
fn lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "herald replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_through_the_api_and_from_the_stopped_data_dir() {
    let mut server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let data = [
        json!({"text": "one"}),
        json!({"text": "two", "n": 2}),
        json!({"list": [1, 2, 3]}),
    ];
    let mut ids = Vec::new();
    for d in &data {
        ids.push(app.push(&dev.device_id, d.clone()).await);
    }
    let base = server.base();
    let data_dir = server.data_dir().to_owned();

    // Online, sealed: three pushes, in order, payloads as base64.
    let online = lines(&replay(&[
        "--api",
        &base,
        "--admin-token",
        ADMIN,
        "--type",
        "PushAccepted",
    ]));
    assert_eq!(online.len(), 3, "{online:?}");
    for (line, id) in online.iter().zip(&ids) {
        assert_eq!(line["type"], "PushAccepted");
        assert_eq!(line["event"]["message_id"], id.as_str());
        assert_eq!(line["event"]["app_id"], app.app_id.as_str());
        assert_eq!(line["event"]["target"]["device_id"], dev.device_id.as_str());
        assert!(line["event"]["payload"]["ciphertext"].is_string());
        assert!(line.get("data").is_none());
    }

    // Online, opened with the data dir's key.
    let key = std::fs::read_to_string(data_dir.join("payload.key")).unwrap();
    let decrypted_online = replay(&[
        "--api",
        &base,
        "--admin-token",
        ADMIN,
        "--type",
        "PushAccepted",
        "--decrypt",
        "--payload-key",
        key.trim(),
    ]);
    let opened = lines(&decrypted_online);
    assert_eq!(opened.len(), 3);
    for (line, d) in opened.iter().zip(&data) {
        assert_eq!(&line["data"], d);
    }

    // The whole log online, to a file: app, device, three pushes.
    let out_dir = tempfile::tempdir().unwrap();
    let out_file = out_dir.path().join("events.jsonl");
    let written = replay(&[
        "--api",
        &base,
        "--admin-token",
        ADMIN,
        "--output",
        path(&out_file),
    ]);
    assert!(written.status.success(), "{}", stderr(&written));
    let online_all = std::fs::read(&out_file).unwrap();
    let all: Vec<Value> = String::from_utf8(online_all.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Gateways write heartbeats into the log too; they belong to no app.
    let types: Vec<&str> = all
        .iter()
        .map(|l| l["type"].as_str().unwrap())
        .filter(|t| *t != "GatewayHeartbeat")
        .collect();
    assert!(all.iter().any(|l| l["type"] == "GatewayHeartbeat"));
    assert_eq!(
        types,
        [
            "AppCreated",
            "DeviceRegistered",
            "PushAccepted",
            "PushAccepted",
            "PushAccepted"
        ]
    );

    // Filters by app and by time reach the server.
    let by_app = lines(&replay(&[
        "--api",
        &base,
        "--admin-token",
        ADMIN,
        "--app",
        &app.app_id,
        "--from",
        "2020-01-01T00:00:00Z",
    ]));
    assert_eq!(by_app.len(), 5);
    let future = lines(&replay(&[
        "--api",
        &base,
        "--admin-token",
        ADMIN,
        "--from",
        "2999-01-01T00:00:00Z",
    ]));
    assert!(future.is_empty());

    // A wrong token is refused with a hint.
    let refused = replay(&["--api", &base, "--admin-token", "not-the-admin-token"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--admin-token"),
        "{}",
        stderr(&refused)
    );

    // The log files can be read while the server runs: the same lines as through the API.
    let live = replay(&["--data-dir", path(&data_dir)]);
    assert!(live.status.success(), "{}", stderr(&live));
    assert!(
        live.stdout.starts_with(&online_all),
        "{}",
        String::from_utf8_lossy(&live.stdout)
    );
    // Filters by app need the projection store, which the running server holds: refused,
    // pointing at --api.
    let locked = replay(&["--data-dir", path(&data_dir), "--app", "x"]);
    assert!(!locked.status.success());
    assert!(stderr(&locked).contains("--api"), "{}", stderr(&locked));

    assert!(server.terminate().success());

    // Offline: the same lines, byte for byte (the stop may have appended after them).
    let offline = replay(&["--data-dir", path(&data_dir)]);
    assert!(offline.status.success(), "{}", stderr(&offline));
    assert!(
        offline.stdout.starts_with(&online_all),
        "offline:\n{}\nonline:\n{}",
        String::from_utf8_lossy(&offline.stdout),
        String::from_utf8_lossy(&online_all)
    );
    // Opened offline with the key from the data dir: the same as online.
    let decrypted_offline = replay(&[
        "--data-dir",
        path(&data_dir),
        "--type",
        "PushAccepted",
        "--decrypt",
    ]);
    assert!(
        decrypted_offline.status.success(),
        "{}",
        stderr(&decrypted_offline)
    );
    assert_eq!(decrypted_offline.stdout, decrypted_online.stdout);
    // Offsets: from the third record on.
    let window = lines(&replay(&[
        "--data-dir",
        path(&data_dir),
        "--from",
        "2",
        "--to",
        "4",
    ]));
    let offsets: Vec<u64> = window
        .iter()
        .map(|l| l["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 3]);
}

#[test]
fn bad_arguments_are_refused_naming_the_flag() {
    let bad_from = replay(&["--from", "yesterday"]);
    assert!(!bad_from.status.success());
    let e = stderr(&bad_from);
    assert!(e.contains("--from") && e.contains("RFC 3339"), "{e}");

    let reversed = replay(&["--from", "10", "--to", "5"]);
    assert!(!reversed.status.success());
    assert!(stderr(&reversed).contains("--to"), "{}", stderr(&reversed));

    let empty = tempfile::tempdir().unwrap();
    let no_key = replay(&["--data-dir", path(empty.path()), "--decrypt"]);
    assert!(!no_key.status.success());
    assert!(
        stderr(&no_key).contains("--payload-key"),
        "{}",
        stderr(&no_key)
    );

    let no_data = replay(&["--data-dir", path(&empty.path().join("nothing"))]);
    assert!(!no_data.status.success());
    assert!(
        stderr(&no_data).contains("--data-dir"),
        "{}",
        stderr(&no_data)
    );

    let bad_type = replay(&["--data-dir", path(empty.path()), "--type", "Push,,Acked"]);
    assert!(!bad_type.status.success());
    assert!(
        stderr(&bad_type).contains("--type"),
        "{}",
        stderr(&bad_type)
    );

    let no_token = replay(&[
        "--api",
        "http://127.0.0.1:9",
        "--data-dir",
        path(empty.path()),
    ]);
    assert!(!no_token.status.success());
    assert!(
        stderr(&no_token).contains("--admin-token"),
        "{}",
        stderr(&no_token)
    );
}
