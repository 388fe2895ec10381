//! Reads one device's backlog of 100,000 entries in pages, from the embedded store and
//! from the CQL store, and reports the time and how much the process grew while reading:
//! a page at a time, memory stays bounded whatever the backlog's length (the same read of
//! a tenth as many entries is shown beside it).
//!
//! `bench/backlog.sh` runs it (it starts Cassandra with scripts/cassandra-up unless
//! `HERALD_CASSANDRA` names one):
//!
//! ```sh
//! cargo run --release -p herald-projections --features cql --example backlog -- \
//!     --cassandra 127.0.0.1:19042 --entries 100000 --page 256
//! ```

use std::time::Instant;

use herald_projections::embedded::{EmbeddedStore, open_database};
use herald_projections::model::InboxEntry;
use herald_projections::view::{Store, Writes};

/// Entries written per commit.
const WRITE_BATCH: u64 = 5_000;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Writes `n` entries of `device` (seqs 1..=n).
fn fill(store: &dyn Store, device: &str, n: u64) -> anyhow::Result<()> {
    let mut seq = 1;
    let mut offset = store.checkpoint(0)?;
    while seq <= n {
        let mut w = Writes::default();
        let end = (seq + WRITE_BATCH).min(n + 1);
        for s in seq..end {
            w.entries.insert(
                (device.to_owned(), s),
                Some(InboxEntry {
                    seq: s,
                    message_id: format!("01890000-0000-7000-8000-{s:012}"),
                    ts_ms: 1_800_000_000_000,
                    expires_at_ms: u64::MAX / 2,
                    received: false,
                }),
            );
        }
        offset += 1;
        store.commit(&w, 0, offset)?;
        seq = end;
    }
    Ok(())
}

/// Reads the whole backlog in pages; (entries, seconds, peak RSS growth in bytes).
fn read_all(store: &dyn Store, device: &str, page: usize) -> anyhow::Result<(u64, f64, u64)> {
    let base = rss_bytes();
    let mut peak = base;
    let started = Instant::now();
    let (mut after, mut count) = (0, 0u64);
    loop {
        let entries = store.inbox_page(device, after, page)?;
        let Some(last) = entries.last() else { break };
        anyhow::ensure!(last.seq == after + entries.len() as u64, "seqs are dense");
        after = last.seq;
        count += entries.len() as u64;
        peak = peak.max(rss_bytes());
    }
    Ok((
        count,
        started.elapsed().as_secs_f64(),
        peak.saturating_sub(base),
    ))
}

fn report(store_name: &str, store: &dyn Store, n: u64, page: usize) -> anyhow::Result<()> {
    for (device, entries) in [("small", n / 10), ("big", n)] {
        let started = Instant::now();
        fill(store, device, entries)?;
        let wrote = started.elapsed().as_secs_f64();
        let (count, secs, grew) = read_all(store, device, page)?;
        anyhow::ensure!(count == entries, "read {count} of {entries}");
        println!(
            "| backlog of {entries} entries, one device, pages of {page} | {store_name} | {secs:.2} s | {:.0} entries/s | {:.1} MiB | written in {wrote:.1} s |",
            entries as f64 / secs,
            grew as f64 / (1024.0 * 1024.0),
        );
    }
    // For contrast: the big backlog in one request, which a paged reader never makes.
    let (count, secs, grew) = read_all(store, "big", n as usize)?;
    anyhow::ensure!(count == n, "read {count} of {n}");
    println!(
        "| backlog of {n} entries, one device, in one request (for contrast) | {store_name} | {secs:.2} s | {:.0} entries/s | {:.1} MiB | |",
        n as f64 / secs,
        grew as f64 / (1024.0 * 1024.0),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let n: u64 = arg("--entries").map_or(Ok(100_000), |v| v.parse())?;
    let page: usize = arg("--page").map_or(Ok(256), |v| v.parse())?;
    println!(
        "| read | store | time | rate | peak RSS growth while reading | |\n| --- | --- | --- | --- | --- | --- |"
    );
    let dir = tempfile::tempdir()?;
    let embedded = EmbeddedStore::open(open_database(dir.path())?, "")?;
    report("embedded (fjall)", &embedded, n, page)?;
    #[cfg(feature = "cql")]
    if let Some(addr) = arg("--cassandra").or_else(|| std::env::var("HERALD_CASSANDRA").ok()) {
        use herald_projections::cql::{CqlConfig, CqlStore};
        let store = CqlStore::connect(&CqlConfig::new(&addr, "backlog_bench"))?;
        store.truncate()?;
        report(&format!("CQL (Cassandra at {addr})"), &store, n, page)?;
    }
    Ok(())
}
