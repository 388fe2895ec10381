//! Helpers for the end-to-end tests: start the built `herald` binary on free loopback
//! ports, talk to its REST API, and connect devices with stock MQTT clients.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald_client::{ConnectOptions, Connection, DeviceCredentials, Envelope};
use serde_json::{Value, json};

pub const ADMIN: &str = "e2e-admin-token-0123456789";

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `herald serve`.
pub struct Server {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub http_port: u16,
    pub mqtt_port: u16,
    pub ws_port: u16,
    pub env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(&[]).await
    }

    pub async fn start_with(env: &[(&str, &str)]) -> Server {
        Self::start_configured("", env).await
    }

    /// A server with `toml` as its config file (flags and `env` still win).
    pub async fn start_configured(toml: &str, env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("herald.toml");
        std::fs::write(&config, toml).unwrap();
        let config = config.display().to_string();
        let env: Vec<(&str, &str)> = std::iter::once(("HERALD_CONFIG", config.as_str()))
            .chain(env.iter().copied())
            .collect();
        let mut s = Server {
            child: None,
            data_dir: tmp.path().join("data"),
            http_port: free_port(),
            mqtt_port: free_port(),
            ws_port: free_port(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _tmp: Some(tmp),
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .arg("--mqtt-addr")
            .arg(format!("127.0.0.1:{}", self.mqtt_port))
            .arg("--ws-addr")
            .arg(format!("127.0.0.1:{}", self.ws_port))
            .env("HERALD_ADMIN_TOKEN", ADMIN)
            .env(
                "HERALD_LOG",
                "info,herald_gateway=debug,fjall=warn,lsm_tree=warn",
            )
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", self.base())).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "herald did not start: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// SIGKILL, no warning.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server running");
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "herald did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data dir and ports.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.spawn().await;
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An app with a token.
#[derive(Clone)]
pub struct App {
    pub base: String,
    pub app_id: String,
    pub app_key: String,
    pub client_id: String,
    pub client_secret: String,
    pub token: String,
    pub http: reqwest::Client,
}

pub async fn create_app(server: &Server) -> App {
    create_app_at(server.base()).await
}

/// Creates an app through the API at `base` and gets its token.
pub async fn create_app_at(base: String) -> App {
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/apps"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "e2e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let a: Value = r.json().await.unwrap();
    let mut app = App {
        base,
        app_id: a["app_id"].as_str().unwrap().into(),
        app_key: a["app_key"].as_str().unwrap().into(),
        client_id: a["client_id"].as_str().unwrap().into(),
        client_secret: a["client_secret"].as_str().unwrap().into(),
        token: String::new(),
        http,
    };
    app.token = app.new_token().await;
    app
}

impl App {
    pub async fn new_token(&self) -> String {
        let r = self
            .http
            .post(format!("{}/oauth/token", self.base))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", &self.client_id),
                ("client_secret", &self.client_secret),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let t: Value = r.json().await.unwrap();
        assert_eq!(t["token_type"], "Bearer");
        t["access_token"].as_str().unwrap().to_owned()
    }

    pub async fn register(&self) -> DeviceCredentials {
        herald_client::register(&self.http, &self.base, &self.app_key)
            .await
            .unwrap()
    }

    /// POST /v1/messages; returns (status, body).
    pub async fn push_raw(&self, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/messages", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Pushes `data` to one device; asserts 202; returns the message id.
    pub async fn push(&self, device_id: &str, data: Value) -> String {
        let (status, body) = self
            .push_raw(json!({"to": {"device_id": device_id}, "data": data}))
            .await;
        assert_eq!(status, 202, "{body}");
        body["message_id"].as_str().unwrap().to_owned()
    }

    pub async fn broadcast(&self, data: Value) -> String {
        let (status, body) = self
            .push_raw(json!({"to": {"broadcast": true}, "data": data}))
            .await;
        assert_eq!(status, 202, "{body}");
        body["message_id"].as_str().unwrap().to_owned()
    }

    pub async fn status(&self, message_id: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}/v1/messages/{message_id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the message's status has `acked == n`.
    pub async fn wait_acked(&self, message_id: &str, n: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, s) = self.status(message_id).await;
            if code == 200 && s["acked"] == n {
                return s;
            }
            assert!(Instant::now() < deadline, "not acked by {n}: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub async fn connect(creds: &DeviceCredentials) -> Connection {
    herald_client::connect(creds, ConnectOptions::default())
        .await
        .unwrap()
}

/// Receives exactly `n` messages (with a generous deadline).
pub async fn recv_n(conn: &mut Connection, n: usize) -> Vec<Envelope> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), conn.messages.recv()).await {
            Ok(Some(m)) => out.push(m),
            Ok(None) => panic!("connection ended after {} of {n} messages", out.len()),
            Err(_) => panic!("timed out after {} of {n} messages", out.len()),
        }
    }
    out
}

/// Where a stock tool is, or why the test that needs it is skipped. With
/// HERALD_REQUIRE_TOOLS=1 (set by scripts/test) a missing tool fails the test instead.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("HERALD_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
            panic!("{name} is required (HERALD_REQUIRE_TOOLS=1) but not on PATH");
        }
        eprintln!("SKIPPED: {name} is not installed (scripts/test installs it)");
    }
    found
}

