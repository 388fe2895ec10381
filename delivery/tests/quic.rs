//! The QUIC link between a worker and a gateway, over real QUIC with mutual TLS on
//! loopback: presence, entries, requests, a peer with a foreign certificate, a malformed
//! frame, and a link that breaks and comes back.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use herald_delivery::link::Link;
use herald_delivery::quic::{QuicLink, QuicLinkConfig};
use herald_eventlog::embedded::EmbeddedLog;
use herald_eventlog::{EventLog, Record};
use herald_gateway::hub::Command;
use herald_gateway::link::{self, LinkServer, LinkTls};
use herald_gateway::{DeviceDirectory, DeviceInfo, DirectoryError, Hub};
use herald_schemas::link::{BacklogPage, Delivery};
use tokio::sync::watch;

/// The worker's view of devices in these tests: one device with one token, and a backlog
/// of one entry. (The store-backed directory is tested with the worker itself.)
struct OneDevice;

fn entry(device: &str, seq: u64) -> Delivery {
    Delivery {
        device_id: device.into(),
        seq,
        message_id: format!("m{seq}").into(),
        expires_at_ms: u64::MAX,
        envelope: Arc::from(&b"{}"[..]),
        released: false,
    }
}

impl DeviceDirectory for OneDevice {
    fn authenticate(
        &self,
        device_id: &str,
        token: &[u8],
    ) -> BoxFuture<'static, Result<Option<DeviceInfo>, DirectoryError>> {
        let ok = device_id == "dev-1" && token == b"secret";
        Box::pin(async move {
            Ok(ok.then(|| DeviceInfo {
                network: "4g".into(),
            }))
        })
    }
    fn backlog(
        &self,
        device_id: Arc<str>,
        after_seq: u64,
        _limit: usize,
    ) -> BoxFuture<'static, Result<BacklogPage, DirectoryError>> {
        Box::pin(async move {
            Ok(BacklogPage {
                entries: vec![entry(&device_id, after_seq + 1)],
                covered_through: after_seq + 1,
                complete: true,
            })
        })
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    certs: std::path::PathBuf,
    hub: Arc<Hub>,
    server: Arc<LinkServer>,
    log: Arc<EmbeddedLog>,
    _stop_gateway: watch::Sender<bool>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    link::generate_certs(&certs, &[]).expect("certs");
    let hub = Arc::new(Hub::default());
    let server = LinkServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &LinkTls::in_dir(&certs, "gateway"),
        hub.clone(),
        "gw-test",
        herald_gateway::link::LinkLimits::default(),
    )
    .expect("bind");
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(server.clone().serve(shutdown));
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("log")).expect("log"));
    Setup {
        _dir: dir,
        certs,
        hub,
        server,
        log,
        _stop_gateway: stop,
    }
}

/// A link to the test's gateway opened by hand (a valid worker certificate), for frames
/// no `QuicLink` would send.
async fn raw_link(
    s: &Setup,
    name: &str,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let tls = LinkTls::in_dir(&s.certs, "worker");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let (conn, send, recv) = link::connect(
        &endpoint,
        tls.client_config().expect("client config"),
        s.server.local_addr().expect("addr"),
        name,
    )
    .await
    .expect("connect");
    (endpoint, conn, send, recv)
}

fn worker(s: &Setup, tls: LinkTls) -> (Arc<QuicLink>, watch::Sender<bool>) {
    let (stop, shutdown) = watch::channel(false);
    let link = QuicLink::start(
        QuicLinkConfig {
            gateways: vec![s.server.local_addr().expect("addr").to_string()],
            tls,
            worker_id: "worker-test".into(),
        },
        Arc::new(OneDevice),
        s.log.clone(),
        shutdown,
    )
    .expect("start");
    (link, stop)
}

