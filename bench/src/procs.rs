//! The processes a benchmark runs: servers under test and simulator processes, with
//! their memory (VmRSS) and CPU time read from /proc.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// The admin token the benchmark gives herald.
pub const ADMIN: &str = "bench-admin-token-0123456789";

/// The payload key every role process of a benchmark shares (32 bytes, base64).
pub const BENCH_PAYLOAD_KEY: &str = "YmVuY2gtcGF5bG9hZC1rZXktMDEyMzQ1Njc4OWFiY2Q=";

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("bad VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

/// CPU time (user + system) of a process so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("bad stat")?.parse()?;
    let stime: u64 = fields.get(12).context("bad stat")?.parse()?;
    // Clock ticks; 100 per second on Linux.
    Ok(Duration::from_millis((utime + stime) * 10))
}

/// Which server is under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `herald serve`.
    Herald,
    /// Debian's Mosquitto.
    Mosquitto,
    /// rumqttd from crates.io.
    Rumqttd,
}

impl Kind {
    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Herald => "herald",
            Kind::Mosquitto => "Mosquitto",
            Kind::Rumqttd => "rumqttd",
        }
    }
}

/// A running server under test.
pub struct Server {
    /// Which.
    pub kind: Kind,
    /// Its MQTT port.
    pub mqtt_port: u16,
    /// Its REST port (herald only).
    pub http_port: u16,
    /// herald only: the MQTT ports of its `herald gateway` processes, if it has any.
    pub gateway_ports: Vec<u16>,
    child: Child,
    gateways: Vec<Child>,
    _dir: tempdir::Dir,
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `herald`.
    pub herald: PathBuf,
    /// `herald-sim`.
    pub sim: PathBuf,
    /// `mosquitto`, if installed.
    pub mosquitto: Option<PathBuf>,
    /// `rumqttd`, if installed.
    pub rumqttd: Option<PathBuf>,
}

fn which(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(extra.iter().map(PathBuf::from));
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

impl Bins {
    /// Finds the binaries: herald and herald-sim beside this executable, the peers on
    /// PATH (and /usr/sbin, ~/.cargo/bin).
    pub fn find() -> anyhow::Result<Bins> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("no exe dir")?;
        let herald = dir.join("herald");
        let sim = dir.join("herald-sim");
        for p in [&herald, &sim] {
            if !p.is_file() {
                bail!(
                    "{} not found: build with `cargo build --release -p herald -p herald-bench` (bench/run does)",
                    p.display()
                );
            }
        }
        Ok(Bins {
            herald,
            sim,
            mosquitto: which("mosquitto", &["/usr/sbin"]),
            rumqttd: which("rumqttd", &[]),
        })
    }
}

/// A temporary directory removed on drop.
pub mod tempdir {
    use std::path::{Path, PathBuf};

    /// The directory.
    #[derive(Debug)]
    pub struct Dir(PathBuf);

