//! End-to-end tests of the assembled `herald` binary with stock clients: mosquitto_sub
//! and rumqttc for devices, reqwest for the REST API.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Item 1: a stock `mosquitto_sub` receives a push; the status reports it acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_receives_pushes_and_status_reports_acked() {
    let Some(mosquitto_sub) = tool("mosquitto_sub") else {
        return;
    };
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    // The first push waits in the inbox (backlog); the second goes out live.
    let m1 = app.push(&dev.device_id, json!({"text": "first"})).await;

    let mut sub = MosquittoSub::start(&mosquitto_sub, server.mqtt_port, &dev, 1, 2);
    let line1 = sub.next().await;
    assert_eq!(line1["id"], m1.as_str());
    assert_eq!(line1["seq"], 1);
    assert_eq!(line1["data"], json!({"text": "first"}));

    let m2 = app.push(&dev.device_id, json!({"text": "second"})).await;
    let line2 = sub.next().await;
    assert_eq!(line2["id"], m2.as_str());
    assert_eq!(line2["seq"], 2);
    assert_eq!(line2["data"]["text"], "second");
    assert!(line2["ts"].as_u64().unwrap() >= line1["ts"].as_u64().unwrap());

    for m in [&m1, &m2] {
        let s = app.wait_acked(m, 1).await;
        assert_eq!(s["state"], "delivered", "{s}");
        assert_eq!(s["targeted"], 1);
        assert_eq!(s["delivered"], 1);
    }
    let status = sub.0.child.wait().unwrap();
    assert!(status.success(), "mosquitto_sub: {status}");
}

/// Item 2: 1,000 pushes to an offline device arrive once each, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_backlog_of_1000_arrives_once_in_order() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut sent = Vec::new();
    // Sixteen publishers at a time: the log decides the order, seq follows it.
    for chunk in (0..1000).collect::<Vec<_>>().chunks(16) {
        let futs = chunk
            .iter()
            .map(|i| app.push(&dev.device_id, json!({ "n": i })));
        sent.extend(futures::future::join_all(futs).await);
    }
    let mut conn = connect(&dev).await;
    let got = recv_n(&mut conn, 1000).await;
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=1000).collect::<Vec<u64>>(),
        "in seq order, dense"
    );
    let ids: HashSet<&str> = got.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 1000, "each message once");
    assert_eq!(ids, sent.iter().map(String::as_str).collect::<HashSet<_>>());
    // Nothing more arrives: a sentinel is the very next message.
    let last = app.push(&dev.device_id, json!("sentinel")).await;
    let next = recv_n(&mut conn, 1).await;
    assert_eq!(next[0].id, last);
    assert_eq!(next[0].seq, 1001);
}

/// Item 3: every push answered 202 survives SIGKILL; acked pushes are not redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_pushes_survive_sigkill_and_acked_ones_are_not_resent() {
    let mut server = Server::start().await;
    let app = create_app(&server).await;
    let online = app.register().await;
    let offline = app.register().await;

    // Phase 1: the online device receives and acks 50 pushes.
    let mut conn = connect(&online).await;
    let mut acked = Vec::new();
    for i in 0..50 {
        acked.push(app.push(&online.device_id, json!({ "acked": i })).await);
    }
    let got = recv_n(&mut conn, 50).await;
    assert_eq!(
        got.iter().map(|e| &e.id).collect::<Vec<_>>(),
        acked.iter().collect::<Vec<_>>()
    );
    for m in &acked {
        app.wait_acked(m, 1).await;
    }
    drop(conn);

    // Phase 2: 200 pushes to a device that is offline, then kill -9 right after the
    // last 202.
    let mut accepted = Vec::new();
    for chunk in (0..200).collect::<Vec<_>>().chunks(20) {
        let futs = chunk
            .iter()
            .map(|i| app.push(&offline.device_id, json!({ "n": i })));
        accepted.extend(futures::future::join_all(futs).await);
    }
    server.kill9();
    server.restart().await;

    let mut conn = connect(&offline).await;
    let got = recv_n(&mut conn, 200).await;
    let ids: HashSet<&str> = got.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        accepted.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    assert_eq!(
        got.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=200).collect::<Vec<u64>>()
    );

    // The online device had acked all of its 50: after the crash it gets none of them
    // again; the first thing it sees is a new push.
    let mut conn = connect(&online).await;
    let fresh = app.push(&online.device_id, json!("after crash")).await;
    let next = recv_n(&mut conn, 1).await;
    assert_eq!(next[0].id, fresh, "an acked message was sent again");
    assert_eq!(next[0].seq, 51);
}

