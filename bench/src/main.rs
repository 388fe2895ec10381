//! `herald-bench`: runs herald's benchmark scenarios beside Mosquitto and rumqttd on this
//! machine, in one run, and prints the README's table.
//!
//! ```text
//! bench/run                 # the full run (builds release first)
//! bench/run --quick         # small sizes: what CI runs so the bench cannot rot
//! bench/run --scenario fanout --scenario idle --idle-conns 1000000
//! ```
//!
//! Every scenario starts what it measures on loopback ports (herald serve, Mosquitto,
//! rumqttd, herald-sim processes), measures, stops them, and removes their files. A peer
//! that is not installed is reported as "not installed" rather than skipped silently.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use herald_bench::procs::{Bins, Kafka, Kind, Server, Sim, cpu_time, rss_bytes};
use herald_bench::publisher::Publisher;
use herald_bench::{api, device_cost, now_ms, now_us};
use serde_json::{Value, json};

/// Runs herald's benchmarks beside Mosquitto and rumqttd and prints a markdown table.
#[derive(Debug, Parser)]
#[command(name = "herald-bench", version, about, long_about)]
struct Args {
    /// Small sizes for every scenario (seconds, not minutes): what CI runs.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (repeatable): e2e, e2e-kafka, broadcast, idle, latency,
    /// fanout, device-cost, observability. e2e-kafka uses the broker HERALD_KAFKA names, or starts one
    /// with scripts/kafka-up. device-cost prints a table of its own (no peer runs it).
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Idle connections per server in the idle scenario [default: 100000; quick: 1000].
    #[arg(long)]
    idle_conns: Option<usize>,
    /// Connected devices in the broadcast scenario [default: 100000; quick: 600].
    #[arg(long)]
    broadcast_devices: Option<usize>,
    /// Also write the table to this file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// Extra environment for `herald serve`.
type Env = Vec<(String, String)>;

/// What the e2e scenario runs against.
enum Deploy {
    /// `herald serve` with this extra environment.
    Serve(Env),
    /// One process per role on this Kafka broker and topic.
    Roles { kafka: String, topic: String },
}

/// Concurrent REST requests of the e2e publisher (an app server's connection pool).
const E2E_CONCURRENCY: usize = 256;

/// Publishes in flight at once in the fan-out scenario, for herald (REST requests) and
/// the peers (unacknowledged QoS 1 PUBLISHes) alike.
const PUBLISH_WINDOW: usize = 32;

/// Connections one process may hold here (20,000 open files, some kept for the rest).
const PER_PROCESS: usize = 19_000;

#[derive(Debug, Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

#[derive(Debug, Clone)]
struct Row {
    scenario: String,
    metric: String,
    better: Better,
    herald: Option<f64>,
    mosquitto: Cell,
    rumqttd: Cell,
    unit: &'static str,
}

#[derive(Debug, Clone)]
enum Cell {
    Value(f64),
    NotApplicable,
    Missing(String),
}

fn fmt(v: f64, unit: &str) -> String {
    let n = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    // Thousands separators for big numbers.
    let n = if v >= 10_000.0 {
        let digits: Vec<char> = n.chars().collect();
        let mut s = String::new();
        for (i, c) in digits.iter().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                s.push(',');
            }
            s.push(*c);
        }
        s
    } else {
        n
    };
    if unit.is_empty() {
        n
    } else {
        format!("{n} {unit}")
    }
}

impl Row {
    fn render(&self) -> String {
        let cell = |c: &Cell| match c {
            Cell::Value(v) => fmt(*v, self.unit),
            Cell::NotApplicable => "—".to_owned(),
            Cell::Missing(why) => why.clone(),
        };
        let herald = self
            .herald
            .map(|v| fmt(v, self.unit))
            .unwrap_or_else(|| "failed".into());
        let peers: Vec<f64> = [&self.mosquitto, &self.rumqttd]
            .iter()
            .filter_map(|c| match c {
                Cell::Value(v) => Some(*v),
                _ => None,
            })
            .collect();
        let ratio = match (self.herald, self.better) {
            (Some(h), Better::Higher) if !peers.is_empty() => {
                let best = peers.iter().cloned().fold(f64::MIN, f64::max);
                format!("{:.2}× (higher is better)", h / best)
            }
            (Some(h), Better::Lower) if !peers.is_empty() && h > 0.0 => {
                let best = peers.iter().cloned().fold(f64::MAX, f64::min);
                format!("{:.2}× (best peer ÷ herald)", best / h)
            }
            _ => "—".into(),
        };
        format!(
            "| {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.metric,
            herald,
            cell(&self.mosquitto),
            cell(&self.rumqttd),
            ratio
        )
    }
}

