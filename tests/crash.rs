//! The delivery contract under crashes: `herald serve` is killed with SIGKILL at random
//! moments, at least 20 times, while devices connected through the SDK receive pushes
//! sent at a steady rate (unicast, broadcast, short TTLs, recalls), with retries under
//! an Idempotency-Key whenever an answer does not come. At the end every accepted push
//! was seen by each of its targets exactly once, in `seq` order; no expired or recalled
//! message was seen after its expiry or recall; and `herald verify` finds the live
//! projections identical to a rebuild from the log.
//!
//! The run is driven by a seed, printed at the start; replay a failure with
//! `HERALD_CRASH_SEED=<seed>`. `HERALD_CRASH_KILLS` sets the number of kills (default 20).

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use herald_client::sim::Rng;
use herald_client::{Device, DeviceOptions, Qos};
use serde_json::{Value, json};

/// What one device's app saw: (seq, message id, when).
type Seen = Arc<Mutex<Vec<(u64, String, Instant)>>>;

#[derive(Debug, Clone)]
struct Accepted {
    message_id: String,
    /// `None`: every device (broadcast).
    target: Option<usize>,
    /// When the accepting answer arrived; the push was accepted no later than this.
    answered: Instant,
    ttl: Option<Duration>,
    recalled_at: Option<Instant>,
}

