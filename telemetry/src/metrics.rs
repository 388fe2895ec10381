//! The metrics herald exports, and one function per thing that happens.
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `herald_http_requests_total` | counter | route, method, status | REST requests answered |
//! | `herald_http_request_duration_seconds` | histogram | route, method | time to answer |
//! | `herald_pushes_accepted_total` | counter | app_id | pushes answered 202 |
//! | `herald_log_appended_events_total` | counter | | events made durable in the log |
//! | `herald_log_sync_seconds` | histogram | | one group commit: fsync (embedded) or broker ack (Kafka) |
//! | `herald_delivery_lag_records` | gauge | partition | durable records the projections have not applied |
//! | `herald_delivery_applied_events_total` | counter | | events folded into the projections |
//! | `herald_inbox_entries_stored_total` | counter | app_id | inbox entries written (one per target device) |
//! | `herald_delivered_total` | counter | app_id | entries a device confirmed (herald counts delivery at the ack) |
//! | `herald_ack_latency_seconds` | histogram | | push accepted → device ack, by the log's times |
//! | `herald_gateway_connections` | gauge | | device sessions open |
//! | `herald_gateway_connects_total` | counter | | sessions opened (CONNECT accepted) |
//! | `herald_gateway_disconnects_total` | counter | reason | sessions ended, by why |
//! | `herald_gateway_publishes_total` | counter | | PUBLISHes written to devices |
//! | `herald_gateway_backlog_entries_total` | counter | | entries read back from a stored inbox: missed while offline, or resent after a reconnect |
//! | `herald_gateway_acks_total` | counter | | PUBACKs / PUBCOMPs from devices |
//! | `herald_gateway_inflight` | gauge | | entries sent and not yet acknowledged |
//! | `herald_gateway_refused_total` | counter | reason | device connections refused before CONNACK accepted them |
//! | `herald_listener_connections` | gauge | listener | connections a listener holds |
//! | `herald_listener_refused_total` | counter | listener, reason | connections closed at accept: over a cap, or no descriptor to spare |
//! | `herald_listener_accept_errors_total` | counter | listener | accepts that failed for want of a resource (EMFILE, ENFILE, ...) |
//! | `herald_log_refused_appends_total` | counter | reason | appends refused before anything was written (the log is not poisoned) |
//! | `herald_app_limited_total` | counter | app_id, limit | requests refused over an app's limit (429, 413, 403) |

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Switches recording on or off for this process (on by default). Off, every record
/// function returns at once and `/metrics` shows only what was recorded before.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether metrics are recorded in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Latency buckets for requests and ack round trips, in seconds (0.5 ms to 10 s).
const FAST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for a group commit, in seconds (50 µs to 1 s).
const SYNC_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Buckets for push → ack, in seconds (1 ms to an hour: a device may be offline).
const ACK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 3600.0,
];

/// Every metric, registered in `registry`.
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) http_requests: IntCounterVec,
    pub(crate) http_duration: HistogramVec,
    pub(crate) accepted: IntCounterVec,
    pub(crate) log_appended: IntCounter,
    pub(crate) log_sync: Histogram,
    pub(crate) lag: IntGaugeVec,
    pub(crate) applied: IntCounter,
    pub(crate) stored: IntCounterVec,
    pub(crate) delivered: IntCounterVec,
    pub(crate) ack_latency: Histogram,
    pub(crate) connections: IntGauge,
    pub(crate) connects: IntCounter,
    pub(crate) disconnects: IntCounterVec,
    pub(crate) publishes: IntCounter,
    pub(crate) backlog: IntCounter,
    pub(crate) acks: IntCounter,
    pub(crate) inflight: IntGauge,
    pub(crate) gateway_refused: IntCounterVec,
    pub(crate) listener_connections: IntGaugeVec,
    pub(crate) listener_refused: IntCounterVec,
    pub(crate) accept_errors: IntCounterVec,
    pub(crate) log_refused: IntCounterVec,
    pub(crate) app_limited: IntCounterVec,
}

