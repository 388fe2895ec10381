//! `herald-sim`: a device simulator for herald's benchmarks.
//!
//! One process opens many MQTT 3.1.1 client connections (one small tokio task
//! each), subscribes every connection to one topic, acknowledges every PUBLISH
//! it receives and measures end-to-end latency. The same client is used
//! against herald's gateway, Mosquitto and rumqttd, so the comparison is fair.
//! Packets are encoded and decoded with herald's own codec
//! (`herald_gateway::codec`).
//!
//! # What a connection does
//!
//! TCP connect (optionally from one of `--source-ips`), CONNECT (client id,
//! and with `--creds` user name = client id = `device_id`, password =
//! `device_token`), wait for CONNACK, SUBSCRIBE to `--topic` at `--qos`, wait
//! for SUBACK. A failed or refused attempt is retried up to 3 times, then the
//! connection counts as failed. Connections are started at `--connect-rate`
//! per second with at most `--connect-concurrency` handshakes in flight.
//!
//! Once subscribed, every PUBLISH is acknowledged immediately (PUBACK at
//! QoS 1; PUBREC at QoS 2, then PUBCOMP when the PUBREL arrives), and a
//! PINGREQ is sent after `--keep-alive` seconds without sending anything.
//!
//! # What is measured
//!
//! * **Latency**: the payload is searched for the bytes `"t":`; the integer
//!   after them is the send time in microseconds since the Unix epoch (this
//!   works for herald's envelope `{"id":..,"seq":..,"ts":..,"data":{"t":..}}`
//!   and for raw payloads `{"t":..}`). Latency = receipt time - `t`, recorded
//!   in an HDR histogram in microseconds. Payloads without `"t":` are counted
//!   but not timed.
//! * **Duplicates**: when the payload contains `"seq":` (herald envelopes),
//!   each connection remembers the last seq it saw; a seq at or below it is a
//!   duplicate. Duplicates are acknowledged but counted separately: they count
//!   neither as `received` (nor towards `--expect`) nor in the latency figures.
//!
//! # Output
//!
//! JSON lines on stdout, flushed as they are written (human-readable messages
//! go to stderr):
//!
//! ```text
//! {"event":"connected","connected":N,"failed":F,"elapsed_ms":T}
//! {"event":"progress","received":R}
//! {"event":"done","reason":"expected","connected":N,"failed":F,"received":R,"duplicates":D,
//!  "first_ms":..,"last_ms":..,"latency_us":{"count":C,"p50":..,"p90":..,"p99":..,"p999":..,"max":..},
//!  "disconnects":X}
//! ```
//!
//! * `connected` is printed once every connection is up or has failed;
//!   `elapsed_ms` counts from the first connection attempt.
//! * `progress` is printed at most once a second, when `received` changed.
//! * `done` is the final report (on one line). `first_ms`/`last_ms` are the
//!   Unix-epoch milliseconds of the first and last receipt (`null` if none);
//!   the latency percentiles are `null` when nothing was timed;
//!   `disconnects` counts established connections that were lost (closed by
//!   the server, reset, or a protocol error). `reason` says why the run ended:
//!   `expected` (`--expect` reached), `timeout`, `all_disconnected` (no
//!   connection left, or none came up), `stdin_eof`, or `signal`.
//!
//! # Modes and exit codes
//!
//! * `--expect M` (M > 0): exit 0 as soon as M messages were received in
//!   total (at QoS 2, once their PUBRELs are answered too, waiting at most 5 s
//!   for those); exit 2 after `--timeout` seconds (counted from when all
//!   connections are up), when every connection is gone, or on
//!   SIGTERM/SIGINT.
//! * `--expect 0` (idle mode): hold the connections until stdin reaches EOF or
//!   SIGTERM/SIGINT arrives, then report and exit 0.
//! * Exit 1: bad arguments or a setup error.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{ArgGroup, Parser};
use hdrhistogram::Histogram;
use herald_gateway::codec::{self, CONNACK_ACCEPTED, Connect, Packet, Subscribe};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Largest packet accepted from the server (the whole frame, in bytes).
const MAX_PACKET: usize = 64 << 20;
/// How often a failed connection attempt is retried.
const RETRIES: u32 = 3;
/// Delay before the first retry (doubled for each further one).
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// Bytes read from a socket at a time (into a buffer on the thread's stack,
/// not in the connection's state).
const READ_CHUNK: usize = 16 * 1024;
/// Reads per wake-up before yielding to other connections.
const READS_PER_WAKE: usize = 8;
/// A connection's leftover buffers larger than this are freed once empty.
const KEEP_BUF: usize = 512;
/// Highest latency the histogram distinguishes (one hour, in microseconds).
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// How long to wait, once `--expect` is reached, for outstanding QoS 2
/// exchanges (PUBREC sent, PUBREL not yet arrived) before exiting anyway.
const QOS2_GRACE: Duration = Duration::from_secs(5);
/// Connection errors written to stderr before going quiet.
const MAX_LOGGED_ERRORS: u64 = 20;

