//! The live overview: once a second, the process's metrics turned into what an operator
//! watches (rates, percentiles, gauges), with the last [`HISTORY`] samples kept so a page
//! that opens draws the recent past at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::metrics::METRICS;

/// Samples kept: five minutes at one a second.
pub const HISTORY: usize = 300;

/// Percentiles are taken over this many of the latest intervals (a second's worth of
/// acks can be too few to say much).
const PERCENTILE_WINDOW: usize = 5;

/// One second of the system, as the overview shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Sample {
    /// When it was taken (ms since the Unix epoch).
    pub ts_ms: u64,
    /// Pushes answered 202, per second.
    pub accepted_per_s: f64,
    /// PUBLISHes written to devices, per second.
    pub sent_per_s: f64,
    /// Acknowledgements from devices, per second.
    pub acked_per_s: f64,
    /// Push accepted → device ack, median over the last few seconds (ms).
    pub ack_p50_ms: Option<f64>,
    /// The same, 99th percentile (ms).
    pub ack_p99_ms: Option<f64>,
    /// Device sessions open.
    pub connected: i64,
    /// Durable log records the delivery workers have not applied, summed.
    pub lag_records: i64,
    /// One group commit of the log, median over the last few seconds (ms).
    pub sync_p50_ms: Option<f64>,
    /// The same, 99th percentile (ms).
    pub sync_p99_ms: Option<f64>,
    /// REST answers with a 5xx status, per second.
    pub http_5xx_per_s: f64,
    /// Pushes accepted since the process started.
    pub accepted_total: u64,
    /// PUBLISHes written since the process started.
    pub sent_total: u64,
    /// Acknowledgements received since the process started.
    pub acked_total: u64,
    /// Entries sent and not yet acknowledged.
    pub inflight: i64,
}

/// The counters and histogram buckets at one instant.
#[derive(Debug, Clone, Default)]
struct Reading {
    at: Option<std::time::Instant>,
    accepted: u64,
    sent: u64,
    acked: u64,
    http_5xx: u64,
    /// Cumulative bucket counts (upper bound, count), +Inf last.
    ack_buckets: Vec<(f64, u64)>,
    sync_buckets: Vec<(f64, u64)>,
}

fn read() -> Reading {
    let m = &*METRICS;
    let http_5xx = sum(&m.http_requests, |metric| {
        let server_error = metric
            .get_label()
            .iter()
            .any(|l| l.name() == "status" && l.value().starts_with('5'));
        if server_error {
            metric.get_counter().get_value()
        } else {
            0.0
        }
    }) as u64;
    Reading {
        at: Some(std::time::Instant::now()),
        accepted: sum(&m.accepted, |c| c.get_counter().get_value()) as u64,
        sent: m.publishes.get(),
        acked: m.acks.get(),
        http_5xx,
        ack_buckets: buckets(&m.ack_latency),
        sync_buckets: buckets(&m.log_sync),
    }
}

/// The sum of `value` over every labelled child of `vec`.
fn sum<C: Collector>(vec: &C, value: fn(&prometheus::proto::Metric) -> f64) -> f64 {
    vec.collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(value)
        .sum()
}

fn buckets(h: &prometheus::Histogram) -> Vec<(f64, u64)> {
    let families = h.collect();
    let Some(metric) = families.first().and_then(|f| f.get_metric().first()) else {
        return Vec::new();
    };
    let hist = metric.get_histogram();
    let mut out: Vec<(f64, u64)> = hist
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .collect();
    out.push((f64::INFINITY, hist.get_sample_count()));
    out
}

/// The `q` quantile (0..1) of the observations between two readings of the same
/// histogram's cumulative buckets, interpolated within a bucket as Prometheus's
/// `histogram_quantile` does; `None` without observations. One in the +Inf bucket is
/// reported as the largest finite bound.
pub fn quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .enumerate()
        .map(|(i, &(bound, n))| {
            let was = before.get(i).map_or(0, |b| b.1);
            (bound, n.saturating_sub(was))
        })
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for &(bound, cumulative) in &delta {
        if cumulative as f64 >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let in_bucket = (cumulative - below) as f64;
            let frac = if in_bucket > 0.0 {
                (rank - below as f64) / in_bucket
            } else {
                1.0
            };
            return Some(lower + (bound - lower) * frac);
        }
        lower = bound;
        below = cumulative;
    }
    Some(lower)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The sampler's output: the history and the newest sample.
pub struct Overview {
    history: Mutex<VecDeque<Sample>>,
    latest: watch::Sender<Sample>,
}

