//! The single connection of [`connect`]: one MQTT session, no reconnect, acknowledged on
//! receipt. Kept for tests and measurements that want to see exactly one connection;
//! apps use [`Device`](crate::Device).

use std::time::Duration;

use anyhow::bail;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};

use crate::{DeviceCredentials, Envelope};

/// How [`connect`] connects.
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

/// How a [`Connection`] ended.
#[derive(Debug)]
pub enum Closed {
    /// The gateway refused the credentials.
    Refused(String),
    /// The connection broke or was closed by the gateway (for example, taken over).
    Lost(String),
    /// The app dropped the connection.
    Dropped,
}

/// A live connection made by [`connect`].
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
/// says why. Entries are acknowledged as soon as they are read from the socket, before
/// the app receives them, and duplicates are removed by `seq` within this connection
/// only; [`Device`](crate::Device) acknowledges after the app and resumes across
/// connections.
pub async fn connect(
    creds: &DeviceCredentials,
    opts: ConnectOptions,
) -> anyhow::Result<Connection> {
    if creds.device_id.is_empty() {
        bail!("the device id is empty");
    }
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