/// Waits until `mailbox` has been given at least `n` entries; returns them.
async fn entries(mailbox: &herald_gateway::hub::Mailbox, n: usize) -> Vec<Delivery> {
    let mut got: Vec<Delivery> = Vec::new();
    while got.len() < n {
        tokio::time::timeout(Duration::from_secs(10), mailbox.wait())
            .await
            .unwrap_or_else(|_| panic!("got {} of {n} entries", got.len()));
        got.extend(mailbox.take().into_iter().flat_map(|c| match c {
            Command::Deliver(d) => d,
            Command::Withdraw(_) => Vec::new(),
        }));
    }
    got
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn presence_entries_and_requests_cross_the_link() {
    let s = setup();
    let (w, _stop) = worker(&s, LinkTls::in_dir(&s.certs, "worker"));
    eventually("the worker is linked", || *w.linked().borrow() == 1).await;
    eventually("the gateway sees the worker", || s.server.linked() == 1).await;

    // A device connects at the gateway: the worker learns it is wanted there.
    let reg = s.hub.register("dev-1".into());
    eventually("dev-1 is wanted", || w.wants("dev-1")).await;
    assert!(!w.wants("dev-2"));

    // Entries for it reach its mailbox; entries for others are not sent.
    w.deliver(vec![entry("dev-1", 1), entry("dev-2", 1)]);
    assert_eq!(entries(&reg.mailbox, 1).await, vec![entry("dev-1", 1)]);

    // The gateway's requests are answered by the worker.
    let dir = s.server.directory();
    assert_eq!(
        dir.authenticate("dev-1", b"secret").await.expect("auth"),
        Some(DeviceInfo {
            network: "4g".into()
        })
    );
    assert_eq!(
        dir.authenticate("dev-1", b"wrong").await.expect("auth"),
        None
    );
    let page = dir.backlog("dev-1".into(), 4, 10).await.expect("backlog");
    assert_eq!(page.entries, vec![entry("dev-1", 5)]);
    let offsets = s
        .server
        .log()
        .append(vec![Record {
            key: b"dev-1".to_vec(),
            value: b"event".to_vec(),
        }])
        .await
        .expect("append through the link");
    let stored = s.log.read(offsets[0], 1).await.expect("read");
    assert_eq!(stored[0].value, b"event");

    // It leaves: no longer wanted.
    s.hub.unregister("dev-1", reg.conn_id);
    eventually("dev-1 is no longer wanted", || !w.wants("dev-1")).await;
}

#[tokio::test]
async fn a_peer_whose_certificate_another_ca_signed_is_refused() {
    let s = setup();
    let foreign = s.certs.parent().expect("parent").join("foreign");
    link::generate_certs(&foreign, &[]).expect("certs");
    // The foreign worker trusts our gateway's CA but shows a certificate of its own CA.
    let tls = LinkTls {
        ca: s.certs.join("ca.crt"),
        cert: foreign.join("worker.crt"),
        key: foreign.join("worker.key"),
    };
    let (w, _stop) = worker(&s, tls);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(*w.linked().borrow(), 0, "the foreign worker never links");
    assert_eq!(s.server.linked(), 0);
    // Without a link, the gateway's requests fail at once instead of hanging.
    assert!(
        s.server
            .directory()
            .authenticate("dev-1", b"secret")
            .await
            .is_err()
    );

    // A worker with the right certificate still gets in.
    let (good, _stop2) = worker(&s, LinkTls::in_dir(&s.certs, "worker"));
    eventually("the good worker is linked", || *good.linked().borrow() == 1).await;
}

#[tokio::test]
async fn a_malformed_frame_closes_that_link_only() {
    let s = setup();
    let (w, _stop) = worker(&s, LinkTls::in_dir(&s.certs, "worker"));
    eventually("the worker is linked", || s.server.linked() == 1).await;

    // A second peer with a valid certificate sends garbage after its hello.
    let (_endpoint, conn, mut send, _recv) = raw_link(&s, "rogue").await;
    eventually("the rogue is linked", || s.server.linked() == 2).await;
    send.write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the gateway closes the rogue link");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(link::CLOSE_MALFORMED));
        }
        other => panic!("unexpected close: {other}"),
    }
    eventually("only the rogue link is gone", || s.server.linked() == 1).await;

    // A frame that says it is larger than the limit is refused before it is read.
    let (_endpoint, huge, mut send, _recv) = raw_link(&s, "huge").await;
    eventually("the second rogue is linked", || s.server.linked() == 2).await;
    send.write_all(&u32::MAX.to_be_bytes())
        .await
        .expect("write");
    match tokio::time::timeout(Duration::from_secs(5), huge.closed())
        .await
        .expect("the gateway closes the oversized frame's link")
    {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(link::CLOSE_MALFORMED));
        }
        other => panic!("unexpected close: {other}"),
    }
    eventually("only that link is gone", || s.server.linked() == 1).await;

    // The good link still carries entries.
    let reg = s.hub.register("dev-1".into());
    eventually("dev-1 is wanted", || w.wants("dev-1")).await;
    w.deliver(vec![entry("dev-1", 1)]);
    tokio::time::timeout(Duration::from_secs(5), reg.mailbox.wait())
        .await
        .expect("the good link still delivers");
}