/// Item 4: a broadcast reaches each of 200 connected devices of the app, once, and none
/// of another app's devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_device_of_the_app_and_no_other() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let other = create_app(&server).await;
    let mut conns = Vec::new();
    for _ in 0..200 {
        let dev = app.register().await;
        conns.push(connect(&dev).await);
    }
    let mut others = Vec::new();
    for _ in 0..5 {
        let dev = other.register().await;
        others.push((dev.clone(), connect(&dev).await));
    }
    let m = app.broadcast(json!({"all": true})).await;
    for c in &mut conns {
        let got = recv_n(c, 1).await;
        assert_eq!(got[0].id, m);
        assert_eq!(got[0].data, json!({"all": true}));
    }
    let s = app.wait_acked(&m, 200).await;
    assert_eq!(s["targeted"], 200);
    // The other app's devices: the first message each sees is its own app's sentinel.
    for (dev, c) in &mut others {
        let sentinel = other.push(&dev.device_id, json!("mine")).await;
        let got = recv_n(c, 1).await;
        assert_eq!(got[0].id, sentinel, "another app's broadcast leaked");
    }
    // And no device got it twice.
    for c in &mut conns {
        assert!(c.messages.try_recv().is_err());
    }
}

/// Item 5: a second connection with the same device id closes the first; only the new
/// one receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_takes_over() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut first = connect(&dev).await;
    let m1 = app.push(&dev.device_id, json!(1)).await;
    assert_eq!(recv_n(&mut first, 1).await[0].id, m1);
    // Once its ack is applied, m1 is not resent to the next connection.
    app.wait_acked(&m1, 1).await;

    let mut second = connect(&dev).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), &mut first.closed)
        .await
        .expect("the first connection was not closed")
        .unwrap();
    assert!(
        matches!(closed, herald_client::Closed::Lost(_)),
        "{closed:?}"
    );

    let m2 = app.push(&dev.device_id, json!(2)).await;
    let got = recv_n(&mut second, 1).await;
    assert_eq!(got[0].id, m2);
    assert!(
        first.messages.recv().await.is_none(),
        "the old connection received"
    );
}

/// Item 6: bad input gets a clear error, and the server keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_service_continues() {
    let server = Server::start_with(&[("HERALD_TOKEN_TTL_S", "2")]).await;
    let app = create_app(&server).await;
    let other = create_app(&server).await;
    let dev = app.register().await;
    let foreign = other.register().await;
    let http = reqwest::Client::new();
    let base = server.base();

    let expect_error = |status: u16, code: &'static str| {
        move |(s, body): (u16, Value)| {
            assert_eq!(s, status, "{body}");
            assert_eq!(body["error"]["code"], code, "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
    };
    async fn send(rb: reqwest::RequestBuilder) -> (u16, Value) {
        let r = rb.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    // Malformed JSON: 400.
    expect_error(400, "malformed_json")(
        send(
            http.post(format!("{base}/v1/messages"))
                .bearer_auth(&app.token)
                .header("content-type", "application/json")
                .body("{\"to\": {"),
        )
        .await,
    );
    // Missing token, forged token (another key), alg none: 401.
    expect_error(401, "missing_token")(
        send(http.post(format!("{base}/v1/messages")).json(&json!({}))).await,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": "herald", "sub": app.app_id, "iat": now, "exp": now + 600});
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"not the server's key at all....."),
    )
    .unwrap();
    let push_body = json!({"to": {"device_id": dev.device_id}, "data": 1});
    expect_error(401, "invalid_token")(
        send(
            http.post(format!("{base}/v1/messages"))
                .bearer_auth(&forged)
                .json(&push_body),
        )
        .await,
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    );
    expect_error(401, "invalid_token")(
        send(
            http.post(format!("{base}/v1/messages"))
                .bearer_auth(&none)
                .json(&push_body),
        )
        .await,
    );
    // Wrong admin token and wrong client secret: 401.
    expect_error(401, "invalid_token")(
        send(http.post(format!("{base}/v1/apps")).bearer_auth("nope")).await,
    );
    expect_error(401, "invalid_client")(
        send(http.post(format!("{base}/oauth/token")).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", app.client_id.as_str()),
            ("client_secret", "wrong"),
        ]))
        .await,
    );
    // Another app's device: 404, exactly like a device that does not exist.
    expect_error(404, "not_found")(
        app.push_raw(json!({"to": {"device_id": foreign.device_id}, "data": 1}))
            .await,
    );
    expect_error(404, "not_found")(
        app.push_raw(json!({"to": {"device_id": "no-such-device"}, "data": 1}))
            .await,
    );
    // Another app's message: 404.
    let theirs = other.push(&foreign.device_id, json!(1)).await;
    expect_error(404, "not_found")(app.status(&theirs).await);
    // Oversized data (4 KiB default) and oversized body: 413.
    expect_error(413, "data_too_large")(
        app.push_raw(json!({"to": {"device_id": dev.device_id}, "data": "x".repeat(5000)}))
            .await,
    );
    expect_error(413, "body_too_large")(
        app.push_raw(json!({"to": {"device_id": dev.device_id}, "data": "x".repeat(100_000)}))
            .await,
    );
    // Invalid fields: 422.
    expect_error(422, "invalid_request")(app.push_raw(json!({"to": {}, "data": 1})).await);
    expect_error(422, "invalid_request")(
        app.push_raw(json!({"to": {"device_id": dev.device_id}, "data": 1, "ttl_s": 0}))
            .await,
    );

    // A garbage CONNECT and a CONNECT with a lying length: the server closes that
    // connection only.
    for garbage in [
        &b"\x10\x05hello"[..],
        &b"\x10\xff\xff\xff\xff\x7fxx"[..],
        &b"GET / HTTP/1.1\r\n\r\n"[..],
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.mqtt_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(garbage).unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "expected the server to close, got {:?}", &buf[..n]);
    }
    // A bad password: CONNACK "not authorized".
    let mut bad = dev.clone();
    bad.device_token = "wrong".into();
    let err = herald_client::connect(&bad, herald_client::ConnectOptions::default())
        .await
        .err()
        .expect("a wrong password must be refused");
    assert!(err.to_string().contains("NotAuthorized"), "{err}");

    // The server still delivers.
    let mut conn = connect(&dev).await;
    let m = app.push(&dev.device_id, json!("still here")).await;
    assert_eq!(recv_n(&mut conn, 1).await[0].id, m);

    // An expired token: 401 (tokens here live 2 s).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    expect_error(401, "invalid_token")(
        app.push_raw(json!({"to": {"device_id": dev.device_id}, "data": 1}))
            .await,
    );
}

