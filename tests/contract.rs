//! The delivery contract, line by line, against the real binary: idempotent publish
//! (also across restarts and indeterminate requests), TTL, recall, collapse keys, and
//! QoS 2 exactly once on the wire.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use herald_gateway::codec::Packet;
use serde_json::{Value, json};

async fn push_keyed(app: &App, key: &str, body: &Value) -> Result<(u16, Value), reqwest::Error> {
    let r = app
        .http
        .post(format!("{}/v1/messages", app.base))
        .bearer_auth(&app.token)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

/// Item 3: 1,000 concurrent retries of 100 keys give exactly 100 messages; a key reused
/// with another body is 409; a retry after a restart still gets the same message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_100_keys_make_100_messages() {
    let mut server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let body = |k: usize| json!({"to": {"device_id": dev.device_id}, "data": {"k": k}});
    let mut tasks = Vec::new();
    for round in 0..10 {
        for k in 0..100 {
            let (app, b) = (app.clone(), body(k));
            tasks.push(tokio::spawn(async move {
                let (s, r) = push_keyed(&app, &format!("key-{k}"), &b).await.unwrap();
                (
                    k,
                    round,
                    s,
                    r["message_id"].as_str().unwrap_or("").to_owned(),
                )
            }));
        }
    }
    let mut ids: HashMap<usize, HashSet<String>> = HashMap::new();
    let (mut created, mut replayed) = (0, 0);
    for t in tasks {
        let (k, _, status, id) = t.await.unwrap();
        match status {
            202 => created += 1,
            200 => replayed += 1,
            other => panic!("unexpected status {other}"),
        }
        ids.entry(k).or_default().insert(id);
    }
    assert_eq!((created, replayed), (100, 900));
    assert!(
        ids.values().all(|s| s.len() == 1),
        "a key produced two message ids"
    );
    let all: HashSet<String> = ids.values().flatten().cloned().collect();
    assert_eq!(all.len(), 100);

    // The device gets exactly 100 messages.
    let mut conn = connect(&dev).await;
    let got = recv_n(&mut conn, 100).await;
    assert_eq!(
        got.iter().map(|e| e.id.clone()).collect::<HashSet<_>>(),
        all
    );
    let sentinel = app.push(&dev.device_id, json!("end")).await;
    assert_eq!(recv_n(&mut conn, 1).await[0].id, sentinel);

    // The log holds exactly 100 PushAccepted events with a key (plus the sentinel).
    let events = admin_events(&server, "PushAccepted").await;
    assert_eq!(events.len(), 101, "PushAccepted events in the log");

    // Same key, different body: 409.
    let (s, r) = push_keyed(&app, "key-7", &body(8)).await.unwrap();
    assert_eq!(s, 409, "{r}");
    assert_eq!(r["error"]["code"], "idempotency_key_reused");

    // Across a restart, a retry still answers the same message.
    server.restart().await;
    let (s, r) = push_keyed(&app, "key-42", &body(42)).await.unwrap();
    assert_eq!(s, 200, "{r}");
    assert!(ids[&42].contains(r["message_id"].as_str().unwrap()));
}