/// MQTT 3.1.1 device simulator for benchmarks: many subscriber connections per
/// process, every PUBLISH acknowledged, latency and duplicates measured.
///
/// Prints JSON lines on stdout: a "connected" event once all connections are up
/// (or failed), "progress" events at most once a second, and a final "done"
/// report with counts and latency percentiles (microseconds). Exit code 0 when
/// done normally, 2 on timeout or loss of every connection, 1 on setup errors.
#[derive(Parser, Debug)]
#[command(name = "herald-sim", version)]
#[command(group(ArgGroup::new("who").required(true).args(["creds", "anonymous"])))]
struct Args {
    /// Broker host name or IP address.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Broker MQTT port.
    #[arg(long)]
    port: u16,

    /// JSON-lines file of devices, one {"device_id": "...", "device_token": "..."}
    /// per line; one connection per line, with client id = user name = device_id
    /// and password = device_token. Either this or --anonymous is required.
    #[arg(long, value_name = "FILE")]
    creds: Option<PathBuf>,

    /// Open N connections without user name or password instead of --creds;
    /// their client ids are PREFIX0 .. PREFIX{N-1} (see --id-prefix).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    anonymous: Option<u32>,

    /// Client id prefix for --anonymous connections.
    #[arg(long, value_name = "PREFIX", default_value = "sim-")]
    id_prefix: String,

    /// Topic filter every connection subscribes to (herald delivers on "inbox").
    #[arg(long, default_value = "inbox")]
    topic: String,

    /// QoS requested in the SUBSCRIBE: 0, 1 or 2. Each PUBLISH is acknowledged
    /// at the QoS it arrives with: nothing at 0, PUBACK at 1, PUBREC at 2 and
    /// then PUBCOMP when the server's PUBREL arrives.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,

    /// Local source addresses to spread connections over, round-robin (each
    /// socket is bound to ADDR:0 before connecting), so that ephemeral ports do
    /// not run out. A range "127.0.1.1-127.0.1.250", a single address, or a
    /// comma-separated list of both. Default: let the kernel choose.
    #[arg(long, value_name = "ADDRS")]
    source_ips: Option<String>,

    /// Connections started per second; 0 = as fast as --connect-concurrency
    /// allows.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    connect_rate: u32,

    /// Most handshakes (TCP connect, CONNECT/CONNACK, SUBSCRIBE/SUBACK,
    /// including retries) in progress at once.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    connect_concurrency: u32,

    /// Seconds one handshake attempt may take before it counts as failed (and
    /// is retried, up to 3 times).
    #[arg(long, value_name = "S", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    handshake_timeout: u64,

    /// MQTT keep-alive in seconds, sent in CONNECT; a connection that has sent
    /// nothing for this long sends a PINGREQ. 0 disables keep-alive.
    #[arg(long, value_name = "S", default_value_t = 60)]
    keep_alive: u16,

    /// Set the clean-session flag in CONNECT (default: persistent sessions).
    #[arg(long)]
    clean_session: bool,

    /// Total PUBLISH messages (not counting duplicates) to receive across all
    /// connections; once reached, print the report and exit 0. 0 = idle mode:
    /// hold the connections until stdin reaches EOF or SIGTERM/SIGINT, then
    /// report and exit 0.
    #[arg(long, value_name = "M", default_value_t = 0)]
    expect: u64,

    /// With --expect: give up this many seconds after all connections are up
    /// (or failed), report what was received and exit 2. 0 = wait forever.
    #[arg(long, value_name = "S", default_value_t = 300)]
    timeout: u64,

    /// Tokio worker threads (default: one per CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
}

/// One line of the --creds file.
#[derive(Deserialize)]
struct Cred {
    /// Client id and user name.
    device_id: String,
    /// Password.
    device_token: String,
}

/// Who the connections are.
enum Who {
    /// One connection per device, with credentials.
    Creds(Vec<Cred>),
    /// `count` anonymous connections named `prefix{i}`.
    Anonymous {
        /// Number of connections.
        count: u32,
        /// Client id prefix.
        prefix: String,
    },
}

