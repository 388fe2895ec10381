//! Hostile clients against `herald serve`: floods of half-open HTTP requests and silent
//! or lying MQTT sockets from one address must not stop anybody else, poison the log,
//! or make herald report itself healthier than it is.
//!
//! The 24,000-socket flood comes from two child processes (this test binary run again
//! with `HERALD_ABUSE_CHILD` set), since one process may hold at most 20,000 files here.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const CHILD: &str = "HERALD_ABUSE_CHILD";

/// The child's part: opens `http` half-open requests and `mqtt` silent sockets from
/// 127.0.0.1, prints how many it holds, and holds them until its stdin closes.
fn abusive_child(spec: &str) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let n: Vec<u64> = spec.split(',').map(|x| x.parse().unwrap()).collect();
    let (http_port, mqtt_port, http, mqtt) = (n[0] as u16, n[1] as u16, n[2], n[3]);
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    setrlimit(Resource::Nofile, l).unwrap();
    let mut held = Vec::new();
    let (mut opened, mut failed) = (0u64, 0u64);
    let began = Instant::now();
    for i in 0..http + mqtt {
        let port = if i < http { http_port } else { mqtt_port };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(mut s) => {
                if i < http {
                    // Half a request: never the blank line.
                    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
                }
                held.push(s);
                opened += 1;
            }
            Err(_) => failed += 1,
        }
    }
    println!(
        "HOLDING opened={opened} failed={failed} in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    std::io::stdout().flush().unwrap();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
}

