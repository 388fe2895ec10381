//! The reconnecting `Device` against a small scripted MQTT gateway in this file, which
//! behaves like herald's for what a device can see: it refuses a wrong password, sends
//! the unacknowledged entries of the inbox in `seq` order on each connection (so an
//! entry not acknowledged is sent again), sends new entries live, and forgets an entry
//! once it is acknowledged. The tests look at what the app is shown and at the
//! acknowledgements the gateway receives. End-to-end tests against the real server are
//! in the workspace's `tests/sdk.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_client::{
    Device, DeviceCredentials, DeviceEvent, DeviceOptions, DisconnectReason, Error, Message, Qos,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

const TOKEN: &str = "secret";
const WAIT: Duration = Duration::from_secs(10);

/// What the gateway has seen.
#[derive(Default)]
struct State {
    /// seq -> the envelope bytes, for entries not yet acknowledged.
    inbox: BTreeMap<u64, Vec<u8>>,
    /// (connection number, seq) for each acknowledgement, in the order received.
    acks: Vec<(u64, u64)>,
    connections: u64,
    /// PUBCOMPs received (QoS 2).
    pubcomps: u64,
}

struct Gateway {
    port: u16,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    new_entry: Arc<Notify>,
    kill: watch::Sender<u64>,
    granted_qos: u8,
    /// A PUBREL sent right after the SUBACK, as herald does for an entry received at
    /// QoS 2 on an earlier connection.
    stray_pubrel: Option<u16>,
}

impl Gateway {
    async fn start() -> Arc<Gateway> {
        Self::start_with_qos(1).await
    }

    /// A gateway that grants at most `granted_qos` on `inbox`.
    async fn start_with_qos(granted_qos: u8) -> Arc<Gateway> {
        Self::start_with(granted_qos, None).await
    }