impl Who {
    /// Number of connections to open.
    fn len(&self) -> usize {
        match self {
            Who::Creds(creds) => creds.len(),
            Who::Anonymous { count, .. } => *count as usize,
        }
    }

    /// The CONNECT for connection `idx`.
    fn connect(&self, idx: usize, clean_session: bool, keep_alive_s: u16) -> Connect {
        let (client_id, username, password) = match self {
            Who::Creds(creds) => match creds.get(idx) {
                Some(c) => (
                    c.device_id.clone(),
                    Some(c.device_id.clone()),
                    Some(c.device_token.as_bytes().to_vec()),
                ),
                None => (String::new(), None, None),
            },
            Who::Anonymous { prefix, .. } => (format!("{prefix}{idx}"), None, None),
        };
        Connect {
            clean_session,
            keep_alive_s,
            client_id,
            username,
            password,
            ..Connect::default()
        }
    }
}

/// Counters shared by all connections.
#[derive(Default)]
struct Stats {
    /// Connections that completed their handshake.
    connected: AtomicU64,
    /// Connections that gave up after their retries.
    failed: AtomicU64,
    /// `connected + failed`, as one counter so exactly one task sees the end.
    settled: AtomicU64,
    /// Non-duplicate PUBLISHes received (and acknowledged).
    received: AtomicU64,
    /// Duplicate PUBLISHes (by herald `seq`).
    duplicates: AtomicU64,
    /// Established connections lost.
    disconnects: AtomicU64,
    /// QoS 2 exchanges of this run still waiting for the server's PUBREL.
    awaiting_rel: AtomicI64,
    /// Unix micros of the first receipt (0 = none yet).
    first_us: AtomicU64,
    /// Unix micros of the last receipt.
    last_us: AtomicU64,
    /// Errors written to stderr so far.
    logged: AtomicU64,
}

/// Everything the connection tasks share.
struct Sim {
    /// Broker address.
    addr: SocketAddr,
    /// Source addresses to bind to, round-robin (empty: no bind).
    source_ips: Vec<IpAddr>,
    /// Connection identities.
    who: Who,
    /// Topic filter to subscribe to.
    topic: String,
    /// Requested subscription QoS.
    qos: u8,
    /// Keep-alive in seconds (0: none).
    keep_alive: u16,
    /// Clean-session flag.
    clean_session: bool,
    /// Messages to receive (0: idle mode).
    expect: u64,
    /// Time allowed per handshake attempt.
    handshake_timeout: Duration,
    /// Number of connections.
    total: u64,
    /// Counters.
    stats: Stats,
    /// Wakes the main loop: all settled, `--expect` reached, a disconnect.
    wake: Notify,
}

impl Sim {
    /// Writes a connection error to stderr, for the first few only.
    fn log(&self, msg: std::fmt::Arguments<'_>) {
        let n = self.stats.logged.fetch_add(1, Relaxed);
        if n < MAX_LOGGED_ERRORS {
            eprintln!("herald-sim: {msg}");
        } else if n == MAX_LOGGED_ERRORS {
            eprintln!("herald-sim: (further connection errors not shown)");
        }
    }

    /// Counts one connection as settled (connected or failed).
    fn settle(&self) {
        if self.stats.settled.fetch_add(1, Relaxed) + 1 == self.total {
            self.wake.notify_one();
        }
    }
}

// ---------------------------------------------------------------------------
// Latency histograms: one per worker thread, merged for the report.
// ---------------------------------------------------------------------------

/// Every thread's histogram, for the final merge.
static HISTOGRAMS: Mutex<Vec<Arc<Mutex<Histogram<u64>>>>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's histogram (locking it is uncontended until the report).
    static LOCAL_HISTOGRAM: Arc<Mutex<Histogram<u64>>> = {
        let h = Arc::new(Mutex::new(new_histogram()));
        lock(&HISTOGRAMS).push(Arc::clone(&h));
        h
    };
}

/// An empty latency histogram (1 µs to one hour, 3 significant digits).
fn new_histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant bounds are valid")
}

/// Locks a mutex, ignoring poisoning (the data are plain counters).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records latencies on the current thread's histogram.
fn record_latencies(us: &[u64]) {
    LOCAL_HISTOGRAM.with(|h| {
        let mut h = lock(h);
        for &v in us {
            h.saturating_record(v);
        }
    });
}

