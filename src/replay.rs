//! `herald replay`: streams the event log as JSON lines, for analysts.
//!
//! Two sources, one output: with `--api URL` it reads `GET /v1/admin/events` of a running
//! server; without, it reads a data dir's log files (`--data-dir`) directly, also while a
//! server runs on it. Only `--app`/`--device` need the projection store, which a running
//! server locks; then the data dir is refused with a pointer to `--api`. Both print the same bytes for the same records: the filter and
//! the line format live in `herald_ingest::replay`, which also opens payloads for
//! `--decrypt` (on this side: the server never decrypts for a replay).
//!
//! The log is read in pages of `PAGE_RECORDS` records and written through a buffered
//! writer, so memory stays flat however long the log is. A progress bar is drawn on
//! stderr only when stderr is a terminal.

use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine;
use herald_eventlog::embedded::EmbeddedLog;
use herald_eventlog::{EventLog, Offset};
use herald_ingest::admin::{FROM_HEADER, TO_HEADER};
use herald_ingest::replay::{
    Filter, PAGE_RECORDS, Replay, decrypt_event, decrypt_line, line_offset,
};
use herald_projections::embedded::EmbeddedStore;
use herald_projections::embedded::open_database;
use herald_projections::view::View;
use herald_schemas::seal::{KEY_BYTES, Keyring};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

/// Bytes buffered before a write to the output.
const OUTPUT_BUFFER_BYTES: usize = 1 << 20;

/// Arguments of `herald replay`.
///
/// Prints one JSON object per event:
/// `{"offset":N,"ts_ms":T,"type":"PushAccepted","schema_version":2,"event":{…}}`, bytes
/// as base64, push payloads sealed unless `--decrypt` is given.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Read from a running server's REST API, e.g. http://127.0.0.1:8080 (needs the
    /// admin token). Without it, the data dir's log files are read directly, also while a
    /// server runs (only --app and --device then need the server stopped, or --api).
    #[arg(long, value_name = "URL")]
    api: Option<String>,
    #[command(flatten)]
    server: ServerDir,
    /// Start at this offset, or at the first event at or after this RFC 3339 time
    /// (e.g. 2024-05-01T12:00:00Z) [default: 0].
    #[arg(long, value_name = "OFFSET|TIME", value_parser = parse_bound)]
    from: Option<Bound>,
    /// Stop before this offset, or keep only events before this RFC 3339 time
    /// [default: the end of the log when the replay starts].
    #[arg(long, value_name = "OFFSET|TIME", value_parser = parse_bound)]
    to: Option<Bound>,
    /// Only events about this app: its own, and those of its devices.
    #[arg(long, value_name = "APP_ID")]
    app: Option<String>,
    /// Only events about this device: its own, pushes to it, and its app's broadcasts.
    #[arg(long, value_name = "DEVICE_ID")]
    device: Option<String>,
    /// Only these event types, comma-separated (e.g. PushAccepted,DeviceAcked).
    #[arg(long = "type", value_name = "TYPE[,TYPE…]")]
    types: Option<String>,
    /// Open push payloads and add them to their lines as "data".
    #[arg(long)]
    decrypt: bool,
    /// The payload key for --decrypt, 32 bytes in base64 [default: the data dir's payload.key].
    #[arg(
        long,
        env = "HERALD_PAYLOAD_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    payload_key: Option<String>,
    /// Write the lines to this file instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    /// With --api on a partitioned Kafka topic (the role processes): the partition to
    /// read; offsets are that partition's [default: 0].
    #[arg(long, value_name = "N", requires = "api")]
    partition: Option<u32>,
}

/// One end of the replayed range, as given to `--from` or `--to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// A log offset.
    Offset(Offset),
    /// A time, in ms since the Unix epoch.
    TimeMs(u64),
}

fn parse_bound(s: &str) -> Result<Bound, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Bound::Offset)
            .map_err(|e| format!("offset {s} is out of range: {e}"));
    }
    let ts: jiff::Timestamp = s.parse().map_err(|e| {
        format!(
            "expected a log offset (e.g. 1200) or an RFC 3339 time \
             (e.g. 2024-05-01T12:00:00Z): {e}"
        )
    })?;
    u64::try_from(ts.as_millisecond())
        .map(Bound::TimeMs)
        .map_err(|_| format!("{s} is before 1970"))
}