    impl Dir {
        /// Creates `herald-bench-<pid>-<n>` under the system temp dir.
        pub fn new(tag: &str) -> std::io::Result<Dir> {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("herald-bench-{}-{tag}-{n}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }
        /// Its path.
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `herald certs --out dir`.
async fn make_certs(bins: &Bins, dir: &Path) -> anyhow::Result<()> {
    let status = Command::new(&bins.herald)
        .arg("certs")
        .arg("--out")
        .arg(dir)
        .stdout(Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("herald certs failed: {status}");
    }
    Ok(())
}

/// Waits until a gateway's log says a delivery worker linked to it; fails with
/// `timed_out` at `deadline`.
async fn wait_linked(
    log: &std::path::Path,
    deadline: Instant,
    timed_out: &str,
) -> anyhow::Result<()> {
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("delivery worker linked")
    {
        if Instant::now() > deadline {
            bail!("{timed_out}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn wait_port(port: u16, what: &str, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited at start-up: {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {port} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Server {
    /// Starts a server of `kind` on fresh loopback ports.
    pub async fn start(kind: Kind, bins: &Bins) -> anyhow::Result<Server> {
        Self::start_with_gateways(kind, bins, 0).await
    }

    /// Starts `herald serve` linked over QUIC to `gateways` `herald gateway` processes
    /// (each holds its own devices' connections), or a server of `kind` alone.
    pub async fn start_with_gateways(
        kind: Kind,
        bins: &Bins,
        gateways: usize,
    ) -> anyhow::Result<Server> {
        Self::start_opts(kind, bins, gateways, &[]).await
    }

    /// Like [`Server::start_with_gateways`], with extra environment for `herald serve`
    /// (for example `HERALD_KAFKA_BROKERS`).
    pub async fn start_opts(
        kind: Kind,
        bins: &Bins,
        gateways: usize,
        env: &[(String, String)],
    ) -> anyhow::Result<Server> {
        let dir = tempdir::Dir::new(kind.name())?;
        let mut gateway_children = Vec::new();
        let mut gateway_ports = Vec::new();
        let mut link_addrs = Vec::new();
        let certs = dir.path().join("certs");
        if kind == Kind::Herald && gateways > 0 {
            make_certs(bins, &certs).await?;
            for i in 0..gateways {
                let (mqtt, link) = (free_port()?, free_port()?);
                let log = std::fs::File::create(dir.path().join(format!("gateway-{i}.log")))?;
                let mut child = Command::new(&bins.herald)
                    .arg("gateway")
                    .arg("--mqtt-addr")
                    .arg(format!("127.0.0.1:{mqtt}"))
                    .arg("--ws-addr")
                    .arg(format!("127.0.0.1:{}", free_port()?))
                    .arg("--link-addr")
                    .arg(format!("127.0.0.1:{link}"))
                    .arg("--link-certs")
                    .arg(&certs)
                    .arg("--gateway-id")
                    .arg(format!("gateway-{i}"))
                    .env("HERALD_LOG", "warn,herald_gateway::link=info")
                    .stdout(Stdio::null())
                    .stderr(log)
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .context("cannot start herald gateway")?;
                wait_port(mqtt, "herald gateway", &mut child).await?;
                gateway_children.push(child);
                gateway_ports.push(mqtt);
                link_addrs.push(format!("127.0.0.1:{link}"));
            }
        }
        let mqtt_port = free_port()?;
        let http_port = free_port()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut cmd = match kind {
            Kind::Herald => {
                let mut c = Command::new(&bins.herald);
                c.arg("serve")
                    .arg("--data-dir")
                    .arg(dir.path().join("data"))
                    .arg("--http-addr")
                    .arg(format!("127.0.0.1:{http_port}"))
                    .arg("--mqtt-addr")
                    .arg(format!("127.0.0.1:{mqtt_port}"))
                    .arg("--ws-addr")
                    .arg(format!("127.0.0.1:{}", free_port()?))
                    .env("HERALD_ADMIN_TOKEN", ADMIN)
                    .env("HERALD_LOG", "warn");
                if !link_addrs.is_empty() {
                    c.env("HERALD_LINK_GATEWAYS", link_addrs.join(","))
                        .env("HERALD_LINK_CERTS", &certs);
                }
                c.envs(env.iter().map(|(k, v)| (k, v)));
                c
            }
            Kind::Mosquitto => {
                let bin = bins
                    .mosquitto
                    .as_ref()
                    .context("mosquitto is not installed")?;
                let conf = dir.path().join("mosquitto.conf");
                // Queue and in-flight limits set explicitly, as large as herald's
                // defaults allow a device (herald: 32 in flight, the inbox unbounded).
                std::fs::write(
                    &conf,
                    format!(
                        "listener {mqtt_port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\nmax_inflight_messages 32\nmax_connections -1\npersistence false\nlog_dest none\n"
                    ),
                )?;
                let mut c = Command::new(bin);
                c.arg("-c").arg(conf);
                c
            }
            Kind::Rumqttd => {
                let bin = bins.rumqttd.as_ref().context("rumqttd is not installed")?;
                let conf = dir.path().join("rumqttd.toml");
                std::fs::write(
                    &conf,
                    format!(
                        r#"id = 0
[router]
id = 0
max_connections = 20000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{mqtt_port}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 32
    dynamic_filters = true
"#
                    ),
                )?;
                let mut c = Command::new(bin);
                c.arg("-c").arg(conf).arg("-q");
                c
            }
        };
        cmd.stdout(Stdio::null())
            .stderr(log)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", kind.name()))?;
        wait_port(mqtt_port, kind.name(), &mut child).await?;
        if kind == Kind::Herald {
            wait_port(http_port, "herald http", &mut child).await?;
        }
        // Every gateway says when the worker linked to it.
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..gateway_children.len() {
            let log = dir.path().join(format!("gateway-{i}.log"));
            wait_linked(
                &log,
                deadline,
                &format!("herald gateway {i} was not linked within 30 s"),
            )
            .await?;
        }
        Ok(Server {
            kind,
            mqtt_port,
            http_port,
            gateway_ports,
            child,
            gateways: gateway_children,
            _dir: dir,
        })
    }

    /// The partitions of the topic the roles benchmark creates.
    pub const ROLES_PARTITIONS: &str = "4";

    /// One process per role on Kafka at `kafka`, topic `topic` (of
    /// [`Server::ROLES_PARTITIONS`]): `herald ingest` (its REST port is this server's),
    /// one `herald deliver` and one `herald gateway` (its MQTT port is this server's).
    pub async fn start_roles(bins: &Bins, kafka: &str, topic: &str) -> anyhow::Result<Server> {
        let dir = tempdir::Dir::new("roles")?;
        let certs = dir.path().join("certs");
        make_certs(bins, &certs).await?;
        let (mqtt, link, http) = (free_port()?, free_port()?, free_port()?);
        let spawn = |args: Vec<String>, name: &str| -> anyhow::Result<Child> {
            let log = std::fs::File::create(dir.path().join(format!("{name}.log")))?;
            Command::new(&bins.herald)
                .args(&args)
                .env("HERALD_ADMIN_TOKEN", ADMIN)
                .env("HERALD_PAYLOAD_KEY", BENCH_PAYLOAD_KEY)
                .env("HERALD_LOG", "warn,herald_gateway::link=info")
                .stdout(Stdio::null())
                .stderr(log)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start herald {name}"))
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
        let certs_s = certs.display().to_string();
        let mut gateway = spawn(
            s(&[
                "gateway",
                "--mqtt-addr",
                &format!("127.0.0.1:{mqtt}"),
                "--ws-addr",
                &format!("127.0.0.1:{}", free_port()?),
                "--link-addr",
                &format!("127.0.0.1:{link}"),
                "--link-certs",
                &certs_s,
                "--gateway-id",
                "gateway-0",
            ]),
            "gateway-0",
        )?;
        wait_port(mqtt, "herald gateway", &mut gateway).await?;
        let kafka_args = [
            "--kafka-brokers",
            kafka,
            "--kafka-topic",
            topic,
            "--kafka-partitions",
            Self::ROLES_PARTITIONS,
        ];
        let mut deliver_args = s(&["deliver", "--data-dir"]);
        deliver_args.push(dir.path().join("deliver").display().to_string());
        deliver_args.extend(s(&kafka_args));
        deliver_args.extend(s(&[
            "--link-gateway",
            &format!("127.0.0.1:{link}"),
            "--link-certs",
            &certs_s,
        ]));
        let deliver = spawn(deliver_args, "deliver")?;
        let mut ingest_args = s(&["ingest", "--data-dir"]);
        ingest_args.push(dir.path().join("ingest").display().to_string());
        ingest_args.extend(s(&kafka_args));
        ingest_args.extend(s(&["--http-addr", &format!("127.0.0.1:{http}")]));
        let mut ingest = spawn(ingest_args, "ingest")?;
        wait_port(http, "herald ingest", &mut ingest).await?;
        wait_linked(
            &dir.path().join("gateway-0.log"),
            Instant::now() + Duration::from_secs(60),
            "herald deliver did not link to the gateway within 60 s",
        )
        .await?;
        Ok(Server {
            kind: Kind::Herald,
            mqtt_port: mqtt,
            http_port: http,
            gateway_ports: Vec::new(),
            child: ingest,
            gateways: vec![gateway, deliver],
            _dir: dir,
        })
    }

    /// The process ids of its gateway processes.
    pub fn gateway_pids(&self) -> Vec<u32> {
        self.gateways.iter().filter_map(|c| c.id()).collect()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Its REST base URL (herald).
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Its data dir (herald) or config dir.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Stops it (and its gateway processes).
    pub async fn stop(mut self) {
        for g in &mut self.gateways {
            let _ = g.kill().await;
        }
        let _ = self.child.kill().await;
    }
}

/// A running `herald-sim` process.
pub struct Sim {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Sim {
    /// Starts `herald-sim` with `args`.
    pub fn start(bins: &Bins, args: &[String]) -> anyhow::Result<Sim> {
        let mut child = Command::new(&bins.sim)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start herald-sim")?;
        let stdout = child.stdout.take().context("no stdout")?;
        Ok(Sim {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// Waits for the next JSON line with `"event": event`.
    pub async fn wait_event(&mut self, event: &str) -> anyhow::Result<Value> {
        while let Some(line) = self.lines.next_line().await? {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["event"] == event {
                return Ok(v);
            }
        }
        bail!("herald-sim ended before {event}")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Closes its stdin (idle mode: report and exit) and waits for its report.
    pub async fn finish(mut self) -> anyhow::Result<Value> {
        drop(self.child.stdin.take());
        let done = self.wait_event("done").await;
        let _ = self.child.wait().await;
        done
    }
}

/// A Kafka broker for the benchmarks: the one `HERALD_KAFKA` names, or one started with
/// `scripts/kafka-up` on free ports (and stopped on drop).
pub struct Kafka {
    /// host:port.
    pub addr: String,
    dir: Option<PathBuf>,
}

impl Kafka {
    /// Finds or starts a broker; an error says why none is available.
    pub async fn get() -> anyhow::Result<Kafka> {
        if let Ok(addr) = std::env::var("HERALD_KAFKA")
            && !addr.is_empty()
        {
            return Ok(Kafka { addr, dir: None });
        }
        let port = loop {
            let p = free_port()?;
            if p < 65000 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        let dir = std::env::temp_dir().join(format!("herald-bench-kafka-{}", std::process::id()));
        let out = Command::new("scripts/kafka-up")
            .env("HERALD_KAFKA_PORT", port.to_string())
            .env("HERALD_KAFKA_DIR", &dir)
            .output()
            .await
            .context("cannot run scripts/kafka-up (run the bench from the repository root)")?;
        if !out.status.success() {
            bail!(
                "scripts/kafka-up failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Kafka {
            addr: format!("127.0.0.1:{port}"),
            dir: Some(dir),
        })
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::process::Command::new("scripts/kafka-down")
                .env("HERALD_KAFKA_DIR", dir)
                .status();
        }
    }
}
