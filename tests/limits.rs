//! Per-app limits against `herald serve`: set by the admin API, in force at once, 429
//! with `Retry-After` for pushes over the rate, nothing answered 202 ever lost, and
//! another app pushing at the same time unaffected.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

async fn put_limits(server: &Server, app_id: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .put(format!("{}/v1/admin/apps/{app_id}/limits", server.base()))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_over_an_apps_rate_gets_429_and_loses_nothing() {
    let server = Server::start().await;
    let limited = create_app(&server).await;
    let other = create_app(&server).await;
    let (status, view) = put_limits(&server, &limited.app_id, json!({"pushes_per_s": 50})).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["set"]["pushes_per_s"], 50);
    assert_eq!(view["effective"]["pushes_per_s"], 50);
    assert_eq!(view["set"]["broadcasts_per_min"], Value::Null);
    assert_eq!(view["effective"]["broadcasts_per_min"], 60, "the default");
    let dev = limited.register().await;
    let other_dev = other.register().await;
    let mut conn = connect(&dev).await;
    let mut other_conn = connect(&other_dev).await;

    // Twice the rate for two seconds: 200 pushes, one every 10 ms; the other app
    // pushes 100 meanwhile.
    let began = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let (app, id) = (limited.clone(), dev.device_id.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(
                tokio::time::Instant::from_std(began) + Duration::from_millis(i * 10),
            )
            .await;
            let r = app
                .http
                .post(format!("{}/v1/messages", app.base))
                .bearer_auth(&app.token)
                .json(&json!({"to": {"device_id": id}, "data": {"i": i}}))
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), retry, r.json::<Value>().await.unwrap())
        }));
    }
    let mut other_ids = Vec::new();
    for i in 0..100 {
        other_ids.push(other.push(&other_dev.device_id, json!({"o": i})).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut accepted, mut refused) = (HashSet::new(), 0u64);
    let mut answered = Vec::new();
    for t in tasks {
        answered.push(t.await.unwrap());
    }
    let took = began.elapsed().as_secs_f64();
    for answer in answered {
        let (status, retry, body) = answer;
        match status {
            202 => {
                accepted.insert(body["message_id"].as_str().unwrap().to_owned());
            }
            429 => {
                refused += 1;
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                let retry: u64 = retry.expect("Retry-After").parse().unwrap();
                assert!((1..=2).contains(&retry), "Retry-After {retry}");
            }
            other => panic!("push answered {other}: {body}"),
        }
    }
    println!(
        "{} accepted, {refused} refused in {took:.2} s at 50/s",
        accepted.len()
    );
    // The bucket holds one second's worth and refills at 50 a second.
    let most = 50.0 + 50.0 * took + 2.0;
    assert!(
        (accepted.len() as f64) <= most,
        "{} > {most}",
        accepted.len()
    );
    assert!(accepted.len() >= 100, "{} accepted", accepted.len());
    assert!(refused >= 40, "{refused} refused");

    // Every push answered 202 arrives, once; the other app lost nothing either.
    let got: HashSet<String> = recv_n(&mut conn, accepted.len())
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(got, accepted);
    let got: Vec<String> = recv_n(&mut other_conn, other_ids.len())
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(got, other_ids);

    let metrics = Scrape::of(&server).await;
    let counted = metrics.value(
        "herald_app_limited_total",
        &[("app_id", &limited.app_id), ("limit", "pushes_per_s")],
    );
    assert_eq!(counted, refused as f64);
    let other_counted = metrics.value("herald_app_limited_total", &[("app_id", &other.app_id)]);
    assert_eq!(other_counted, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_and_payload_size_are_limited_per_app() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let (status, view) = put_limits(
        &server,
        &app.app_id,
        json!({"broadcasts_per_min": 2, "max_data_bytes": 100}),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    let dev = app.register().await;
    app.broadcast(json!({"n": 1})).await;
    app.broadcast(json!({"n": 2})).await;
    let r = app
        .http
        .post(format!("{}/v1/messages", app.base))
        .bearer_auth(&app.token)
        .json(&json!({"to": {"broadcast": true}, "data": {"n": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (29..=31).contains(&retry),
        "a minute's bucket of 2: {retry}"
    );
    // Unicasts are not broadcasts.
    app.push(&dev.device_id, json!({"n": 4})).await;
    // The app's payload limit, below the deployment's.
    let (status, body) = app
        .push_raw(json!({"to": {"device_id": dev.device_id}, "data": {"x": "y".repeat(200)}}))
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "data_too_large");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100 bytes")
    );
    // Back to the defaults: a null is the default.
    let (status, view) = put_limits(&server, &app.app_id, json!({"max_data_bytes": null})).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["effective"]["max_data_bytes"], 4096);
    assert_eq!(view["effective"]["broadcasts_per_min"], 60);
    app.push(&dev.device_id, json!({"x": "y".repeat(200)}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_limits_answers_bad_input_with_clear_errors() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    for (body, code) in [
        (json!({"pushes_per_s": 0}), 422),
        (json!({"pushes_per_s": 2_000_000}), 422),
        (json!({"max_data_bytes": 1_000_000}), 422),
        (json!({"pushes_per_s": "fast"}), 422),
        (json!({"no_such_limit": 1}), 422),
    ] {
        let (status, answer) = put_limits(&server, &app.app_id, body.clone()).await;
        assert_eq!(status, code, "{body}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    let (status, _) = put_limits(&server, "no-such-app", json!({})).await;
    assert_eq!(status, 404);
    // An app cannot set its own limits.
    let r = app
        .http
        .put(format!(
            "{}/v1/admin/apps/{}/limits",
            server.base(),
            app.app_id
        ))
        .bearer_auth(&app.token)
        .json(&json!({"pushes_per_s": 1_000_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = reqwest::Client::new()
        .get(format!(
            "{}/v1/admin/apps/{}/limits",
            server.base(),
            app.app_id
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["set"]["pushes_per_s"], Value::Null);
    assert_eq!(view["effective"]["pushes_per_s"], 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_devices_per_app_cap_refuses_registration_with_a_clear_error() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let other = create_app(&server).await;
    app.register().await;
    let (status, view) = put_limits(&server, &app.app_id, json!({"max_devices": 5})).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["effective"]["max_devices"], 5);
    // 20 at once: exactly four more are let in (one was there), whatever the race.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (http, base, key) = (app.http.clone(), app.base.clone(), app.app_key.clone());
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(format!("{base}/v1/devices"))
                .json(&json!({"app_key": key}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    let (mut created, mut refused) = (0, 0);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            201 => created += 1,
            403 => {
                refused += 1;
                assert_eq!(body["error"]["code"], "device_limit_reached", "{body}");
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("at most 5 devices"),
                    "{body}"
                );
            }
            other => panic!("registration answered {other}: {body}"),
        }
    }
    assert_eq!((created, refused), (4, 16));
    // Another app is not limited by this one's cap; raising the cap lets devices in.
    other.register().await;
    let (status, _) = put_limits(&server, &app.app_id, json!({"max_devices": 6})).await;
    assert_eq!(status, 200);
    app.register().await;
    // The count survives a restart (it is a projection of the log).
    let mut server = server;
    server.restart().await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/devices", server.base()))
        .json(&json!({"app_key": app.app_key}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_inbox_keeps_the_newest_entries_and_the_device_sees_the_gap() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let (status, view) = put_limits(&server, &app.app_id, json!({"max_inbox_entries": 3})).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["effective"]["max_inbox_entries"], 3);
    let dev = app.register().await;
    // Five pushes to a device that is offline: its inbox keeps the newest three.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.push(&dev.device_id, json!({"i": i})).await);
    }
    // (A push is answered once durable; its fold follows within moments.)
    for id in &ids[..2] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            let (_, s) = app.status(id).await;
            if s["state"] != "pending" || Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(s["state"], "dropped", "{s}");
        assert_eq!(
            (s["targeted"].as_u64(), s["dropped"].as_u64()),
            (Some(1), Some(1))
        );
    }
    let (_, s) = app.status(&ids[2]).await;
    assert_eq!(s["state"], "pending", "{s}");
    // The SDK shows the newest three, and that two were missed before them: the gap in
    // the seqs is the signal.
    let mut device = herald_client::Device::start(&dev, quick_options())
        .await
        .unwrap();
    let first = device.next().await.unwrap();
    assert_eq!((first.seq, first.missed()), (3, 2));
    assert_eq!(first.id, ids[2]);
    first.ack();
    for (want, id) in [(4, &ids[3]), (5, &ids[4])] {
        let m = device.next().await.unwrap();
        assert_eq!((m.seq, m.missed(), &m.id), (want, 0, id));
        m.ack();
    }
    app.wait_acked(&ids[4], 1).await;
    drop(device);
    let mut conn = connect(&dev).await;
    // A connected device that acknowledges keeps up: nothing more is dropped.
    let mut more = Vec::new();
    for i in 5..10 {
        let id = app.push(&dev.device_id, json!({"i": i})).await;
        recv_n(&mut conn, 1).await;
        more.push(id);
    }
    for id in &more {
        let s = app.wait_acked(id, 1).await;
        assert_eq!(s["dropped"], 0, "{s}");
    }
}