/// All threads' histograms merged.
fn merged_histogram() -> Histogram<u64> {
    let mut total = new_histogram();
    for h in lock(&HISTOGRAMS).iter() {
        if let Err(e) = total.add(&*lock(h)) {
            eprintln!("herald-sim: merging latency histograms: {e}");
        }
    }
    total
}

/// The unsigned integer right after the first occurrence of `key` in `hay`
/// (JSON whitespace skipped), if any.
fn int_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let pos = hay.windows(key.len()).position(|w| w == key)?;
    let rest = hay.get(pos + key.len()..)?;
    let start = rest
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))?;
    let mut value: u64 = 0;
    let mut digits = 0;
    for &b in rest.get(start..)? {
        if !b.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

// ---------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------

/// Where a connection is in its handshake.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// CONNECT sent, waiting for CONNACK.
    AwaitConnAck,
    /// SUBSCRIBE sent, waiting for SUBACK.
    AwaitSubAck,
    /// Subscribed.
    Ready,
}

/// What a read turned up.
enum Flow {
    /// Keep going.
    Open,
    /// The server closed the connection.
    Eof,
}

/// One MQTT connection's state: kept small, since there are many.
struct Conn {
    /// The socket.
    stream: TcpStream,
    /// Bytes of an incomplete packet carried over to the next read (usually
    /// empty and unallocated).
    rbuf: Vec<u8>,
    /// Packets to send (acknowledgements, PINGREQ), written after each read.
    wbuf: Vec<u8>,
    /// Last herald `seq` seen, for duplicate detection.
    last_seq: Option<u64>,
    /// Handshake progress.
    stage: Stage,
    /// Messages received but not yet counted (counted once acknowledged).
    new_received: u32,
    /// Duplicates received but not yet counted.
    new_duplicates: u32,
    /// Packet ids of QoS 2 PUBLISHes answered with PUBREC whose PUBREL has
    /// not arrived yet (usually empty and unallocated).
    awaiting_rel: Vec<u16>,
    /// Change of `awaiting_rel.len()` not yet added to [`Stats::awaiting_rel`].
    new_awaiting_rel: i32,
}

impl Conn {
    /// Wraps a freshly connected socket.
    fn new(stream: TcpStream) -> Self {
        Conn {
            stream,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            last_seq: None,
            stage: Stage::AwaitConnAck,
            new_received: 0,
            new_duplicates: 0,
            awaiting_rel: Vec::new(),
            new_awaiting_rel: 0,
        }
    }