impl Overview {
    /// Starts sampling every `interval` on the current tokio runtime. Sampling stops when
    /// the last `Arc` is dropped.
    pub fn start(interval: Duration) -> Arc<Overview> {
        let overview = Arc::new(Overview {
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            latest: watch::Sender::new(Sample::default()),
        });
        let weak: Weak<Overview> = Arc::downgrade(&overview);
        tokio::spawn(async move {
            let mut readings: VecDeque<Reading> = VecDeque::new();
            readings.push_back(read());
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(overview) = weak.upgrade() else {
                    return;
                };
                let now = read();
                let sample = sample(&readings, &now);
                readings.push_back(now);
                if readings.len() > PERCENTILE_WINDOW {
                    readings.pop_front();
                }
                overview.push(sample);
            }
        });
        overview
    }

    fn push(&self, sample: Sample) {
        if let Ok(mut h) = self.history.lock() {
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(sample.clone());
        }
        self.latest.send_replace(sample);
    }

    /// The samples kept, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.history
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Wakes on every new sample.
    pub fn subscribe(&self) -> watch::Receiver<Sample> {
        self.latest.subscribe()
    }
}

/// The sample for `now`, given the readings before it (oldest first, at least one).
fn sample(readings: &VecDeque<Reading>, now: &Reading) -> Sample {
    let empty = Reading::default();
    let last = readings.back().unwrap_or(&empty);
    let oldest = readings.front().unwrap_or(&empty);
    let secs = match (last.at, now.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-3),
        _ => 1.0,
    };
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let ms = |v: Option<f64>| v.map(|s| (s * 1000.0 * 100.0).round() / 100.0);
    let m = &*METRICS;
    let lag = sum(&m.lag, |g| g.get_gauge().get_value()) as i64;
    Sample {
        ts_ms: now_ms(),
        accepted_per_s: rate(last.accepted, now.accepted),
        sent_per_s: rate(last.sent, now.sent),
        acked_per_s: rate(last.acked, now.acked),
        ack_p50_ms: ms(quantile(&oldest.ack_buckets, &now.ack_buckets, 0.5)),
        ack_p99_ms: ms(quantile(&oldest.ack_buckets, &now.ack_buckets, 0.99)),
        connected: m.connections.get(),
        lag_records: lag,
        sync_p50_ms: ms(quantile(&oldest.sync_buckets, &now.sync_buckets, 0.5)),
        sync_p99_ms: ms(quantile(&oldest.sync_buckets, &now.sync_buckets, 0.99)),
        http_5xx_per_s: rate(last.http_5xx, now.http_5xx),
        accepted_total: now.accepted,
        sent_total: now.sent,
        acked_total: now.acked,
        inflight: m.inflight.get(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket_of_the_rank() {
        let before = [(0.01, 0), (0.1, 0), (1.0, 0), (f64::INFINITY, 0)];
        // 10 observations: 4 ≤ 10 ms, 5 in (10, 100] ms, 1 in (100 ms, 1 s].
        let after = [(0.01, 4), (0.1, 9), (1.0, 10), (f64::INFINITY, 10)];
        let p50 = quantile(&before, &after, 0.5).unwrap();
        assert!((p50 - (0.01 + 0.09 * 0.2)).abs() < 1e-9, "{p50}");
        let p99 = quantile(&before, &after, 0.99).unwrap();
        assert!((p99 - (0.1 + 0.9 * 0.9)).abs() < 1e-9, "{p99}");
        assert_eq!(
            quantile(&after, &after, 0.5),
            None,
            "no observations between"
        );
        // Only the difference counts: the same 10 before, one slow one after.
        let later = [(0.01, 4), (0.1, 9), (1.0, 10), (f64::INFINITY, 11)];
        assert_eq!(
            quantile(&after, &later, 0.5),
            Some(1.0),
            "+Inf → largest bound"
        );
    }

    #[tokio::test]
    async fn samples_turn_counters_into_rates() {
        let overview = Overview::start(Duration::from_millis(100));
        let mut rx = overview.subscribe();
        rx.changed().await.unwrap();
        for _ in 0..50 {
            crate::metrics::push_accepted("rates");
        }
        let mut seen = 0.0;
        for _ in 0..5 {
            rx.changed().await.unwrap();
            seen += rx.borrow().accepted_per_s * 0.1;
        }
        // Other tests in this process may count too: at least ours, within rounding.
        assert!(seen >= 45.0, "{seen}");
        assert!(overview.history().len() >= 5);
    }
}
