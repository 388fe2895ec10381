//! Operators' view: Prometheus `/metrics` (parsed by a Prometheus text-format parser,
//! its counters checked against what the test did), the admin API's access rules, and the
//! admin page in a real browser.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// One scrape of `/metrics`, parsed.
struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    async fn of(server: &Server) -> Scrape {
        let r = reqwest::get(format!("{}/metrics", server.base()))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let text = r.text().await.unwrap();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        Scrape(prometheus_parse::Scrape::parse(lines).unwrap())
    }

    /// The value of `name` whose labels include `labels` (0 when there is none).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(b) => {
                    b.iter().map(|c| c.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => 0.0,
            })
            .sum()
    }

    fn help(&self) -> &HashMap<String, String> {
        &self.0.docs
    }
}

#[tokio::test]
async fn metrics_count_what_a_scripted_run_did() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut conn = connect(&dev).await;
    let before = Scrape::of(&server).await;
    let app_label = [("app_id", app.app_id.as_str())];
    assert_eq!(
        before.value("herald_pushes_accepted_total", &app_label),
        0.0
    );

    const N: usize = 25;
    let mut last = String::new();
    for i in 0..N {
        last = app.push(&dev.device_id, json!({"n": i})).await;
    }
    let got = recv_n(&mut conn, N).await;
    assert_eq!(got.len(), N);
    app.wait_acked(&last, 1).await;

    // The delivery worker counts acks once it has folded them; the status above read
    // the same projection, so they are in.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let s = Scrape::of(&server).await;
        if s.value("herald_delivered_total", &app_label) >= N as f64 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    assert_eq!(delta("herald_pushes_accepted_total", &app_label), N as f64);
    assert_eq!(
        delta("herald_inbox_entries_stored_total", &app_label),
        N as f64
    );
    assert_eq!(delta("herald_delivered_total", &app_label), N as f64);
    let route = [
        ("route", "/v1/messages"),
        ("method", "POST"),
        ("status", "202"),
    ];
    assert_eq!(delta("herald_http_requests_total", &route), N as f64);
    assert_eq!(
        delta(
            "herald_http_request_duration_seconds_count",
            &[("route", "/v1/messages"), ("method", "POST")]
        ),
        N as f64
    );
    assert_eq!(delta("herald_gateway_publishes_total", &[]), N as f64);
    assert_eq!(delta("herald_gateway_acks_total", &[]), N as f64);
    assert_eq!(delta("herald_ack_latency_seconds_count", &[]), N as f64);
    // Each push and each ack is an event; group commits cover them.
    assert!(delta("herald_log_appended_events_total", &[]) >= 2.0 * N as f64);
    assert!(delta("herald_log_sync_seconds_count", &[]) >= 1.0);
    assert_eq!(after.value("herald_gateway_connections", &[]), 1.0);
    assert!(after.value("herald_gateway_connects_total", &[]) >= 1.0);
    assert_eq!(after.value("herald_gateway_inflight", &[]), 0.0);
    assert_eq!(
        after.value("herald_delivery_lag_records", &[("partition", "0")]),
        0.0
    );
    assert!(
        after.help()["herald_pushes_accepted_total"].contains("202"),
        "every metric says what it counts"
    );

    // A refused request is counted under its route and status; an unknown path once.
    let (code, _) = app
        .push_raw(json!({"to": {"device_id": "not-a-uuid"}, "data": 1}))
        .await;
    assert_ne!(code, 202);
    let r = reqwest::get(format!("{}/no/such/route", server.base()))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    conn.disconnect().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = Scrape::of(&server).await;
        let refused = s.value(
            "herald_http_requests_total",
            &[("route", "/v1/messages"), ("status", &code.to_string())],
        );
        let unmatched = s.value("herald_http_requests_total", &[("route", "unmatched")]);
        let gone = s.value("herald_gateway_disconnects_total", &[]);
        if refused == 1.0 && unmatched == 1.0 && gone == 1.0 {
            assert_eq!(s.value("herald_gateway_connections", &[]), 0.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refused {refused}, unmatched {unmatched}, disconnects {gone}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