/// Registers `m` in `r` and hands it back. A name registered twice is a bug in the list
/// above, found by the first test that touches a metric.
fn reg<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
    r.register(Box::new(m.clone()))
        .expect("each metric is registered once");
    m
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

pub(crate) static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    // The options below are constants; they are valid or every test fails.
    let r = Registry::new();
    let counter = |name, help| reg(&r, IntCounter::with_opts(opts(name, help)).expect("valid"));
    let counter_vec = |name, help, labels: &[&str]| {
        reg(
            &r,
            IntCounterVec::new(opts(name, help), labels).expect("valid"),
        )
    };
    let gauge = |name, help| reg(&r, IntGauge::with_opts(opts(name, help)).expect("valid"));
    let histogram = |name, help, buckets| {
        reg(
            &r,
            Histogram::with_opts(hist(name, help, buckets)).expect("valid"),
        )
    };
    Metrics {
        http_requests: counter_vec(
            "herald_http_requests_total",
            "REST requests answered, by route pattern, method and status",
            &["route", "method", "status"],
        ),
        http_duration: reg(
            &r,
            HistogramVec::new(
                hist(
                    "herald_http_request_duration_seconds",
                    "Time to answer a REST request, by route pattern and method",
                    FAST_BUCKETS,
                ),
                &["route", "method"],
            )
            .expect("valid"),
        ),
        accepted: counter_vec(
            "herald_pushes_accepted_total",
            "Pushes answered 202 (durable in the log), by app",
            &["app_id"],
        ),
        log_appended: counter(
            "herald_log_appended_events_total",
            "Events made durable in the event log",
        ),
        log_sync: histogram(
            "herald_log_sync_seconds",
            "One group commit of the event log: the fsync (embedded) or the broker's ack (Kafka)",
            SYNC_BUCKETS,
        ),
        lag: reg(
            &r,
            IntGaugeVec::new(
                opts(
                    "herald_delivery_lag_records",
                    "Durable log records the delivery worker has not applied yet, by partition",
                ),
                &["partition"],
            )
            .expect("valid"),
        ),
        applied: counter(
            "herald_delivery_applied_events_total",
            "Log events folded into the projections",
        ),
        stored: counter_vec(
            "herald_inbox_entries_stored_total",
            "Inbox entries written, one per target device, by app",
            &["app_id"],
        ),
        delivered: counter_vec(
            "herald_delivered_total",
            "Inbox entries a device confirmed receiving (delivery is counted at the ack), by app",
            &["app_id"],
        ),
        ack_latency: histogram(
            "herald_ack_latency_seconds",
            "From a push's acceptance to a device's ack of it, by the log's timestamps",
            ACK_BUCKETS,
        ),
        connections: gauge("herald_gateway_connections", "Device sessions open"),
        connects: counter(
            "herald_gateway_connects_total",
            "Device sessions opened (CONNECT accepted)",
        ),
        disconnects: counter_vec(
            "herald_gateway_disconnects_total",
            "Device sessions ended, by reason",
            &["reason"],
        ),
        publishes: counter(
            "herald_gateway_publishes_total",
            "PUBLISH packets written to devices",
        ),
        backlog: counter(
            "herald_gateway_backlog_entries_total",
            "Entries read back from a device's stored inbox: missed while offline, or sent \
             again after a reconnect because they were not acknowledged",
        ),
        acks: counter(
            "herald_gateway_acks_total",
            "Acknowledgements (PUBACK, PUBCOMP) received from devices",
        ),
        inflight: gauge(
            "herald_gateway_inflight",
            "Entries sent to devices and not yet acknowledged",
        ),
        gateway_refused: counter_vec(
            "herald_gateway_refused_total",
            "Device connections refused before a CONNACK accepted them, by reason",
            &["reason"],
        ),
        listener_connections: reg(
            &r,
            IntGaugeVec::new(
                opts(
                    "herald_listener_connections",
                    "Connections a listener holds, by listener",
                ),
                &["listener"],
            )
            .expect("valid"),
        ),
        listener_refused: counter_vec(
            "herald_listener_refused_total",
            "Connections closed as soon as accepted, by listener and the cap they were over",
            &["listener", "reason"],
        ),
        accept_errors: counter_vec(
            "herald_listener_accept_errors_total",
            "Accepts that failed for want of a resource (file descriptors, buffer memory)",
            &["listener"],
        ),
        log_refused: counter_vec(
            "herald_log_refused_appends_total",
            "Appends the event log refused before writing anything, by the resource it lacked \
             (the log stays usable)",
            &["reason"],
        ),
        app_limited: counter_vec(
            "herald_app_limited_total",
            "Requests refused because the app was over one of its limits, by app and limit",
            &["app_id", "limit"],
        ),
        registry: r,
    }
});

