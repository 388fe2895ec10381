//! herald's Rust device SDK (an API boundary): register a device, connect to its
//! gateway over MQTT 3.1.1, and receive its pushes once each, in order, across
//! reconnects and restarts.
//!
//! A [`Device`] keeps one connection to the gateway (client id = user name = device id,
//! password = device token, subscribed to `inbox`) and reconnects by itself with a
//! jittered exponential backoff when it breaks; it stops only when the gateway refuses
//! the credentials. Each entry arrives as an [`Envelope`] `{"id","seq","ts","data"}`.
//! The device removes duplicates by `seq` and by recent message id, remembers the last
//! `seq` shown (optionally in a state file, so a restarted app resumes there), and
//! acknowledges an entry only once the app is done with it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use herald_client::{Device, DeviceOptions};
//!
//! let http = reqwest::Client::new();
//! let creds = herald_client::register(&http, "http://127.0.0.1:8080", "APP_KEY").await?;
//! let mut opts = DeviceOptions::default();
//! opts.state_file = Some("herald-state.json".into());
//! let device = Device::start(&creds, opts).await?;
//!
//! // Handler style: each entry is acknowledged when the handler returns.
//! device
//!     .run(|msg| async move { println!("{} {} {}", msg.seq, msg.id, msg.data) })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Pull style, for apps that hand work on:
//!
//! ```no_run
//! # async fn demo(creds: herald_client::DeviceCredentials) -> Result<(), herald_client::Error> {
//! let mut device = herald_client::Device::start(&creds, Default::default()).await?;
//! let mut events = device.events();
//! tokio::spawn(async move {
//!     while let Ok(event) = events.recv().await {
//!         eprintln!("herald: {event:?}");
//!     }
//! });
//! while let Some(msg) = device.next().await {
//!     println!("{} {}", msg.seq, msg.data);
//!     msg.ack(); // or drop it: dropping acknowledges too
//! }
//! device.close().await
//! # }
//! ```
//!
//! # Delivery guarantee: at most once to the app
//!
//! An entry's `seq` is recorded as seen (and, with a state file, saved) at the moment
//! [`Device::next`] returns it, before the app handles it; its acknowledgement (PUBACK,
//! or PUBREC at QoS 2) is sent only after the app acknowledges or drops the
//! [`Message`] (in [`Device::run`]: after the handler returns). So:
//!
//! - The app never sees a message twice, even across restarts with a state file: a
//!   resend (same `seq`) or a repeat (same id) is acknowledged at once and not shown.
//! - If the connection breaks while the app handles a message, the gateway resends it;
//!   the device removes it as a duplicate and acknowledges it on the new connection.
//! - If the process dies while the app handles a message, that message is lost to the
//!   app: with a state file the restarted device treats it as seen (without one, a
//!   restarted device starts from nothing and shows whatever the gateway still holds).
//!   herald's status for the message stays "not acknowledged" until the restarted
//!   device acknowledges the resend, so the app server can tell.
//!
//! Acknowledgements go out in arrival order: one waits for every earlier entry of the
//! same connection to be acknowledged. An entry is only ever acknowledged on the
//! connection that delivered it.
//!
//! # Layout
//!
//! - [`Device`], [`DeviceHandle`], [`Message`], [`DeviceEvent`] (`device.rs`): the
//!   reconnecting device: a driver task per device runs the connection loop; the app
//!   side removes duplicates, saves state and hands out messages.
//! - [`Resume`] (`resume.rs`): the duplicate and resume logic and the state file, pure.
//! - `backoff.rs`, `acks.rs`: the reconnect schedule and the acknowledgement order, pure.
//! - [`connect`] (`connection.rs`): a single connection without reconnect, acknowledged
//!   on receipt, used by tests and `examples/push_load.rs`.
//! - [`Heartbeat`] (`heartbeat.rs`): the adaptive heartbeat's decisions, pure.
//! - [`nat`]: a NAT simulator (a proxy that forgets idle connections) and the cost model
//!   that prices what crossed it; [`sim`]: a device-cost run on them.
//! - [`register`] (here): device registration over REST.

mod acks;
mod backoff;
mod connection;
mod device;
mod error;
pub mod heartbeat;
pub mod nat;
mod resume;
pub mod sim;

use anyhow::{Context, anyhow, bail};
pub use herald_schemas::envelope::Envelope;
use serde::{Deserialize, Serialize};

pub use backoff::BackoffOptions;
pub use connection::{Closed, ConnectOptions, Connection, connect};
pub use device::{
    Ack, Device, DeviceEvent, DeviceHandle, DeviceOptions, DisconnectReason, Message, Qos, Status,
};
pub use error::Error;
pub use heartbeat::{Heartbeat, HeartbeatOptions};
pub use resume::{Resume, Verdict};

/// A registered device's identity and where to connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceCredentials {
    /// The device id: MQTT client id and username.
    pub device_id: String,
    /// The device token: MQTT password.
    pub device_token: String,
    /// The gateway's MQTT host.
    pub mqtt_host: String,
    /// The gateway's MQTT port.
    pub mqtt_port: u16,
    /// The keep-alive herald suggests for the network the device registered on, in
    /// seconds (where the adaptive heartbeat starts).
    #[serde(default)]
    pub keep_alive_s: Option<u16>,
}

#[derive(Deserialize)]
struct RegisterResponse {
    device_id: String,
    device_token: String,
    gateway: Gateway,
}

#[derive(Deserialize)]
struct Gateway {
    mqtt: String,
    #[serde(default)]
    keep_alive_s: Option<u16>,
}

/// Parses `mqtt://host:port`.
pub fn parse_mqtt_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .ok_or_else(|| anyhow!("gateway address {url:?} is not mqtt://host:port"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("gateway address {url:?} has no port"))?;
    Ok((host.to_owned(), port.parse().context("gateway port")?))
}

/// Registers a device with an app key at the API at `base_url`.
pub async fn register(
    http: &reqwest::Client,
    base_url: &str,
    app_key: &str,
) -> anyhow::Result<DeviceCredentials> {
    register_on(http, base_url, app_key, None).await
}

/// [`register`], telling herald the network the device is on (`wifi`, `5g`, `4g`, `3g`,
/// `2g`, `unknown`): the keep-alive it suggests depends on it.
pub async fn register_on(
    http: &reqwest::Client,
    base_url: &str,
    app_key: &str,
    network: Option<&str>,
) -> anyhow::Result<DeviceCredentials> {
    let mut body = serde_json::json!({ "app_key": app_key });
    if let Some(n) = network {
        body["network"] = n.into();
    }
    let resp = http
        .post(format!("{base_url}/v1/devices"))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "registration failed: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let r: RegisterResponse = resp.json().await?;
    let (mqtt_host, mqtt_port) = parse_mqtt_url(&r.gateway.mqtt)?;
    Ok(DeviceCredentials {
        device_id: r.device_id,
        device_token: r.device_token,
        mqtt_host,
        mqtt_port,
        keep_alive_s: r.gateway.keep_alive_s,
    })
}
