//! End-to-end tests of the device SDK (`herald_client::Device`) against the built
//! `herald` binary: every message is shown to the app once, in order, and acknowledged
//! after the app, across a slow handler, connections killed by the client, and a
//! kill -9 and restart of the server.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use herald_client::{
    Device, DeviceCredentials, DeviceEvent, DeviceHandle, DeviceOptions, DisconnectReason, Envelope,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

/// Options that retry quickly, so a restarted server is found again within a second.
fn options() -> DeviceOptions {
    let mut o = DeviceOptions::default();
    o.backoff.initial_delay = Duration::from_millis(50);
    o.backoff.max_delay = Duration::from_millis(500);
    o.backoff.reset_after = Duration::ZERO;
    o
}

/// What the app saw: each message with the time it was handled.
type Seen = mpsc::UnboundedReceiver<(Envelope, Instant)>;

/// A device running a handler that records each message, taking `delay` per message.
struct Running {
    handle: DeviceHandle,
    events: tokio::sync::broadcast::Receiver<DeviceEvent>,
    seen: Seen,
    task: JoinHandle<Result<(), herald_client::Error>>,
}

async fn run_device(creds: &DeviceCredentials, opts: DeviceOptions, delay: Duration) -> Running {
    let mut device = Device::start(creds, opts).await.unwrap();
    let handle = device.handle();
    let events = device.events();
    let (tx, seen) = mpsc::unbounded_channel();
    let task = tokio::spawn(device.run(move |env| {
        let tx = tx.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _ = tx.send((env, Instant::now()));
        }
    }));
    Running {
        handle,
        events,
        seen,
        task,
    }
}

impl Running {
    /// Receives exactly `n` messages.
    async fn recv_n(&mut self, n: usize) -> Vec<Envelope> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match tokio::time::timeout(WAIT, self.seen.recv()).await {
                Ok(Some((m, _))) => out.push(m),
                Ok(None) => panic!("device stopped after {} of {n} messages", out.len()),
                Err(_) => panic!("timed out after {} of {n} messages", out.len()),
            }
        }
        out
    }

    /// Waits for an event matching `f`, skipping others.
    async fn event(&mut self, f: impl Fn(&DeviceEvent) -> bool) -> DeviceEvent {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Ok(e) if f(&e) => return e,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => panic!("events ended: {e}"),
                }
            }
        })
        .await
        .expect("timed out waiting for an event")
    }

    async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Asserts that `got` is exactly the messages `sent`, once each, in seq order from
/// `first_seq`.
fn assert_once_in_order(got: &[Envelope], sent: &[String], first_seq: u64) {
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    let want: Vec<u64> = (first_seq..first_seq + sent.len() as u64).collect();
    assert_eq!(seqs, want, "seq order, dense, no duplicate");
    let ids: Vec<&str> = got.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "each id once"
    );
    assert_eq!(
        ids.iter().copied().collect::<HashSet<_>>(),
        sent.iter().map(String::as_str).collect::<HashSet<_>>()
    );
}

/// Pushes `n` messages to one device, 16 at a time; returns their ids (in the order of
/// the requests, which is not always the log's: the seq order is what the device sees).
async fn push_n(app: &App, device_id: &str, n: usize, tag: &str) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let futs = chunk
            .iter()
            .map(|i| app.push(device_id, json!({ "tag": tag, "n": i })));
        ids.extend(futures::future::join_all(futs).await);
    }
    ids
}

/// Backlog and live messages arrive once each, in order; each is acknowledged after the
/// handler returns; nothing more arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arrive_once_in_order_and_are_acked_after_the_app() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut sent = push_n(&app, &dev.device_id, 50, "backlog").await;

    let mut device = Device::start(&dev, options()).await.unwrap();
    let handle = device.handle();
    let mut got = Vec::new();
    for _ in 0..50 {
        let m = tokio::time::timeout(WAIT, device.next())
            .await
            .unwrap()
            .unwrap();
        got.push(m.envelope().clone());
    }
    sent.extend(push_n(&app, &dev.device_id, 50, "live").await);
    let mut held = None;
    for i in 0..50 {
        let m = tokio::time::timeout(WAIT, device.next())
            .await
            .unwrap()
            .unwrap();
        got.push(m.envelope().clone());
        if i == 49 {
            held = Some(m);
        }
    }
    assert_once_in_order(&got, &sent, 1);

    // The last message is held by the app: not acknowledged until it is done.
    app.wait_acked(&got[98].id, 1).await;
    let last = held.take().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, status) = app.status(&last.id).await;
    assert_eq!(status["acked"], 0, "acknowledged before the app was done");
    let last_id = last.id.clone();
    last.ack();
    app.wait_acked(&last_id, 1).await;

    // Nothing more: a sentinel is the very next message.
    let sentinel = app.push(&dev.device_id, json!("sentinel")).await;
    let m = tokio::time::timeout(WAIT, device.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.id.as_str(), m.seq), (sentinel.as_str(), 101));
    assert_eq!(device.last_seq(), 101);
    assert_eq!(handle.status().connections, 1);
    device.close().await.unwrap();
}

