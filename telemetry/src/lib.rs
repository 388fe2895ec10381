//! herald's telemetry: every Prometheus metric the processes export, in one place, and the
//! live overview the admin page and `herald top` draw, sampled from those metrics.
//!
//! # Layout
//! - [`metrics`]: the metrics, registered in one [`Registry`](prometheus::Registry), each
//!   recorded through a function named for what happened (so a metric's name, help and
//!   labels are written once). [`metrics::render`] is the text `/metrics` serves.
//! - [`overview`]: a sampler that turns the counters and histograms into per-second rates
//!   and percentiles once a second, keeps the last few minutes, and hands them to
//!   subscribers.
//!
//! # Invariants
//! - Recording is a few atomic operations (a labelled metric adds a hash lookup under a
//!   read lock); nothing here does I/O or allocates per event once a label was seen.
//! - Metrics can be switched off for a process ([`metrics::set_enabled`]), so the cost of
//!   measuring can itself be measured: every record function is then one relaxed load.
//! - Labels have bounded cardinality: routes are the router's patterns, reasons are
//!   `&'static str`s, app ids are the apps of this deployment.

pub mod metrics;
pub mod overview;
