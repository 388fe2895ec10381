//! What an idle device costs: one [`Device`] with the adaptive heartbeat, behind a
//! [`NatProxy`] that forgets idle connections, in scaled time, with pushes sent at random
//! moments. The benchmark's device-cost scenario and the heartbeat tests run it.
//!
//! The run has three phases: learning, with pushes at random moments (until the
//! heartbeat settles, or gives up after [`CostScenario::max_learning`]); an idle window
//! of [`CostScenario::steady_intervals`] settled intervals with no push, whose cost
//! (priced by [`CostModel`]) is extrapolated to a day and a month; and a window of
//! [`CostScenario::push_intervals`] settled intervals with pushes at random moments
//! again. Learning's cost is reported apart (it is paid once per network: the interval
//! is remembered). Push traffic (PUBLISH and its acknowledgements) never counts as
//! idle cost.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;

use crate::heartbeat::HeartbeatOptions;
use crate::nat::{Cost, CostModel, NatProxy, is_push_traffic};
use crate::{Device, DeviceCredentials, DeviceEvent, DeviceOptions, DisconnectReason};

/// One device-cost run.
#[derive(Debug, Clone)]
pub struct CostScenario {
    /// The NAT's idle timeout (device time).
    pub nat: Duration,
    /// Real time per device time (`1.0 / 60.0`: a minute in a second).
    pub time_scale: f64,
    /// The network the device reports.
    pub network: String,
    /// The mean gap between pushes (device time; exponential gaps, so pushes come at
    /// random moments, some into dead paths).
    pub push_every: Duration,
    /// Give up learning after this (device time).
    pub max_learning: Duration,
    /// The idle window, in settled intervals.
    pub steady_intervals: u32,
    /// The window of pushes after it, in settled intervals.
    pub push_intervals: u32,
    /// Seeds the push moments.
    pub seed: u64,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct CostReport {
    /// The NAT's idle timeout (device time).
    pub nat: Duration,
    /// The interval the heartbeat settled on (device time); `None` if it did not.
    pub settled: Option<Duration>,
    /// How long learning took (device time).
    pub learning: Duration,
    /// Paths found dead (each one a reconnect).
    pub dead_paths: u64,
    /// Learning's cost (everything but pushes).
    pub learning_cost: Cost,
    /// The steady window's idle cost (everything but pushes).
    pub steady_cost: Cost,
    /// The steady window's length (device time).
    pub steady_window: Duration,
    /// Radio wake-ups per day when idle (steady).
    pub wakeups_per_day: f64,
    /// Bytes per 30-day month when idle (steady).
    pub bytes_per_month: f64,
    /// Pushes sent.
    pub pushes: usize,
    /// Pushes that never arrived.
    pub lost: usize,
    /// Pushes the app was shown twice.
    pub duplicates: usize,
    /// The latest a push arrived (device time).
    pub max_delay: Duration,
    /// Pushes that took longer than the heartbeat interval in force when they were sent.
    pub late: usize,
}

/// A small deterministic generator (xorshift64*), so that a seed replays a simulation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is taken as 1).
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An exponential gap of mean `mean`.
    pub fn gap(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(-(1.0 - self.unit()).max(1e-9).ln())
    }
}

