//! One role per process on a real Kafka broker: `herald ingest`, two `herald deliver`
//! sharing the topic's four partitions, three `herald gateway` and `herald nav`, all on
//! loopback. 300 devices connect to the gateway navigation names; unicast and broadcast
//! pushes arrive, in order, and are acknowledged; one worker is killed with SIGKILL and
//! the other takes its partitions over; a gateway is killed and its devices reconnect
//! where navigation sends them and get their backlog; the broker stops for ten seconds
//! (ingest answers 503, never 202) and comes back: nothing lost, nothing shown twice.
//!
//! Runs when `HERALD_KAFKA` names a broker (scripts/test starts one).
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use herald_client::{Device, DeviceCredentials, parse_mqtt_url};
use serde_json::{Value, json};

const PAYLOAD_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn broker() -> Option<String> {
    service("HERALD_KAFKA", "scripts/test starts Kafka")
}

/// A role process.
struct Role {
    child: Option<Child>,
    log: PathBuf,
    http_port: u16,
}

impl Role {
    fn start(role: &str, name: &str, dir: &Path, args: &[String]) -> Role {
        let http_port = free_port();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg(role)
            .arg("--data-dir")
            .arg(dir.join(name))
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args(args)
            .env("HERALD_ADMIN_TOKEN", ADMIN)
            .env("HERALD_PAYLOAD_KEY", PAYLOAD_KEY)
            .env("HERALD_CONFIG", dir.join("roles.toml"))
            .env("HERALD_HEARTBEAT_MS", "300")
            .env("HERALD_LOG", "info,herald_gateway=debug")
            // With the CQL store: once this file exists, the process aborts in the middle
            // of its next commit.
            .env("HERALD_CQL_CRASH_FILE", dir.join(format!("crash-{name}")))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Role {
            child: Some(child),
            log,
            http_port,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/healthz", self.base())).await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "not healthy: {}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn nav(base: &str, device_id: &str) -> Value {
    reqwest::get(format!("{base}/v1/nav?device_id={device_id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The Cassandra server of the CQL variant, or why there is none.
fn cassandra() -> Option<String> {
    if !cfg!(feature = "cql") {
        eprintln!("skipped: the cql feature is off");
        return None;
    }
    service("HERALD_CASSANDRA", "scripts/test starts Cassandra")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_in_their_own_processes_share_the_partitions_and_take_over_a_dead_workers() {
    if broker().is_none() {
        return;
    }
    roles(None).await;
}

/// The same deployment with the projections on a real Cassandra server that every role
/// shares. The first worker dies in the middle of a commit (it aborts at its crash point,
/// after its journal and before any row, while a burst of pushes is folded); the other
/// takes its partitions over from their shared checkpoints and finishes that commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_share_one_cql_store_and_a_worker_killed_mid_batch_loses_nothing() {
    if broker().is_none() {
        return;
    }
    let Some(cassandra) = cassandra() else {
        return;
    };
    roles(Some(cassandra)).await;
}

/// One roles test at a time: each runs a dozen processes and a broker of its own, and
/// two at once on two cores starve each other's brokers.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The roles test, with each process's own embedded store, or with one CQL store at
/// `cql` for all.
async fn roles(cql: Option<String>) {
    let _one = ONE_AT_A_TIME.lock().await;
    // A broker of its own: this test stops it for a while.
    let kafka = Service::kafka();
    let brokers = kafka.addr();
    let tmp = tempfile::tempdir().unwrap();
    // Appends give up after 2 s, so a stopped broker shows as 503 quickly.
    std::fs::write(tmp.path().join("roles.toml"), "kafka_timeout_ms = 2000\n").unwrap();
    let certs = make_certs(tmp.path());
    let mut gateways: Vec<GatewayProc> = (0..3)
        .map(|i| GatewayProc::start(&certs, &format!("gw-{i}"), tmp.path()))
        .collect();
    let topic = format!(
        "herald.test.roles.{}.{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let topic_name = topic.clone();
    let shared = vec![
        "--kafka-brokers".to_string(),
        brokers,
        "--kafka-topic".into(),
        topic,
        "--kafka-partitions".into(),
        "4".into(),
    ];
    let mut shared = shared;
    if let Some(nodes) = &cql {
        shared.extend([
            "--store".into(),
            "cql".into(),
            "--cql-nodes".into(),
            nodes.clone(),
            "--cql-keyspace".into(),
            format!("roles_{}", std::process::id()),
        ]);
    }
    let mut deliver_args = shared.clone();
    deliver_args.extend([
        "--link-gateway".into(),
        gateways
            .iter()
            .map(|g| g.link_addr())
            .collect::<Vec<_>>()
            .join(","),
        "--link-certs".into(),
        certs.display().to_string(),
    ]);
    let ingest = Role::start("ingest", "ingest", tmp.path(), &shared);
    let nav_proc = Role::start("nav", "nav", tmp.path(), &shared);
    let mut workers = [
        Role::start("deliver", "deliver-a", tmp.path(), &deliver_args),
        Role::start("deliver", "deliver-b", tmp.path(), &deliver_args),
    ];
    ingest.wait_healthy().await;
    nav_proc.wait_healthy().await;
    for g in &gateways {
        g.wait_linked(1).await;
    }
    // The group splits the four partitions: each worker serves two (the first to join
    // served all four for a moment, and gave two up when the second joined).
    let serving = |w: &Role| {
        let log = w.log();
        log.matches("serving a partition").count() as i64
            - log.matches("gave a partition up").count() as i64
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while serving(&workers[0]) != 2 || serving(&workers[1]) != 2 {
        assert!(
            Instant::now() < deadline,
            "the partitions were not shared: {}\n{}",
            workers[0].log(),
            workers[1].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Navigation hears the three gateways (their heartbeats go through a worker into the
    // log).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ids = BTreeSet::new();
        for i in 0..40 {
            let id = format!("00000000-0000-4000-8000-{i:012}");
            ids.insert(nav(&nav_proc.base(), &id).await["gateway_id"].to_string());
        }
        if ids.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "nav knows {ids:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 300 devices, each connecting where nav sends it.
    let app = create_app_at(ingest.base()).await;
    let mut opts = quick_options();
    // On every reconnect the SDK asks navigation where to go.
    opts.nav_url = Some(nav_proc.base());
    let mut devices: Vec<(DeviceCredentials, Device)> = Vec::new();
    let mut per_gateway: HashMap<String, usize> = HashMap::new();
    let mut gateway_of: HashMap<String, String> = HashMap::new();
    for _ in 0..300 {
        let mut dev = app.register().await;
        let placed = nav(&nav_proc.base(), &dev.device_id).await;
        let (host, port) = parse_mqtt_url(placed["mqtt"].as_str().unwrap()).unwrap();
        dev.mqtt_host = host;
        dev.mqtt_port = port;
        let gw = placed["gateway_id"].as_str().unwrap().to_string();
        gateway_of.insert(dev.device_id.clone(), gw.clone());
        *per_gateway.entry(gw).or_default() += 1;
        let device = Device::start(&dev, opts.clone()).await.unwrap();
        devices.push((dev, device));
    }
    assert_eq!(per_gateway.len(), 3, "{per_gateway:?}");

    // A unicast to each and one broadcast: everyone gets both, in order.
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for (dev, _) in &devices {
        let id = app.push(&dev.device_id, json!({"to": dev.device_id})).await;
        sent.entry(dev.device_id.clone()).or_default().push(id);
    }
    let all = app.broadcast(json!({"all": true})).await;
    for (dev, _) in &devices {
        sent.get_mut(&dev.device_id).unwrap().push(all.clone());
    }
    let mut seen: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    for (dev, device) in devices.iter_mut() {
        let got = seen.entry(dev.device_id.clone()).or_default();
        while got.len() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(30), device.next())
                .await
                .unwrap_or_else(|_| panic!("{} got {got:?}", dev.device_id))
                .unwrap();
            got.push((m.envelope().id.clone(), m.envelope().seq));
        }
    }
    let status = app.wait_acked(&all, 300).await;
    assert_eq!(status["targeted"], 300, "{status}");

    // The delivery group's committed offsets follow what the workers have stored: once
    // the log is quiet, each partition's end.
    {
        use herald_eventlog::EventLog;
        use herald_eventlog::kafka::{KafkaConfig, OrderedKafkaLog};
        let mut k = KafkaConfig::new(kafka.addr());
        k.topic.clone_from(&topic_name);
        let logs = OrderedKafkaLog::open_topic(k).await.unwrap();
        assert_eq!(logs.len(), 4, "the topic has the configured partitions");
        // Gateways keep writing heartbeats, so the ends move on: the offsets must reach
        // where the partitions were when the acks were in.
        let target: Vec<i64> = logs
            .iter()
            .map(|l| *l.durable_end().borrow() as i64)
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let committed = logs[0]
                .kafka()
                .committed_offsets("herald-deliver", &[0, 1, 2, 3])
                .await
                .unwrap();
            if committed
                .iter()
                .zip(&target)
                .all(|(c, t)| c.is_some_and(|c| c >= *t))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "committed {committed:?}, wanted {target:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // A worker dies in the middle of folding a burst of pushes (to devices in every
    // partition); the other takes its partitions over.
    let burst: Vec<_> = devices
        .iter()
        .take(30)
        .map(|(dev, _)| {
            let (app, id) = (app.clone(), dev.device_id.clone());
            tokio::spawn(async move {
                let m = app.push(&id, json!({"after": true})).await;
                (id, m)
            })
        })
        .collect();
    if cql.is_some() && cfg!(feature = "crash-point") {
        // Dies in the middle of a commit: after its journal, before any row.
        std::fs::write(tmp.path().join("crash-deliver-a"), b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let exited = workers[0]
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().unwrap().is_some());
            if exited {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the worker never reached its crash point: {}",
                workers[0].log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            workers[0].log().contains("crash point"),
            "{}",
            workers[0].log()
        );
        workers[0].kill9();
    } else {
        tokio::time::sleep(Duration::from_millis(30)).await;
        workers[0].kill9();
    }
    for pushed in burst {
        let (id, m) = pushed.await.unwrap();
        sent.get_mut(&id).unwrap().push(m);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while serving(&workers[1]) != 4 {
        assert!(
            Instant::now() < deadline,
            "the partitions were not taken over: {}",
            workers[1].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if cql.is_some() && cfg!(feature = "crash-point") {
        assert!(
            workers[1].log().contains("finishing a commit"),
            "the surviving worker finished the commit the dead one left half done: {}",
            workers[1].log()
        );
    }
    for (dev, device) in devices.iter_mut().take(30) {
        let got = seen.get_mut(&dev.device_id).unwrap();
        while got.len() < 3 {
            let m = tokio::time::timeout(Duration::from_secs(60), device.next())
                .await
                .unwrap_or_else(|_| panic!("{} got {got:?} after the failover", dev.device_id))
                .unwrap();
            got.push((m.envelope().id.clone(), m.envelope().seq));
        }
    }
    // A gateway dies: its devices ask navigation again, reconnect to the others and get
    // what was pushed to them meanwhile.
    gateways[0].kill9();
    let orphans: Vec<usize> = devices
        .iter()
        .enumerate()
        .filter(|(_, (d, _))| gateway_of[&d.device_id] == "gw-0")
        .map(|(i, _)| i)
        .collect();
    assert!(!orphans.is_empty());
    for &i in &orphans {
        let dev = &devices[i].0;
        let id = app.push(&dev.device_id, json!({"moved": true})).await;
        sent.get_mut(&dev.device_id).unwrap().push(id);
    }
    for &i in &orphans {
        let (dev, device) = &mut devices[i];
        let got = seen.get_mut(&dev.device_id).unwrap();
        let want = sent[&dev.device_id].len();
        while got.len() < want {
            let m = tokio::time::timeout(Duration::from_secs(60), device.next())
                .await
                .unwrap_or_else(|_| panic!("{} got {got:?} after its gateway died", dev.device_id))
                .unwrap();
            got.push((m.envelope().id.clone(), m.envelope().seq));
        }
        let now = nav(&nav_proc.base(), &dev.device_id).await;
        assert_ne!(
            now["gateway_id"], "gw-0",
            "navigation moved {}",
            dev.device_id
        );
    }

    // Kafka stops for about ten seconds: herald ingest refuses pushes with 503, never a
    // 202 it cannot keep; once Kafka is back, the same Idempotency-Keys go through, once.
    kafka.down(true);
    let http = reqwest::Client::new();
    let push_keyed = |dev: String, key: String| {
        let (http, base, token) = (http.clone(), app.base.clone(), app.token.clone());
        async move {
            let r = http
                .post(format!("{base}/v1/messages"))
                .bearer_auth(token)
                .header("Idempotency-Key", key)
                .json(&json!({"to": {"device_id": dev}, "data": {"outage": true}}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or_default())
        }
    };
    let down_since = Instant::now();
    let mut refused = Vec::new();
    eprintln!("phase: kafka down");
    for (dev, _) in devices.iter().skip(100).take(10) {
        if down_since.elapsed() > Duration::from_secs(10) && !refused.is_empty() {
            break;
        }
        let key = format!("outage-{}", dev.device_id);
        let (status, body) = push_keyed(dev.device_id.clone(), key.clone()).await;
        assert_eq!(status, 503, "accepted while Kafka was down: {body}");
        refused.push((dev.device_id.clone(), key));
    }
    eprintln!(
        "phase: refused {} pushes in {:?}",
        refused.len(),
        down_since.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_since.elapsed())).await;
    kafka.up(true);
    eprintln!("phase: kafka up again after {:?}", down_since.elapsed());
    for (device_id, key) in &refused {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = push_keyed(device_id.clone(), key.clone()).await;
            // 200: the push answered 503 did reach the log after all (the producer's
            // retry outlived the request), and the key makes this retry return it.
            if status == 202 || status == 200 {
                sent.get_mut(device_id)
                    .unwrap()
                    .push(body["message_id"].as_str().unwrap().to_string());
                break;
            }
            assert_eq!(status, 503, "{body}");
            assert!(
                Instant::now() < deadline,
                "Kafka never came back for herald ingest: {body}\n{}",
                ingest
                    .log()
                    .lines()
                    .filter(|l| !l.contains("librdkafka") && !l.contains("lsm_tree"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    eprintln!("phase: retries accepted after {:?}", down_since.elapsed());
    for (dev, device) in devices.iter_mut().skip(100).take(10) {
        let got = seen.get_mut(&dev.device_id).unwrap();
        let want = sent[&dev.device_id].len();
        while got.len() < want {
            let Ok(m) = tokio::time::timeout(Duration::from_secs(60), device.next()).await else {
                let notable = |log: String| {
                    log.lines()
                        .filter(|l| {
                            !l.contains("librdkafka")
                                && !l.contains("backlog read failed")
                                && (l.contains("WARN")
                                    || l.contains("ERROR")
                                    || l.contains("herald::roles")
                                    || l.contains(dev.device_id.as_str()))
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                let last = sent[&dev.device_id].last().unwrap();
                panic!(
                    "{} got {got:?} after Kafka returned; status of {last}: {:?}\nworker: {}\ngateways: {}\n{}",
                    dev.device_id,
                    app.status(last).await,
                    notable(workers[1].log()),
                    notable(gateways[1].log()),
                    notable(gateways[2].log()),
                )
            };
            let m = m.unwrap();
            got.push((m.envelope().id.clone(), m.envelope().seq));
        }
    }

    eprintln!(
        "phase: outage pushes received after {:?}",
        down_since.elapsed()
    );
    // Every device saw exactly what was sent to it, once, in seq order.
    for (dev, device) in devices.iter_mut() {
        let got = &seen[&dev.device_id];
        let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        let mut want: Vec<&str> = sent[&dev.device_id].iter().map(String::as_str).collect();
        // The unicast and the broadcast may be numbered in either order.
        let mut first_two: Vec<&str> = ids.iter().take(2).copied().collect();
        first_two.sort_unstable();
        let mut want_two: Vec<&str> = want.drain(..2).collect();
        want_two.sort_unstable();
        assert_eq!(first_two, want_two, "{}", dev.device_id);
        assert_eq!(&ids[2..], want.as_slice(), "{}", dev.device_id);
        assert!(
            got.windows(2).all(|w| w[0].1 < w[1].1),
            "{} saw seqs out of order: {got:?}",
            dev.device_id
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(20), device.next())
                .await
                .is_err(),
            "{} saw something twice",
            dev.device_id
        );
    }
}
