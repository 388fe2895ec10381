//! Devices in the wild: MQTT 5 (CONNACK properties, reason codes, per-message expiry
//! and ids, the device's own limits), the keep-alive policy, MQTT over WebSocket and TLS,
//! each shown with stock clients (mosquitto_sub, paho-mqtt, openssl) or, for bytes no
//! stock client sends, a raw client built on herald's codec.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use herald_gateway::codec::{
    Connect, Disconnect, LEVEL_5, Packet, Properties, Publish, Subscribe, Value, properties, reason,
};
use serde_json::json;

/// Small limits, so that each refusal is quick to trigger.
const LIMITS: &str = "
max_packet_bytes = 2048
receive_maximum = 4
keep_alive_min_s = 1
connect_timeout_s = 3
";

fn v5_connect(
    dev: &herald_client::DeviceCredentials,
    keep_alive_s: u16,
    props: Properties,
) -> Packet {
    Packet::Connect(Connect {
        protocol_level: LEVEL_5,
        keep_alive_s,
        client_id: dev.device_id.clone(),
        username: Some(dev.device_id.clone()),
        password: Some(dev.device_token.clone().into_bytes()),
        properties: props,
        ..Connect::default()
    })
}

/// An MQTT 5 device, connected (CONNACK checked) with `props`; returns the CONNACK's
/// properties too.
fn v5_device(
    port: u16,
    dev: &herald_client::DeviceCredentials,
    keep_alive_s: u16,
    props: Properties,
) -> (Raw, Properties) {
    let mut raw = Raw::open(port, LEVEL_5);
    raw.send(&v5_connect(dev, keep_alive_s, props));
    match raw.recv() {
        Packet::ConnAck(c) if c.code == 0 => (raw, c.properties),
        other => panic!("expected a successful CONNACK, got {other:?}"),
    }
}