/// What to replay: an offset range (the end resolved against the log) and a filter.
#[derive(Debug)]
struct Selection {
    from: Offset,
    to: Option<Offset>,
    filter: Filter,
    partition: Option<u32>,
}

impl Selection {
    fn from_args(args: &ReplayArgs) -> anyhow::Result<Self> {
        let mut s = Selection {
            from: 0,
            to: None,
            partition: args.partition,
            filter: Filter {
                app: args.app.clone(),
                device: args.device.clone(),
                ..Filter::default()
            },
        };
        match args.from {
            Some(Bound::Offset(o)) => s.from = o,
            Some(Bound::TimeMs(t)) => s.filter.from_ts_ms = Some(t),
            None => {}
        }
        match args.to {
            Some(Bound::Offset(o)) => s.to = Some(o),
            Some(Bound::TimeMs(t)) => s.filter.to_ts_ms = Some(t),
            None => {}
        }
        if let Some(to) = s.to
            && to < s.from
        {
            bail!("--to {to} is before --from {}", s.from);
        }
        if let (Some(from), Some(to)) = (s.filter.from_ts_ms, s.filter.to_ts_ms)
            && to < from
        {
            bail!("the --to time is before the --from time");
        }
        if let Some(list) = &args.types {
            s.filter.types =
                Filter::parse_types(list).map_err(|e| anyhow::anyhow!("--type: {e}"))?;
        }
        Ok(s)
    }

    /// The offsets to read, given the log's durable end: never past it.
    fn range(&self, end: Offset) -> (Offset, Offset) {
        (self.from, self.to.unwrap_or(end).min(end).max(self.from))
    }
}

/// What a replay wrote.
#[derive(Debug, Default)]
struct Stats {
    from: Offset,
    to: Offset,
    lines: u64,
    unopened: u64,
}

/// Runs `herald replay`.
pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let selection = Selection::from_args(&args)?;
    let data_dir = args.server.dir();
    let keyring = if args.decrypt {
        Some(payload_keyring(args.payload_key.as_deref(), &data_dir)?)
    } else {
        None
    };
    // One worker: it starts the next page's read while this thread renders a page.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = match &args.api {
        Some(api) => {
            if !api.starts_with("http://") {
                bail!(
                    "--api {api}: expected an http:// URL, e.g. http://127.0.0.1:8080 (this \
                     build speaks plain HTTP; reach a remote server through a tunnel)"
                );
            }
            let token = args.server.admin_token()?;
            runtime.block_on(online(
                api,
                &token,
                &selection,
                keyring.as_ref(),
                args.output.as_deref(),
            ))
        }
        None => offline(
            &runtime,
            &data_dir,
            &selection,
            keyring.as_ref(),
            args.output.as_deref(),
        ),
    };
    let stats = match result {
        Ok(stats) => stats,
        // A reader that stopped early (`| head`) is not a failure.
        Err(e) if broken_pipe(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    if stats.lines == 0 {
        eprintln!(
            "herald replay: no events matched in offsets {}..{}",
            stats.from, stats.to
        );
    }
    if stats.unopened > 0 {
        eprintln!(
            "herald replay: {} payloads could not be opened; their lines say why in \
             \"data_error\" (is --payload-key the server's key?)",
            stats.unopened
        );
    }
    Ok(())
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A secret given by flag or environment (empty counts as unset), else read from a file
/// of the data dir, else `None`.
fn secret(given: Option<&str>, file: &Path) -> anyhow::Result<Option<String>> {
    if let Some(v) = given.map(str::trim).filter(|v| !v.is_empty()) {
        return Ok(Some(v.to_owned()));
    }
    match std::fs::read_to_string(file) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
}

/// Where a command finds a server's files: its data dir, and the admin token for its API.
#[derive(Debug, clap::Args)]
pub struct ServerDir {
    /// The server's data dir: where its admin-token and payload.key files are, and the
    /// log `herald replay` reads without --api [default: ./herald-data].
    #[arg(long, env = "HERALD_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The admin token for the server's API [default: the data dir's admin-token file].
    #[arg(
        long,
        env = "HERALD_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,
}

impl ServerDir {
    /// The data dir.
    pub fn dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("herald-data"))
    }

    /// The admin token: the flag or variable, else the data dir's file.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        admin_token(self.admin_token.as_deref(), &self.dir())
    }
}

