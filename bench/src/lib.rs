//! herald's benchmarks: the pieces `herald-bench` (the orchestrator) is made of.
//!
//! # Layout
//! - [`procs`]: starting and measuring the servers under test (herald, Mosquitto,
//!   rumqttd) and the `herald-sim` device simulator processes.
//! - [`api`]: herald's REST API in bulk: apps, device registration, pushes.
//! - [`publisher`]: a QoS 1 MQTT publisher for the peers, on herald's codec.
//! - [`device_cost`]: the device-cost scenario (the SDK's adaptive heartbeat behind
//!   simulated NATs).
//!
//! Every scenario starts what it measures on loopback ports, measures, and stops it.

pub mod api;
pub mod device_cost;
pub mod procs;
pub mod publisher;

/// Microseconds since the Unix epoch: the `"t"` stamped into each payload.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    now_us() / 1000
}