fn subscribe(raw: &mut Raw, filters: &[(&str, u8)]) -> Vec<u8> {
    raw.send(&Packet::Subscribe(Subscribe {
        pkid: 1,
        filters: filters.iter().map(|(f, o)| (f.to_string(), *o)).collect(),
        ..Subscribe::default()
    }));
    match raw.recv() {
        Packet::SubAck(s) => s.codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// The DISCONNECT the server sends before it closes, or `None` if it closed without one.
fn disconnect_reason(raw: &mut Raw) -> Option<u8> {
    let mut reason = None;
    while let Some(p) = raw.recv_or_closed() {
        if let Packet::Disconnect(d) = p {
            reason = Some(d.reason_code);
        }
    }
    reason
}

fn user(pairs: &[(&str, &str)]) -> Properties {
    let mut p = Properties::new();
    for (k, v) in pairs {
        p.user(k, v);
    }
    p
}

/// `mosquitto_sub -V mqttv5` receives a push, with the entry's remaining life as Message
/// Expiry Interval and its id and seq as user properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_v5_receives_a_push_with_expiry_and_ids() {
    let Some(mosquitto_sub) = tool("mosquitto_sub") else {
        return;
    };
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut sub = MosquittoSub::start_with(
        &mosquitto_sub,
        server.mqtt_port,
        &dev,
        1,
        1,
        &["-V", "mqttv5", "-F", "%E|%P|%p"],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = app
        .push_raw(json!({"to": {"device_id": dev.device_id}, "data": {"v": 5}, "ttl_s": 600}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["message_id"].as_str().unwrap();
    let line = sub.0.next().await;
    let mut parts = line.splitn(3, '|');
    let (expiry, props, payload) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let expiry: u32 = expiry.parse().unwrap_or_else(|_| panic!("{line}"));
    assert!((590..=600).contains(&expiry), "{line}");
    assert!(props.contains(&format!("id:{id}")), "{line}");
    assert!(props.contains("seq:1"), "{line}");
    let envelope: serde_json::Value = serde_json::from_str(payload).unwrap();
    assert_eq!(envelope["id"], id);
    assert_eq!(envelope["data"], json!({"v": 5}));
    assert!(sub.0.child.wait().unwrap().success());
    app.wait_acked(id, 1).await;
}

/// CONNACK tells the truth: the keep-alive herald will enforce (from the network the device
/// reports, or registered with), its limits, and that retain, wildcards, subscription ids
/// and shared subscriptions are not offered. The device's Receive Maximum is honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_properties_and_the_devices_receive_maximum() {
    let server = Server::start_configured(LIMITS, &[]).await;
    let app = create_app(&server).await;
    let dev = app.register().await;

    let mut props = user(&[("network", "2g")]);
    props
        .push(properties::SESSION_EXPIRY, Value::U32(3600))
        .push(properties::RECEIVE_MAXIMUM, Value::U16(1));
    let (mut raw, connack) = v5_device(server.mqtt_port, &dev, 0, props);
    assert_eq!(connack.u16(properties::SERVER_KEEP_ALIVE), Some(180));
    assert_eq!(connack.u32(properties::SESSION_EXPIRY), Some(0));
    assert_eq!(connack.u16(properties::RECEIVE_MAXIMUM), Some(4));
    assert_eq!(connack.u32(properties::MAXIMUM_PACKET_SIZE), Some(2048));
    for flag in [
        properties::RETAIN_AVAILABLE,
        properties::WILDCARD_SUB_AVAILABLE,
        properties::SUB_ID_AVAILABLE,
        properties::SHARED_SUB_AVAILABLE,
    ] {
        assert_eq!(connack.byte(flag), Some(0), "property {flag:#04x}");
    }
    assert_eq!(
        subscribe(
            &mut raw,
            &[("inbox", 1), ("news/+", 1), ("$share/g/inbox", 1)]
        ),
        vec![
            1,
            reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
            reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
        ]
    );

    // Receive Maximum 1: the second push waits for the first one's PUBACK.
    let first = app.push(&dev.device_id, json!(1)).await;
    let second = app.push(&dev.device_id, json!(2)).await;
    let Packet::Publish(p) = raw.recv() else {
        panic!("expected a PUBLISH")
    };
    assert_eq!(p.properties.user_value("id"), Some(first.as_str()));
    assert_eq!(p.properties.user_value("seq"), Some("1"));
    assert!(p.properties.u32(properties::MESSAGE_EXPIRY).is_some());
    raw.s
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut probe = [0u8; 1];
    assert!(
        std::io::Read::read(&mut raw.s, &mut probe).is_err(),
        "a second PUBLISH arrived beyond the device's Receive Maximum"
    );
    raw.s
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    raw.send(&Packet::PubAck(p.pkid));
    let Packet::Publish(p) = raw.recv() else {
        panic!("expected a PUBLISH")
    };
    assert_eq!(p.properties.user_value("id"), Some(second.as_str()));
    raw.send(&Packet::PubAck(p.pkid));
    app.wait_acked(&second, 1).await;

    // The device's Maximum Packet Size: a push whose PUBLISH would exceed it is not sent
    // (it stays in the inbox), the next one is.
    let mut props = Properties::new();
    props.push(properties::MAXIMUM_PACKET_SIZE, Value::U32(300));
    let (mut raw, _) = v5_device(server.mqtt_port, &dev, 60, props);
    assert_eq!(subscribe(&mut raw, &[("inbox", 1)]), vec![1]);
    let big = app.push(&dev.device_id, json!("x".repeat(400))).await;
    let small = app.push(&dev.device_id, json!("small")).await;
    let Packet::Publish(p) = raw.recv() else {
        panic!("expected a PUBLISH")
    };
    assert_eq!(p.properties.user_value("id"), Some(small.as_str()));
    raw.send(&Packet::PubAck(p.pkid));
    app.wait_acked(&small, 1).await;
    let (_, status) = app.status(&big).await;
    assert_eq!(status["acked"], 0, "{status}");

    // A device that reports nothing gets the keep-alive of the network it registered
    // with; one that asks for a keep-alive gets it, held to the bounds.
    let on_3g = register_on(&app, "3g", server.mqtt_port).await;
    let (_raw, connack) = v5_device(server.mqtt_port, &on_3g, 0, Properties::new());
    assert_eq!(connack.u16(properties::SERVER_KEEP_ALIVE), Some(240));
    let (_raw, connack) = v5_device(server.mqtt_port, &on_3g, 65_000, Properties::new());
    assert_eq!(connack.u16(properties::SERVER_KEEP_ALIVE), Some(3600));
}

/// Every refusal and disconnect carries its MQTT 5 reason code, bad input included, and
/// the server serves the next device as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_disconnects_carry_reason_codes() {
    let server = Server::start_configured(LIMITS, &[]).await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let port = server.mqtt_port;

    // 0x87 Not authorized: a wrong token.
    let mut raw = Raw::open(port, LEVEL_5);
    let mut wrong = dev.clone();
    wrong.device_token = "not-the-token".into();
    raw.send(&v5_connect(&wrong, 60, Properties::new()));
    match raw.recv() {
        Packet::ConnAck(c) => assert_eq!(c.code, reason::NOT_AUTHORIZED),
        other => panic!("{other:?}"),
    }
    assert!(raw.recv_or_closed().is_none());

    // 0x8C Bad authentication method: enhanced authentication is not offered.
    let mut raw = Raw::open(port, LEVEL_5);
    let mut props = Properties::new();
    props.push(properties::AUTH_METHOD, Value::Str("SCRAM-SHA-1".into()));
    raw.send(&v5_connect(&dev, 60, props));
    assert!(matches!(raw.recv(), Packet::ConnAck(c) if c.code == reason::BAD_AUTH_METHOD));

    // 0x82 Protocol Error: a property twice in CONNECT (the codec writes what it is
    // given).
    let mut raw = Raw::open(port, LEVEL_5);
    let mut twice = Properties::new();
    twice
        .push(properties::RECEIVE_MAXIMUM, Value::U16(5))
        .push(properties::RECEIVE_MAXIMUM, Value::U16(6));
    raw.send(&v5_connect(&dev, 60, twice));
    assert!(matches!(raw.recv(), Packet::ConnAck(c) if c.code == reason::PROTOCOL_ERROR));
    assert!(raw.recv_or_closed().is_none());

    // 0x8E Session taken over: the same device connects again.
    let (mut old, _) = v5_device(port, &dev, 60, Properties::new());
    let (mut new, _) = v5_device(port, &dev, 60, Properties::new());
    assert_eq!(
        disconnect_reason(&mut old),
        Some(reason::SESSION_TAKEN_OVER)
    );

    // 0x95 Packet too large: a PUBLISH over herald's Maximum Packet Size (2048).
    new.send(&Packet::Publish(Publish {
        qos: 1,
        topic: "up".into(),
        pkid: 1,
        payload: vec![0u8; 3000].into(),
        ..Publish::default()
    }));
    assert_eq!(disconnect_reason(&mut new), Some(reason::PACKET_TOO_LARGE));

    // 0x93 Receive Maximum exceeded: five QoS 2 PUBLISHes unreleased against 4.
    let (mut raw, _) = v5_device(port, &dev, 60, Properties::new());
    for pkid in 1..=5 {
        raw.send(&Packet::Publish(Publish {
            qos: 2,
            topic: "up".into(),
            pkid,
            payload: b"x".to_vec().into(),
            ..Publish::default()
        }));
    }
    assert_eq!(
        disconnect_reason(&mut raw),
        Some(reason::RECEIVE_MAXIMUM_EXCEEDED)
    );

    // 0x81 Malformed Packet: a SUBSCRIBE whose properties name an undefined one, and
    // raw bytes that are no packet at all.
    let subscribe_with = |props: Properties| {
        Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![("inbox".into(), 1)],
            properties: props,
        })
    };
    let mut undefined = Properties::new();
    undefined.push(0x7F, Value::Byte(0));
    let (mut raw, _) = v5_device(port, &dev, 60, Properties::new());
    raw.send(&subscribe_with(undefined));
    assert_eq!(disconnect_reason(&mut raw), Some(reason::MALFORMED));
    let (mut raw, _) = v5_device(port, &dev, 60, Properties::new());
    raw.send_bytes(&[0x82, 0x03, 0x00, 0x01, 0x09]);
    assert_eq!(disconnect_reason(&mut raw), Some(reason::MALFORMED));

    // 0x82 Protocol Error: a SUBSCRIBE with its Subscription Identifier twice.
    let mut twice = Properties::new();
    twice
        .push(properties::SUBSCRIPTION_ID, Value::VarInt(1))
        .push(properties::SUBSCRIPTION_ID, Value::VarInt(2));
    let (mut raw, _) = v5_device(port, &dev, 60, Properties::new());
    raw.send(&subscribe_with(twice));
    assert_eq!(disconnect_reason(&mut raw), Some(reason::PROTOCOL_ERROR));

    // 0x8D Keep Alive timeout: silent past 1.5 x 1 s.
    let (mut raw, connack) = v5_device(port, &dev, 1, Properties::new());
    assert_eq!(connack.u16(properties::SERVER_KEEP_ALIVE), Some(1));
    let started = Instant::now();
    assert_eq!(
        disconnect_reason(&mut raw),
        Some(reason::KEEP_ALIVE_TIMEOUT)
    );
    assert!(started.elapsed() >= Duration::from_millis(1400));

    // A socket that sends no CONNECT is closed after connect_timeout_s (3 s).
    let mut silent = Raw::open(port, LEVEL_5);
    let started = Instant::now();
    assert!(silent.recv_or_closed().is_none());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );

    // The server is unharmed: a device connects and gets its push.
    let (mut raw, _) = v5_device(port, &dev, 60, Properties::new());
    assert_eq!(subscribe(&mut raw, &[("inbox", 1)]), vec![1]);
    let m = app.push(&dev.device_id, json!("still here")).await;
    loop {
        match raw.recv() {
            Packet::Publish(p) if p.properties.user_value("id") == Some(m.as_str()) => {
                raw.send(&Packet::PubAck(p.pkid));
                break;
            }
            Packet::Publish(p) => raw.send(&Packet::PubAck(p.pkid)),
            other => panic!("{other:?}"),
        }
    }
    app.wait_acked(&m, 1).await;
    raw.send(&Packet::Disconnect(Disconnect::default()));
    assert!(raw.recv_or_closed().is_none());
}