    /// Reads what the socket has (without waiting), handles every complete
    /// packet and queues the replies in `wbuf`. The read buffer lives on this
    /// (synchronous) function's stack, not in the connection's state.
    fn on_readable(&mut self, sim: &Sim) -> anyhow::Result<Flow> {
        let mut chunk = [0u8; READ_CHUNK];
        let mut latencies = Vec::new();
        let mut flow = Flow::Open;
        for _ in 0..READS_PER_WAKE {
            let n = match self.stream.try_read(&mut chunk) {
                Ok(0) => {
                    flow = Flow::Eof;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            };
            self.feed(chunk.get(..n).unwrap_or_default(), sim, &mut latencies)?;
            if n < READ_CHUNK {
                break;
            }
        }
        if !latencies.is_empty() {
            record_latencies(&latencies);
        }
        Ok(flow)
    }

    /// Handles the complete packets in `rbuf` + `data`, keeping the rest.
    fn feed(&mut self, data: &[u8], sim: &Sim, latencies: &mut Vec<u64>) -> anyhow::Result<()> {
        if self.rbuf.is_empty() {
            let used = self.handle_frames(data, sim, latencies)?;
            if let Some(rest) = data.get(used..).filter(|r| !r.is_empty()) {
                self.rbuf.extend_from_slice(rest);
            }
        } else {
            let mut buf = std::mem::take(&mut self.rbuf);
            buf.extend_from_slice(data);
            let used = self.handle_frames(&buf, sim, latencies)?;
            buf.drain(..used);
            if buf.is_empty() && buf.capacity() > KEEP_BUF {
                buf = Vec::new();
            }
            self.rbuf = buf;
        }
        Ok(())
    }

    /// Handles every complete packet at the start of `buf`; returns how many
    /// bytes they took.
    fn handle_frames(
        &mut self,
        buf: &[u8],
        sim: &Sim,
        latencies: &mut Vec<u64>,
    ) -> anyhow::Result<usize> {
        let mut used = 0;
        while let Some(rest) = buf.get(used..) {
            let Some(len) = codec::check(rest, MAX_PACKET)? else {
                break;
            };
            let frame = rest.get(..len).unwrap_or_default();
            self.handle(codec::decode(frame)?, sim, latencies)?;
            used += len;
        }
        Ok(used)
    }

    /// Handles one packet from the server.
    fn handle(
        &mut self,
        packet: Packet,
        sim: &Sim,
        latencies: &mut Vec<u64>,
    ) -> anyhow::Result<()> {
        match packet {
            Packet::Publish(p) => {
                let now = herald_bench::now_us();
                match p.qos {
                    1 => codec::encode(&Packet::PubAck(p.pkid), &mut self.wbuf),
                    2 => {
                        codec::encode(&Packet::PubRec(p.pkid), &mut self.wbuf);
                        if !self.awaiting_rel.contains(&p.pkid) {
                            self.awaiting_rel.push(p.pkid);
                            self.new_awaiting_rel += 1;
                        }
                    }
                    _ => {}
                }
                if let Some(seq) = int_after(&p.payload, b"\"seq\":") {
                    if self.last_seq.is_some_and(|last| seq <= last) {
                        self.new_duplicates += 1;
                        return Ok(());
                    }
                    self.last_seq = Some(seq);
                }
                if let Some(t) = int_after(&p.payload, b"\"t\":") {
                    latencies.push(now.saturating_sub(t));
                }
                let first = &sim.stats.first_us;
                if first.load(Relaxed) == 0 {
                    let _ = first.compare_exchange(0, now, Relaxed, Relaxed);
                }
                sim.stats.last_us.fetch_max(now, Relaxed);
                self.new_received += 1;
            }
            Packet::PubRel(pkid) => {
                codec::encode(&Packet::PubComp(pkid), &mut self.wbuf);
                // A PUBREL may also finish an exchange of an earlier session.
                if let Some(i) = self.awaiting_rel.iter().position(|&id| id == pkid) {
                    self.awaiting_rel.swap_remove(i);
                    self.new_awaiting_rel -= 1;
                    if self.awaiting_rel.is_empty() && self.awaiting_rel.capacity() > KEEP_BUF {
                        self.awaiting_rel = Vec::new();
                    }
                }
            }
            Packet::ConnAck(ack) if self.stage == Stage::AwaitConnAck => {
                if ack.code != CONNACK_ACCEPTED {
                    bail!("CONNACK refused the connection (return code {})", ack.code);
                }
                self.stage = Stage::AwaitSubAck;
            }
            Packet::SubAck(ack) if self.stage == Stage::AwaitSubAck && ack.pkid == 1 => {
                if ack.codes.contains(&codec::SUBACK_FAILURE) {
                    bail!("SUBACK refused the subscription to {:?}", sim.topic);
                }
                self.stage = Stage::Ready;
            }
            Packet::PingResp
            | Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::UnsubAck(_) => {}
            other => bail!("unexpected packet from the server: {other:?}"),
        }
        Ok(())
    }

    /// Sends what is queued in `wbuf`, then counts the messages it
    /// acknowledged. Returns whether anything was sent.
    async fn flush(&mut self, sim: &Sim) -> anyhow::Result<bool> {
        let sent = !self.wbuf.is_empty();
        if sent {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
            if self.wbuf.capacity() > KEEP_BUF {
                self.wbuf = Vec::new();
            }
        }
        if self.new_duplicates > 0 {
            sim.stats
                .duplicates
                .fetch_add(u64::from(self.new_duplicates), Relaxed);
            self.new_duplicates = 0;
        }
        if self.new_awaiting_rel != 0 {
            let delta = i64::from(self.new_awaiting_rel);
            self.new_awaiting_rel = 0;
            let now = sim.stats.awaiting_rel.fetch_add(delta, Relaxed) + delta;
            if delta < 0 && now <= 0 && sim.expect > 0 {
                sim.wake.notify_one();
            }
        }
        if self.new_received > 0 {
            let k = u64::from(self.new_received);
            self.new_received = 0;
            let before = sim.stats.received.fetch_add(k, Relaxed);
            if sim.expect > 0 && before < sim.expect && before + k >= sim.expect {
                sim.wake.notify_one();
            }
        }
        Ok(sent)
    }

    /// Reads and handles packets until the handshake reaches `stage`.
    async fn drive_until(&mut self, stage: Stage, sim: &Sim) -> anyhow::Result<()> {
        while self.stage < stage {
            self.stream.readable().await?;
            let flow = self.on_readable(sim)?;
            self.flush(sim).await?;
            if let Flow::Eof = flow {
                bail!("server closed the connection during the handshake");
            }
        }
        Ok(())
    }

    /// The steady state: acknowledge what arrives, ping when idle. Returns
    /// `Ok` when the server closes the connection.
    async fn run(mut self, sim: &Sim) -> anyhow::Result<()> {
        let keep_alive = Duration::from_secs(sim.keep_alive.into());
        let ping = tokio::time::sleep(keep_alive);
        tokio::pin!(ping);
        loop {
            let flow = tokio::select! {
                r = self.stream.readable() => {
                    r?;
                    self.on_readable(sim)?
                }
                () = &mut ping, if !keep_alive.is_zero() => {
                    codec::encode(&Packet::PingReq, &mut self.wbuf);
                    Flow::Open
                }
            };
            if self.flush(sim).await? && !keep_alive.is_zero() {
                ping.as_mut().reset(Instant::now() + keep_alive);
            }
            if let Flow::Eof = flow {
                return Ok(());
            }
        }
    }
}

/// One handshake attempt: connect, CONNECT/CONNACK, SUBSCRIBE/SUBACK.
async fn handshake(sim: &Sim, idx: usize) -> anyhow::Result<Conn> {
    let socket = if sim.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if !sim.source_ips.is_empty() {
        let ip = sim.source_ips[idx % sim.source_ips.len()];
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind to {ip}"))?;
    }
    let stream = socket.connect(sim.addr).await.context("TCP connect")?;
    stream.set_nodelay(true)?;
    let mut conn = Conn::new(stream);
    let connect = sim.who.connect(idx, sim.clean_session, sim.keep_alive);
    codec::encode(&Packet::Connect(connect), &mut conn.wbuf);
    conn.flush(sim).await?;
    conn.drive_until(Stage::AwaitSubAck, sim).await?;
    let subscribe = Subscribe {
        pkid: 1,
        filters: vec![(sim.topic.clone(), sim.qos)],
        ..Subscribe::default()
    };
    codec::encode(&Packet::Subscribe(subscribe), &mut conn.wbuf);
    conn.flush(sim).await?;
    conn.drive_until(Stage::Ready, sim).await?;
    conn.wbuf = Vec::new();
    Ok(conn)
}

/// Handshake with timeout and retries.
async fn establish(sim: &Sim, idx: usize) -> anyhow::Result<Conn> {
    let mut attempt = 0;
    loop {
        let result = tokio::time::timeout(sim.handshake_timeout, handshake(sim, idx))
            .await
            .unwrap_or_else(|_| Err(anyhow!("handshake timed out")));
        match result {
            Ok(conn) => return Ok(conn),
            Err(e) if attempt < RETRIES => {
                tokio::time::sleep(RETRY_DELAY * 2u32.pow(attempt)).await;
                attempt += 1;
                drop(e);
            }
            Err(e) => return Err(e.context(format!("gave up after {} attempts", attempt + 1))),
        }
    }
}

/// A connection task, from handshake to disconnect.
async fn device(sim: Arc<Sim>, idx: usize, permit: OwnedSemaphorePermit) {
    // Boxed so that the handshake's state is freed once it is done.
    let established = Box::pin(establish(&sim, idx)).await;
    drop(permit);
    let conn = match established {
        Ok(conn) => conn,
        Err(e) => {
            sim.log(format_args!("connection {idx}: {e:#}"));
            sim.stats.failed.fetch_add(1, Relaxed);
            sim.settle();
            return;
        }
    };
    sim.stats.connected.fetch_add(1, Relaxed);
    sim.settle();
    match conn.run(&sim).await {
        Ok(()) => sim.log(format_args!("connection {idx}: closed by the server")),
        Err(e) => sim.log(format_args!("connection {idx}: {e:#}")),
    }
    sim.stats.disconnects.fetch_add(1, Relaxed);
    sim.wake.notify_one();
}

/// Starts the connections at the configured rate and concurrency.
async fn spawn_connections(sim: Arc<Sim>, rate: u32, concurrency: u32) {
    let sem = Arc::new(Semaphore::new(concurrency as usize));
    let start = Instant::now();
    for idx in 0..sim.who.len() {
        if rate > 0 {
            let due = start + Duration::from_secs_f64(idx as f64 / f64::from(rate));
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
        }
        let Ok(permit) = Arc::clone(&sem).acquire_owned().await else {
            return;
        };
        tokio::spawn(device(Arc::clone(&sim), idx, permit));
    }
}

// ---------------------------------------------------------------------------
// Setup and reporting
// ---------------------------------------------------------------------------

/// Parses `--source-ips`: ranges `A-B`, single addresses, comma-separated.
fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut ips = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("bad address {a:?}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("bad address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a >= 1 << 20 {
                bail!("bad address range {part:?}");
            }
            ips.extend((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))));
        } else {
            ips.push(
                part.parse()
                    .with_context(|| format!("bad address {part:?}"))?,
            );
        }
    }
    if ips.is_empty() {
        bail!("--source-ips lists no address");
    }
    if ips.iter().any(IpAddr::is_ipv4) && ips.iter().any(IpAddr::is_ipv6) {
        bail!("--source-ips mixes IPv4 and IPv6 addresses");
    }
    Ok(ips)
}