/// A REST client whose connections come from `ip`.
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(ip))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// `/readyz` from 127.0.0.2: its status and body.
async fn readyz(server: &Server) -> (u16, Value) {
    let r = client_from([127, 0, 0, 2])
        .get(format!("{}/readyz", server.base()))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// How many files the server holds open.
fn open_files(server: &Server) -> usize {
    let pid = server.child.as_ref().unwrap().id();
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Pushes to `dev` (the app's client is on 127.0.0.2; 202 expected) and has it connect
/// as a stock client from 127.0.0.3; returns how long it took from starting the client to
/// the push's arrival.
async fn received_from_elsewhere(
    server: &Server,
    app: &App,
    dev: &herald_client::DeviceCredentials,
    label: &str,
) -> Duration {
    let msg = app.push(&dev.device_id, json!({ "t": label })).await;
    let sub = tool("mosquitto_sub").expect("mosquitto_sub");
    let began = Instant::now();
    let mut device =
        MosquittoSub::start_with(&sub, server.mqtt_port, dev, 1, 1, &["-A", "127.0.0.3"]);
    let got = device.next().await;
    let took = began.elapsed();
    assert_eq!(got["id"], msg.as_str());
    assert_eq!(got["data"]["t"], label);
    took
}

/// A new device of `app` is served within a second of trying; returns how long it took.
async fn a_normal_client_is_served(server: &Server, app: &App, label: &str) -> Duration {
    let dev = app.register().await;
    let took = received_from_elsewhere(server, app, &dev, label).await;
    assert!(
        took < Duration::from_secs(1),
        "{label}: the device received after {took:?}"
    );
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_half_open_sockets_from_one_address_stops_nobody_else() {
    if let Ok(spec) = std::env::var(CHILD) {
        abusive_child(&spec);
        return;
    }
    if tool("mosquitto_sub").is_none() {
        return;
    }
    let server = Server::start().await;
    let mut app = create_app(&server).await;
    app.http = client_from([127, 0, 0, 2]);
    let took = a_normal_client_is_served(&server, &app, "before").await;
    println!("before the flood: received in {took:?}");

    // 24,000 sockets from 127.0.0.1 in two processes: 87 % half-open HTTP requests,
    // the rest silent on the MQTT port.
    let (http_each, mqtt_each) = (10_440u64, 1_560u64);
    let mut children = Vec::new();
    for _ in 0..2 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_flood_of_half_open_sockets_from_one_address_stops_nobody_else",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                CHILD,
                format!(
                    "{},{},{http_each},{mqtt_each}",
                    server.http_port, server.mqtt_port
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        children.push((child, stdout));
    }
    let mut opened = 0u64;
    for (_, stdout) in &mut children {
        let mut text = String::new();
        let mut byte = [0u8; 1];
        // The test harness prints its own words around the child's line.
        while !text
            .find("HOLDING")
            .is_some_and(|at| text[at..].contains('\n'))
        {
            assert_eq!(stdout.read(&mut byte).unwrap(), 1, "child exited: {text}");
            text.push(byte[0] as char);
        }
        let at = text.find("HOLDING").unwrap();
        let line = text[at..].lines().next().unwrap();
        println!("child: {line}");
        opened += line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("opened="))
            .unwrap()
            .parse::<u64>()
            .unwrap();
    }
    assert!(opened >= 23_000, "the flood opened only {opened} sockets");

    // While they are open: the server holds a bounded few, refused the rest, and
    // serves everybody else.
    let files = open_files(&server);
    println!("during the flood: herald holds {files} files");
    assert!(files < 2_000, "herald holds {files} files");
    let took = a_normal_client_is_served(&server, &app, "during").await;
    println!("during the flood: received in {took:?}");
    let (status, ready) = readyz(&server).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["log"]["state"], "ok", "{ready}");
    let metrics = Scrape::with(&app.http, &server).await;
    let refused_http = metrics.value("herald_listener_refused_total", &[("listener", "http")]);
    let refused_devices =
        metrics.value("herald_listener_refused_total", &[("listener", "devices")]);
    println!("refused: http {refused_http}, devices {refused_devices}");
    // Those admitted are closed after the header timeout, and more are admitted then:
    // how many were refused depends on timing, but never fewer than this.
    assert!(refused_http > 5_000.0, "{refused_http}");
    assert!(refused_devices > 2_000.0, "{refused_devices}");

    // Closed again: still served, and the log never poisoned.
    for (mut child, _) in children {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    let took = a_normal_client_is_served(&server, &app, "after").await;
    println!("after the flood: received in {took:?}");
    let (status, ready) = readyz(&server).await;
    assert_eq!(status, 200, "{ready}");
    let health = client_from([127, 0, 0, 2])
        .get(format!("{}/healthz", server.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        !server.log().contains("poisoning the log"),
        "the log was poisoned:\n{}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_and_lying_mqtt_sockets_do_not_stop_a_valid_device() {
    use herald_gateway::codec::{self, Connect, Packet};
    if tool("mosquitto_sub").is_none() {
        return;
    }
    let server = Server::start().await;
    let mut app = create_app(&server).await;
    app.http = client_from([127, 0, 0, 2]);
    let victim = app.register().await;
    let mqtt = SocketAddr::from(([127, 0, 0, 1], server.mqtt_port));

    // 2,000 sockets from 127.0.0.4 that never send CONNECT.
    let mut silent = Vec::new();
    for _ in 0..2_000 {
        if let Ok(s) = herald_net::connect_from([127, 0, 0, 4], mqtt).await {
            silent.push(s);
        }
    }
    // 2,000 from 127.0.0.5 sending a CONNECT with a wrong password, again and again.
    let mut wrong = Vec::new();
    codec::encode(
        &Packet::Connect(Connect {
            protocol_level: codec::LEVEL_311,
            client_id: victim.device_id.clone(),
            username: Some(victim.device_id.clone()),
            password: Some(b"not-the-token".to_vec()),
            keep_alive_s: 60,
            clean_session: true,
            ..Connect::default()
        }),
        &mut wrong,
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut liars = Vec::new();
    for _ in 0..2_000 {
        let (stop, attempts, wrong) = (stop.clone(), attempts.clone(), wrong.clone());
        liars.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut s) = herald_net::connect_from([127, 0, 0, 5], mqtt).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let _ = s.write_all(&wrong).await;
                let mut buf = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
                attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    // Let the flood run a moment, then the real device connects from 127.0.0.3.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let took = received_from_elsewhere(&server, &app, &victim, "through").await;
    println!(
        "the device received in {took:?} during {} wrong-password attempts",
        attempts.load(std::sync::atomic::Ordering::Relaxed)
    );
    // Connected and served while both floods go on. (Bounded generously: this test's
    // own 2,000 lying clients share the machine's two cores with the server and, under
    // `cargo test`, with other tests; it took 20 ms alone and 1.1 s at worst in a full
    // run.)
    assert!(took < Duration::from_secs(5), "{took:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in liars {
        let _ = l.await;
    }
    drop(silent);

    let metrics = Scrape::with(&app.http, &server).await;
    let not_authorized = metrics.value(
        "herald_gateway_refused_total",
        &[("reason", "not_authorized")],
    );
    let over_cap = metrics.value(
        "herald_listener_refused_total",
        &[
            ("listener", "devices"),
            ("reason", "max_unauthenticated_per_source"),
        ],
    );
    println!("refused: not authorized {not_authorized}, over the per-source cap {over_cap}");
    assert!(not_authorized >= 100.0, "{not_authorized}");
    assert!(over_cap >= 1_000.0, "{over_cap}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_out_of_files_answers_503_and_recovers_without_a_restart() {
    let Some(prlimit) = tool("prlimit") else {
        return;
    };
    // Small segments, so a few pushes start a new one.
    let server = Server::start_configured("log_segment_bytes = 4096\n", &[]).await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut conn = connect(&dev).await;
    let pid = server.child.as_ref().unwrap().id().to_string();
    let set_limit = |soft: usize| {
        let ok = Command::new(&prlimit)
            .args(["--pid", &pid, &format!("--nofile={soft}:20000")])
            .status()
            .unwrap();
        assert!(ok.success(), "prlimit failed");
    };
    // A request first, so the client's kept-alive connection exists before the process
    // may open no more files.
    let mut accepted = vec![app.push(&dev.device_id, json!({"n": 0})).await];
    set_limit(open_files(&server));
    // Pushes go on through the spare segment, until a roll finds none: that push is
    // refused with 503 and nothing else breaks.
    let mut refused = None;
    for n in 1..400 {
        let (status, body) = app
            .push_raw(json!({"to": {"device_id": dev.device_id}, "data": {"n": n}}))
            .await;
        match status {
            202 => accepted.push(body["message_id"].as_str().unwrap().to_owned()),
            503 => {
                refused = Some(body);
                break;
            }
            other => panic!("push answered {other}: {body}"),
        }
    }
    let refused = refused.expect("a push was refused once the log needed a file");
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    // Still refused while no file can be had, with a time to try again.
    let again = app
        .http
        .post(format!("{}/v1/messages", server.base()))
        .bearer_auth(&app.token)
        .json(&json!({"to": {"device_id": dev.device_id}, "data": {"n": "again"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 503);
    assert_eq!(again.headers()["retry-after"], "1");
    println!(
        "{} pushes accepted before the log needed a file: {refused}",
        accepted.len()
    );
    let ready = app
        .http
        .get(format!("{}/readyz", server.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["log"]["state"], "degraded", "{ready}");
    let live = app
        .http
        .get(format!("{}/healthz", server.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200, "not poisoned: a restart is not needed");

    // Files come back: pushes succeed again, without a restart.
    set_limit(20_000);
    let (status, body) = app
        .push_raw(json!({"to": {"device_id": dev.device_id}, "data": {"n": "after"}}))
        .await;
    assert_eq!(status, 202, "{body}");
    accepted.push(body["message_id"].as_str().unwrap().to_owned());
    // Ready again once every listener has taken what waited for a descriptor (an accept
    // loop backs off for a second at most).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = app
            .http
            .get(format!("{}/readyz", server.base()))
            .send()
            .await
            .unwrap();
        let (status, body) = (ready.status(), ready.text().await.unwrap());
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still not ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every push answered 202 reaches the device, once each, in order.
    let got = recv_n(&mut conn, accepted.len()).await;
    let ids: Vec<String> = got.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, accepted);
    assert!(
        !server.log().contains("poisoning the log"),
        "{}",
        server.log()
    );
}