/// paho-mqtt (Python) receives a push over MQTT 5 on TCP and over WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_receives_pushes_over_mqtt5_and_websocket() {
    let Some(python) = python_with("paho.mqtt") else {
        return;
    };
    let server = Server::start().await;
    let app = create_app(&server).await;
    for (transport, port) in [("tcp", server.mqtt_port), ("websockets", server.ws_port)] {
        let dev = app.register().await;
        let mut paho = paho_sub(&python, transport, port, &dev, &[]);
        assert_eq!(paho.next().await, "subscribed");
        let m = app.push(&dev.device_id, json!({"via": transport})).await;
        let got: serde_json::Value = serde_json::from_str(&paho.next().await).unwrap();
        assert_eq!(got["user"]["id"], m.as_str(), "{got}");
        assert_eq!(got["envelope"]["data"], json!({"via": transport}));
        app.wait_acked(&m, 1).await;
    }
}

/// MQTT.js in headless Chromium (a page served by the test) receives a push over
/// WebSocket: the message is read from the page's DOM, and a screenshot taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_js_in_headless_chromium_receives_a_push() {
    let Some((node, browser)) = headless_browser() else {
        return;
    };
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let shots = tempfile::tempdir().unwrap();
    let shot = shots.path().join("page.png");
    let mut cmd = Command::new(node);
    cmd.arg(browser.join("run.mjs"))
        .args(["--url", &format!("ws://127.0.0.1:{}/mqtt", server.ws_port)])
        .args(["--id", &dev.device_id, "--token", &dev.device_token])
        .arg("--screenshot")
        .arg(&shot);
    let mut page = Lines::spawn(cmd);
    assert_eq!(page.next_within(60).await, "subscribed");
    let m = app
        .push(&dev.device_id, json!({"title": "hello, browser"}))
        .await;
    let shown: serde_json::Value = serde_json::from_str(&page.next().await).unwrap();
    assert_eq!(shown["id"], m.as_str(), "{shown}");
    assert_eq!(shown["user_id"], m.as_str(), "{shown}");
    assert_eq!(shown["seq"], 1);
    assert_eq!(shown["data"], json!({"title": "hello, browser"}));
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 1000,
        "no screenshot"
    );
    app.wait_acked(&m, 1).await;
}

