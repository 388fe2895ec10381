//! A QoS 1 MQTT 3.1.1 publisher on herald's codec, for publishing to the peers: it keeps
//! up to `window` PUBLISHes unacknowledged, like a real publisher would.

use std::collections::HashSet;

use anyhow::{Context, bail};
use herald_gateway::codec::{self, ConnAck, Connect, Packet, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connected publisher.
pub struct Publisher {
    stream: TcpStream,
    buf: Vec<u8>,
    next: u16,
    unacked: HashSet<u16>,
    window: usize,
}

impl Publisher {
    /// Connects to `127.0.0.1:port` as `client_id`.
    pub async fn connect(port: u16, client_id: &str, window: usize) -> anyhow::Result<Self> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let mut out = Vec::new();
        codec::encode(
            &Packet::Connect(Connect {
                keep_alive_s: 60,
                client_id: client_id.to_owned(),
                ..Connect::default()
            }),
            &mut out,
        );
        stream.write_all(&out).await?;
        let mut p = Publisher {
            stream,
            buf: Vec::new(),
            next: 1,
            unacked: HashSet::new(),
            window: window.max(1),
        };
        match p.read().await? {
            Packet::ConnAck(ConnAck { code: 0, .. }) => Ok(p),
            other => bail!("publisher not accepted: {other:?}"),
        }
    }

    async fn read(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some(n) = codec::check(&self.buf, 1 << 20)? {
                let frame: Vec<u8> = self.buf.drain(..n).collect();
                return Ok(codec::decode(&frame)?);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("broker closed the publisher");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Publishes at QoS 1, waiting for room in the window.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
        while self.unacked.len() >= self.window {
            self.take_ack().await?;
        }
        let pkid = self.next;
        self.next = if pkid == u16::MAX { 1 } else { pkid + 1 };
        let mut out = Vec::with_capacity(payload.len() + topic.len() + 8);
        codec::encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: 1,
                retain: false,
                topic: topic.to_owned(),
                pkid,
                payload: bytes::Bytes::copy_from_slice(payload),
                ..Publish::default()
            }),
            &mut out,
        );
        self.stream.write_all(&out).await?;
        self.unacked.insert(pkid);
        Ok(())
    }

    async fn take_ack(&mut self) -> anyhow::Result<()> {
        match self.read().await? {
            Packet::PubAck(pkid) => {
                self.unacked.remove(&pkid);
                Ok(())
            }
            Packet::PingResp => Ok(()),
            other => bail!("unexpected packet to the publisher: {other:?}"),
        }
    }

    /// Waits until every PUBLISH is acknowledged.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        while !self.unacked.is_empty() {
            self.take_ack().await.context("waiting for PUBACKs")?;
        }
        Ok(())
    }
}