#[tokio::test]
async fn when_a_link_comes_back_every_session_rereads_its_inbox() {
    let s = setup();
    let reg = s.hub.register("dev-1".into());
    let (w, stop) = worker(&s, LinkTls::in_dir(&s.certs, "worker"));
    eventually("linked", || s.server.linked() == 1).await;
    eventually("dev-1 is wanted", || w.wants("dev-1")).await;
    // The first link-up already asked every session to reread; clear that.
    let _ = reg.mailbox.take_overflow();

    // The link breaks: the worker stops wanting the device (its entries wait in the inbox).
    stop.send_replace(true);
    eventually("unlinked", || s.server.linked() == 0).await;
    eventually("dev-1 no longer wanted", || !w.wants("dev-1")).await;
    assert!(!reg.mailbox.take_overflow());

    // A link comes back: the session rereads its inbox, so nothing in flight is lost.
    let (w2, _stop2) = worker(&s, LinkTls::in_dir(&s.certs, "worker"));
    eventually("linked again", || s.server.linked() == 1).await;
    eventually("dev-1 is wanted again", || w2.wants("dev-1")).await;
    assert!(
        reg.mailbox.take_overflow(),
        "the session was told to reread its inbox"
    );
}

#[tokio::test]
async fn a_gateway_never_takes_entries_for_a_device_it_does_not_hold() {
    use herald_schemas::link::delivery_to_wire;
    use herald_schemas::link::wire::{self, down};
    let s = setup();
    let held = s.hub.register("dev-1".into());
    // A worker (with a valid certificate) sends entries for a device held here and for
    // one that is not.
    let (_endpoint, conn, mut send, _recv) = raw_link(&s, "worker").await;
    eventually("linked", || s.server.linked() == 1).await;
    let _ = held.mailbox.take_overflow();
    let frame = wire::Down {
        body: Some(down::Body::Deliver(wire::Deliver {
            entries: vec![
                delivery_to_wire(&entry("dev-9", 1)),
                delivery_to_wire(&entry("dev-1", 1)),
            ],
        })),
    };
    link::write_frame(&mut send, &frame).await.expect("write");
    // (The link's start woke the session to reread its inbox; skip to the entries.)
    assert_eq!(
        entries(&held.mailbox, 1).await,
        vec![entry("dev-1", 1)],
        "only the held device's entry is taken"
    );
    assert!(
        !s.hub.is_connected("dev-9"),
        "no session appears for the other device"
    );
    // A session that connects later reads its inbox; nothing was kept for it.
    let late = s.hub.register("dev-9".into());
    assert!(late.mailbox.take().is_empty());
    assert!(conn.close_reason().is_none(), "the link stays up");

    // A resync of every session (a withdrawal for everyone did not fit) reaches them all.
    let _ = held.mailbox.take_overflow();
    let _ = late.mailbox.take_overflow();
    let frame = wire::Down {
        body: Some(down::Body::Resync(wire::Resync {
            device_ids: Vec::new(),
            all: true,
        })),
    };
    link::write_frame(&mut send, &frame).await.expect("write");
    let (mut held_told, mut late_told) = (false, false);
    eventually("every session rereads its inbox", || {
        held_told |= held.mailbox.take_overflow();
        late_told |= late.mailbox.take_overflow();
        held_told && late_told
    })
    .await;
}

