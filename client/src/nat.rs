//! A NAT simulator for tests and benchmarks: a loopback TCP proxy that behaves like a
//! carrier NAT, and the ledger of what crossed it.
//!
//! [`NatProxy`] forwards each device connection to the gateway. A connection idle (no
//! byte either way) for longer than the idle timeout is forgotten, as a carrier NAT
//! forgets its mapping: from then on every byte either way is dropped, and nothing tells
//! either end (no RST, no FIN): the device's writes "succeed" and its pings go
//! unanswered; the gateway's pushes vanish. A new connection gets a new mapping. The
//! timeout is real time: a test that scales time (a 30-minute NAT in 30 s) passes the
//! scaled value, and so does the device's heartbeat.
//!
//! Everything that crosses is written to a [`Ledger`] (each read as one segment, with its
//! direction, size, MQTT packet type and whether it was delivered), which
//! [`CostModel::account`] turns into what a phone would pay: packets and bytes at the IP
//! level and radio wake-ups.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Which way bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Device to gateway.
    Up,
    /// Gateway to device.
    Down,
}

/// What the ledger records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The device opened a connection (a new mapping).
    Open,
    /// One read's worth of bytes: `first` is the first byte (the MQTT packet type is its
    /// high nibble); `delivered` is false when the mapping was gone and it was dropped.
    Data {
        /// Which way.
        dir: Dir,
        /// How many bytes.
        bytes: usize,
        /// The first byte.
        first: u8,
        /// Whether it got through.
        delivered: bool,
    },
    /// One side closed; `delivered` is false when the mapping was gone.
    Close {
        /// Which side closed (`Up`: the device).
        dir: Dir,
        /// Whether the other side learned of it.
        delivered: bool,
    },
}

/// One ledger line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// When (real time).
    pub at: Instant,
    /// Which connection (numbered from 1).
    pub conn: u64,
    /// What.
    pub entry: Entry,
}

/// Everything that crossed the NAT, in order.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// The events.
    pub events: Vec<Event>,
}

struct Shared {
    ledger: Mutex<Ledger>,
    idle_timeout: Mutex<Duration>,
    next_conn: AtomicU64,
}

impl Shared {
    fn record(&self, conn: u64, entry: Entry) {
        self.ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .events
            .push(Event {
                at: Instant::now(),
                conn,
                entry,
            });
    }

