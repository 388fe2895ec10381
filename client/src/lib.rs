//! herald's Rust device SDK (an API boundary): register a device, connect to its
//! gateway over MQTT, and receive its pushes once each, in order.
//!
//! This first version covers what a device needs to receive pushes: registration over
//! REST, an MQTT connection with the device's credentials, the `inbox` subscription at
//! QoS 1, and duplicate removal by `seq` (a resent entry is never shown twice). Resume
//! across process restarts and the adaptive heartbeat come later.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let http = reqwest::Client::new();
//! let creds = herald_client::register(&http, "http://127.0.0.1:8080", "APP_KEY").await?;
//! let mut conn = herald_client::connect(&creds, herald_client::ConnectOptions::default()).await?;
//! while let Some(msg) = conn.messages.recv().await {
//!     println!("{} {}", msg.seq, msg.data);
//! }
//! # Ok(()) }
//! ```

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
pub use herald_schemas::envelope::Envelope;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

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
    let resp = http
        .post(format!("{base_url}/v1/devices"))
        .json(&serde_json::json!({ "app_key": app_key }))
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
    })
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Most unacknowledged messages the client accepts at once.
    pub inflight: u16,
    /// Ask the gateway to keep the session (herald keeps the inbox either way).
    pub clean_session: bool,
    /// Messages buffered for the app before the connection stops reading.
    pub buffer: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            keep_alive: Duration::from_secs(60),
            inflight: 64,
            clean_session: false,
            buffer: 1024,
        }
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum Closed {
    /// The gateway refused the credentials.
    Refused(String),
    /// The connection broke or was closed by the gateway (for example, taken over).
    Lost(String),
    /// The app dropped the connection.
    Dropped,
}

/// A live connection.
pub struct Connection {
    /// The device's messages, each once, in `seq` order.
    pub messages: mpsc::Receiver<Envelope>,
    /// Resolves when the connection ends.
    pub closed: oneshot::Receiver<Closed>,
    client: AsyncClient,
}

impl Connection {
    /// Disconnects cleanly.
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

/// Connects, subscribes to `inbox` at QoS 1 and resolves once the subscription is
/// acknowledged. The connection does not reconnect by itself: when it ends, `closed`
/// says why.
pub async fn connect(
    creds: &DeviceCredentials,
    opts: ConnectOptions,
) -> anyhow::Result<Connection> {
    let mut mqtt = MqttOptions::new(&creds.device_id, &creds.mqtt_host, creds.mqtt_port);
    mqtt.set_credentials(&creds.device_id, &creds.device_token)
        .set_keep_alive(opts.keep_alive)
        .set_clean_session(opts.clean_session)
        .set_inflight(opts.inflight)
        .set_max_packet_size(256 * 1024, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(mqtt, 16);
    client.subscribe("inbox", QoS::AtLeastOnce).await?;
    let (tx, messages) = mpsc::channel(opts.buffer);
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
    let (closed_tx, closed) = oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut last_seq = 0u64;
        let end = loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Ok(()));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let env = match herald_schemas::envelope::decode(&p.payload) {
                        Ok(e) => e,
                        Err(_) => continue,
                    };
                    // Entries arrive in seq order; a resend after a reconnect repeats
                    // seqs already shown.
                    if env.seq <= last_seq {
                        continue;
                    }
                    last_seq = env.seq;
                    if tx.send(env).await.is_err() {
                        break Closed::Dropped;
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    break Closed::Refused(format!("{code:?}"));
                }
                Err(e) => break Closed::Lost(e.to_string()),
            }
        };
        if let Some(r) = ready.take() {
            let _ = r.send(Err(format!("{end:?}")));
        }
        let _ = closed_tx.send(end);
    });
    match ready_rx.await {
        Ok(Ok(())) => Ok(Connection {
            messages,
            closed,
            client,
        }),
        Ok(Err(e)) => bail!("connection failed: {e}"),
        Err(_) => bail!("connection task ended"),
    }
}