/// Sends one logical request until it gets a definite answer, across server restarts.
async fn until_answered(
    http: &reqwest::Client,
    req: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match req(http).timeout(Duration::from_secs(5)).send().await {
            Ok(r) if r.status().as_u16() < 500 => {
                let s = r.status().as_u16();
                return (s, r.json().await.unwrap_or(Value::Null));
            }
            // A 503, a reset connection, no answer: indeterminate; retry the same request.
            _ => {}
        }
        assert!(Instant::now() < deadline, "no definite answer within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(device_kills: bool) {
    let seed: u64 = std::env::var("HERALD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let kills: usize = std::env::var("HERALD_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!(
        "crash test seed: {seed} (replay with HERALD_CRASH_SEED={seed}), kills: {kills}, device kills: {device_kills}"
    );
    let mut rng = Rng::new(seed);

    let server = Arc::new(tokio::sync::Mutex::new(Server::start().await));
    let (app, data_dir, base) = {
        let s = server.lock().await;
        (create_app(&s).await, s.data_dir().to_owned(), s.base())
    };

    // Devices through the SDK; every fourth subscribes at QoS 2.
    const DEVICES: usize = 12;
    let mut seen: Vec<Seen> = Vec::new();
    let mut handles = Vec::new();
    for i in 0..DEVICES {
        let creds = app.register().await;
        let mut opts = DeviceOptions::default();
        if i % 4 == 0 {
            opts.qos = Qos::ExactlyOnce;
        }
        let mut device = Device::start(&creds, opts).await.unwrap();
        handles.push(device.handle());
        let log: Seen = Arc::new(Mutex::new(Vec::new()));
        seen.push(log.clone());
        tokio::spawn(async move {
            while let Some(msg) = device.next().await {
                log.lock()
                    .unwrap()
                    .push((msg.seq, msg.id.clone(), Instant::now()));
                msg.ack();
            }
        });
    }
    let device_ids: Vec<String> = handles.iter().map(|h| h.device_id().to_owned()).collect();

    // The killer: SIGKILL at random moments, then restart on the same ports.
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (server, stop) = (server.clone(), stop.clone());
        let mut krng = Rng::new(rng.next_u64() | 1);
        tokio::spawn(async move {
            for _ in 0..kills {
                tokio::time::sleep(Duration::from_millis(600 + krng.below(1600))).await;
                let mut s = server.lock().await;
                s.kill9();
                s.start_again().await;
            }
            stop.store(true, Ordering::Release);
        })
    };
    // Client-side kills: a device's connection dropped without DISCONNECT.
    let dropper = device_kills.then(|| {
        let (handles, stop) = (handles.clone(), stop.clone());
        let mut drng = Rng::new(rng.next_u64() | 1);
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(200 + drng.below(600))).await;
                handles[drng.below(handles.len() as u64) as usize].kill_connection();
            }
        })
    });

    // The publisher: a steady stream of pushes, each retried under its own key until
    // it has a definite answer.
    let http = reqwest::Client::new();
    let mut accepted: Vec<Accepted> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let roll = rng.below(100);
        if roll < 5 && !accepted.is_empty() {
            // Recall a recent push.
            let i = accepted.len() - 1 - rng.below(accepted.len().min(20) as u64) as usize;
            let id = accepted[i].message_id.clone();
            let (s, body) = until_answered(&http, |c| {
                c.post(format!("{base}/v1/messages/{id}/recall"))
                    .bearer_auth(&app.token)
            })
            .await;
            assert_eq!(s, 200, "{body}");
            accepted[i].recalled_at.get_or_insert_with(Instant::now);
            continue;
        }
        let (target, ttl) = match roll {
            5..=9 => (None, None),
            10..=14 => (
                Some(rng.below(DEVICES as u64) as usize),
                Some(1 + rng.below(2)),
            ),
            _ => (Some(rng.below(DEVICES as u64) as usize), None),
        };
        let mut body = match target {
            Some(d) => json!({"to": {"device_id": device_ids[d]}, "data": {"n": n}}),
            None => json!({"to": {"broadcast": true}, "data": {"n": n}}),
        };
        if let Some(t) = ttl {
            body["ttl_s"] = json!(t);
        }
        let key = format!("crash-{seed}-{n}");
        let (s, r) = until_answered(&http, |c| {
            c.post(format!("{base}/v1/messages"))
                .bearer_auth(&app.token)
                .header("Idempotency-Key", &key)
                .json(&body)
        })
        .await;
        assert!(s == 202 || s == 200, "{s} {r}");
        accepted.push(Accepted {
            message_id: r["message_id"].as_str().unwrap().to_owned(),
            target,
            answered: Instant::now(),
            ttl: ttl.map(Duration::from_secs),
            recalled_at: None,
        });
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    killer.await.unwrap();
    if let Some(d) = dropper {
        d.await.unwrap();
    }

    // What each device must see: every push that was neither recalled nor short-lived.
    let mut must: Vec<HashSet<String>> = vec![HashSet::new(); DEVICES];
    let mut may: HashMap<String, &Accepted> = HashMap::new();
    for a in &accepted {
        if a.recalled_at.is_some() || a.ttl.is_some() {
            may.insert(a.message_id.clone(), a);
            continue;
        }
        match a.target {
            Some(d) => {
                must[d].insert(a.message_id.clone());
            }
            None => must.iter_mut().for_each(|m| {
                m.insert(a.message_id.clone());
            }),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let missing: usize = (0..DEVICES)
            .map(|d| {
                let got: HashSet<String> = seen[d]
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(_, id, _)| id.clone())
                    .collect();
                must[d].difference(&got).count()
            })
            .sum();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: {missing} accepted entries never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let tolerance = Duration::from_secs(1);
    let mut total = 0;
    for d in 0..DEVICES {
        let log = seen[d].lock().unwrap().clone();
        total += log.len();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for w in log.windows(2) {
            assert!(
                w[0].0 < w[1].0,
                "seed {seed}: device {d} saw seq {} then {}",
                w[0].0,
                w[1].0
            );
        }
        for (_, id, at) in &log {
            *counts.entry(id.as_str()).or_default() += 1;
            if let Some(a) = may.get(id) {
                if let Some(r) = a.recalled_at {
                    assert!(
                        *at <= r + tolerance,
                        "seed {seed}: {id} seen {:?} after its recall",
                        *at - r
                    );
                }
                if let Some(ttl) = a.ttl {
                    let expiry = a.answered + ttl;
                    assert!(
                        *at <= expiry + tolerance,
                        "seed {seed}: {id} seen {:?} after its expiry",
                        *at - expiry
                    );
                }
            } else {
                assert!(
                    must[d].contains(id),
                    "seed {seed}: device {d} saw {id}, never sent to it"
                );
            }
        }
        for (id, c) in counts {
            assert_eq!(c, 1, "seed {seed}: device {d} saw {id} {c} times");
        }
    }
    eprintln!(
        "crash test: {} pushes accepted, {kills} kills, {total} messages seen, all once, in order",
        accepted.len()
    );

    for h in &handles {
        h.shutdown();
    }
    let status = server.lock().await.terminate();
    assert!(status.success());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["verify", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "seed {seed}: herald verify failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("identical"), "{text}");
}

/// Item 1: SIGKILL at random moments while devices receive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_shows_nothing_twice() {
    run(false).await;
}

/// Item 2: the same, with devices also dropping their connections at random.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_devices_dropping_connections_loses_nothing() {
    run(true).await;
}