/// The text exposition format (Prometheus 0.0.4) of every metric.
pub fn render() -> String {
    let mut out = Vec::new();
    // Encoding into a Vec fails only for a metric family without metrics, which the
    // registry does not hand out.
    let _ = TextEncoder::new().encode(&METRICS.registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One app's counters in this process since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AppUsage {
    /// Pushes accepted.
    pub accepted: u64,
    /// Inbox entries stored.
    pub stored: u64,
    /// Entries devices confirmed.
    pub delivered: u64,
}

/// Every app's counters that moved in this process, by app id.
pub fn per_app() -> std::collections::HashMap<String, AppUsage> {
    use prometheus::core::Collector;
    let m = &*METRICS;
    let mut out: std::collections::HashMap<String, AppUsage> = Default::default();
    type Set = fn(&mut AppUsage, u64);
    let fields: [(&IntCounterVec, Set); 3] = [
        (&m.accepted, |u, v| u.accepted = v),
        (&m.stored, |u, v| u.stored = v),
        (&m.delivered, |u, v| u.delivered = v),
    ];
    for (vec, set) in fields {
        for family in vec.collect() {
            for metric in family.get_metric() {
                let Some(app) = metric.get_label().iter().find(|l| l.name() == "app_id") else {
                    continue;
                };
                let usage = out.entry(app.value().to_owned()).or_default();
                set(usage, metric.get_counter().get_value() as u64);
            }
        }
    }
    out
}

macro_rules! when_enabled {
    () => {
        if !enabled() {
            return;
        }
    };
}

/// A REST request was answered.
pub fn http_request(route: &str, method: &str, status: &str, took: Duration) {
    when_enabled!();
    let m = &*METRICS;
    m.http_requests
        .with_label_values(&[route, method, status])
        .inc();
    m.http_duration
        .with_label_values(&[route, method])
        .observe(took.as_secs_f64());
}

/// A push of `app_id` was accepted (answered 202).
pub fn push_accepted(app_id: &str) {
    when_enabled!();
    METRICS.accepted.with_label_values(&[app_id]).inc();
}

/// A group commit made `events` events durable in `took`.
pub fn log_synced(events: usize, took: Duration) {
    when_enabled!();
    let m = &*METRICS;
    m.log_appended.inc_by(events as u64);
    m.log_sync.observe(took.as_secs_f64());
}

/// The delivery worker of `partition` has `records` durable records left to apply.
pub fn delivery_lag(partition: u32, records: u64) {
    when_enabled!();
    METRICS
        .lag
        .with_label_values(&[partition.to_string().as_str()])
        .set(i64::try_from(records).unwrap_or(i64::MAX));
}

/// The delivery worker folded `events` events.
pub fn events_applied(events: usize) {
    when_enabled!();
    METRICS.applied.inc_by(events as u64);
}

/// `entries` inbox entries of `app_id` were written.
pub fn entries_stored(app_id: &str, entries: u64) {
    when_enabled!();
    METRICS.stored.with_label_values(&[app_id]).inc_by(entries);
}

/// A device confirmed an entry of `app_id`, `latency_ms` after its push was accepted.
pub fn delivered(app_id: &str, latency_ms: u64) {
    when_enabled!();
    let m = &*METRICS;
    m.delivered.with_label_values(&[app_id]).inc();
    m.ack_latency.observe(latency_ms as f64 / 1000.0);
}

/// A device session opened.
pub fn connected() {
    // The gauge moves even when off, so switching on later does not leave it wrong.
    METRICS.connections.inc();
    when_enabled!();
    METRICS.connects.inc();
}

/// A device session ended for `reason`.
pub fn disconnected(reason: &str) {
    METRICS.connections.dec();
    when_enabled!();
    METRICS.disconnects.with_label_values(&[reason]).inc();
}

/// A PUBLISH was written to a device.
pub fn published() {
    when_enabled!();
    METRICS.publishes.inc();
}

/// `entries` entries were read back from a stored inbox.
pub fn backlog_read(entries: usize) {
    when_enabled!();
    METRICS.backlog.inc_by(entries as u64);
}

/// A device acknowledged an entry.
pub fn acked() {
    when_enabled!();
    METRICS.acks.inc();
}

/// The in-flight entries of all sessions changed by `delta`. Always recorded: a gauge
/// must come back to zero.
pub fn inflight(delta: i64) {
    METRICS.inflight.add(delta);
}

/// A device connection was refused before its CONNACK accepted it, for `reason`.
pub fn gateway_refused(reason: &'static str) {
    when_enabled!();
    METRICS.gateway_refused.with_label_values(&[reason]).inc();
}

/// `listener` holds `delta` more connections. Always recorded: a gauge must come back
/// to zero.
pub fn listener_connections(listener: &'static str, delta: i64) {
    METRICS
        .listener_connections
        .with_label_values(&[listener])
        .add(delta);
}

/// `listener` closed a connection at accept because it was over the cap `reason`.
pub fn listener_refused(listener: &'static str, reason: &'static str) {
    when_enabled!();
    METRICS
        .listener_refused
        .with_label_values(&[listener, reason])
        .inc();
}

/// An accept of `listener` failed for want of a resource.
pub fn listener_accept_error(listener: &'static str) {
    when_enabled!();
    METRICS.accept_errors.with_label_values(&[listener]).inc();
}

/// A request of `app_id` was refused over its limit `limit`.
pub fn app_limited(app_id: &str, limit: &'static str) {
    when_enabled!();
    METRICS
        .app_limited
        .with_label_values(&[app_id, limit])
        .inc();
}

/// The event log refused an append before writing anything, lacking `reason`.
pub fn log_refused(reason: &'static str) {
    when_enabled!();
    METRICS.log_refused.with_label_values(&[reason]).inc();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn render_names_every_metric_with_help() {
        http_request("/v1/messages", "POST", "202", Duration::from_millis(3));
        push_accepted("app-1");
        delivery_lag(0, 5);
        entries_stored("app-1", 1);
        delivered("app-1", 12);
        disconnected("closed_by_device");
        connected();
        let text = render();
        for name in [
            "herald_http_requests_total",
            "herald_http_request_duration_seconds_bucket",
            "herald_pushes_accepted_total",
            "herald_log_sync_seconds_count",
            "herald_delivery_lag_records",
            "herald_delivered_total",
            "herald_ack_latency_seconds_bucket",
            "herald_gateway_connections",
            "herald_gateway_disconnects_total",
            "herald_gateway_inflight",
        ] {
            assert!(text.contains(&format!("\n{name}")), "{name} in\n{text}");
        }
        assert!(text.contains("# HELP herald_pushes_accepted_total Pushes answered 202"));
        assert!(text.contains(r#"herald_pushes_accepted_total{app_id="app-1"} 1"#));
    }
}