/// A handler far slower than the pushes still gets everything, once, in order: more
/// messages than the gateway's in-flight window wait on the server, not in the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_still_gets_everything() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut running = run_device(&dev, options(), Duration::from_millis(15)).await;
    running
        .event(|e| matches!(e, DeviceEvent::Connected { .. }))
        .await;
    let sent = push_n(&app, &dev.device_id, 120, "slow").await;
    let got = running.recv_n(120).await;
    assert_once_in_order(&got, &sent, 1);
    app.wait_acked(&got[119].id, 1).await;
    assert_eq!(running.handle.status().connections, 1);
    running.stop().await;
}

/// Killing the device's connection at random while messages flow: the device reconnects
/// by itself and the app sees every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_connection_the_device_resumes_without_duplicates_or_gaps() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let mut running = run_device(&dev, options(), Duration::from_millis(2)).await;
    running
        .event(|e| matches!(e, DeviceEvent::Connected { connection: 1 }))
        .await;

    let pusher = tokio::spawn({
        let app = app.clone();
        let id = dev.device_id.clone();
        async move { push_n(&app, &id, 300, "kill").await }
    });
    let kills = 5u64;
    for k in 1..=kills {
        tokio::time::sleep(Duration::from_millis(100 + 37 * k)).await;
        let before = running.handle.status().connections;
        running.handle.kill_connection();
        running
            .event(|e| {
                matches!(
                    e,
                    DeviceEvent::Disconnected {
                        reason: DisconnectReason::Killed,
                        ..
                    }
                )
            })
            .await;
        let s = running
            .handle
            .wait_status(|s| s.connected && s.connections > before)
            .await;
        assert!(!s.stopped);
    }
    let sent = pusher.await.unwrap();
    let got = running.recv_n(300).await;
    assert_once_in_order(&got, &sent, 1);
    assert!(running.handle.status().connections > kills);
    app.wait_acked(&got[299].id, 1).await;

    // No duplicate is left to come: the next message is a fresh one.
    let sentinel = app.push(&dev.device_id, json!("sentinel")).await;
    let next = running.recv_n(1).await;
    assert_eq!((next[0].id.as_str(), next[0].seq), (sentinel.as_str(), 301));
    running.stop().await;
}

/// kill -9 and restart of the server while messages flow to several devices: each
/// reconnects by itself and sees every accepted message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_server_kill9_and_restart_devices_resume_without_duplicates_or_gaps() {
    let mut server = Server::start().await;
    let app = create_app(&server).await;
    let mut devices = Vec::new();
    for _ in 0..10 {
        let dev = app.register().await;
        let running = run_device(&dev, options(), Duration::from_millis(3)).await;
        devices.push((dev, running));
    }
    for (_, r) in &mut devices {
        r.event(|e| matches!(e, DeviceEvent::Connected { connection: 1 }))
            .await;
    }
    let mut sent = Vec::new();
    for (dev, _) in &devices {
        sent.push(push_n(&app, &dev.device_id, 40, "before").await);
    }
    // Let part of it be shown (and some of it acknowledged) before the crash.
    let mut got: Vec<Vec<Envelope>> = Vec::new();
    for (_, r) in &mut devices {
        got.push(r.recv_n(10).await);
    }
    server.restart().await;
    for (_, r) in &mut devices {
        r.event(|e| matches!(e, DeviceEvent::Disconnected { .. }))
            .await;
        r.handle
            .wait_status(|s| s.connected && s.connections >= 2)
            .await;
    }
    for (i, (dev, _)) in devices.iter().enumerate() {
        sent[i].extend(push_n(&app, &dev.device_id, 20, "after").await);
    }
    for (i, (_, r)) in devices.iter_mut().enumerate() {
        got[i].extend(r.recv_n(50).await);
        assert_once_in_order(&got[i], &sent[i], 1);
    }
    for (i, (dev, r)) in devices.iter_mut().enumerate() {
        app.wait_acked(&got[i][59].id, 1).await;
        let sentinel = app.push(&dev.device_id, json!("sentinel")).await;
        let next = r.recv_n(1).await;
        assert_eq!((next[0].id.as_str(), next[0].seq), (sentinel.as_str(), 61));
    }
    for (_, r) in devices {
        r.stop().await;
    }
}

/// A restarted app with a state file is not shown a message again, even one it never
/// acknowledged (at most once to the app); the restarted device acknowledges it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_app_with_a_state_file_never_sees_a_message_again() {
    let server = Server::start().await;
    let app = create_app(&server).await;
    let dev = app.register().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options();
    opts.state_file = Some(dir.path().join("herald-state.json"));
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(app.push(&dev.device_id, json!(i)).await);
    }

    let mut device = Device::start(&dev, opts.clone()).await.unwrap();
    for want in &sent {
        let m = tokio::time::timeout(WAIT, device.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&m.id, want);
        if m.seq == 3 {
            // The app dies while handling the third: never acknowledged.
            std::mem::forget(m);
        }
    }
    app.wait_acked(&sent[1], 1).await;
    assert_eq!(app.status(&sent[2]).await.1["acked"], 0);
    drop(device);

    let mut running = run_device(&dev, opts, Duration::ZERO).await;
    // The resend of the third is acknowledged without being shown.
    app.wait_acked(&sent[2], 1).await;
    let fresh = app.push(&dev.device_id, json!("fresh")).await;
    let next = running.recv_n(1).await;
    assert_eq!((next[0].id.as_str(), next[0].seq), (fresh.as_str(), 4));
    running.stop().await;
}