/// TLS: `mosquitto_sub --cafile` receives a push over TLS, paho over WebSocket on TLS,
/// and a client offering only TLS 1.0 or 1.1 is refused while TLS 1.2 is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_for_mqtt_and_websocket_refuses_old_versions() {
    let Some(mosquitto_sub) = tool("mosquitto_sub") else {
        return;
    };
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = make_certs(certs_dir.path());
    let (cert, key) = (
        certs.join("gateway.crt").display().to_string(),
        certs.join("gateway.key").display().to_string(),
    );
    let server = Server::start_with(&[("HERALD_TLS_CERT", &cert), ("HERALD_TLS_KEY", &key)]).await;
    let app = create_app(&server).await;
    // Registration tells devices where to connect, now over TLS.
    let dev = register_on(&app, "wifi", server.mqtt_port).await;
    let ca = certs.join("ca.crt").display().to_string();

    let mut sub = MosquittoSub::start_with(
        &mosquitto_sub,
        server.mqtt_port,
        &dev,
        1,
        1,
        &["--cafile", &ca, "-V", "mqttv5"],
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let m = app.push(&dev.device_id, json!("over tls")).await;
    assert_eq!(sub.next().await["id"], m.as_str());
    assert!(sub.0.child.wait().unwrap().success());

    // Plain MQTT on the TLS port gets a TLS alert, not a CONNACK.
    let mut plain = Raw::open(server.mqtt_port, LEVEL_5);
    plain.send(&v5_connect(&dev, 60, Properties::new()));
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain.s, &mut answer);
    assert_eq!(answer.first(), Some(&0x15), "{answer:?}");

    for (version, accepted) in [("-tls1", false), ("-tls1_1", false), ("-tls1_2", true)] {
        let out = Command::new(&openssl)
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", server.mqtt_port),
            ])
            .args([version, "-CAfile", &ca, "-cipher", "DEFAULT:@SECLEVEL=0"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A completed handshake shows the server's certificate and a cipher; a refused
        // one "Cipher is (NONE)" and the alert.
        let handshaken = out.status.success()
            && text.contains("BEGIN CERTIFICATE")
            && !text.contains("Cipher is (NONE)");
        assert_eq!(handshaken, accepted, "openssl s_client {version}: {text}");
    }

    if let Some(python) = python_with("paho.mqtt") {
        let dev = register_on(&app, "wifi", server.mqtt_port).await;
        let mut paho = paho_sub(
            &python,
            "websockets",
            server.ws_port,
            &dev,
            &["--cafile", &ca],
        );
        assert_eq!(paho.next().await, "subscribed");
        let m = app.push(&dev.device_id, json!("wss")).await;
        let got: serde_json::Value = serde_json::from_str(&paho.next().await).unwrap();
        assert_eq!(got["user"]["id"], m.as_str(), "{got}");
    }
}

