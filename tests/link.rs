//! Gateways in their own processes (`herald gateway`), linked over QUIC to `herald serve`:
//! a stock mosquitto_sub on a gateway process gets its backlog and live pushes and its
//! acks reach the log; a gateway killed with SIGKILL and started again loses nothing and
//! its device sees nothing twice; a gateway without the link's certificates is refused;
//! devices connect where navigation sends them, and a gateway that dies moves only its
//! own devices.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use herald_client::{Device, DeviceCredentials};
use serde_json::{Value, json};

/// A new device of `app`, running the SDK against the gateway at MQTT port `port`.
async fn device_at(app: &App, port: u16) -> (DeviceCredentials, Device) {
    let mut dev = app.register().await;
    dev.mqtt_host = "127.0.0.1".into();
    dev.mqtt_port = port;
    let device = Device::start(&dev, quick_options()).await.unwrap();
    (dev, device)
}

async fn serve_with(gateways: &[&GatewayProc], certs: &Path) -> Server {
    let list: Vec<String> = gateways.iter().map(|g| g.link_addr()).collect();
    Server::start_with(&[
        ("HERALD_LINK_GATEWAYS", &list.join(",")),
        ("HERALD_LINK_CERTS", certs.to_str().unwrap()),
        ("HERALD_HEARTBEAT_MS", "300"),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_client_on_a_gateway_process_gets_backlog_and_live_pushes() {
    let Some(mosquitto_sub) = tool("mosquitto_sub") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let certs = make_certs(tmp.path());
    let gw = GatewayProc::start(&certs, "gw-a", tmp.path());
    let server = serve_with(&[&gw], &certs).await;
    gw.wait_linked(1).await;

    let app = create_app(&server).await;
    let dev = app.register().await;
    let m1 = app.push(&dev.device_id, json!({"n": 1})).await;

    let mut sub = MosquittoSub::start(&mosquitto_sub, gw.mqtt_port, &dev, 1, 2);
    let first = sub.next().await;
    assert_eq!(
        first["id"],
        m1.as_str(),
        "the backlog comes through the link"
    );
    assert_eq!(first["seq"], 1);
    let m2 = app.push(&dev.device_id, json!({"n": 2})).await;
    let second = sub.next().await;
    assert_eq!(
        second["id"],
        m2.as_str(),
        "a live push comes through the link"
    );
    assert_eq!(second["seq"], 2);
    for m in [&m1, &m2] {
        let s = app.wait_acked(m, 1).await;
        assert_eq!(s["delivered"], 1, "the gateway's ack reached the log: {s}");
    }
    // The gateway process counts what it did on its own /metrics.
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", gw.metrics_port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "herald_gateway_publishes_total 2",
        "herald_gateway_acks_total 2",
        "herald_gateway_connects_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(sub.0.child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_process_killed_and_restarted_loses_nothing_and_shows_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = make_certs(tmp.path());
    let mut gw = GatewayProc::start(&certs, "gw-b", tmp.path());
    let other = GatewayProc::start(&certs, "gw-c", tmp.path());
    let server = serve_with(&[&gw, &other], &certs).await;
    gw.wait_linked(1).await;
    other.wait_linked(1).await;

    let app = create_app(&server).await;
    let (dev, mut device) = device_at(&app, gw.mqtt_port).await;

    let mut sent = Vec::new();
    let mut seen = Vec::new();
    for i in 0..5 {
        sent.push(app.push(&dev.device_id, json!({"i": i})).await);
    }
    take_until(
        &mut device,
        &mut seen,
        5,
        Duration::from_secs(20),
        "live pushes",
    )
    .await;

    // The gateway process dies; pushes keep being accepted meanwhile.
    gw.kill9();
    for i in 5..10 {
        sent.push(app.push(&dev.device_id, json!({"i": i})).await);
    }
    gw.spawn();
    gw.wait_linked(2).await;
    take_until(
        &mut device,
        &mut seen,
        10,
        Duration::from_secs(30),
        "after the restart",
    )
    .await;
    let ids: Vec<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    let want: Vec<&str> = sent.iter().map(String::as_str).collect();
    assert_eq!(ids, want, "every push once, in order");
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    // Nothing more comes (no duplicate shown).
    assert!(
        tokio::time::timeout(Duration::from_millis(500), device.next())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_another_cas_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = make_certs(tmp.path());
    let foreign = make_certs(&tmp.path().join("foreign"));
    let gw = GatewayProc::start(&foreign, "gw-x", tmp.path());
    let server = serve_with(&[&gw], &certs).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !gw.log().contains("delivery worker linked"),
        "a worker of another CA was linked: {}",
        gw.log()
    );
    assert!(gw.log().contains("link refused"), "{}", gw.log());
    // herald serve itself is unaffected.
    let app = create_app(&server).await;
    let dev = app.register().await;
    app.push(&dev.device_id, json!({"ok": true})).await;
}

async fn nav(base: &str, device_id: &str) -> Value {
    let r = reqwest::get(format!("{base}/v1/nav?device_id={device_id}"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_where_navigation_sends_them_and_a_dead_gateway_moves_only_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = make_certs(tmp.path());
    let mut a = GatewayProc::start(&certs, "gw-a", tmp.path());
    let b = GatewayProc::start(&certs, "gw-b", tmp.path());
    let server = serve_with(&[&a, &b], &certs).await;
    a.wait_linked(1).await;
    b.wait_linked(1).await;
    let base = server.base();

    // Bad input is a clear 400.
    for q in ["", "?device_id=not-a-uuid", "?device_id"] {
        let r = reqwest::get(format!("{base}/v1/nav{q}")).await.unwrap();
        assert_eq!(r.status(), 400, "{q}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_query");
    }

    // Navigation hears all three gateways (herald serve's own, gw-a, gw-b).
    let app = create_app(&server).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut devices = Vec::new();
    loop {
        let dev = app.register().await;
        let placed = nav(&base, &dev.device_id).await;
        // Registration answered the same gateway as GET /v1/nav.
        assert_eq!(
            format!("mqtt://{}:{}", dev.mqtt_host, dev.mqtt_port),
            placed["mqtt"].as_str().unwrap()
        );
        devices.push((dev, placed["gateway_id"].as_str().unwrap().to_string()));
        let ids: std::collections::BTreeSet<&str> =
            devices.iter().map(|(_, g)| g.as_str()).collect();
        if devices.len() >= 60 && ids.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "navigation knows {ids:?}");
    }

    // Every device connects where it was sent and gets its push and a broadcast.
    let opts = quick_options();
    let mut running = Vec::new();
    for (dev, _) in &devices {
        running.push(Device::start(dev, opts.clone()).await.unwrap());
    }
    for (dev, _) in &devices {
        app.push(&dev.device_id, json!({"to": dev.device_id})).await;
    }
    app.broadcast(json!({"all": true})).await;
    for ((dev, gw), device) in devices.iter().zip(running.iter_mut()) {
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(20), device.next())
                .await
                .unwrap_or_else(|_| panic!("{} on {gw} got {got:?}", dev.device_id))
                .unwrap();
            got.push(m.envelope().data.clone());
        }
        assert!(got.contains(&json!({"to": dev.device_id})), "{got:?}");
        assert!(got.contains(&json!({"all": true})), "{got:?}");
    }

    // gw-a dies: after three missed heartbeats its devices are sent elsewhere; every
    // other device keeps its gateway.
    a.kill9();
    let before: Vec<(String, String)> = devices
        .iter()
        .map(|(d, g)| (d.device_id.clone(), g.clone()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut moved_ok = true;
        for (id, was) in &before {
            let now = nav(&base, id).await;
            let now = now["gateway_id"].as_str().unwrap();
            if was == "gw-a" {
                moved_ok &= now != "gw-a";
            } else {
                assert_eq!(now, was, "a device of a live gateway moved");
            }
        }
        if moved_ok {
            break;
        }
        assert!(Instant::now() < deadline, "gw-a's devices were not moved");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_and_restored_loses_nothing_and_shows_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = make_certs(tmp.path());
    let gw = GatewayProc::start(&certs, "gw-cut", tmp.path());
    // herald serve reaches the gateway's link through a relay this test can cut.
    let relay = UdpCut::start(format!("127.0.0.1:{}", gw.link_port).parse().unwrap()).await;
    let server = Server::start_with(&[
        ("HERALD_LINK_GATEWAYS", &format!("127.0.0.1:{}", relay.port)),
        ("HERALD_LINK_CERTS", certs.to_str().unwrap()),
        ("HERALD_HEARTBEAT_MS", "300"),
    ])
    .await;
    gw.wait_linked(1).await;

    let app = create_app(&server).await;
    let (dev, mut device) = device_at(&app, gw.mqtt_port).await;
    let mut sent = Vec::new();
    let mut seen = Vec::new();
    for i in 0..3 {
        sent.push(app.push(&dev.device_id, json!({"before": i})).await);
    }
    take_until(
        &mut device,
        &mut seen,
        3,
        Duration::from_secs(20),
        "over the link",
    )
    .await;

    // The link is cut for longer than its idle timeout: it breaks. Pushes are accepted
    // meanwhile and wait in the inbox.
    relay.set_cut(true);
    let cut_at = Instant::now();
    for i in 0..5 {
        sent.push(app.push(&dev.device_id, json!({"during": i})).await);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().contains("gateway link broke") && !gw.log().contains("link closed") {
        assert!(Instant::now() < deadline, "the cut link never broke");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(cut_at.elapsed())).await;

    // Restored: the worker links again, the session rereads its inbox.
    relay.set_cut(false);
    gw.wait_linked(2).await;
    for i in 0..2 {
        sent.push(app.push(&dev.device_id, json!({"after": i})).await);
    }
    let n = sent.len();
    take_until(
        &mut device,
        &mut seen,
        n,
        Duration::from_secs(30),
        "after the link came back",
    )
    .await;
    assert_exactly(&mut device, &seen, &sent).await;
}

/// `/readyz` of a gateway process (its metrics address): the status and the body, once
/// it answers at all.
async fn gateway_readyz(gw: &GatewayProc, path: &str) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{}{path}", gw.metrics_port)).await {
            let status = r.status().as_u16();
            return (status, r.json().await.unwrap());
        }
        assert!(Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_process_is_ready_only_while_a_worker_is_linked() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = make_certs(tmp.path());
    let gw = GatewayProc::start(&certs, "gw-ready", tmp.path());
    // Alone it is alive, but it cannot authenticate a device: not ready, and it says why.
    let (status, body) = gateway_readyz(&gw, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["link"]["state"], "degraded", "{body}");
    let (status, body) = gateway_readyz(&gw, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    for name in ["devices", "link", "metrics"] {
        assert!(names.contains(&name), "{name} in {body}");
    }
    // Linked: ready.
    let mut server = serve_with(&[&gw], &certs).await;
    gw.wait_linked(1).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = gateway_readyz(&gw, "/readyz").await;
        if status == 200 {
            assert_eq!(body["checks"]["link"]["state"], "ok", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The worker gone: not ready again once the link times out.
    server.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = gateway_readyz(&gw, "/readyz").await;
        if status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "still ready: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
