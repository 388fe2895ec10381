//! `herald rebuild` and `herald verify`: fold the whole log again into a fresh store and
//! compare it with the live one.
//!
//! Both work on a stopped data dir (the embedded database is locked by a running
//! `herald serve`). The fresh store is built in keyspaces prefixed `rebuild.` beside the
//! live ones, up to exactly the live store's checkpoint, so the two are comparable; it is
//! dropped afterwards. With `--store cql` it is built in a CQL keyspace instead (and
//! kept), so a CQL store can be compared with the embedded one: the digests do not
//! depend on the store.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, bail};
use herald_delivery::worker::fold_batch;
use herald_eventlog::EventLog;
use herald_eventlog::embedded::EmbeddedLog;
use herald_projections::embedded::{EmbeddedStore, open_database};
use herald_projections::view::Store;

/// Arguments of `herald rebuild` and `herald verify`.
#[derive(Debug, clap::Args)]
pub struct RebuildArgs {
    /// The data dir of a stopped herald [default: ./herald-data].
    #[arg(long, env = "HERALD_DATA_DIR", default_value = "herald-data")]
    data_dir: PathBuf,
    /// Rebuild into a CQL keyspace instead of beside the live store: `cql`. The
    /// keyspace (--cql-keyspace, required) is emptied first; verify then compares it
    /// with the data dir's live projections.
    #[arg(long, value_parser = ["embedded", "cql"], default_value = "embedded")]
    store: String,
    /// CQL contact points, host:port,… (with --store cql).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:9042")]
    cql_nodes: Vec<String>,
    /// The CQL keyspace to rebuild into (with --store cql); everything in it is replaced.
    #[arg(long)]
    cql_keyspace: Option<String>,
}

/// Where the rebuilt copy goes.
enum Fresh {
    Embedded(EmbeddedStore),
    #[cfg(feature = "cql")]
    Cql(herald_projections::cql::CqlStore),
}

impl Fresh {
    fn store(&self) -> &dyn Store {
        match self {
            Fresh::Embedded(s) => s,
            #[cfg(feature = "cql")]
            Fresh::Cql(s) => s,
        }
    }

    fn digests(&self, now_ms: u64) -> anyhow::Result<Vec<herald_projections::digest::Digest>> {
        Ok(match self {
            Fresh::Embedded(s) => s.digests(now_ms)?,
            #[cfg(feature = "cql")]
            Fresh::Cql(s) => s.digests(now_ms)?,
        })
    }

    fn open(args: &RebuildArgs, db: &fjall::Database) -> anyhow::Result<Self> {
        if args.store == "cql" {
            let Some(keyspace) = &args.cql_keyspace else {
                bail!(
                    "--store cql needs --cql-keyspace: the keyspace to rebuild into (it is emptied first)"
                );
            };
            #[cfg(feature = "cql")]
            {
                let mut c = herald_projections::cql::CqlConfig::new("", keyspace);
                c.nodes.clone_from(&args.cql_nodes);
                let store = herald_projections::cql::CqlStore::connect(&c)
                    .with_context(|| format!("cannot open the CQL keyspace {keyspace}"))?;
                store.truncate()?;
                return Ok(Fresh::Cql(store));
            }
            #[cfg(not(feature = "cql"))]
            bail!(
                "--store cql ({keyspace}): this herald was built without CQL support (cargo build --release --features cql)"
            );
        }
        // A rebuilt copy left by an interrupted run is dropped first.
        EmbeddedStore::open(db.clone(), PREFIX)?.destroy()?;
        Ok(Fresh::Embedded(EmbeddedStore::open(db.clone(), PREFIX)?))
    }
}

/// Records folded per batch.
const BATCH: usize = 4096;

const PREFIX: &str = "rebuild.";

/// Runs `herald rebuild` (`verify == false`) or `herald verify`.
pub fn run(args: RebuildArgs, verify: bool) -> anyhow::Result<()> {
    let path = args.data_dir.join("store");
    if !path.exists() {
        bail!("no herald data in {} (--data-dir)", args.data_dir.display());
    }
    // The log's lock tells whether a server runs on this data dir.
    let log = EmbeddedLog::open(&args.data_dir.join("log")).with_context(|| {
        format!(
            "cannot open the event log in {}: is `herald serve` running on it? Stop it first",
            args.data_dir.display()
        )
    })?;
    let db = open_database(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let live = EmbeddedStore::open(db.clone(), "")?;
    if live.has_legacy_layout()? {
        bail!(
            "the projections in {} were written by an older herald (before partitions): start `herald serve` once to rebuild them, then verify",
            args.data_dir.display()
        );
    }
    let until = live.checkpoint(0)?;

    let fresh = Fresh::open(&args, &db)?;

    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(until);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} rebuilding [{bar:40}] {pos}/{len} events ({per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut from = 0;
    while from < until {
        let want = BATCH.min((until - from) as usize);
        let records = runtime.block_on(log.read(from, want))?;
        if records.is_empty() {
            bail!("the log ends at {from}, before the live checkpoint {until}");
        }
        let (next, _, _) = fold_batch(fresh.store(), from, &records)?;
        bar.set_position(next);
        from = next;
    }
    bar.finish_and_clear();

    let now = now_ms();
    let rebuilt = fresh.digests(now)?;
    let current = live.digests(now)?;
    match &fresh {
        Fresh::Embedded(_) => {
            println!("rebuilt {until} events from {}", args.data_dir.display());
        }
        #[cfg(feature = "cql")]
        Fresh::Cql(s) => println!(
            "rebuilt {until} events from {} into the CQL keyspace {}",
            args.data_dir.display(),
            s.keyspace()
        ),
    }
    println!(
        "{:<14} {:>10}  {:<64}  {}",
        "projection",
        "records",
        "digest (rebuilt)",
        if verify { "live" } else { "" }
    );
    let mut same = true;
    for ((name, n, digest), (_, live_n, live_digest)) in rebuilt.iter().zip(&current) {
        let verdict = if !verify {
            String::new()
        } else if digest == live_digest && n == live_n {
            "identical".to_owned()
        } else {
            same = false;
            format!("DIFFERS ({live_n} records, {live_digest})")
        };
        println!("{name:<14} {n:>10}  {digest}  {verdict}");
    }
    drop(log);
    // The only kind without the `cql` feature.
    #[allow(irrefutable_let_patterns)]
    if let Fresh::Embedded(f) = fresh {
        f.destroy()?;
    }
    if verify {
        if same {
            println!("verify: the live projections are identical to a rebuild from the log");
        } else {
            bail!("verify: the live projections differ from a rebuild from the log");
        }
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