    async fn start_with(granted_qos: u8, stray_pubrel: Option<u16>) -> Arc<Gateway> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = Arc::new(Gateway {
            port: listener.local_addr().unwrap().port(),
            state: Arc::default(),
            changed: watch::channel(0).0,
            new_entry: Arc::new(Notify::new()),
            kill: watch::channel(0).0,
            granted_qos,
            stray_pubrel,
        });
        let g = gw.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let g = g.clone();
                tokio::spawn(async move { g.connection(stream).await });
            }
        });
        gw
    }

    fn creds(&self, device_id: &str) -> DeviceCredentials {
        DeviceCredentials {
            device_id: device_id.into(),
            device_token: TOKEN.into(),
            mqtt_host: "127.0.0.1".into(),
            mqtt_port: self.port,
            keep_alive_s: None,
        }
    }

    /// Adds an entry to the inbox and sends it to a live connection.
    fn push(&self, seq: u64, id: &str) {
        let bytes =
            herald_schemas::envelope::encode(id, seq, 1, format!("{{\"n\":{seq}}}").as_bytes());
        self.push_raw(seq, bytes);
    }

    fn push_raw(&self, seq: u64, bytes: Vec<u8>) {
        self.state.lock().unwrap().inbox.insert(seq, bytes);
        self.new_entry.notify_waiters();
    }

    /// Closes every live connection, as a crash of the gateway would.
    fn drop_connections(&self) {
        self.kill.send_modify(|n| *n += 1);
    }

    fn acks(&self) -> Vec<(u64, u64)> {
        self.state.lock().unwrap().acks.clone()
    }

    /// Waits until `f` holds for the state.
    async fn wait(&self, what: &str, f: impl Fn(&State) -> bool) {
        let mut rx = self.changed.subscribe();
        let ok = tokio::time::timeout(WAIT, async {
            loop {
                if f(&self.state.lock().unwrap()) {
                    return;
                }
                rx.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            ok.is_ok(),
            "timed out waiting for {what}: acks {:?}",
            self.acks()
        );
    }

    async fn wait_acks(&self, n: usize) -> Vec<(u64, u64)> {
        self.wait(&format!("{n} acks"), |s| s.acks.len() >= n).await;
        self.acks()
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    async fn connection(self: Arc<Self>, mut s: TcpStream) {
        let mut kill = self.kill.subscribe();
        let Some((0x10, connect)) = read_packet(&mut s).await else {
            return;
        };
        if !password_ok(&connect) {
            let _ = s.write_all(&[0x20, 0x02, 0x00, 0x05]).await;
            return;
        }
        let conn = {
            let mut st = self.state.lock().unwrap();
            st.connections += 1;
            st.connections
        };
        self.touch();
        s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let (pkt_tx, mut pkt_rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(p) = read_packet(&mut rd).await {
                if pkt_tx.send(p).await.is_err() {
                    break;
                }
            }
        });
        let mut qos = None;
        let mut sent_through = 0u64;
        let mut pkids: BTreeMap<u16, u64> = BTreeMap::new();
        let mut next_pkid = 1u16;
        loop {
            // Registered before the inbox is read, so a push in between is not missed.
            let notified = self.new_entry.notified();
            // Send what is new, once subscribed.
            if let Some(q) = qos {
                let entries: Vec<(u64, Vec<u8>)> = self
                    .state
                    .lock()
                    .unwrap()
                    .inbox
                    .range(sent_through + 1..)
                    .map(|(k, v)| (*k, v.clone()))
                    .collect();
                for (seq, payload) in entries {
                    pkids.insert(next_pkid, seq);
                    let mut body = vec![0x00, 0x05];
                    body.extend_from_slice(b"inbox");
                    body.extend_from_slice(&next_pkid.to_be_bytes());
                    body.extend_from_slice(&payload);
                    let header = if q == 2 { 0x34 } else { 0x32 };
                    if wr.write_all(&frame(header, &body)).await.is_err() {
                        return;
                    }
                    next_pkid += 1;
                    sent_through = seq;
                }
            }
            tokio::select! {
                _ = kill.changed() => return,
                _ = notified => {}
                p = pkt_rx.recv() => {
                    let Some((kind, body)) = p else { return };
                    match kind & 0xF0 {
                        0x80 => {
                            // SUBSCRIBE: pkid, then (topic, qos).
                            let asked = *body.last().unwrap();
                            let granted = asked.min(self.granted_qos);
                            qos = Some(granted);
                            let reply = [0x90, 0x03, body[0], body[1], granted];
                            wr.write_all(&reply).await.unwrap();
                            if let Some(pkid) = self.stray_pubrel {
                                let [hi, lo] = pkid.to_be_bytes();
                                wr.write_all(&[0x62, 0x02, hi, lo]).await.unwrap();
                            }
                        }
                        0x40 | 0x50 => {
                            // PUBACK (QoS 1) or PUBREC (QoS 2) acknowledges the entry.
                            let pkid = u16::from_be_bytes([body[0], body[1]]);
                            if let Some(seq) = pkids.remove(&pkid) {
                                let mut st = self.state.lock().unwrap();
                                st.inbox.remove(&seq);
                                st.acks.push((conn, seq));
                            }
                            if kind & 0xF0 == 0x50 {
                                wr.write_all(&[0x62, 0x02, body[0], body[1]]).await.unwrap();
                            }
                            self.touch();
                        }
                        0x70 => {
                            self.state.lock().unwrap().pubcomps += 1;
                            self.touch();
                        }
                        0xC0 => wr.write_all(&[0xD0, 0x00]).await.unwrap(),
                        _ => return,
                    }
                }
            }
        }
    }
}

fn password_ok(connect: &[u8]) -> bool {
    // Protocol name (6), level (1), flags (1), keep-alive (2), then strings.
    let flags = connect[7];
    let mut at = 10;
    let mut string = || {
        let len = usize::from(u16::from_be_bytes([connect[at], connect[at + 1]]));
        let s = connect[at + 2..at + 2 + len].to_vec();
        at += 2 + len;
        s
    };
    let _client_id = string();
    if flags & 0x80 == 0 || flags & 0x40 == 0 {
        return false;
    }
    let _user = string();
    string() == TOKEN.as_bytes()
}

fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

async fn read_packet<R: AsyncReadExt + Unpin>(r: &mut R) -> Option<(u8, Vec<u8>)> {
    let kind = r.read_u8().await.ok()?;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = r.read_u8().await.ok()?;
        len |= usize::from(b & 0x7F) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    Some((kind, body))
}

fn fast_options() -> DeviceOptions {
    let mut o = DeviceOptions::default();
    o.backoff.initial_delay = Duration::from_millis(20);
    o.backoff.max_delay = Duration::from_millis(200);
    o.backoff.jitter_seed = Some(7);
    o
}

async fn next(device: &mut Device) -> Message {
    tokio::time::timeout(WAIT, device.next())
        .await
        .expect("timed out waiting for a message")
        .expect("the device stopped")
}

/// Waits for an event matching `f`, skipping others.
async fn event(
    rx: &mut tokio::sync::broadcast::Receiver<DeviceEvent>,
    f: impl Fn(&DeviceEvent) -> bool,
) -> DeviceEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let e = rx.recv().await.unwrap();
            if f(&e) {
                return e;
            }
        }
    })
    .await
    .expect("timed out waiting for an event")
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "herald-client-test-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn entries_arrive_once_in_order_and_are_acked_after_the_app_in_order() {
    let gw = Gateway::start().await;
    for seq in 1..=3 {
        gw.push(seq, &format!("m{seq}"));
    }
    let mut device = Device::start(&gw.creds("d1"), fast_options())
        .await
        .unwrap();
    let m1 = next(&mut device).await;
    let m2 = next(&mut device).await;
    let m3 = next(&mut device).await;
    assert_eq!(
        [m1.seq, m2.seq, m3.seq, m1.ts],
        [1, 2, 3, 1],
        "in seq order, envelope fields through Deref"
    );
    assert_eq!(m2.envelope().id, "m2");
    assert_eq!(m3.data, serde_json::json!({"n": 3}));

    // The app finishes 3 and 2 first: nothing is acknowledged before 1 is.
    m3.ack();
    m2.ack();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(gw.acks().is_empty(), "acked out of order: {:?}", gw.acks());
    drop(m1); // Dropping acknowledges too.
    assert_eq!(gw.wait_acks(3).await, vec![(1, 1), (1, 2), (1, 3)]);

    // Live entries follow.
    gw.push(4, "m4");
    let m4 = next(&mut device).await;
    assert_eq!((m4.seq, m4.id.as_str()), (4, "m4"));
    assert_eq!(device.last_seq(), 4);
    assert!(device.status().connected);
    device.close().await.unwrap();
}