struct Ctx {
    bins: Bins,
    http: reqwest::Client,
    bar: indicatif::ProgressBar,
    ip_block: std::sync::atomic::AtomicU8,
}

impl Ctx {
    fn step(&self, msg: impl Into<String>) {
        let msg = msg.into();
        if self.bar.is_hidden() {
            eprintln!("… {msg}");
        }
        self.bar.set_message(msg);
    }

    /// A fresh block of 250 loopback source addresses for one simulator process.
    fn source_ips(&self) -> String {
        let b = self
            .ip_block
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1);
        format!("127.{b}.0.1-127.{b}.0.250")
    }

    fn sim_args(&self, port: u16, extra: &[String]) -> Vec<String> {
        let mut a = vec![
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--source-ips".into(),
            self.source_ips(),
            "--connect-rate".into(),
            "5000".into(),
        ];
        a.extend_from_slice(extra);
        a
    }
}

/// Who connects to a server: registered herald devices, or anonymous clients.
async fn devices_for(
    ctx: &Ctx,
    server: &Server,
    n: usize,
    tag: &str,
) -> anyhow::Result<(Vec<String>, Option<api::App>, Vec<(String, String)>)> {
    match server.kind {
        Kind::Herald => {
            let app = api::create_app(&ctx.http, &server.base()).await?;
            ctx.step(format!("{tag}: registering {n} devices with herald"));
            let devices = api::register(&ctx.http, &app, n, 64, |_| {}).await?;
            let creds = server.dir().join(format!("creds-{tag}.jsonl"));
            api::write_creds(&creds, &devices)?;
            Ok((
                vec![
                    "--creds".into(),
                    creds.display().to_string(),
                    "--topic".into(),
                    "inbox".into(),
                ],
                Some(app),
                devices,
            ))
        }
        _ => Ok((
            vec![
                "--anonymous".into(),
                n.to_string(),
                "--id-prefix".into(),
                format!("{tag}-"),
                "--topic".into(),
                "bench/t".into(),
            ],
            None,
            Vec::new(),
        )),
    }
}

fn latency(done: &Value, q: &str) -> Option<f64> {
    done["latency_us"][q].as_f64().map(|us| us / 1000.0)
}

fn check_done(done: &Value, expected: u64, what: &str) -> anyhow::Result<()> {
    let got = done["received"].as_u64().unwrap_or(0);
    if got < expected {
        bail!("{what}: devices received {got} of {expected}");
    }
    if done["duplicates"].as_u64().unwrap_or(0) > 0 {
        eprintln!("note: {what}: {} duplicates seen", done["duplicates"]);
    }
    Ok(())
}

/// Fan-out at the MQTT layer: n subscribers, m messages at QoS 1.
async fn fanout(ctx: &Ctx, kind: Kind, n: usize, m: usize) -> anyhow::Result<(f64, f64, f64)> {
    let server = Server::start(kind, &ctx.bins).await?;
    let (who, app, _) = devices_for(ctx, &server, n, "fanout").await?;
    let rss0 = rss_bytes(server.pid())?;
    ctx.step(format!(
        "fanout/{}: connecting {n} subscribers",
        kind.name()
    ));
    let total = (n * m) as u64;
    let mut args = ctx.sim_args(server.mqtt_port, &who);
    args.extend([
        "--expect".into(),
        total.to_string(),
        "--timeout".into(),
        "300".into(),
    ]);
    let mut sim = Sim::start(&ctx.bins, &args)?;
    sim.wait_event("connected").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = rss_bytes(server.pid())?;
    ctx.step(format!(
        "fanout/{}: {m} messages to {n} subscribers",
        kind.name()
    ));
    let t0 = now_ms();
    match &app {
        Some(app) => {
            // Like the peers' publisher: up to PUBLISH_WINDOW requests in flight.
            let mut inflight = futures::stream::FuturesUnordered::new();
            for _ in 0..m {
                if inflight.len() >= PUBLISH_WINDOW
                    && let Some(r) = futures::StreamExt::next(&mut inflight).await
                {
                    r?;
                }
                inflight.push(api::push(
                    &ctx.http,
                    app,
                    json!({"broadcast": true}),
                    now_us(),
                ));
            }
            while let Some(r) = futures::StreamExt::next(&mut inflight).await {
                r?;
            }
        }
        None => {
            let mut p =
                Publisher::connect(server.mqtt_port, "bench-publisher", PUBLISH_WINDOW).await?;
            for _ in 0..m {
                p.publish("bench/t", json!({"t": now_us()}).to_string().as_bytes())
                    .await?;
            }
            p.flush().await?;
        }
    }
    let done = sim.wait_event("done").await?;
    check_done(&done, total, &format!("fanout/{}", kind.name()))?;
    let last = done["last_ms"].as_u64().unwrap_or(t0 + 1);
    let secs = (last.saturating_sub(t0)).max(1) as f64 / 1000.0;
    server.stop().await;
    Ok((
        total as f64 / secs,
        (rss1.saturating_sub(rss0)) as f64 / n as f64,
        latency(&done, "p99").unwrap_or(f64::NAN),
    ))
}