/// Registers a device that reports `network`, through the REST API.
async fn register_on(app: &App, network: &str, port: u16) -> herald_client::DeviceCredentials {
    let r = app
        .http
        .post(format!("{}/v1/devices", app.base))
        .json(&json!({"app_key": app.app_key, "network": network}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    let scheme = body["gateway"]["mqtt"]
        .as_str()
        .unwrap()
        .split("://")
        .next();
    let tls = body["gateway"]["ws"]
        .as_str()
        .unwrap()
        .starts_with("wss://");
    assert_eq!(scheme == Some("mqtts"), tls, "{body}");
    herald_client::DeviceCredentials {
        device_id: body["device_id"].as_str().unwrap().into(),
        device_token: body["device_token"].as_str().unwrap().into(),
        mqtt_host: "127.0.0.1".into(),
        mqtt_port: port,
        keep_alive_s: None,
    }
}

/// A Python with `module` importable, or why the test that needs it is skipped (scripts/test
/// installs tests/clients/requirements.txt).
fn python_with(module: &str) -> Option<String> {
    let python = std::env::var("HERALD_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    if std::env::var("HERALD_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
        panic!("{python} cannot import {module} (HERALD_REQUIRE_TOOLS=1)");
    }
    eprintln!("SKIPPED: {python} cannot import {module} (scripts/test installs it)");
    None
}

/// tests/clients/paho_sub.py as `dev`: prints `subscribed`, then a JSON line per message.
fn paho_sub(
    python: &str,
    transport: &str,
    port: u16,
    dev: &herald_client::DeviceCredentials,
    extra: &[&str],
) -> Lines {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/paho_sub.py");
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .args(["--transport", transport, "--port", &port.to_string()])
        .args(["--device-id", &dev.device_id])
        // `--token=…` in one argument: a token may start with `-`, which argparse would
        // take for an option.
        .arg(format!("--token={}", dev.device_token))
        .args(extra);
    Lines::spawn(cmd)
}