async fn admin_events(server: &Server, types: &str) -> Vec<Value> {
    let text = reqwest::Client::new()
        .get(format!("{}/v1/admin/events?type={types}", server.base()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Item 7: a publish whose answer never came (the server was killed mid-request),
/// retried with the same key after the restart, ends with exactly one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indeterminate_publishes_retried_across_kills_make_one_message_each() {
    let mut server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut keys = Vec::new();
    for round in 0..12u64 {
        let key = format!("indeterminate-{round}");
        let body = json!({"to": {"device_id": dev.device_id}, "data": {"round": round}});
        let (a, k, b) = (app.clone(), key.clone(), body.clone());
        let inflight = tokio::spawn(async move { push_keyed(&a, &k, &b).await });
        // Kill at a different moment each round: before, during or after the append.
        tokio::time::sleep(Duration::from_micros(round * 700)).await;
        server.kill9();
        let first = inflight.await.unwrap();
        server.start_again().await;
        let (s, r) = push_keyed(&app, &key, &body).await.unwrap();
        assert!(
            s == 200 || s == 202,
            "round {round}: {s} {r}\n{}",
            server.log()
        );
        if let Ok((s1, r1)) = first {
            // The first answer, if it came, names the same message.
            if s1 == 202 {
                assert_eq!(r1["message_id"], r["message_id"]);
                assert_eq!(s, 200);
            }
        }
        keys.push(r["message_id"].as_str().unwrap().to_owned());
    }
    let mut conn = connect(&dev).await;
    let got = recv_n(&mut conn, keys.len()).await;
    assert_eq!(
        got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        keys,
        "exactly one message per key, in order"
    );
    let sentinel = app.push(&dev.device_id, json!("end")).await;
    assert_eq!(recv_n(&mut conn, 1).await[0].id, sentinel);
}

/// TTL, recall and collapse: an expired, recalled or replaced entry is never sent, and
/// the status says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_recalled_and_replaced_entries_are_never_sent() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let other = create_app(&server).await;
    let dev = app.register().await;
    let d = &dev.device_id;

    let (s, short) = app
        .push_raw(json!({"to": {"device_id": d}, "data": "short", "ttl_s": 1}))
        .await;
    assert_eq!(s, 202);
    let short = short["message_id"].as_str().unwrap().to_owned();
    let recalled = app.push(d, json!("recalled")).await;
    let (_, old) = app
        .push_raw(json!({"to": {"device_id": d}, "data": "score 1-0", "collapse_key": "score"}))
        .await;
    let old = old["message_id"].as_str().unwrap().to_owned();
    let (_, new) = app
        .push_raw(json!({"to": {"device_id": d}, "data": "score 2-0", "collapse_key": "score"}))
        .await;
    let new = new["message_id"].as_str().unwrap().to_owned();
    let kept = app.push(d, json!("kept")).await;

    // Recall: only by its own app; twice is harmless.
    let r = other
        .http
        .post(format!("{}/v1/messages/{recalled}/recall", other.base))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    for _ in 0..2 {
        let r = app
            .http
            .post(format!("{}/v1/messages/{recalled}/recall", app.base))
            .bearer_auth(&app.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let s: Value = r.json().await.unwrap();
        assert_eq!(
            (s["state"].as_str(), s["recalled"].as_u64()),
            (Some("recalled"), Some(1)),
            "{s}"
        );
    }
    // Let the short TTL pass while the device is offline.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut conn = connect(&dev).await;
    let got = recv_n(&mut conn, 2).await;
    assert_eq!(
        got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![new.clone(), kept.clone()]
    );
    let sentinel = app.push(d, json!("end")).await;
    assert_eq!(recv_n(&mut conn, 1).await[0].id, sentinel);

    let (_, s) = app.status(&short).await;
    assert_eq!(
        (s["state"].as_str(), s["expired"].as_u64()),
        (Some("expired"), Some(1)),
        "{s}"
    );
    let (_, s) = app.status(&old).await;
    assert_eq!(
        (s["state"].as_str(), s["replaced"].as_u64()),
        (Some("replaced"), Some(1)),
        "{s}"
    );
    app.wait_acked(&new, 1).await;

    // A recalled broadcast reaches no device that connects afterwards.
    let b = app.broadcast(json!("oops")).await;
    let r = app
        .http
        .post(format!("{}/v1/messages/{b}/recall", app.base))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let late = app.register().await;
    let mut conn2 = connect(&late).await;
    let s2 = app.push(&late.device_id, json!("first")).await;
    assert_eq!(recv_n(&mut conn2, 1).await[0].id, s2);
}

/// QoS 2 exactly once on the wire, with its state surviving a reconnect and a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_state_survives_reconnect_and_crash() {
    let mut server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let port = server.mqtt_port;
    let m = app.push(&dev.device_id, json!("exactly once")).await;

    // 1. PUBLISH arrives; the device goes away before answering: the same PUBLISH (same
    //    packet id) comes again.
    let d = dev.clone();
    let pkid = tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(port, &d, false);
        match raw.recv() {
            Packet::Publish(p) => {
                assert_eq!(p.qos, 2);
                p.pkid
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    })
    .await
    .unwrap();
    // 2. Again the PUBLISH with the same id; PUBREC; PUBREL comes; leave before PUBCOMP.
    let d = dev.clone();
    tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(port, &d, false);
        match raw.recv() {
            Packet::Publish(p) => assert_eq!(p.pkid, pkid),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
        raw.send(&Packet::PubRec(pkid));
        assert_eq!(raw.recv(), Packet::PubRel(pkid));
    })
    .await
    .unwrap();
    // 3. After a crash: only the PUBREL comes, never the PUBLISH; PUBCOMP completes it.
    server.restart().await;
    let port = server.mqtt_port;
    let d = dev.clone();
    tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(port, &d, false);
        assert_eq!(raw.recv(), Packet::PubRel(pkid));
        raw.send(&Packet::PubComp(pkid));
    })
    .await
    .unwrap();
    let s = app.wait_acked(&m, 1).await;
    assert_eq!(s["state"], "delivered");
}

/// A stock `mosquitto_sub` subscribed at QoS 2 gets each push exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_at_qos2_gets_each_push_once() {
    let Some(mosquitto_sub) = tool("mosquitto_sub") else {
        return;
    };
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(app.push(&dev.device_id, json!({ "i": i })).await);
    }
    let out = tokio::process::Command::new(mosquitto_sub)
        .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args([
            "-i",
            &dev.device_id,
            "-u",
            &dev.device_id,
            "-P",
            &dev.device_token,
        ])
        .args(["-t", "inbox", "-q", "2", "-c", "-C", "20", "-W", "20"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(got, ids);
    for m in &ids {
        app.wait_acked(m, 1).await;
    }
}

/// Item 8: a damaged log is detected at start-up: a torn tail is truncated and logged,
/// corruption before it stops start-up with an error naming the offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_log_is_detected_at_start_up() {
    let mut server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    for i in 0..20 {
        app.push(&dev.device_id, json!({ "i": i })).await;
    }
    assert!(server.terminate().success());
    let segment = server.data_dir().join("log").join(format!("{:020}.seg", 0));
    let good = std::fs::read(&segment).unwrap();

    // Corruption in the middle: one flipped byte. herald refuses to start and says where.
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    std::fs::write(&segment, &bad).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--data-dir"])
        .arg(server.data_dir())
        .args(["--http-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0"])
        .args(["--ws-addr", "127.0.0.1:0"])
        .env("HERALD_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a corrupt log: {stderr}");
    assert!(stderr.contains("corrupt at offset"), "{stderr}");
    assert!(
        stderr.contains("checksum") || stderr.contains("length"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bad,
        "nothing may be cut off"
    );

    // A torn tail (the last record cut short by a crash): truncated, logged, serving.
    std::fs::write(&segment, &good[..good.len() - 7]).unwrap();
    server.start_again().await;
    assert!(server.log().contains("torn tail"), "{}", server.log());
    let mut conn = connect(&dev).await;
    // The last push's record was cut: 19 remain, then new pushes continue the seqs.
    let got = recv_n(&mut conn, 19).await;
    assert_eq!(got.last().unwrap().seq, 19);
    let m = app.push(&dev.device_id, json!("after repair")).await;
    let next = recv_n(&mut conn, 1).await;
    assert_eq!(next[0].id, m);
}