#[tokio::test]
async fn an_entry_resent_after_a_kill_is_acked_as_a_duplicate_and_not_shown() {
    let gw = Gateway::start().await;
    gw.push(1, "m1");
    let mut device = Device::start(&gw.creds("d1"), fast_options())
        .await
        .unwrap();
    let mut events = device.events();
    event(&mut events, |e| {
        matches!(e, DeviceEvent::Connected { connection: 1 })
    })
    .await;
    let handle = device.handle();

    // The app is still handling m1 when the connection is killed.
    let m1 = next(&mut device).await;
    handle.kill_connection();
    let e = event(&mut events, |e| {
        matches!(e, DeviceEvent::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(
            e,
            DeviceEvent::Disconnected {
                connection: 1,
                reason: DisconnectReason::Killed,
                ..
            }
        ),
        "{e:?}"
    );
    event(&mut events, |e| {
        matches!(e, DeviceEvent::Connected { connection: 2 })
    })
    .await;
    // The gateway resent m1 on connection 2: acknowledged there, not shown again.
    assert_eq!(gw.wait_acks(1).await, vec![(2, 1)]);
    // The late ack of the handled m1 goes nowhere (its connection is gone).
    m1.ack();
    gw.push(2, "m2");
    let m2 = next(&mut device).await;
    assert_eq!(m2.seq, 2, "m1 was not shown twice");
    drop(m2);
    assert_eq!(gw.wait_acks(2).await, vec![(2, 1), (2, 2)]);
    assert_eq!(handle.status().connections, 2);
}

#[tokio::test]
async fn a_repeated_id_under_a_new_seq_is_acked_and_not_shown() {
    let gw = Gateway::start().await;
    gw.push(1, "same");
    let mut device = Device::start(&gw.creds("d1"), fast_options())
        .await
        .unwrap();
    assert_eq!(next(&mut device).await.seq, 1);
    gw.push(2, "other");
    gw.push(3, "same");
    gw.push(4, "last");
    // Let the device read all three before the app looks: the repeat must not hide the
    // entry waiting before it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = next(&mut device).await;
    assert_eq!((m.seq, m.id.as_str()), (2, "other"));
    m.ack();
    let m = next(&mut device).await;
    assert_eq!((m.seq, m.id.as_str()), (4, "last"));
    drop(m);
    assert_eq!(gw.wait_acks(4).await, vec![(1, 1), (1, 2), (1, 3), (1, 4)]);
}

#[tokio::test]
async fn a_malformed_entry_is_acked_and_skipped() {
    let gw = Gateway::start().await;
    gw.push_raw(1, b"not json".to_vec());
    gw.push(2, "m2");
    let mut device = Device::start(&gw.creds("d1"), fast_options())
        .await
        .unwrap();
    let mut events = device.events();
    assert_eq!(next(&mut device).await.seq, 2);
    event(&mut events, |e| {
        matches!(e, DeviceEvent::MalformedEntry { .. })
    })
    .await;
    assert_eq!(gw.wait_acks(2).await, vec![(1, 1), (1, 2)]);
}

#[tokio::test]
async fn refused_credentials_stop_the_device_with_the_reason() {
    let gw = Gateway::start().await;
    let mut creds = gw.creds("d1");
    creds.device_token = "wrong".into();
    let mut device = Device::start(&creds, fast_options()).await.unwrap();
    let mut events = device.events();
    assert!(
        tokio::time::timeout(WAIT, device.next())
            .await
            .unwrap()
            .is_none()
    );
    let err = device.error().expect("a reason");
    assert!(
        matches!(err, Error::Refused { code } if code == "NotAuthorized"),
        "{err:?}"
    );
    assert!(err.to_string().contains("NotAuthorized"));
    assert_eq!(
        event(&mut events, |_| true).await,
        DeviceEvent::Refused {
            code: "NotAuthorized".into()
        }
    );
    assert_eq!(event(&mut events, |_| true).await, DeviceEvent::Stopped);
    assert!(device.status().stopped);
    // One attempt only.
    assert_eq!(gw.state.lock().unwrap().connections, 0);
}

#[tokio::test]
async fn the_device_reconnects_after_the_gateway_drops_it_and_while_it_is_down() {
    let gw = Gateway::start().await;
    let mut device = Device::start(&gw.creds("d1"), fast_options())
        .await
        .unwrap();
    let handle = device.handle();
    let mut events = device.events();
    event(&mut events, |e| {
        matches!(e, DeviceEvent::Connected { connection: 1 })
    })
    .await;
    for round in 1..=3u64 {
        gw.drop_connections();
        let e = event(&mut events, |e| {
            matches!(e, DeviceEvent::Disconnected { .. })
        })
        .await;
        assert!(
            matches!(&e, DeviceEvent::Disconnected { connection, reason: DisconnectReason::Lost(_), retry_in }
                if *connection == round && *retry_in <= Duration::from_millis(200)),
            "{e:?}"
        );
        let s = handle
            .wait_status(|s| s.connected && s.connections > round)
            .await;
        assert_eq!(s.connections, round + 1);
        gw.push(round, &format!("m{round}"));
        assert_eq!(next(&mut device).await.seq, round);
    }

    // Nobody listening: attempts fail and are retried with backoff.
    let port = gw.port;
    let mut opts = fast_options();
    opts.backoff.max_delay = Duration::from_millis(40);
    let creds = DeviceCredentials {
        mqtt_port: {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        },
        ..gw.creds("d2")
    };
    assert_ne!(creds.mqtt_port, port);
    let mut offline = Device::start(&creds, opts).await.unwrap();
    let mut events = offline.events();
    for _ in 0..3 {
        let e = event(&mut events, |_| true).await;
        assert!(
            matches!(&e, DeviceEvent::ConnectFailed { retry_in, .. } if *retry_in <= Duration::from_millis(40)),
            "{e:?}"
        );
    }
    offline.close().await.unwrap();
    assert_eq!(
        event(&mut events, |e| matches!(e, DeviceEvent::Stopped)).await,
        DeviceEvent::Stopped
    );
}

#[tokio::test]
async fn a_restarted_device_resumes_from_its_state_file() {
    let gw = Gateway::start().await;
    let dir = TempDir::new("resume");
    let mut opts = fast_options();
    opts.state_file = Some(dir.0.join("state.json"));
    for seq in 1..=3 {
        gw.push(seq, &format!("m{seq}"));
    }
    let mut device = Device::start(&gw.creds("d1"), opts.clone()).await.unwrap();
    next(&mut device).await.ack();
    next(&mut device).await.ack();
    // The app crashes while handling m3: never acknowledged.
    let m3 = next(&mut device).await;
    assert_eq!(m3.seq, 3);
    assert_eq!(gw.wait_acks(2).await, vec![(1, 1), (1, 2)]);
    std::mem::forget(m3);
    drop(device);

    // The restarted device does not show m3 again; it acknowledges it.
    let mut device = Device::start(&gw.creds("d1"), opts.clone()).await.unwrap();
    assert_eq!(device.last_seq(), 3);
    gw.push(4, "m4");
    assert_eq!(next(&mut device).await.seq, 4);
    assert_eq!(gw.wait_acks(4).await[2..], [(2, 3), (2, 4)]);
    device.close().await.unwrap();

    // Another device's state file, or a corrupt one, stops the start.
    let err = Device::start(&gw.creds("d2"), opts.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StateWrongDevice { .. }), "{err:?}");
    std::fs::write(dir.0.join("state.json"), b"{").unwrap();
    let err = Device::start(&gw.creds("d1"), opts).await.unwrap_err();
    assert!(matches!(err, Error::StateCorrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("state.json"), "{err}");
}

#[tokio::test]
async fn a_failing_state_file_stops_the_device_without_showing_the_message() {
    let gw = Gateway::start().await;
    let dir = TempDir::new("unwritable");
    let mut opts = fast_options();
    // A directory in the way of the temporary file makes every save fail.
    opts.state_file = Some(dir.0.join("state.json"));
    std::fs::create_dir(dir.0.join("state.json.tmp")).unwrap();
    gw.push(1, "m1");
    let mut device = Device::start(&gw.creds("d1"), opts).await.unwrap();
    assert!(
        tokio::time::timeout(WAIT, device.next())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        matches!(device.error(), Some(Error::StateWrite { .. })),
        "{:?}",
        device.error()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        gw.acks().is_empty(),
        "the unshown entry stays on the gateway"
    );
}

#[tokio::test]
async fn the_handler_api_acks_after_each_handler_and_stops_on_shutdown() {
    let gw = Gateway::start().await;
    for seq in 1..=20 {
        gw.push(seq, &format!("m{seq}"));
    }
    let device = Device::start(&gw.creds("d1"), fast_options())
        .await
        .unwrap();
    let handle = device.handle();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (release_tx, release_rx) = watch::channel(false);
    let run = tokio::spawn({
        let seen = seen.clone();
        device.run(move |env| {
            let seen = seen.clone();
            let mut release = release_rx.clone();
            async move {
                // The first handler is slow until released.
                if env.seq == 1 {
                    release.wait_for(|r| *r).await.unwrap();
                }
                seen.lock().unwrap().push(env.seq);
            }
        })
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(gw.acks().is_empty(), "acked before the handler returned");
    release_tx.send_replace(true);
    let acks = gw.wait_acks(20).await;
    assert_eq!(acks, (1..=20).map(|s| (1, s)).collect::<Vec<_>>());
    assert_eq!(*seen.lock().unwrap(), (1..=20).collect::<Vec<_>>());
    handle.shutdown();
    tokio::time::timeout(WAIT, run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(handle.status().stopped);
}

#[tokio::test]
async fn at_qos_2_the_acknowledgement_is_a_pubrec_after_the_app() {
    let gw = Gateway::start_with_qos(2).await;
    gw.push(1, "m1");
    let mut opts = fast_options();
    opts.qos = Qos::ExactlyOnce;
    let mut device = Device::start(&gw.creds("d1"), opts).await.unwrap();
    let m1 = next(&mut device).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(gw.acks().is_empty());
    m1.ack();
    assert_eq!(gw.wait_acks(1).await, vec![(1, 1)]);
    gw.wait("PUBCOMP", |s| s.pubcomps == 1).await;
}

#[tokio::test]
async fn out_of_range_options_are_refused_at_start() {
    let gw = Gateway::start().await;
    for (name, change) in [
        (
            "keep_alive",
            (|o: &mut DeviceOptions| o.keep_alive = Duration::from_millis(500))
                as fn(&mut DeviceOptions),
        ),
        ("buffer", |o| o.buffer = 0),
        ("events_capacity", |o| o.events_capacity = 0),
        ("backoff.max_delay", |o| {
            o.backoff.max_delay = Duration::ZERO
        }),
    ] {
        let mut opts = DeviceOptions::default();
        change(&mut opts);
        let err = Device::start(&gw.creds("d1"), opts).await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidOption { name: n, .. } if *n == name),
            "{err:?}"
        );
    }
    let err = Device::start(&gw.creds(""), DeviceOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("device_id"), "{err}");
}

#[tokio::test]
async fn a_pubrel_for_an_entry_of_an_earlier_connection_is_answered_at_qos_2() {
    let gw = Gateway::start_with(2, Some(500)).await;
    let mut opts = fast_options();
    opts.qos = Qos::ExactlyOnce;
    let mut device = Device::start(&gw.creds("d1"), opts).await.unwrap();
    gw.wait("PUBCOMP of the stray PUBREL", |s| s.pubcomps == 1)
        .await;
    gw.push(1, "m1");
    next(&mut device).await.ack();
    assert_eq!(gw.wait_acks(1).await, vec![(1, 1)]);
    gw.wait("PUBCOMP", |s| s.pubcomps == 2).await;
    assert_eq!(
        device.handle().status().connections,
        1,
        "the connection held"
    );
}