/// Reads the --creds file.
fn read_creds(path: &PathBuf) -> anyhow::Result<Vec<Cred>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut creds = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let cred: Cred = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", path.display(), n + 1))?;
        creds.push(cred);
    }
    if creds.is_empty() {
        bail!("{} holds no credentials", path.display());
    }
    Ok(creds)
}

/// Warns when the open-file limit is too low for `n` connections.
fn check_fd_limit(n: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft
        && soft < n + 64
    {
        eprintln!(
            "herald-sim: warning: open-file limit is {soft}, {n} connections need more (ulimit -n)"
        );
    }
}

/// An output line (fields in the documented order).
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    /// Every connection is up or has failed.
    Connected {
        /// Connections up.
        connected: u64,
        /// Connections that failed.
        failed: u64,
        /// Milliseconds since the first connection attempt.
        elapsed_ms: u64,
    },
    /// Messages received so far.
    Progress {
        /// Non-duplicate messages received.
        received: u64,
    },
    /// The final report.
    Done {
        /// Why the run ended.
        reason: &'static str,
        /// Connections that completed their handshake.
        connected: u64,
        /// Connections that failed.
        failed: u64,
        /// Non-duplicate messages received.
        received: u64,
        /// Duplicate messages received.
        duplicates: u64,
        /// Unix-epoch milliseconds of the first receipt.
        first_ms: Option<u64>,
        /// Unix-epoch milliseconds of the last receipt.
        last_ms: Option<u64>,
        /// Latency percentiles in microseconds.
        latency_us: Latency,
        /// Established connections lost.
        disconnects: u64,
    },
}