/// A stock client running as a child process, its stdout read line by line; killed when
/// dropped.
/// `node` and `tests/clients/browser` when headless Chromium can be driven from there
/// (Debian's `chromium`, or `HERALD_CHROMIUM`, and `npm ci` done in that folder); `None`
/// with a printed reason otherwise (a failure under `HERALD_REQUIRE_TOOLS=1`).
pub fn headless_browser() -> Option<(PathBuf, PathBuf)> {
    let node = tool("node")?;
    let browser = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/browser");
    let chromium = std::env::var("HERALD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !browser.join("node_modules/playwright-core").is_dir() || !Path::new(&chromium).is_file() {
        if std::env::var("HERALD_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
            panic!(
                "the browser test needs {chromium} and npm ci in {}",
                browser.display()
            );
        }
        eprintln!(
            "SKIPPED: no Chromium or no tests/clients/browser/node_modules (scripts/test installs both)"
        );
        return None;
    }
    Some((node, browser))
}

pub struct Lines {
    pub child: Child,
    name: String,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Lines {
    /// Starts `cmd` with its stdout and stderr piped.
    pub fn spawn(mut cmd: Command) -> Self {
        use std::io::{BufRead, Read};
        let name = format!("{:?}", cmd.get_program());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            sink.lock().unwrap().push_str(&text);
        });
        Lines {
            child,
            name,
            lines,
            stderr,
        }
    }

    /// The next line it printed (fails the test after `secs` seconds or if it exited).
    pub async fn next_within(&mut self, secs: u64) -> String {
        match tokio::time::timeout(Duration::from_secs(secs), self.lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => {
                let _ = self.child.wait();
                panic!("{} exited: {}", self.name, self.stderr.lock().unwrap())
            }
            Err(_) => panic!(
                "{} printed nothing in {secs} s: {}",
                self.name,
                self.stderr.lock().unwrap()
            ),
        }
    }

    /// The next line it printed (20 s at most).
    pub async fn next(&mut self) -> String {
        self.next_within(20).await
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stock `mosquitto_sub` subscribed to `inbox` as a device, printing each envelope as
/// a line, exiting after `count` messages.
pub struct MosquittoSub(pub Lines);

impl MosquittoSub {
    /// Connects as `dev` to the MQTT port `port` (QoS `qos`, a persistent session).
    pub fn start(tool: &Path, port: u16, dev: &DeviceCredentials, qos: u8, count: usize) -> Self {
        MosquittoSub::start_with(tool, port, dev, qos, count, &[])
    }

    /// [`MosquittoSub::start`] with more arguments (`-V mqttv5`, `--cafile`, `-F`).
    pub fn start_with(
        tool: &Path,
        port: u16,
        dev: &DeviceCredentials,
        qos: u8,
        count: usize,
        extra: &[&str],
    ) -> Self {
        let mut cmd = Command::new(tool);
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-i", &dev.device_id, "-u", &dev.device_id])
            .args(["-P", &dev.device_token, "-t", "inbox", "-c"])
            .args(["-q", &qos.to_string(), "-C", &count.to_string()])
            .args(extra);
        MosquittoSub(Lines::spawn(cmd))
    }

    /// The next envelope it printed (fails the test after 20 s).
    pub async fn next(&mut self) -> Value {
        let line = self.0.next().await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

/// A raw MQTT client, written with herald's codec, for exchanges stock clients cannot be
/// made to stop in the middle of, and for bytes no stock client sends.
pub struct Raw {
    pub s: std::net::TcpStream,
    buf: Vec<u8>,
    /// The protocol level packets are read and written at.
    pub level: u8,
}

impl Raw {
    /// A TCP connection to `port`, nothing sent yet.
    pub fn open(port: u16, level: u8) -> Raw {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Raw {
            s,
            buf: Vec::new(),
            level,
        }
    }

    /// An MQTT 3.1.1 device, connected and subscribed to `inbox` at QoS 2.
    pub fn connect(port: u16, dev: &DeviceCredentials, clean: bool) -> Raw {
        use herald_gateway::codec::{Connect, Packet, Subscribe};
        let mut raw = Raw::open(port, herald_gateway::codec::LEVEL_311);
        raw.send(&Packet::Connect(Connect {
            clean_session: clean,
            keep_alive_s: 60,
            client_id: dev.device_id.clone(),
            username: Some(dev.device_id.clone()),
            password: Some(dev.device_token.clone().into_bytes()),
            ..Connect::default()
        }));
        assert!(matches!(raw.recv(), Packet::ConnAck(c) if c.code == 0));
        raw.send(&Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![("inbox".into(), 2)],
            ..Subscribe::default()
        }));
        match raw.recv() {
            Packet::SubAck(s) => assert_eq!(s.codes, vec![2]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
        raw
    }

    pub fn send(&mut self, p: &herald_gateway::codec::Packet) {
        let mut out = Vec::new();
        herald_gateway::codec::encode_as(p, self.level, &mut out);
        self.send_bytes(&out);
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.s.write_all(bytes).unwrap();
    }

    /// The next packet (fails the test if the connection closes first).
    pub fn recv(&mut self) -> herald_gateway::codec::Packet {
        self.recv_or_closed()
            .expect("the connection closed before a packet arrived")
    }

    /// The next packet, or `None` if the server closed the connection first.
    pub fn recv_or_closed(&mut self) -> Option<herald_gateway::codec::Packet> {
        use std::io::Read;
        loop {
            if let Some(n) = herald_gateway::codec::check(&self.buf, 1 << 20).unwrap() {
                let frame: Vec<u8> = self.buf.drain(..n).collect();
                return Some(herald_gateway::codec::decode_as(&frame, self.level).unwrap());
            }
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Whether the server closed the connection (after any packets still in flight).
    pub fn closed(&mut self) -> bool {
        while self.recv_or_closed().is_some() {}
        true
    }
}

/// Link certificates for tests, written by `herald certs`.
pub fn make_certs(dir: &Path) -> PathBuf {
    let out = dir.join("certs");
    let status = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["certs", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "herald certs failed");
    out
}

/// A running `herald gateway`.
pub struct GatewayProc {
    pub child: Option<Child>,
    pub mqtt_port: u16,
    /// Where it serves /metrics.
    pub metrics_port: u16,
    pub link_port: u16,
    pub certs: PathBuf,
    pub log: PathBuf,
    pub id: String,
}

impl GatewayProc {
    pub fn start(certs: &Path, id: &str, dir: &Path) -> GatewayProc {
        let mut g = GatewayProc {
            child: None,
            mqtt_port: free_port(),
            metrics_port: free_port(),
            link_port: free_port(),
            certs: certs.to_path_buf(),
            log: dir.join(format!("{id}.log")),
            id: id.to_string(),
        };
        g.spawn();
        g
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("gateway")
            .args(["--mqtt-addr", &format!("127.0.0.1:{}", self.mqtt_port)])
            .args(["--ws-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--link-addr", &format!("127.0.0.1:{}", self.link_port)])
            .arg("--link-certs")
            .arg(&self.certs)
            .args(["--gateway-id", &self.id])
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .env("HERALD_LOG", "info,herald_gateway=debug")
            .env("HERALD_HEARTBEAT_MS", "300")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn link_addr(&self) -> String {
        format!("127.0.0.1:{}", self.link_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until the gateway says a worker is linked.
    pub async fn wait_linked(&self, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches("delivery worker linked").count() < times {
            assert!(Instant::now() < deadline, "never linked: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A UDP relay on loopback that can cut what crosses it: between a delivery worker and a
/// gateway's QUIC link, to break the link and restore it.
pub struct UdpCut {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpCut {
    /// Relays datagrams from one client to `target` and back.
    pub async fn start(target: std::net::SocketAddr) -> UdpCut {
        use std::sync::atomic::Ordering;
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(target).await.unwrap();
        let port = front.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<std::net::SocketAddr> = None;
            let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        if !flag.load(Ordering::Relaxed) {
                            let _ = back.send(&a[..n]).await;
                        }
                    }
                    r = back.recv(&mut b) => {
                        let Ok(n) = r else { continue };
                        if let (false, Some(c)) = (flag.load(Ordering::Relaxed), client) {
                            let _ = front.send_to(&b[..n], c).await;
                        }
                    }
                }
            }
        });
        UdpCut { port, cut, task }
    }

    /// Drops everything (`true`) or relays again (`false`).
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for UdpCut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The address a service test runs against, from the variable `var` (set by scripts/test),
/// or `None` after printing why the test is skipped (`how` says how to get one). Under
/// HERALD_REQUIRE_TOOLS the test fails instead of skipping.
pub fn service(var: &str, how: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var_os("HERALD_REQUIRE_TOOLS").is_some() => {
            panic!("{var} is not set, and HERALD_REQUIRE_TOOLS says not to skip")
        }
        _ => {
            eprintln!("skipped: {var} is not set ({how})");
            None
        }
    }
}

pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// A free TCP port on 127.0.0.1 below the ephemeral range (20000 to 32767), for a server
/// that must get the same port back when it restarts.
pub fn fixed_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // Processes start at different places, so parallel test binaries rarely meet.
    let start = std::process::id() % 1_000 * 12;
    loop {
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = 20_000 + ((start + i) % 12_768) as u16;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A server of a test's own (a Kafka broker or a Cassandra node), run by
/// scripts/NAME-up and NAME-down in a directory of its own, and stopped when dropped.
pub struct Service {
    pub port: u16,
    name: &'static str,
    /// The scripts' variables (ports), besides the directory and the keep flag.
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Service {
    /// A Kafka broker (scripts/kafka-up), on a port whose next port (the controller's) is
    /// free too.
    pub fn kafka() -> Service {
        let port = loop {
            let p = free_port();
            if p < 65000 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        Service::start(
            "kafka",
            port,
            vec![("HERALD_KAFKA_PORT".into(), port.to_string())],
        )
    }

    /// A Cassandra node (scripts/cassandra-up), on ports below the kernel's ephemeral
    /// range (32768 and up): a node restarted on the same ports must find them free, and
    /// an ephemeral port may meanwhile be the local end of any connection on the machine.
    pub fn cassandra() -> Service {
        let (port, gossip) = (fixed_port(), fixed_port());
        Service::start(
            "cassandra",
            port,
            vec![
                ("HERALD_CASSANDRA_PORT".into(), port.to_string()),
                ("HERALD_CASSANDRA_STORAGE_PORT".into(), gossip.to_string()),
            ],
        )
    }

    fn start(name: &'static str, port: u16, env: Vec<(String, String)>) -> Service {
        let dir =
            std::env::temp_dir().join(format!("herald-{name}-test-{}-{port}", std::process::id()));
        let s = Service {
            port,
            name,
            env,
            dir,
        };
        s.up(false);
        s
    }

    fn var(&self, what: &str) -> String {
        format!("HERALD_{}_{what}", self.name.to_uppercase())
    }

    /// Starts it (on the data it had, with `keep`); a start that fails is tried twice
    /// more, printing why.
    pub fn up(&self, keep: bool) {
        let mut tries = 0;
        loop {
            let out = Command::new(scripts().join(format!("{}-up", self.name)))
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .env(self.var("DIR"), &self.dir)
                .env(self.var("KEEP"), if keep { "1" } else { "0" })
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            tries += 1;
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(tries < 3, "{}-up failed {tries} times: {why}", self.name);
            eprintln!("{}-up failed; trying again: {why}", self.name);
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Stops it (keeping its data, with `keep`).
    pub fn down(&self, keep: bool) {
        let status = Command::new(scripts().join(format!("{}-down", self.name)))
            .env(self.var("DIR"), &self.dir)
            .env(self.var("KEEP"), if keep { "1" } else { "0" })
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.down(false);
    }
}

/// Takes messages from an SDK device into `seen` until it holds `n` (fails after
/// `within`, naming `what`).
pub async fn take_until(
    device: &mut herald_client::Device,
    seen: &mut Vec<Envelope>,
    n: usize,
    within: Duration,
    what: &str,
) {
    while seen.len() < n {
        let m = tokio::time::timeout(within, device.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: got {} of {n}", seen.len()))
            .unwrap_or_else(|| panic!("{what}: the device stopped"));
        seen.push(m.envelope().clone());
    }
}

/// Asserts the device saw exactly `sent`, once each, in order, and nothing more comes.
pub async fn assert_exactly(
    device: &mut herald_client::Device,
    seen: &[Envelope],
    sent: &[String],
) {
    let ids: Vec<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    let want: Vec<&str> = sent.iter().map(String::as_str).collect();
    assert_eq!(ids, want, "every push once, in order");
    assert!(
        seen.windows(2).all(|w| w[0].seq < w[1].seq),
        "seqs out of order"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), device.next())
            .await
            .is_err(),
        "nothing shown twice"
    );
}

/// SDK options that retry quickly, so a restarted server or gateway is found again soon.
pub fn quick_options() -> herald_client::DeviceOptions {
    let mut opts = herald_client::DeviceOptions::default();
    opts.backoff.initial_delay = Duration::from_millis(50);
    opts.backoff.max_delay = Duration::from_millis(500);
    opts
}

/// One scrape of `/metrics`, parsed.
pub struct Scrape(pub prometheus_parse::Scrape);

impl Scrape {
    pub async fn of(server: &Server) -> Scrape {
        Scrape::with(&reqwest::Client::new(), server).await
    }

    /// A scrape made with `http` (a client bound to another source address, say).
    pub async fn with(http: &reqwest::Client, server: &Server) -> Scrape {
        let r = http
            .get(format!("{}/metrics", server.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let text = r.text().await.unwrap();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        Scrape(prometheus_parse::Scrape::parse(lines).unwrap())
    }

    /// The value of `name` whose labels include `labels` (0 when there is none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(b) => {
                    b.iter().map(|c| c.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => 0.0,
            })
            .sum()
    }

    pub fn help(&self) -> &std::collections::HashMap<String, String> {
        &self.0.docs
    }
}
