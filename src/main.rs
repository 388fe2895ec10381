//! The `herald` binary: command line, configuration and the wiring of roles. It stays
//! thin; every role lives in its own crate.

mod config;
mod rebuild;
mod replay;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc: herald allocates many small, short-lived buffers per message (requests,
/// envelopes, events); the system allocator spent about a tenth of the CPU on them.
/// Built without transparent huge pages: zeroing fresh 2 MiB pages took a third of the
/// CPU while folding broadcasts.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// herald: durable, real-time push-message delivery over MQTT.
///
/// App servers publish pushes over REST; each push is an event in a durable log; devices
/// receive them over MQTT (topic `inbox`) and acknowledge them; a device that was offline
/// gets what it missed when it reconnects.
#[derive(Debug, Parser)]
#[command(name = "herald", version, about, long_about)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, env = "HERALD_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every role in one process on embedded storage (the default deployment).
    ///
    /// Listens for the REST API (default 0.0.0.0:8080) and MQTT (default 0.0.0.0:9493).
    /// The admin token comes from HERALD_ADMIN_TOKEN; if unset, one is generated into the
    /// data dir and printed. Stop with Ctrl-C or SIGTERM; a restart resumes where it
    /// stopped.
    Serve(ServeArgs),
    /// Stream the event log as JSON lines, through a server's API or from a data dir.
    Replay(replay::ReplayArgs),
    /// Fold the whole log again into a fresh store and print a digest of each projection
    /// (on a stopped data dir).
    Rebuild(rebuild::RebuildArgs),
    /// Rebuild, then compare with the live projections; exits 1 if they differ (on a
    /// stopped data dir).
    Verify(rebuild::RebuildArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// A TOML config file (see herald.example.toml); flags and HERALD_* variables win.
    #[arg(long, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Where the event log and projections are kept [default: ./herald-data].
    #[arg(long, env = "HERALD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// REST API listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "HERALD_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// MQTT listen address [default: 0.0.0.0:9493].
    #[arg(long, env = "HERALD_MQTT_ADDR")]
    mqtt_addr: Option<SocketAddr>,
    /// Lifetime of app access tokens, in seconds [default: 3600].
    #[arg(long, env = "HERALD_TOKEN_TTL_S")]
    token_ttl_s: Option<u64>,
    /// Largest push `data`, in bytes of compact JSON [default: 4096].
    #[arg(long, env = "HERALD_MAX_DATA_BYTES")]
    max_data_bytes: Option<usize>,
    /// How long an Idempotency-Key holds, in seconds [default: 86400].
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW_S")]
    idempotency_window_s: Option<u32>,
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HERALD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Serve(args) => {
            let file = match &args.config {
                Some(path) => config::FileConfig::load(path)?,
                None => config::FileConfig::default(),
            };
            let overrides = config::Overrides {
                data_dir: args.data_dir,
                http_addr: args.http_addr,
                mqtt_addr: args.mqtt_addr,
                admin_token: std::env::var("HERALD_ADMIN_TOKEN").ok(),
                payload_key: std::env::var("HERALD_PAYLOAD_KEY").ok(),
                token_ttl_s: args.token_ttl_s,
                max_data_bytes: args.max_data_bytes,
                idempotency_window_s: args.idempotency_window_s,
            };
            let config = config::Config::resolve(file, overrides)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve::run(config))
        }
        Command::Replay(args) => replay::run(args),
        Command::Rebuild(args) => rebuild::run(args, false),
        Command::Verify(args) => rebuild::run(args, true),
    }
}