/// Runs `scenario` for the registered device `creds`, whose gateway is at `gateway`;
/// `push(i)` sends the i-th push to it and returns its message id.
pub async fn device_cost<P, F>(
    creds: &DeviceCredentials,
    gateway: SocketAddr,
    scenario: &CostScenario,
    mut push: P,
) -> anyhow::Result<CostReport>
where
    P: FnMut(usize) -> F,
    F: Future<Output = anyhow::Result<String>>,
{
    let scale = scenario.time_scale;
    let real = |d: Duration| d.mul_f64(scale);
    let device_time = |d: Duration| d.div_f64(scale);
    let nat = NatProxy::start(gateway, real(scenario.nat)).await?;
    let mut creds = creds.clone();
    creds.mqtt_host = "127.0.0.1".into();
    creds.mqtt_port = nat.addr().port();
    let heartbeat = HeartbeatOptions {
        network: scenario.network.clone(),
        time_scale: scale,
        ..HeartbeatOptions::default()
    };
    let pong_timeout = heartbeat.pong_timeout;
    let mut opts = DeviceOptions {
        heartbeat: Some(heartbeat),
        ..DeviceOptions::default()
    };
    opts.backoff.initial_delay = Duration::from_millis(50);
    opts.backoff.max_delay = Duration::from_secs(1);
    let mut device = Device::start(&creds, opts).await?;
    let handle = device.handle();
    let mut events = device.events();
    let dead_paths = Arc::new(Mutex::new(0u64));
    let dead = dead_paths.clone();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if let DeviceEvent::Disconnected {
                reason: DisconnectReason::DeadPath,
                ..
            } = e
            {
                *dead.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            }
        }
    });
    let received: Arc<Mutex<HashMap<String, (Instant, usize)>>> = Default::default();
    let seen = received.clone();
    let reader = tokio::spawn(async move {
        while let Some(m) = device.next().await {
            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            let at = Instant::now();
            seen.entry(m.id.clone()).or_insert((at, 0)).1 += 1;
            drop(seen);
            m.ack();
        }
    });

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), handle.wait_status(|s| s.connected))
        .await
        .context("the device did not connect through the NAT")?;
    let mut rng = Rng::new(scenario.seed);
    let mut next_push = started + real(rng.gap(scenario.push_every));
    // (message id, sent at, interval in force then)
    let mut sent: Vec<(String, Instant, Duration)> = Vec::new();
    let mut settled_at: Option<(Instant, Duration)> = None;
    let mut idle_end_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let status = handle.status();
        if status.stopped {
            bail!("the device stopped");
        }
        if settled_at.is_none()
            && status.heartbeat_settled
            && let Some(interval) = status.heartbeat
        {
            settled_at = Some((now, interval));
        }
        // Pushes while learning and after the idle window, none during it.
        let mut pushing = true;
        match settled_at {
            Some((at, interval)) => {
                let idle_end = at + real(interval * scenario.steady_intervals);
                if idle_end_at.is_none() && now >= idle_end {
                    idle_end_at = Some(now);
                    next_push = now + real(rng.gap(scenario.push_every));
                }
                if now >= idle_end + real(interval * scenario.push_intervals) {
                    break;
                }
                pushing = idle_end_at.is_some();
            }
            None if now >= started + real(scenario.max_learning) => break,
            None => {}
        }
        if pushing && now >= next_push {
            let interval = status.heartbeat.unwrap_or_default();
            let id = push(sent.len()).await?;
            sent.push((id, now, interval));
            next_push = now + real(rng.gap(scenario.push_every));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = idle_end_at.unwrap_or_else(Instant::now);
    // Every push must arrive: wait for the ones still on their way.
    let deadline = Instant::now() + real(scenario.nat * 2) + Duration::from_secs(10);
    loop {
        let missing = {
            let seen = received.lock().unwrap_or_else(PoisonError::into_inner);
            sent.iter()
                .filter(|(id, ..)| !seen.contains_key(id))
                .count()
        };
        if missing == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;

    let seen = received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    // Scheduling and the push's own way through herald take real time, not scaled.
    let slack = Duration::from_millis(500);
    let mut report = CostReport {
        nat: scenario.nat,
        settled: settled_at.map(|(_, i)| i),
        learning: device_time(settled_at.map_or(end, |(at, _)| at) - started),
        dead_paths: *dead_paths.lock().unwrap_or_else(PoisonError::into_inner),
        learning_cost: Cost::default(),
        steady_cost: Cost::default(),
        steady_window: Duration::ZERO,
        wakeups_per_day: f64::NAN,
        bytes_per_month: f64::NAN,
        pushes: sent.len(),
        lost: 0,
        duplicates: 0,
        max_delay: Duration::ZERO,
        late: 0,
    };
    for (id, at, interval) in &sent {
        match seen.get(id) {
            None => report.lost += 1,
            Some((got, times)) => {
                report.duplicates += times - 1;
                let delay = got.saturating_duration_since(*at);
                report.max_delay = report.max_delay.max(device_time(delay));
                if delay > real(*interval) + slack {
                    report.late += 1;
                }
            }
        }
    }
    let model = CostModel {
        time_scale: scale,
        give_up_after: pong_timeout,
        ..CostModel::default()
    };
    let ledger = nat.ledger();
    let idle = |first: u8| !is_push_traffic(first);
    if let Some((at, _)) = settled_at {
        report.learning_cost = model.account(&ledger, started, at, idle);
        report.steady_cost = model.account(&ledger, at, end, idle);
        report.steady_window = device_time(end - at);
        let days = report.steady_window.as_secs_f64() / 86_400.0;
        report.wakeups_per_day = report.steady_cost.wakeups as f64 / days;
        report.bytes_per_month = report.steady_cost.bytes as f64 / days * 30.0;
    } else {
        report.learning_cost = model.account(&ledger, started, end, idle);
    }
    Ok(report)
}