/// `/openapi.json` describes the routes, generated from the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_the_routes() {
    let server = Server::start().await;
    let doc: Value = reqwest::get(format!("{}/openapi.json", server.base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/v1/apps",
        "/oauth/token",
        "/v1/devices",
        "/v1/messages",
        "/v1/messages/{id}",
        "/v1/admin/events",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    let r = reqwest::get(format!("{}/v1/nope", server.base()))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// SIGTERM stops the server cleanly; a restart resumes from its checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_restart_resumes() {
    let mut server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(app.push(&dev.device_id, json!(i)).await);
    }
    let status = server.terminate();
    assert!(status.success(), "exit status {status}: {}", server.log());
    assert!(server.log().contains("stopped"), "{}", server.log());
    server.start_again().await;
    // The app, its token and the device are all still there.
    let mut conn = connect(&dev).await;
    let got = recv_n(&mut conn, 5).await;
    assert_eq!(got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), sent);
    let m = app.push(&dev.device_id, json!("after restart")).await;
    let next = recv_n(&mut conn, 1).await;
    assert_eq!((next[0].id.as_str(), next[0].seq), (m.as_str(), 6));
}

/// An entry sent but never acknowledged is sent again, with the same seq, on the next
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_entry_is_resent_on_the_next_connection() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let m = app.push(&dev.device_id, json!("ack me later")).await;

    // A stock client that does not acknowledge (manual acks, never sent).
    let mut opts = MqttOptions::new(&dev.device_id, "127.0.0.1", server.mqtt_port);
    opts.set_credentials(&dev.device_id, &dev.device_token)
        .set_manual_acks(true);
    let (client, mut el) = AsyncClient::new(opts, 10);
    client.subscribe("inbox", QoS::AtLeastOnce).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                return herald_schemas::envelope::decode(&p.payload).unwrap();
            }
        }
    })
    .await
    .unwrap();
    assert_eq!((first.id.as_str(), first.seq), (m.as_str(), 1));
    drop(client);
    drop(el);

    let mut conn = connect(&dev).await;
    let again = recv_n(&mut conn, 1).await;
    assert_eq!((again[0].id.as_str(), again[0].seq), (m.as_str(), 1));
    app.wait_acked(&m, 1).await;
}

/// A connection silent for 1.5 x its keep-alive is closed by the server (here with the
/// keep-alive's lower bound, 30 s by default, set to 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_after_one_and_a_half_keep_alives() {
    let server = Server::start_configured("keep_alive_min_s = 1", &[]).await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    // CONNECT with keep-alive 1 s, written by hand so nothing pings.
    let mut body = Vec::new();
    body.extend_from_slice(b"\x00\x04MQTT\x04\xc2\x00\x01");
    for field in [&dev.device_id, &dev.device_id, &dev.device_token] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    assert!(body.len() < 16_384);
    let mut packet = vec![0x10];
    if body.len() < 128 {
        packet.push(body.len() as u8);
    } else {
        packet.extend_from_slice(&[(body.len() % 128) as u8 | 0x80, (body.len() / 128) as u8]);
    }
    packet.extend_from_slice(&body);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.mqtt_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&packet).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    let started = std::time::Instant::now();
    let mut buf = [0u8; 8];
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "expected the server to close"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
}