#[tokio::test]
async fn a_device_that_moves_gateways_is_routed_to_the_new_one_whatever_order_reports_come_in() {
    // Two gateways, one worker linked to both.
    let a = setup();
    let b_hub = Arc::new(Hub::default());
    let b = LinkServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &LinkTls::in_dir(&a.certs, "gateway"),
        b_hub.clone(),
        "gw-b",
        herald_gateway::link::LinkLimits::default(),
    )
    .expect("bind");
    let (_stop_b, shutdown_b) = watch::channel(false);
    tokio::spawn(b.clone().serve(shutdown_b));
    let (_stop, shutdown) = watch::channel(false);
    let w = QuicLink::start(
        QuicLinkConfig {
            gateways: vec![
                a.server.local_addr().expect("addr").to_string(),
                b.local_addr().expect("addr").to_string(),
            ],
            tls: LinkTls::in_dir(&a.certs, "worker"),
            worker_id: "worker-test".into(),
        },
        Arc::new(OneDevice),
        a.log.clone(),
        shutdown,
    )
    .expect("start");
    eventually("linked to both", || *w.linked().borrow() == 2).await;

    // dev-1 holds a session on B; a report that it connected on A arrives later (a newer
    // claim), then A's session ends. B's session is still there: entries go to B.
    let on_b = b_hub.register("dev-1".into());
    eventually("dev-1 wanted", || w.wants("dev-1")).await;
    let on_a = a.hub.register("dev-1".into());
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.hub.unregister("dev-1", on_a.conn_id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(w.wants("dev-1"), "A's gone must not remove B's claim");
    let _ = on_b.mailbox.take_overflow();
    w.deliver(vec![entry("dev-1", 7)]);
    assert_eq!(entries(&on_b.mailbox, 1).await, vec![entry("dev-1", 7)]);
}

#[tokio::test]
async fn a_broadcast_bigger_than_a_frame_crosses_in_several_and_the_link_stays_up() {
    let s = setup();
    let (w, _stop) = worker(&s, LinkTls::in_dir(&s.certs, "worker"));
    let reg = s.hub.register("dev-1".into());
    eventually("dev-1 wanted", || w.wants("dev-1")).await;
    let _ = reg.mailbox.take_overflow();
    // 24 MiB of entries for one gateway: over the 16 MiB frame limit in one frame.
    let big: Arc<[u8]> = vec![b'x'; 4096].into();
    let batch: Vec<Delivery> = (1..=6000)
        .map(|seq| Delivery {
            envelope: big.clone(),
            ..entry("dev-1", seq)
        })
        .collect();
    w.deliver(batch);
    let got = entries(&reg.mailbox, 6000).await.len();
    assert_eq!(got, 6000);
    assert_eq!(s.server.linked(), 1, "the link stayed up");
    assert!(!reg.mailbox.take_overflow(), "no resync was needed");
}

/// The link listener's caps: with room for one link, a second worker is refused at once
/// (not left hanging), and taken once the first has gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_listener_holds_at_most_its_cap_and_refuses_the_rest_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    link::generate_certs(&certs, &[]).expect("certs");
    let server = LinkServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &LinkTls::in_dir(&certs, "gateway"),
        Arc::new(Hub::default()),
        "gw-cap",
        herald_gateway::link::LinkLimits {
            caps: herald_net::Caps {
                max_connections: 1,
                max_unauthenticated: 1,
                max_unauthenticated_per_source: 1,
            },
            handshake_timeout: Duration::from_secs(10),
        },
    )
    .expect("bind");
    let (_stop, shutdown) = watch::channel(false);
    tokio::spawn(server.clone().serve(shutdown));
    let addr = server.local_addr().expect("addr");
    let tls = LinkTls::in_dir(&certs, "worker");
    let endpoint = || quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep");
    let (first_ep, second_ep) = (endpoint(), endpoint());
    let (first, _send, _recv) =
        link::connect(&first_ep, tls.client_config().expect("config"), addr, "w1")
            .await
            .expect("the first link");
    let second = tokio::time::timeout(
        Duration::from_secs(10),
        link::connect(&second_ep, tls.client_config().expect("config"), addr, "w2"),
    )
    .await
    .expect("refused at once, not left hanging");
    assert!(second.is_err(), "a second link past the cap of one");
    assert_eq!(server.gate().health().connections, 1);
    // The first goes: its place is given back, and the next worker links.
    first.close(quinn::VarInt::from_u32(0), b"done");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.gate().health().connections > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let third = link::connect(&second_ep, tls.client_config().expect("config"), addr, "w3").await;
    assert!(third.is_ok(), "{:?}", third.err());
}