/// A herald with `devices` registered devices, all connected through one simulator that
/// expects `expect` messages: what the herald-only scenarios start from.
struct Connected {
    server: Server,
    app: api::App,
    device_ids: Vec<String>,
    sim: Sim,
}

async fn herald_connected(
    ctx: &Ctx,
    tag: &str,
    devices: usize,
    expect: usize,
) -> anyhow::Result<Connected> {
    herald_connected_on(ctx, tag, devices, expect, &Deploy::Serve(Vec::new())).await
}

async fn herald_connected_on(
    ctx: &Ctx,
    tag: &str,
    devices: usize,
    expect: usize,
    deploy: &Deploy,
) -> anyhow::Result<Connected> {
    let server = match deploy {
        Deploy::Serve(env) => Server::start_opts(Kind::Herald, &ctx.bins, 0, env).await?,
        Deploy::Roles { kafka, topic } => Server::start_roles(&ctx.bins, kafka, topic).await?,
    };
    let (who, app, ids) = devices_for(ctx, &server, devices, tag).await?;
    let app = app.context("herald app")?;
    let mut args = ctx.sim_args(server.mqtt_port, &who);
    args.extend([
        "--expect".into(),
        expect.to_string(),
        "--timeout".into(),
        "600".into(),
    ]);
    ctx.step(format!("{tag}: connecting {devices} devices"));
    let mut sim = Sim::start(&ctx.bins, &args)?;
    sim.wait_event("connected").await?;
    Ok(Connected {
        server,
        app,
        device_ids: ids.into_iter().map(|d| d.0).collect(),
        sim,
    })
}

/// e2e: unicast pushes over REST, round robin over connected devices; with `env`, on the
/// deployment it names (the event log on Kafka).
async fn e2e(
    ctx: &Ctx,
    devices: usize,
    pushes: usize,
    deploy: &Deploy,
) -> anyhow::Result<(f64, f64, f64)> {
    let (secs, rate, p99, _) = e2e_watched(ctx, devices, pushes, deploy, false).await?;
    Ok((secs, rate, p99))
}

/// What the admin overview's stream delivered while the e2e pushes ran.
#[derive(Debug, Clone, Copy)]
struct Watched {
    /// `sample` events received.
    samples: usize,
    /// Seconds from the first push to the last receipt.
    secs: f64,
    /// The longest time without a sample in that window, in seconds.
    longest_gap: f64,
}

/// Reads the admin overview stream (SSE) of `base`, noting when each `sample` event
/// arrives, until aborted.
async fn watch_overview(
    http: reqwest::Client,
    base: String,
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
) -> anyhow::Result<()> {
    let mut r = http
        .get(format!("{base}/v1/admin/overview/stream"))
        .bearer_auth(herald_bench::procs::ADMIN)
        .send()
        .await?
        .error_for_status()?;
    let mut pending = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        let at = Instant::now();
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if line.trim_ascii() == b"event: sample"
                && let Ok(mut a) = arrivals.lock()
            {
                a.push(at);
            }
        }
    }
    Ok(())
}