/// Latency figures in microseconds (`None` when nothing was timed).
#[derive(Serialize)]
struct Latency {
    /// Messages timed.
    count: u64,
    /// Median.
    p50: Option<u64>,
    /// 90th percentile.
    p90: Option<u64>,
    /// 99th percentile.
    p99: Option<u64>,
    /// 99.9th percentile.
    p999: Option<u64>,
    /// Maximum.
    max: Option<u64>,
}

/// Writes one JSON line to stdout and flushes it.
fn emit(event: &Event) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(event) {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

/// The final report.
fn report(sim: &Sim, reason: &'static str, started: Instant) {
    let s = &sim.stats;
    let h = merged_histogram();
    let pct = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
    let first_us = s.first_us.load(Relaxed);
    let last_us = s.last_us.load(Relaxed);
    let (first_ms, last_ms) = if first_us == 0 {
        (None, None)
    } else {
        (Some(first_us / 1000), Some(last_us / 1000))
    };
    let received = s.received.load(Relaxed);
    emit(&Event::Done {
        reason,
        connected: s.connected.load(Relaxed),
        failed: s.failed.load(Relaxed),
        received,
        duplicates: s.duplicates.load(Relaxed),
        first_ms,
        last_ms,
        latency_us: Latency {
            count: h.len(),
            p50: pct(0.5),
            p90: pct(0.9),
            p99: pct(0.99),
            p999: pct(0.999),
            max: (!h.is_empty()).then(|| h.max()),
        },
        disconnects: s.disconnects.load(Relaxed),
    });
    let span_s = last_us.saturating_sub(first_us) as f64 / 1e6;
    let rate = if span_s >= 0.01 {
        format!(
            ", {:.0} msg/s between first and last",
            received as f64 / span_s
        )
    } else {
        String::new()
    };
    eprintln!(
        "herald-sim: {reason} after {:.1} s: received {received}{rate}; latency p50 {} µs, p99 {} µs",
        started.elapsed().as_secs_f64(),
        pct(0.5).unwrap_or(0),
        pct(0.99).unwrap_or(0),
    );
}

/// Sets everything up, runs, reports; returns the exit code.
async fn run(args: Args) -> anyhow::Result<i32> {
    let source_ips = match &args.source_ips {
        Some(spec) => parse_source_ips(spec)?,
        None => Vec::new(),
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("resolving {}", args.host))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| {
            source_ips
                .first()
                .is_none_or(|s| s.is_ipv4() == a.is_ipv4())
        })
        .copied()
        .ok_or_else(|| anyhow!("{} has no address of the --source-ips family", args.host))?;
    let who = match (&args.creds, args.anonymous) {
        (Some(path), _) => Who::Creds(read_creds(path)?),
        (None, Some(count)) => Who::Anonymous {
            count,
            prefix: args.id_prefix.clone(),
        },
        (None, None) => bail!("either --creds or --anonymous is required"),
    };
    let total = who.len();
    check_fd_limit(total);
    let sim = Arc::new(Sim {
        addr,
        source_ips,
        who,
        topic: args.topic.clone(),
        qos: args.qos,
        keep_alive: args.keep_alive,
        clean_session: args.clean_session,
        expect: args.expect,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        total: total as u64,
        stats: Stats::default(),
        wake: Notify::new(),
    });
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let idle = args.expect == 0;
    let mut stdin_eof = tokio::spawn(async move {
        if idle {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 256];
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    });

    eprintln!(
        "herald-sim: {total} connections to {addr}, topic {:?}, QoS {}",
        args.topic, args.qos
    );
    let started = Instant::now();
    tokio::spawn(spawn_connections(
        Arc::clone(&sim),
        args.connect_rate,
        args.connect_concurrency,
    ));

    let s = &sim.stats;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut deadline: Option<Instant> = None;
    let mut finish_by: Option<Instant> = None;
    let mut last_progress = 0;
    loop {
        if deadline.is_none() && s.settled.load(Relaxed) >= sim.total {
            emit(&Event::Connected {
                connected: s.connected.load(Relaxed),
                failed: s.failed.load(Relaxed),
                elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            });
            let now = Instant::now();
            deadline = Some(if args.timeout == 0 || idle {
                now + Duration::from_secs(100 * 365 * 86_400)
            } else {
                now + Duration::from_secs(args.timeout)
            });
        }
        if let Some(deadline) = deadline
            && !idle
        {
            if s.received.load(Relaxed) >= sim.expect {
                // At QoS 2 a message is only finished (acknowledged, for
                // herald) once the PUBREL is answered: give those a moment.
                let awaiting = s.awaiting_rel.load(Relaxed);
                let grace_end = *finish_by.get_or_insert_with(|| Instant::now() + QOS2_GRACE);
                if awaiting <= 0 || Instant::now() >= grace_end {
                    if awaiting > 0 {
                        eprintln!("herald-sim: {awaiting} QoS 2 exchanges still wait for PUBREL");
                    }
                    report(&sim, "expected", started);
                    return Ok(0);
                }
            }
            if s.disconnects.load(Relaxed) >= s.connected.load(Relaxed) {
                report(&sim, "all_disconnected", started);
                return Ok(2);
            }
            if Instant::now() >= deadline {
                report(&sim, "timeout", started);
                return Ok(2);
            }
        }
        let wake_at = match (deadline, finish_by) {
            (Some(d), Some(f)) => d.min(f),
            (d, f) => d.or(f).unwrap_or_else(Instant::now),
        };
        tokio::select! {
            () = sim.wake.notified() => {}
            _ = tick.tick() => {
                let received = s.received.load(Relaxed);
                if deadline.is_some() && received != last_progress {
                    last_progress = received;
                    emit(&Event::Progress { received });
                }
            }
            () = tokio::time::sleep_until(wake_at), if deadline.is_some() => {}
            _ = sigterm.recv() => {
                report(&sim, "signal", started);
                return Ok(if idle { 0 } else { 2 });
            }
            _ = sigint.recv() => {
                report(&sim, "signal", started);
                return Ok(if idle { 0 } else { 2 });
            }
            _ = &mut stdin_eof => {
                report(&sim, "stdin_eof", started);
                return Ok(0);
            }
        }
    }
}

fn main() {
    // Usage errors exit 1 (clap's default 2 is this tool's "gave up" code).
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            std::process::exit(1);
        }
        Err(e) => e.exit(),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = args.threads {
        builder.worker_threads(n as usize);
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald-sim: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run(args)).unwrap_or_else(|e| {
        eprintln!("herald-sim: {e:#}");
        1
    });
    // Exit without dropping the runtime: its blocking stdin reader would
    // otherwise keep the process alive.
    std::process::exit(code);
}
