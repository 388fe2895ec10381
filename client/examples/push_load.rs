//! Measures pushes end to end against a running `herald serve`: N unicast pushes over
//! REST, spread over D connected devices, from the first request to the last device
//! receipt, then until herald reports every message acknowledged.
//!
//! ```text
//! cargo run --release -p herald-client --example push_load -- \
//!     --api http://127.0.0.1:8080 --admin-token TOKEN [--devices 100] [--messages 10000] [--concurrency 64]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

struct Args {
    api: String,
    admin_token: String,
    devices: usize,
    messages: usize,
    concurrency: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        api: "http://127.0.0.1:8080".into(),
        admin_token: std::env::var("HERALD_ADMIN_TOKEN").unwrap_or_default(),
        devices: 100,
        messages: 10_000,
        concurrency: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--api" => a.api = value()?,
            "--admin-token" => a.admin_token = value()?,
            "--devices" => a.devices = value()?.parse()?,
            "--messages" => a.messages = value()?.parse()?,
            "--concurrency" => a.concurrency = value()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "push_load --api URL --admin-token TOKEN [--devices N] [--messages N] [--concurrency N]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if a.admin_token.is_empty() {
        bail!("--admin-token (or HERALD_ADMIN_TOKEN) is required");
    }
    if a.devices == 0 || a.messages == 0 || a.concurrency == 0 {
        bail!("--devices, --messages and --concurrency must be at least 1");
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let http = reqwest::Client::new();
    let app: Value = http
        .post(format!("{}/v1/apps", args.api))
        .bearer_auth(&args.admin_token)
        .json(&json!({"name": "push_load"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token: Value = http
        .post(format!("{}/oauth/token", args.api))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", app["client_id"].as_str().unwrap_or_default()),
            (
                "client_secret",
                app["client_secret"].as_str().unwrap_or_default(),
            ),
        ])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = token["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let app_key = app["app_key"].as_str().unwrap_or_default().to_owned();

    let per_device = args.messages / args.devices;
    let total = per_device * args.devices;
    eprintln!("registering and connecting {} devices", args.devices);
    let mut device_ids = Vec::new();
    let received = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    for _ in 0..args.devices {
        let creds = herald_client::register(&http, &args.api, &app_key).await?;
        let mut conn =
            herald_client::connect(&creds, herald_client::ConnectOptions::default()).await?;
        device_ids.push(creds.device_id.clone());
        let received = received.clone();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(_m) = conn.messages.recv().await {
                n += 1;
                received.fetch_add(1, Ordering::Relaxed);
                if n == per_device {
                    let _ = done_tx.send(Instant::now());
                }
            }
        });
    }

    eprintln!(
        "pushing {total} messages ({per_device} per device, {} at a time)",
        args.concurrency
    );
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(device_ids);
    let mut publishers = Vec::new();
    let last_ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    for _ in 0..args.concurrency {
        let (http, api, token, next, ids, last_ids) = (
            http.clone(),
            args.api.clone(),
            token.clone(),
            next.clone(),
            ids.clone(),
            last_ids.clone(),
        );
        publishers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let device = &ids[i % ids.len()];
                let r = http
                    .post(format!("{api}/v1/messages"))
                    .bearer_auth(&token)
                    .json(&json!({"to": {"device_id": device}, "data": {"i": i}}))
                    .send()
                    .await?;
                if r.status() != 202 {
                    bail!("push {i}: {}", r.status());
                }
                let body: Value = r.json().await?;
                if i + ids.len() >= total
                    && let Ok(mut l) = last_ids.lock()
                {
                    l.push(body["message_id"].as_str().unwrap_or_default().to_owned());
                }
            }
        }));
    }
    for p in publishers {
        p.await??;
    }
    let accepted = start.elapsed();
    let mut last = start;
    for _ in 0..args.devices {
        match tokio::time::timeout(Duration::from_secs(300), done_rx.recv()).await {
            Ok(Some(t)) => last = last.max(t),
            _ => bail!(
                "timed out: {} of {total} received",
                received.load(Ordering::Relaxed)
            ),
        }
    }
    let delivered = last - start;
    // herald's own view: each device's last message reported acknowledged.
    let last_ids = last_ids.lock().map(|l| l.clone()).unwrap_or_default();
    for id in &last_ids {
        loop {
            let s: Value = http
                .get(format!("{}/v1/messages/{id}", args.api))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            if s["acked"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let acked = start.elapsed();
    println!(
        "{total} pushes to {} devices: all accepted (202) in {:.2} s ({:.0}/s); all received by devices in {:.2} s; herald reported the last acks in {:.2} s",
        args.devices,
        accepted.as_secs_f64(),
        total as f64 / accepted.as_secs_f64(),
        delivered.as_secs_f64(),
        acked.as_secs_f64()
    );
    Ok(())
}
