//! `herald serve` with its event log on a real Apache Kafka broker (KRaft, from Maven
//! Central's jars via scripts/kafka-up): pushes are accepted only once Kafka has them;
//! while the broker is stopped the API answers 503, never a 202 it cannot keep; after the
//! broker restarts, retries with the same Idempotency-Key go through, and the device gets
//! every accepted push exactly once, in order; a restarted herald resumes from Kafka.
//!
//! Runs when `HERALD_KAFKA` is set (scripts/test sets it); this test starts and stops a
//! broker of its own on other ports, so it can stop it without disturbing other tests.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use herald_client::Device;
use serde_json::json;

fn wanted() -> bool {
    service("HERALD_KAFKA", "scripts/test starts Kafka").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_kafka_never_accepts_what_the_broker_does_not_have() {
    if !wanted() {
        return;
    }
    let broker = Service::kafka();
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("herald.toml");
    std::fs::write(&conf, "kafka_timeout_ms = 3000\n").unwrap();
    let mut server = Server::start_with(&[
        ("HERALD_KAFKA_BROKERS", &broker.addr()),
        ("HERALD_KAFKA_TOPIC", "herald.test.serve"),
        ("HERALD_CONFIG", conf.to_str().unwrap()),
    ])
    .await;
    assert!(
        server.log().contains("event log on Kafka"),
        "{}",
        server.log()
    );

    let app = create_app(&server).await;
    let dev = app.register().await;
    let opts = quick_options();
    let mut device = Device::start(&dev, opts).await.unwrap();
    let mut accepted = Vec::new();
    for i in 0..5 {
        accepted.push(app.push(&dev.device_id, json!({"before": i})).await);
    }

    // The broker goes away for about ten seconds: every push is refused with 503.
    broker.down(true);
    let push_keyed = |key: String, data: serde_json::Value| {
        let (http, base, token, device) = (
            reqwest::Client::new(),
            app.base.clone(),
            app.token.clone(),
            dev.device_id.clone(),
        );
        async move {
            let r = http
                .post(format!("{base}/v1/messages"))
                .bearer_auth(token)
                .header("Idempotency-Key", key)
                .json(&json!({"to": {"device_id": device}, "data": data}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let down_since = Instant::now();
    let mut refused = Vec::new();
    while down_since.elapsed() < Duration::from_secs(10) {
        let key = format!("during-{}", refused.len());
        let (status, body) = push_keyed(key.clone(), json!({"during": refused.len()})).await;
        assert_eq!(
            status, 503,
            "a push accepted while the broker was down: {body}"
        );
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
        refused.push(key);
    }
    assert!(!refused.is_empty());

    // The broker is back: the same keys go through, once each.
    broker.up(true);
    for (i, key) in refused.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = push_keyed(key.clone(), json!({"during": i})).await;
            if status == 202 {
                accepted.push(body["message_id"].as_str().unwrap().to_string());
                break;
            }
            assert_eq!(status, 503, "{body}");
            assert!(
                Instant::now() < deadline,
                "Kafka never came back for herald"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for i in 0..3 {
        accepted.push(app.push(&dev.device_id, json!({"after": i})).await);
    }

    let mut seen = Vec::new();
    let n = accepted.len();
    take_until(
        &mut device,
        &mut seen,
        n,
        Duration::from_secs(30),
        "after Kafka returned",
    )
    .await;
    assert_exactly(&mut device, &seen, &accepted).await;
    drop(device);

    // herald itself restarts (SIGKILL): the log is Kafka's, the projections resume.
    server.restart().await;
    let (status, body) = app.status(accepted.last().unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["targeted"], 1);
}