/// e2e, and with `watch` the admin overview's stream read all along (what the console
/// page draws from).
async fn e2e_watched(
    ctx: &Ctx,
    devices: usize,
    pushes: usize,
    deploy: &Deploy,
    watch: bool,
) -> anyhow::Result<(f64, f64, f64, Option<Watched>)> {
    let Connected {
        server,
        app,
        device_ids: ids,
        mut sim,
    } = herald_connected_on(ctx, "e2e", devices, pushes, deploy).await?;
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let watcher = watch.then(|| {
        tokio::spawn(watch_overview(
            ctx.http.clone(),
            server.base(),
            arrivals.clone(),
        ))
    });
    ctx.step(format!("e2e: {pushes} pushes over REST"));
    let ids = std::sync::Arc::new(ids);
    let start = Instant::now();
    let t0 = now_ms();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..E2E_CONCURRENCY {
        let (http, app, ids, next) = (ctx.http.clone(), app.clone(), ids.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= pushes {
                    return Ok::<_, anyhow::Error>(());
                }
                let d = &ids[i % ids.len()];
                api::push(&http, &app, json!({"device_id": d}), now_us()).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let api_secs = start.elapsed().as_secs_f64();
    let done = sim.wait_event("done").await?;
    let end = Instant::now();
    check_done(&done, pushes as u64, "e2e")?;
    let last = done["last_ms"].as_u64().unwrap_or(t0);
    let watched = match watcher {
        Some(w) => {
            w.abort();
            let times = arrivals.lock().map(|a| a.clone()).unwrap_or_default();
            let inside: Vec<Instant> = times
                .into_iter()
                .filter(|t| *t >= start && *t <= end)
                .collect();
            let mut edges = vec![start];
            edges.extend(inside.iter().copied());
            edges.push(end);
            let longest_gap = edges
                .windows(2)
                .map(|w| w[1].duration_since(w[0]).as_secs_f64())
                .fold(0.0, f64::max);
            Some(Watched {
                samples: inside.len(),
                secs: end.duration_since(start).as_secs_f64(),
                longest_gap,
            })
        }
        None => None,
    };
    server.stop().await;
    Ok((
        (last.saturating_sub(t0)) as f64 / 1000.0,
        pushes as f64 / api_secs,
        latency(&done, "p99").unwrap_or(f64::NAN),
        watched,
    ))
}

/// observability: what metrics cost and whether the console keeps up. The e2e run
/// with metrics on (the overview's stream read all along, as the console page does)
/// and off (`HERALD_METRICS=false`), alternated `rounds` times; the best of each.
async fn observability(
    ctx: &Ctx,
    devices: usize,
    pushes: usize,
    rounds: usize,
) -> anyhow::Result<String> {
    let mut on: Vec<(f64, f64, f64, Watched)> = Vec::new();
    let mut off: Vec<(f64, f64, f64)> = Vec::new();
    for round in 0..rounds {
        // Which goes first alternates, so that neither gains from the order.
        for metrics in [round % 2 == 0, round % 2 == 1] {
            let label = if metrics { "on" } else { "off" };
            ctx.step(format!(
                "observability: round {} of {rounds}, metrics {label}",
                round + 1
            ));
            let env = vec![("HERALD_METRICS".into(), metrics.to_string())];
            let (s, r, p, w) =
                e2e_watched(ctx, devices, pushes, &Deploy::Serve(env), metrics).await?;
            match w {
                Some(w) => on.push((s, r, p, w)),
                None => off.push((s, r, p)),
            }
        }
    }
    let best = |v: &mut dyn Iterator<Item = f64>, higher: bool| {
        v.fold(if higher { 0.0 } else { f64::INFINITY }, |a, b| {
            if higher { a.max(b) } else { a.min(b) }
        })
    };
    let samples: usize = on.iter().map(|r| r.3.samples).sum();
    let watched_secs: f64 = on.iter().map(|r| r.3.secs).sum();
    let longest_gap = on.iter().map(|r| r.3.longest_gap).fold(0.0, f64::max);
    let mut t = format!(
        "| e2e: {pushes} unicast pushes over REST to {devices} devices | metrics on | metrics off | cost of metrics |\n| --- | --- | --- | --- |\n"
    );
    type Pick = fn(&(f64, f64, f64)) -> f64;
    let figures: [(&str, Pick, &str, bool); 3] = [
        ("accepted at the API", |r| r.1, "/s", true),
        ("first request → last device receipt", |r| r.0, "s", false),
        ("p99 push → receipt", |r| r.2, "ms", false),
    ];
    for (label, pick, unit, higher) in figures {
        let with = best(&mut on.iter().map(|r| pick(&(r.0, r.1, r.2))), higher);
        let without = best(&mut off.iter().map(pick), higher);
        // How much worse with metrics on.
        let cost = if higher {
            (without - with) / without
        } else {
            (with - without) / without
        };
        t.push_str(&format!(
            "| {label} | {} | {} | {:+.1} % |\n",
            fmt(with, unit),
            fmt(without, unit),
            cost * 100.0
        ));
    }
    t.push_str(&format!(
        "| console overview under that load | {samples} samples in {watched_secs:.1} s ({:.2}/s), longest gap {longest_gap:.2} s | — | — |\n",
        samples as f64 / watched_secs.max(1e-9)
    ));
    t.push_str(&format!(
        "\nBest of {rounds} runs each, alternated and taking turns to go first (the machine is noisy); cost = how much worse with metrics on. The overview is read as the console page reads it (its SSE stream, admin session), all through the metrics-on runs.\n"
    ));
    Ok(t)
}

/// broadcast: one broadcast push to n connected devices, until the last receipt. With
/// `gateways` > 0 the devices connect to that many `herald gateway` processes linked to
/// one `herald serve` (one process holds at most PER_PROCESS connections here).
async fn broadcast(ctx: &Ctx, n: usize, gateways: usize) -> anyhow::Result<f64> {
    let server = Server::start_with_gateways(Kind::Herald, &ctx.bins, gateways).await?;
    let app = api::create_app(&ctx.http, &server.base()).await?;
    ctx.step(format!("broadcast: registering {n} devices with herald"));
    let devices = api::register(&ctx.http, &app, n, 64, |_| {}).await?;
    let ports = if server.gateway_ports.is_empty() {
        vec![server.mqtt_port]
    } else {
        server.gateway_ports.clone()
    };
    ctx.step(format!(
        "broadcast: connecting {n} devices to {} gateway process(es)",
        ports.len()
    ));
    let mut sims = Vec::new();
    for (i, (port, chunk)) in ports
        .iter()
        .zip(devices.chunks(n.div_ceil(ports.len()).max(1)))
        .enumerate()
    {
        let creds = server.dir().join(format!("creds-broadcast-{i}.jsonl"));
        api::write_creds(&creds, chunk)?;
        let mut args = ctx.sim_args(
            *port,
            &[
                "--creds".into(),
                creds.display().to_string(),
                "--topic".into(),
                "inbox".into(),
            ],
        );
        args.extend([
            "--expect".into(),
            chunk.len().to_string(),
            "--timeout".into(),
            "600".into(),
        ]);
        sims.push((Sim::start(&ctx.bins, &args)?, chunk.len()));
    }
    for (sim, _) in &mut sims {
        sim.wait_event("connected").await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctx.step(format!("broadcast: one push to {n} devices"));
    let t0 = now_ms();
    api::push(&ctx.http, &app, json!({"broadcast": true}), now_us()).await?;
    let mut last = t0;
    for (sim, share) in &mut sims {
        let done = sim.wait_event("done").await?;
        check_done(&done, *share as u64, "broadcast")?;
        last = last.max(done["last_ms"].as_u64().unwrap_or(t0));
    }
    server.stop().await;
    Ok((last.saturating_sub(t0)) as f64 / 1000.0)
}

/// latency: unicast pushes at a steady rate to 100 devices.
async fn latency_at(ctx: &Ctx, rate: usize, secs: u64) -> anyhow::Result<(f64, f64, f64)> {
    let total = rate * secs as usize;
    let Connected {
        server,
        app,
        device_ids: ids,
        mut sim,
    } = herald_connected(ctx, "latency", 100, total).await?;
    ctx.step(format!("latency: {rate} pushes/s for {secs} s"));
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        // Paced: push i is sent at i / rate seconds.
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = permits.clone().acquire_owned().await?;
        let (http, app, d) = (ctx.http.clone(), app.clone(), ids[i % ids.len()].clone());
        tasks.push(tokio::spawn(async move {
            let r = api::push(&http, &app, json!({"device_id": d}), now_us()).await;
            drop(permit);
            r
        }));
    }
    for t in tasks {
        t.await??;
    }
    let done = sim.wait_event("done").await?;
    check_done(&done, total as u64, "latency")?;
    server.stop().await;
    Ok((
        latency(&done, "p50").unwrap_or(f64::NAN),
        latency(&done, "p99").unwrap_or(f64::NAN),
        latency(&done, "p999").unwrap_or(f64::NAN),
    ))
}

/// idle: n idle connections with keep-alive traffic, spread over as many server
/// processes as the open-file limit needs. Returns (RSS bytes per connection, CPU %).
async fn idle(ctx: &Ctx, kind: Kind, n: usize) -> anyhow::Result<(f64, f64)> {
    let procs = n.div_ceil(PER_PROCESS);
    let mut servers = Vec::new();
    let mut sims = Vec::new();
    let mut rss0 = 0u64;
    let mut counts = Vec::new();
    for i in 0..procs {
        let share = n / procs + usize::from(i < n % procs);
        let server = Server::start(kind, &ctx.bins).await?;
        let (who, _, _) = devices_for(ctx, &server, share, &format!("idle{i}")).await?;
        rss0 += rss_bytes(server.pid())?;
        counts.push((who, share));
        servers.push(server);
    }
    ctx.step(format!(
        "idle/{}: connecting {n} devices to {procs} process(es)",
        kind.name()
    ));
    for (server, (who, _)) in servers.iter().zip(&counts) {
        let mut args = ctx.sim_args(server.mqtt_port, who);
        args.extend(["--keep-alive".into(), "30".into()]);
        let mut sim = Sim::start(&ctx.bins, &args)?;
        let c = sim.wait_event("connected").await?;
        if c["failed"].as_u64().unwrap_or(0) > 0 {
            eprintln!(
                "note: idle/{}: {} connections failed",
                kind.name(),
                c["failed"]
            );
        }
        sims.push(sim);
    }
    ctx.step(format!(
        "idle/{}: holding {n} idle connections",
        kind.name()
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu0: Duration = servers
        .iter()
        .map(|s| cpu_time(s.pid()).unwrap_or_default())
        .sum();
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let cpu1: Duration = servers
        .iter()
        .map(|s| cpu_time(s.pid()).unwrap_or_default())
        .sum();
    let rss1: u64 = servers
        .iter()
        .map(|s| rss_bytes(s.pid()).unwrap_or(0))
        .sum();
    let mut connected = 0u64;
    for sim in sims {
        let done = sim.finish().await?;
        connected += done["connected"].as_u64().unwrap_or(0);
    }
    for s in servers {
        s.stop().await;
    }
    if connected < n as u64 {
        eprintln!("note: idle/{}: {connected} of {n} connected", kind.name());
    }
    let per_conn = rss1.saturating_sub(rss0) as f64 / connected.max(1) as f64;
    let cpu_pct = (cpu1.saturating_sub(cpu0)).as_secs_f64() / window.as_secs_f64() * 100.0;
    Ok((per_conn, cpu_pct))
}

fn peer_cell(bins: &Bins, kind: Kind) -> Option<Cell> {
    let installed = match kind {
        Kind::Mosquitto => bins.mosquitto.is_some(),
        Kind::Rumqttd => bins.rumqttd.is_some(),
        Kind::Herald => true,
    };
    (!installed).then(|| Cell::Missing("not installed".into()))
}

async fn run(args: Args) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let bins = Bins::find()?;
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(120));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let ctx = Ctx {
        bins,
        http: reqwest::Client::new(),
        bar,
        ip_block: std::sync::atomic::AtomicU8::new(0),
    };
    let all = [
        "e2e",
        "e2e-kafka",
        "broadcast",
        "idle",
        "latency",
        "fanout",
        "observability",
        "device-cost",
    ];
    let wanted: Vec<&str> = if args.scenarios.is_empty() {
        all.to_vec()
    } else {
        for s in &args.scenarios {
            if !all.contains(&s.as_str()) {
                bail!("unknown --scenario {s}; one of {}", all.join(", "));
            }
        }
        args.scenarios.iter().map(String::as_str).collect()
    };
    let q = args.quick;
    let mut rows = Vec::new();
    let herald_only = |scenario: &str, metric: &str, better, v: Option<f64>, unit| Row {
        scenario: scenario.into(),
        metric: metric.into(),
        better,
        herald: v,
        mosquitto: Cell::NotApplicable,
        rumqttd: Cell::NotApplicable,
        unit,
    };

    if wanted.contains(&"e2e") || wanted.contains(&"e2e-kafka") {
        let (d, p) = if q { (200, 2_000) } else { (10_000, 100_000) };
        let mut plans: Vec<(String, &str, Deploy)> = Vec::new();
        let mut kafka = None;
        // A deployment that could not run still gets its row, empty.
        let e2e_failed = |name: &str| {
            herald_only(
                name,
                "first request → last device receipt",
                Better::Lower,
                None,
                "s",
            )
        };
        if wanted.contains(&"e2e") {
            plans.push((
                format!(
                    "e2e: {p} unicast pushes over REST ({E2E_CONCURRENCY} concurrent) to {d} devices (QoS 1)"
                ),
                "accepted at the API (202, fsync'd)",
                Deploy::Serve(Vec::new()),
            ));
        }
        if wanted.contains(&"e2e-kafka") {
            let name = format!(
                "e2e on Kafka (herald serve --kafka-brokers, one partition, acks=all): {p} unicast pushes over REST to {d} devices"
            );
            ctx.step("e2e-kafka: starting Apache Kafka");
            match Kafka::get().await {
                Ok(k) => {
                    let topic = format!("herald.bench.{}.{}", std::process::id(), now_ms());
                    plans.push((
                        name,
                        "accepted at the API (202, acked by Kafka)",
                        Deploy::Serve(vec![
                            ("HERALD_KAFKA_BROKERS".into(), k.addr.clone()),
                            ("HERALD_KAFKA_TOPIC".into(), topic.clone()),
                        ]),
                    ));
                    plans.push((
                        format!(
                            "e2e on Kafka, one process per role (herald ingest, deliver, gateway; {} partitions): {p} unicast pushes over REST to {d} devices",
                            Server::ROLES_PARTITIONS
                        ),
                        "accepted at the API (202, acked by Kafka)",
                        Deploy::Roles {
                            kafka: k.addr.clone(),
                            topic: format!("{topic}.roles"),
                        },
                    ));
                    kafka = Some(k);
                }
                Err(e) => {
                    eprintln!("e2e-kafka: no Kafka broker: {e:#}");
                    rows.push(e2e_failed(&name));
                }
            }
        }
        for (name, api_metric, deploy) in plans {
            match e2e(&ctx, d, p, &deploy).await {
                Ok((secs, api_rate, p99)) => {
                    rows.push(herald_only(
                        &name,
                        "first request → last device receipt",
                        Better::Lower,
                        Some(secs),
                        "s",
                    ));
                    rows.push(herald_only(
                        &name,
                        api_metric,
                        Better::Higher,
                        Some(api_rate),
                        "/s",
                    ));
                    rows.push(herald_only(
                        &name,
                        "p99 push → receipt",
                        Better::Lower,
                        Some(p99),
                        "ms",
                    ));
                }
                Err(e) => {
                    eprintln!("{name} failed: {e:#}");
                    rows.push(e2e_failed(&name));
                }
            }
        }
        drop(kafka);
    }
    if wanted.contains(&"broadcast") {
        // One process can hold PER_PROCESS connections here: beyond that the devices
        // connect to gateway processes (the quick run uses two, so that path cannot rot).
        let n = args
            .broadcast_devices
            .unwrap_or(if q { 600 } else { 100_000 });
        let gateways = if q { 2 } else { n.div_ceil(PER_PROCESS).max(1) };
        let name = format!(
            "broadcast: one push to {n} connected devices on {gateways} gateway process(es)"
        );
        let r = broadcast(&ctx, n, gateways)
            .await
            .map_err(|e| eprintln!("broadcast failed: {e:#}"))
            .ok();
        rows.push(herald_only(
            &name,
            "request → last device receipt",
            Better::Lower,
            r,
            "s",
        ));
    }
    if wanted.contains(&"latency") {
        let plan: &[(usize, u64)] = if q {
            &[(200, 2), (1_000, 2)]
        } else {
            &[(1_000, 10), (10_000, 5)]
        };
        for &(rate, secs) in plan {
            let name = format!("latency: {rate} pushes/s to 100 devices for {secs} s");
            match latency_at(&ctx, rate, secs).await {
                Ok((p50, p99, p999)) => {
                    rows.push(herald_only(
                        &name,
                        "p50 publish → receipt",
                        Better::Lower,
                        Some(p50),
                        "ms",
                    ));
                    rows.push(herald_only(&name, "p99", Better::Lower, Some(p99), "ms"));
                    rows.push(herald_only(&name, "p999", Better::Lower, Some(p999), "ms"));
                }
                Err(e) => {
                    eprintln!("latency failed: {e:#}");
                    rows.push(herald_only(&name, "p99", Better::Lower, None, "ms"));
                }
            }
        }
    }
    if wanted.contains(&"fanout") {
        let (n, m) = if q { (300, 5) } else { (10_000, 10) };
        let name = format!("fan-out: {m} messages × {n} subscribers, QoS 1");
        let mut results = Vec::new();
        for kind in [Kind::Herald, Kind::Mosquitto, Kind::Rumqttd] {
            let r = match peer_cell(&ctx.bins, kind) {
                Some(missing) => Err(missing),
                None => fanout(&ctx, kind, n, m).await.map_err(|e| {
                    eprintln!("fanout/{} failed: {e:#}", kind.name());
                    Cell::Missing("failed".into())
                }),
            };
            results.push(r);
        }
        let pick = |i: usize, f: fn(&(f64, f64, f64)) -> f64| match &results[i] {
            Ok(v) => Cell::Value(f(v)),
            Err(c) => c.clone(),
        };
        let h = |f: fn(&(f64, f64, f64)) -> f64| results[0].as_ref().ok().map(f);
        for (metric, f, better, unit) in [
            (
                "delivered messages/s",
                (|v: &(f64, f64, f64)| v.0) as fn(&(f64, f64, f64)) -> f64,
                Better::Higher,
                "/s",
            ),
            ("RSS per subscriber", |v| v.1, Better::Lower, "B"),
            ("p99 publish → receipt", |v| v.2, Better::Lower, "ms"),
        ] {
            rows.push(Row {
                scenario: name.clone(),
                metric: metric.into(),
                better,
                herald: h(f),
                mosquitto: pick(1, f),
                rumqttd: pick(2, f),
                unit,
            });
        }
    }
    if wanted.contains(&"idle") {
        let n = args.idle_conns.unwrap_or(if q { 1_000 } else { 100_000 });
        let name = format!("idle-conns: {n} connections, keep-alive 30 s");
        let mut results = Vec::new();
        for kind in [Kind::Herald, Kind::Mosquitto, Kind::Rumqttd] {
            let r = match peer_cell(&ctx.bins, kind) {
                Some(missing) => Err(missing),
                None => idle(&ctx, kind, n).await.map_err(|e| {
                    eprintln!("idle/{} failed: {e:#}", kind.name());
                    Cell::Missing("failed".into())
                }),
            };
            results.push(r);
        }
        let pick = |i: usize, f: fn(&(f64, f64)) -> f64| match &results[i] {
            Ok(v) => Cell::Value(f(v)),
            Err(c) => c.clone(),
        };
        rows.push(Row {
            scenario: name.clone(),
            metric: "server RSS per connection".into(),
            better: Better::Lower,
            herald: results[0].as_ref().ok().map(|v| v.0),
            mosquitto: pick(1, |v| v.0),
            rumqttd: pick(2, |v| v.0),
            unit: "B",
        });
        rows.push(Row {
            scenario: name,
            metric: "server CPU while idle (% of one core)".into(),
            better: Better::Lower,
            herald: results[0].as_ref().ok().map(|v| v.1),
            mosquitto: pick(1, |v| v.1),
            rumqttd: pick(2, |v| v.1),
            unit: "%",
        });
    }
    let mut tables = Vec::new();
    if wanted.contains(&"observability") {
        let (d, p, rounds) = if q {
            (200, 2_000, 1)
        } else {
            (10_000, 100_000, 3)
        };
        ctx.step("observability: e2e with metrics on and off");
        tables.push(observability(&ctx, d, p, rounds).await?);
    }
    if wanted.contains(&"device-cost") {
        ctx.step("device-cost: adaptive heartbeats behind NATs of 5, 15 and 30 min (60x)");
        tables.push(device_cost::run(&ctx.bins, &ctx.http, q).await?);
    }
    ctx.bar.finish_and_clear();
    Ok((rows, tables))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let out = args.out.clone();
    let quick = args.quick;
    let started = Instant::now();
    let (rows, tables) = run(args).await?;
    let mut table = String::new();
    table.push_str("| scenario | metric | herald | Mosquitto | rumqttd | herald vs best peer |\n");
    table.push_str("| --- | --- | --- | --- | --- | --- |\n");
    for r in &rows {
        table.push_str(&r.render());
        table.push('\n');
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    table.push_str(&format!(
        "\n{}run on {cpus} cores, {mem_gib:.0} GiB, in {:.0} s; peers: Mosquitto (max_inflight_messages 32, max_queued_messages 100000), rumqttd (max_inflight_count 32, max_outgoing_packet_count 200); every client is herald-sim.\n",
        if quick { "quick sizes (CI); " } else { "" },
        started.elapsed().as_secs_f64()
    ));
    for t in &tables {
        table.push('\n');
        table.push_str(t);
    }
    print!("{table}");
    if let Some(path) = out {
        std::fs::write(&path, &table)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed = rows.iter().any(|r| r.herald.is_none());
    if failed {
        bail!("some herald scenarios failed (see above)");
    }
    Ok(())
}