    fn idle_timeout(&self) -> Duration {
        *self
            .idle_timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A mapping: alive until idle for longer than the timeout.
struct Mapping {
    last: Instant,
    dead: bool,
}

impl Mapping {
    /// Whether bytes arriving now get through (and they count as activity if so).
    fn pass(&mut self, timeout: Duration) -> bool {
        let now = Instant::now();
        if !self.dead && now.duration_since(self.last) > timeout {
            self.dead = true;
        }
        if !self.dead {
            self.last = now;
        }
        !self.dead
    }
}

/// The proxy. Dropping it stops accepting; connections already made keep going until
/// their ends close them.
pub struct NatProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl NatProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`, forgetting
    /// connections idle for longer than `idle_timeout` (real time).
    pub async fn start(upstream: SocketAddr, idle_timeout: Duration) -> io::Result<NatProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            ledger: Mutex::new(Ledger::default()),
            idle_timeout: Mutex::new(idle_timeout),
            next_conn: AtomicU64::new(1),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((device, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let conn = s.next_conn.fetch_add(1, Ordering::Relaxed);
                    let Ok(gateway) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = device.set_nodelay(true);
                    let _ = gateway.set_nodelay(true);
                    s.record(conn, Entry::Open);
                    let mapping = Arc::new(Mutex::new(Mapping {
                        last: Instant::now(),
                        dead: false,
                    }));
                    let (dr, dw) = device.into_split();
                    let (gr, gw) = gateway.into_split();
                    let up = pump(s.clone(), conn, mapping.clone(), Dir::Up, dr, gw);
                    let down = pump(s.clone(), conn, mapping, Dir::Down, gr, dw);
                    tokio::join!(up, down);
                });
            }
        });
        Ok(NatProxy {
            addr,
            shared,
            accept,
        })
    }

    /// Where devices connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of the ledger so far.
    pub fn ledger(&self) -> Ledger {
        self.shared
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes the idle timeout (for mappings old and new).
    pub fn set_idle_timeout(&self, timeout: Duration) {
        *self
            .shared
            .idle_timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = timeout;
    }
}

impl Drop for NatProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pump(
    s: Arc<Shared>,
    conn: u64,
    mapping: Arc<Mutex<Mapping>>,
    dir: Dir,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // An error reads as the end of the stream.
        let n = from.read(&mut buf).await.unwrap_or_default();
        let pass = mapping
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pass(s.idle_timeout());
        if n == 0 {
            s.record(
                conn,
                Entry::Close {
                    dir,
                    delivered: pass,
                },
            );
            if pass {
                let _ = to.shutdown().await;
            }
            // A dead mapping tells the other end nothing: its half stays open until it
            // gives up by itself.
            return;
        }
        s.record(
            conn,
            Entry::Data {
                dir,
                bytes: n,
                first: buf[0],
                delivered: pass,
            },
        );
        if pass && to.write_all(&buf[..n]).await.is_err() {
            // The other end is gone; keep reading so this end is not stuck.
            continue;
        }
    }
}

/// How a phone pays for what crossed the NAT, in the device's time.
#[derive(Debug, Clone)]
pub struct CostModel {
    /// Real time per device time (the simulation's scale; 1.0 for real time).
    pub time_scale: f64,
    /// IP + TCP header bytes of a segment (IPv4 20 + TCP 20 + timestamps 12).
    pub header_bytes: usize,
    /// A segment not answered by the other side within this (real time, TCP's delayed
    /// ACK) is acknowledged by a pure ACK.
    pub delayed_ack: Duration,
    /// The radio stays up this long after a packet (device time): a packet within it
    /// costs no new wake-up.
    pub radio_tail: Duration,
    /// How long the device retransmits into a dead path before it gives up (device
    /// time; its heartbeat's pong timeout): retransmissions every 200 ms, doubling.
    pub give_up_after: Duration,
    /// Extra bytes per segment when TLS is on (a TLS 1.3 record: 5 header + 16 tag + 1
    /// type), and per connection for the handshake; zero without TLS.
    pub tls_record_bytes: usize,
    /// See `tls_record_bytes`.
    pub tls_handshake_bytes: usize,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            time_scale: 1.0,
            header_bytes: 52,
            delayed_ack: Duration::from_millis(40),
            radio_tail: Duration::from_secs(10),
            give_up_after: Duration::from_secs(10),
            tls_record_bytes: 0,
            tls_handshake_bytes: 0,
        }
    }
}

/// What a stretch of the ledger cost the device.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    /// Packets sent or received by the device.
    pub packets: u64,
    /// Bytes at the IP level, both ways.
    pub bytes: u64,
    /// Of which MQTT bytes.
    pub mqtt_bytes: u64,
    /// Radio wake-ups.
    pub wakeups: u64,
    /// Connections opened.
    pub connections: u64,
}

/// MQTT packet types of pushes (PUBLISH and its acknowledgements), for counting a
/// device's idle cost apart from its pushes.
pub fn is_push_traffic(first: u8) -> bool {
    matches!(first >> 4, 3..=7)
}

impl CostModel {
    /// The device's cost of the events from `from` to `to` (real time), counting only
    /// data segments `include` accepts (by first byte) and the packets they cause.
    pub fn account(
        &self,
        ledger: &Ledger,
        from: Instant,
        to: Instant,
        include: impl Fn(u8) -> bool,
    ) -> Cost {
        let mut cost = Cost::default();
        // (real time, is a packet the device sends or receives) for the wake-up count.
        let mut packets: Vec<Instant> = Vec::new();
        let events: Vec<&Event> = ledger
            .events
            .iter()
            .filter(|e| e.at >= from && e.at < to)
            .collect();
        let h = self.header_bytes as u64;
        let mut add = |cost: &mut Cost, at: Instant, n: u64, bytes: u64| {
            cost.packets += n;
            cost.bytes += bytes;
            for _ in 0..n {
                packets.push(at);
            }
        };
        for (i, e) in events.iter().enumerate() {
            match e.entry {
                Entry::Open => {
                    cost.connections += 1;
                    // SYN, SYN-ACK (60 B with options), ACK; then the TLS handshake.
                    let tls = self.tls_handshake_bytes as u64;
                    add(&mut cost, e.at, 3, 60 + 60 + h + tls);
                }
                Entry::Close { dir, delivered } => match (dir, delivered) {
                    // FIN and its ACK each way.
                    (Dir::Up, true) => add(&mut cost, e.at, 2, 2 * h),
                    (Dir::Down, true) => add(&mut cost, e.at, 2, 2 * h),
                    (Dir::Up, false) => {
                        let n = 1 + self.retransmissions();
                        add(&mut cost, e.at, n, n * h)
                    }
                    (Dir::Down, false) => {}
                },
                Entry::Data {
                    dir,
                    bytes,
                    first,
                    delivered,
                } => {
                    if !include(first) {
                        continue;
                    }
                    let size = h + (bytes + self.tls_record_bytes) as u64;
                    match (dir, delivered) {
                        (Dir::Up, false) => {
                            // Sent into the dead path, then retransmitted until the
                            // device gives up.
                            let n = 1 + self.retransmissions();
                            add(&mut cost, e.at, n, n * size);
                            cost.mqtt_bytes += bytes as u64;
                            continue;
                        }
                        // Never reached the device.
                        (Dir::Down, false) => continue,
                        _ => {}
                    }
                    add(&mut cost, e.at, 1, size);
                    cost.mqtt_bytes += bytes as u64;
                    // A pure ACK back unless the other side sends data soon enough.
                    let answered = events[i + 1..]
                        .iter()
                        .take_while(|n| n.at.duration_since(e.at) <= self.delayed_ack)
                        .any(|n| matches!(n.entry, Entry::Data { dir: d, delivered: true, .. } if d != dir));
                    if !answered {
                        add(&mut cost, e.at, 1, h);
                    }
                }
            }
        }
        packets.sort();
        let tail = self.radio_tail.mul_f64(self.time_scale);
        let mut awake_until: Option<Instant> = None;
        for at in packets {
            if awake_until.is_none_or(|u| at > u) {
                cost.wakeups += 1;
            }
            awake_until = Some(at + tail);
        }
        cost
    }

    /// Retransmissions of one segment before the device gives up: 200 ms, doubling.
    fn retransmissions(&self) -> u64 {
        let mut rto = 0.2;
        let mut at = rto;
        let mut n = 0;
        while at <= self.give_up_after.as_secs_f64() {
            n += 1;
            rto *= 2.0;
            at += rto;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn forgets_an_idle_mapping_silently() {
        // An echo server behind the NAT.
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let nat = NatProxy::start(upstream, Duration::from_millis(300))
            .await
            .unwrap();
        let mut c = TcpStream::connect(nat.addr()).await.unwrap();
        let mut b = [0u8; 8];
        // Active: echoed.
        for _ in 0..3 {
            c.write_all(b"\xC0\x00").await.unwrap();
            c.read_exact(&mut b[..2]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // Idle past the timeout: the write succeeds, nothing comes back, nothing closes.
        tokio::time::sleep(Duration::from_millis(400)).await;
        c.write_all(b"\xC0\x00").await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(500), c.read(&mut b)).await;
        assert!(r.is_err(), "the dead mapping answered: {r:?}");
        // A new connection works.
        let mut c2 = TcpStream::connect(nat.addr()).await.unwrap();
        c2.write_all(b"\xC0\x00").await.unwrap();
        c2.read_exact(&mut b[..2]).await.unwrap();

        let ledger = nat.ledger();
        let dropped = ledger
            .events
            .iter()
            .filter(|e| {
                matches!(
                    e.entry,
                    Entry::Data {
                        delivered: false,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(dropped, 1);
        let start = ledger.events[0].at;
        let cost = CostModel::default().account(&ledger, start, Instant::now(), |_| true);
        assert_eq!(cost.connections, 2);
        // 4 delivered pings out and back (8 segments), a dead one with its 5
        // retransmissions, and two handshakes of 3.
        assert!(cost.packets >= 8 + 6 + 6, "{cost:?}");
        assert_eq!(cost.mqtt_bytes, 2 * 8 + 2);
    }

    #[test]
    fn retransmits_five_times_in_ten_seconds() {
        assert_eq!(CostModel::default().retransmissions(), 5);
    }
}
