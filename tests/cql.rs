//! The CQL projection store end to end, against real Cassandra servers
//! (scripts/cassandra-up): a rebuild into a CQL keyspace gives the digests of the
//! embedded store for the same log, and a CQL server stopped for ten seconds under load
//! pauses the delivery worker (the API answers 503, never 500) and loses nothing.
//!
//! Runs in a herald built with `--features cql` when `HERALD_CASSANDRA` names a server
//! (scripts/test starts one); the outage test starts a server of its own.
#![cfg(feature = "cql")]
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use herald_client::Device;
use serde_json::json;
use tokio::sync::Mutex;

fn cassandra() -> Option<String> {
    service("HERALD_CASSANDRA", "scripts/cassandra-up starts one")
}

fn herald(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The digest lines (`projection records digest`) of a rebuild's output.
fn digest_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.split_whitespace().nth(2).is_some_and(|d| d.len() == 64))
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_into_the_cql_store_gives_the_embedded_stores_digests() {
    let Some(nodes) = cassandra() else { return };
    // A history with every kind of state: apps, devices, unicasts, a broadcast, a
    // collapse key replacing an entry, a recall, acknowledgements, presence.
    let mut server = Server::start().await;
    let app = create_app(&server).await;
    let mut devs = Vec::new();
    for _ in 0..5 {
        devs.push(app.register().await);
    }
    let mut first = connect(&devs[0]).await;
    for i in 0..3 {
        app.push(&devs[0].device_id, json!({"n": i})).await;
    }
    recv_n(&mut first, 3).await;
    let (status, _) = app
        .push_raw(json!({"to": {"device_id": devs[1].device_id}, "data": {"v": 1}, "collapse_key": "score"}))
        .await;
    assert_eq!(status, 202);
    let (status, _) = app
        .push_raw(json!({"to": {"device_id": devs[1].device_id}, "data": {"v": 2}, "collapse_key": "score"}))
        .await;
    assert_eq!(status, 202);
    let all = app.broadcast(json!({"all": true})).await;
    let recalled = app.push(&devs[2].device_id, json!({"oops": true})).await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/messages/{recalled}/recall", app.base))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "recall: {}", r.status());
    recv_n(&mut first, 1).await;
    app.wait_acked(&all, 1).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.terminate().success());
    let data = server.data_dir().to_str().unwrap().to_owned();

    let (ok, embedded) = herald(&["rebuild", "--data-dir", &data]);
    assert!(ok, "{embedded}");
    let keyspace = format!("rebuild_{}", std::process::id());
    let cql_args = [
        "--data-dir",
        &data,
        "--store",
        "cql",
        "--cql-nodes",
        &nodes,
        "--cql-keyspace",
        &keyspace,
    ];
    let (ok, cql) = herald(&[&["rebuild"][..], &cql_args].concat());
    assert!(ok, "{cql}");
    let (embedded, cql_digests) = (digest_lines(&embedded), digest_lines(&cql));
    assert_eq!(embedded.len(), 13, "{embedded:?}");
    assert_eq!(embedded, cql_digests, "the same digests from both stores");
    assert!(
        embedded
            .iter()
            .any(|l| l.starts_with("inbox ") && !l.starts_with("inbox 0 ")),
        "the inboxes hold entries: {embedded:?}"
    );
    // verify compares the CQL rebuild with the live embedded store.
    let (ok, verified) = herald(&[&["verify"][..], &cql_args].concat());
    assert!(ok, "{verified}");
    assert!(verified.contains("identical"), "{verified}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cql_store_stopped_for_ten_seconds_under_load_pauses_the_worker_and_loses_nothing() {
    if cassandra().is_none() {
        return;
    }
    // A server of its own: this test stops it.
    let node = Arc::new(Service::cassandra());
    let conf = tempfile::tempdir().unwrap();
    let conf_file = conf.path().join("herald.toml");
    // Requests to the store give up after a second, so a stopped server shows quickly.
    std::fs::write(&conf_file, "cql_timeout_ms = 1000\n").unwrap();
    let server = Server::start_with(&[
        ("HERALD_STORE", "cql"),
        ("HERALD_CQL_NODES", &node.addr()),
        ("HERALD_CQL_KEYSPACE", "outage"),
        ("HERALD_CONFIG", conf_file.to_str().unwrap()),
    ])
    .await;
    let app = create_app(&server).await;
    let mut devices = Vec::new();
    for _ in 0..10 {
        let creds = app.register().await;
        let device = Device::start(&creds, quick_options()).await.unwrap();
        devices.push((creds, device));
    }

    // Load: pushes to the devices in turn, each with an Idempotency-Key, retried after a
    // 503 until accepted. Every answer is 202, 503, or 200 for a retry of a push that
    // was accepted.
    let accepted: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (app, accepted, refused, stop) =
            (app.clone(), accepted.clone(), refused.clone(), stop.clone());
        let ids: Vec<String> = devices.iter().map(|(c, _)| c.device_id.clone()).collect();
        let http = reqwest::Client::new();
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let device = &ids[n % ids.len()];
                let key = format!("load-{n}");
                loop {
                    let r = http
                        .post(format!("{}/v1/messages", app.base))
                        .bearer_auth(&app.token)
                        .header("Idempotency-Key", &key)
                        .json(&json!({"to": {"device_id": device}, "data": {"n": n}}))
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    match status {
                        // 200: an earlier try with this key was accepted, though its
                        // answer was a 503 (the projections could not confirm it yet).
                        200 | 202 => {
                            let id = body["message_id"].as_str().unwrap().to_owned();
                            accepted
                                .lock()
                                .await
                                .entry(device.clone())
                                .or_default()
                                .push(id);
                            break;
                        }
                        503 => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        other => panic!("a push answered {other}: {body}"),
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = accepted.lock().await.values().map(Vec::len).sum::<usize>();
    assert!(before > 10, "the load runs ({before} accepted)");

    // The store stops for ten seconds.
    let down = Instant::now();
    {
        let node = node.clone();
        tokio::task::spawn_blocking(move || node.down(true))
            .await
            .unwrap();
    }
    // Reads that need the store answer 503 with a JSON error, never 500.
    let some_id = accepted.lock().await.values().next().unwrap()[0].clone();
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (status, body) = app.status(&some_id).await;
        assert!(status == 200 || status == 503, "{status}: {body}");
        if status == 503 {
            assert!(body["error"]["code"].is_string(), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "the status read never failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = reqwest::Client::new()
        .post(format!("{}/v1/devices", server.base()))
        .json(&json!({"app_key": app.app_key}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        503,
        "a registration while the store is away"
    );
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    {
        let node = node.clone();
        tokio::task::spawn_blocking(move || node.up(true))
            .await
            .unwrap();
    }
    eprintln!("the CQL server was away for {:?}", down.elapsed());

    // The load goes on until pushes are accepted again, then a little longer.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after = 0;
    while after < before + 20 {
        assert!(
            Instant::now() < deadline,
            "pushes were never accepted again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = accepted.lock().await.values().map(Vec::len).sum::<usize>();
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "some pushes were refused with 503 while the store was away"
    );
    assert!(
        server
            .log()
            .contains("the projection store is unavailable; the worker waits"),
        "the worker paused: {}",
        server.log()
    );

    // Every accepted push reaches its device, once, in order.
    let accepted = accepted.lock().await.clone();
    let mut total = 0;
    for (creds, device) in devices.iter_mut() {
        let want = accepted.get(&creds.device_id).cloned().unwrap_or_default();
        let mut seen = Vec::new();
        take_until(
            device,
            &mut seen,
            want.len(),
            Duration::from_secs(60),
            &creds.device_id,
        )
        .await;
        assert_exactly(device, &seen, &want).await;
        // Only unicasts here: the device's seqs are exactly 1..=n, none skipped.
        let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=want.len() as u64).collect::<Vec<_>>(),
            "dense seqs"
        );
        total += want.len();
    }
    eprintln!(
        "outage test: {total} pushes accepted ({before} before the stop), {} answered 503 meanwhile, all delivered once, in order",
        refused.load(Ordering::Relaxed)
    );
}