fn admin_token(given: Option<&str>, data_dir: &Path) -> anyhow::Result<String> {
    let file = data_dir.join("admin-token");
    secret(given, &file)?.with_context(|| {
        format!(
            "--api needs the admin token: pass --admin-token TOKEN, set HERALD_ADMIN_TOKEN, \
             or point --data-dir at the server's data dir ({} does not exist)",
            file.display()
        )
    })
}

fn payload_keyring(given: Option<&str>, data_dir: &Path) -> anyhow::Result<Keyring> {
    let file = data_dir.join("payload.key");
    let from_flag = given.is_some_and(|g| !g.trim().is_empty());
    let text = secret(given, &file)?.with_context(|| {
        format!(
            "--decrypt needs the payload key: pass --payload-key KEY, set HERALD_PAYLOAD_KEY, \
             or point --data-dir at the server's data dir ({} does not exist)",
            file.display()
        )
    })?;
    let what = if from_flag {
        "--payload-key (or HERALD_PAYLOAD_KEY)".to_owned()
    } else {
        file.display().to_string()
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .with_context(|| format!("{what} is not base64"))?;
    let key: [u8; KEY_BYTES] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{what} must be {KEY_BYTES} bytes in base64"))?;
    // Key id 1 is the one `herald serve` seals with.
    Ok(Keyring::new(1, &key))
}

fn open_output(path: Option<&Path>) -> anyhow::Result<BufWriter<Box<dyn Write>>> {
    let sink: Box<dyn Write> = match path {
        Some(p) => Box::new(
            std::fs::File::create(p)
                .with_context(|| format!("--output: cannot create {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    Ok(BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, sink))
}

fn write_out(out: &mut impl Write, bytes: &[u8]) -> anyhow::Result<()> {
    out.write_all(bytes).context("cannot write the output")
}

/// A progress bar over the replayed offsets, drawn only when stderr is a terminal.
struct Progress(Option<ProgressBar>);

impl Progress {
    fn new(from: Offset, to: Offset) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = ProgressBar::new(to - from);
        if let Ok(style) = ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} records ({per_sec:0}, eta {eta})",
        ) {
            bar.set_style(style);
        }
        Progress(Some(bar))
    }

    fn set(&self, done: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(done);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

// ------------------------------------------------------------------------ offline

/// Refuses a data dir whose database a running server holds: fjall locks it, and the
/// server's API is the way in.
fn refuse_if_serving(store: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let Ok(lock) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(store.join("lock"))
    else {
        // No lock file yet, or no permission: opening the database will say.
        return Ok(());
    };
    match lock.try_lock() {
        // Dropping the file releases the probe's lock before fjall takes its own.
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(in_use(data_dir)),
        Err(std::fs::TryLockError::Error(_)) => Ok(()),
    }
}

fn in_use(data_dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "the data dir {} is in use by a running herald (its database is locked); replay \
         through the server instead: herald replay --api http://HOST:PORT (the admin token \
         comes from --admin-token, HERALD_ADMIN_TOKEN or {})",
        data_dir.display(),
        data_dir.join("admin-token").display()
    )
}

fn offline(
    runtime: &tokio::runtime::Runtime,
    data_dir: &Path,
    selection: &Selection,
    keyring: Option<&Keyring>,
    output: Option<&Path>,
) -> anyhow::Result<Stats> {
    let log_dir = data_dir.join("log");
    let store_dir = data_dir.join("store");
    if !log_dir.is_dir() {
        bail!(
            "{} is not a herald data dir ({} does not exist); pass --data-dir DIR (or set \
             HERALD_DATA_DIR), or --api URL to read from a running server",
            data_dir.display(),
            log_dir.display()
        );
    }
    // The log's segment files can be read while a server appends to them: this sees the
    // records intact when it opened.
    let log = Arc::new(
        EmbeddedLog::open_read_only(&log_dir)
            .with_context(|| format!("cannot open the event log in {}", log_dir.display()))?,
    );
    let (from, to) = selection.range(*log.durable_end().borrow());

    // Device → app answers come from the projections, only when a filter needs them;
    // a running server holds the projection store, so then ask it through --api.
    let store = if selection.filter.app.is_some() || selection.filter.device.is_some() {
        refuse_if_serving(&store_dir, data_dir)?;
        let db = match open_database(&store_dir) {
            Ok(db) => db,
            // The server started between the probe and the open.
            Err(e) if e.to_string().contains("Locked") => return Err(in_use(data_dir)),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open {}", store_dir.display()));
            }
        };
        Some(EmbeddedStore::open(db, "").context("cannot open the projection store")?)
    } else {
        None
    };
    let lookup = |device: &str| {
        store
            .as_ref()
            .and_then(|s| s.device(device).ok().flatten())
            .map(|d| d.app_id)
    };
    let mut replay = Replay::new(selection.filter.clone(), lookup);

    let mut out = open_output(output)?;
    let progress = Progress::new(from, to);
    let mut stats = Stats {
        from,
        to,
        ..Stats::default()
    };
    let mut page = Vec::with_capacity(OUTPUT_BUFFER_BYTES);
    // The next page is read on the blocking pool while this one is rendered.
    let read = |next: Offset| {
        let log = log.clone();
        let max = PAGE_RECORDS.min((to - next) as usize);
        runtime.spawn(async move { log.read(next, max).await })
    };
    let mut pending = (from < to).then(|| read(from));
    while let Some(task) = pending.take() {
        let records = runtime
            .block_on(task)
            .context("the log reader stopped")?
            .context("cannot read the event log")?;
        let Some(last) = records.last() else {
            bail!("the event log has no record at an offset below its durable end");
        };
        let next = last.offset + 1;
        if next < to {
            pending = Some(read(next));
        }
        page.clear();
        for record in &records {
            let before = page.len();
            let event = replay.render(record, &mut page);
            if page.len() > before {
                stats.lines += 1;
            }
            if let (Some(event), Some(keyring)) = (event, keyring)
                && decrypt_event(&mut page, &event, keyring)
            {
                stats.unopened += 1;
            }
        }
        write_out(&mut out, &page)?;
        progress.set(next - from);
    }
    out.flush().context("cannot write the output")?;
    Ok(stats)
}

// ------------------------------------------------------------------------ online

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

fn header_offset(resp: &reqwest::Response, name: &str) -> Option<Offset> {
    resp.headers().get(name)?.to_str().ok()?.parse().ok()
}

async fn online(
    api: &str,
    token: &str,
    selection: &Selection,
    keyring: Option<&Keyring>,
    output: Option<&Path>,
) -> anyhow::Result<Stats> {
    let base = api.trim_end_matches('/');
    let f = &selection.filter;
    let mut query: Vec<(&str, String)> = vec![("from", selection.from.to_string())];
    if let Some(p) = selection.partition {
        query.push(("partition", p.to_string()));
    }
    if let Some(to) = selection.to {
        query.push(("to", to.to_string()));
    }
    if let Some(t) = f.from_ts_ms {
        query.push(("from_ts", t.to_string()));
    }
    if let Some(t) = f.to_ts_ms {
        query.push(("to_ts", t.to_string()));
    }
    if let Some(app) = &f.app {
        query.push(("app", app.clone()));
    }
    if let Some(device) = &f.device {
        query.push(("device", device.clone()));
    }
    if !f.types.is_empty() {
        query.push(("type", f.types.join(",")));
    }
    let mut resp = reqwest::Client::new()
        .get(format!("{base}/v1/admin/events"))
        .query(&query)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach herald at {base} (--api)"))?;
    let status = resp.status();
    if !status.is_success() {
        let detail = match resp.json::<ErrorBody>().await {
            Ok(b) => format!("{}: {}", b.error.code, b.error.message),
            Err(_) => "no details".to_owned(),
        };
        let hint = match status.as_u16() {
            401 => " (check --admin-token or HERALD_ADMIN_TOKEN)",
            404 => " (is --api a herald server with /v1/admin/events?)",
            _ => "",
        };
        bail!("herald at {base} refused the replay: {status}, {detail}{hint}");
    }
    let from = header_offset(&resp, FROM_HEADER).unwrap_or(selection.from);
    let to = header_offset(&resp, TO_HEADER).unwrap_or(from).max(from);

    let mut out = open_output(output)?;
    let progress = Progress::new(from, to);
    let mut stats = Stats {
        from,
        to,
        ..Stats::default()
    };
    let mut carry: Vec<u8> = Vec::new();
    let mut lines = Vec::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                // Flush what arrived whole, so the output says how far the replay got.
                let _ = out.flush();
                return Err(e).with_context(|| {
                    format!(
                        "the stream from {base} broke off after {} lines (the server's \
                         log says why)",
                        stats.lines
                    )
                });
            }
        };
        carry.extend_from_slice(&chunk);
        let Some(cut) = carry.iter().rposition(|&b| b == b'\n').map(|i| i + 1) else {
            continue;
        };
        lines.clear();
        let mut last = None;
        for line in carry[..cut].split_inclusive(|&b| b == b'\n') {
            stats.lines += 1;
            last = line_offset(line).or(last);
            match keyring {
                Some(keyring) => {
                    if decrypt_line(line, keyring, &mut lines)
                        .with_context(|| format!("{base} sent a line that is not JSON"))?
                    {
                        stats.unopened += 1;
                    }
                }
                None => lines.extend_from_slice(line),
            }
        }
        carry.drain(..cut);
        write_out(&mut out, &lines)?;
        if let Some(last) = last {
            progress.set(last.saturating_add(1).saturating_sub(from));
        }
    }
    if !carry.is_empty() {
        bail!("the stream from {base} ended in the middle of a line");
    }
    out.flush().context("cannot write the output")?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bounds_are_offsets_or_rfc3339_times() {
        assert_eq!(parse_bound("1200"), Ok(Bound::Offset(1200)));
        assert_eq!(
            parse_bound("2024-05-01T12:00:00Z"),
            Ok(Bound::TimeMs(1_714_564_800_000))
        );
        assert_eq!(
            parse_bound("2024-05-01T14:00:00.5+02:00"),
            Ok(Bound::TimeMs(1_714_564_800_500))
        );
        assert!(parse_bound("yesterday").unwrap_err().contains("RFC 3339"));
        assert!(
            parse_bound("1969-12-31T00:00:00Z")
                .unwrap_err()
                .contains("1970")
        );
        assert!(parse_bound("99999999999999999999999").is_err());
    }

    #[test]
    fn the_range_stops_at_the_durable_end() {
        let s = Selection {
            from: 5,
            to: Some(100),
            filter: Filter::default(),
            partition: None,
        };
        assert_eq!(s.range(50), (5, 50));
        assert_eq!(s.range(3), (5, 5));
        let open = Selection {
            from: 0,
            to: None,
            filter: Filter::default(),
            partition: None,
        };
        assert_eq!(open.range(7), (0, 7));
    }

    #[test]
    fn secrets_come_from_the_flag_then_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let e = payload_keyring(None, dir.path()).unwrap_err().to_string();
        assert!(e.contains("--payload-key"), "{e}");
        let e = admin_token(Some(""), dir.path()).unwrap_err().to_string();
        assert!(e.contains("--admin-token"), "{e}");

        std::fs::write(dir.path().join("admin-token"), "tok\n").unwrap();
        assert_eq!(admin_token(None, dir.path()).unwrap(), "tok");
        assert_eq!(admin_token(Some("flag"), dir.path()).unwrap(), "flag");

        let e = payload_keyring(Some("not base64!"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--payload-key"), "{e}");
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        let e = payload_keyring(Some(&short), dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("32 bytes"), "{e}");
        let key = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        std::fs::write(dir.path().join("payload.key"), &key).unwrap();
        assert!(payload_keyring(None, dir.path()).is_ok());
    }
}
