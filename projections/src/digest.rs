//! Digests of the projected state that do not depend on the store that holds it, so a
//! rebuild into one store can be compared with another (`herald rebuild`, `herald
//! verify`), and the CQL store with the embedded one.
//!
//! Each projection's rows are hashed in key order (SHA-256 over each key and value as
//! JSON, each preceded by its length): two states with the same rows have the same
//! digests, whatever wrote them.

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::memory::MemState;

/// How long after an inbox entry expires a store may still hold it. The CQL store gives
/// inbox rows a TTL of the entry's remaining life plus this; the digests leave out the
/// entries past it, which readers skip anyway, so a store that has dropped them and one
/// that has not compare equal.
pub const INBOX_TTL_GRACE_MS: u64 = 3_600_000;

/// One projection's digest: its name, how many rows it holds, and the SHA-256 of its
/// rows in hex.
pub type Digest = (&'static str, u64, String);

struct Table {
    hasher: Sha256,
    rows: u64,
}

impl Table {
    fn new() -> Self {
        Table {
            hasher: Sha256::new(),
            rows: 0,
        }
    }

    fn row(&mut self, key: &impl Serialize, value: &impl Serialize) {
        // Serializing plain data to JSON cannot fail.
        for part in [
            serde_json::to_vec(key).unwrap_or_default(),
            serde_json::to_vec(value).unwrap_or_default(),
        ] {
            self.hasher.update((part.len() as u64).to_be_bytes());
            self.hasher.update(&part);
        }
        self.rows += 1;
    }

    fn finish(self, name: &'static str) -> Digest {
        let hex = self
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (name, self.rows, hex)
    }
}

fn table<'a, K: Serialize + 'a, V: Serialize + 'a>(
    name: &'static str,
    rows: impl IntoIterator<Item = (&'a K, &'a V)>,
) -> Digest {
    let mut t = Table::new();
    for (k, v) in rows {
        t.row(k, v);
    }
    t.finish(name)
}

/// The digest of each projection of `state` at `now_ms` (the time decides which expired
/// inbox entries are left out; see [`INBOX_TTL_GRACE_MS`]). Checkpoints are left out:
/// compare them separately.
pub fn digests(state: &MemState, now_ms: u64) -> Vec<Digest> {
    let live =
        |e: &crate::model::InboxEntry| e.expires_at_ms.saturating_add(INBOX_TTL_GRACE_MS) > now_ms;
    vec![
        table("apps", &state.apps),
        table("app_by_client", &state.app_by_client),
        table("app_by_key", &state.app_by_key),
        table("devices", &state.devices),
        table("app_devices", state.app_devices.iter().map(|k| (k, &()))),
        table("inbox_heads", &state.heads),
        table("inbox", state.entries.iter().filter(|(_, e)| live(e))),
        table("collapse", &state.collapse),
        table("messages", &state.messages),
        table("payloads", &state.payloads),
        table("presence", &state.presence),
        table("idempotency", &state.idempotency),
        // Totals per app, not rows per partition: a store that counted the devices it
        // had when it began keeping counts (in one row) equals one folded from scratch.
        table("app_device_counts", &app_device_totals(state)),
    ]
}

/// Devices registered per app, summed over every partition's row.
fn app_device_totals(state: &MemState) -> std::collections::BTreeMap<&str, u64> {
    let mut totals = std::collections::BTreeMap::new();
    for ((app, _), n) in &state.app_device_counts {
        *totals.entry(app.as_str()).or_insert(0) += n;
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InboxEntry;

    #[test]
    fn equal_states_have_equal_digests_and_expired_entries_do_not_count() {
        let mut a = MemState::default();
        let entry = |seq, expires_at_ms| InboxEntry {
            seq,
            message_id: format!("m{seq}"),
            ts_ms: 1,
            expires_at_ms,
            received: false,
        };
        a.entries.insert(("d".into(), 1), entry(1, 10_000_000));
        let mut b = a.clone();
        assert_eq!(digests(&a, 0), digests(&b, 0));
        // An entry long expired is left out: a store that dropped it compares equal.
        b.entries.insert(("d".into(), 2), entry(2, 1_000));
        assert_eq!(digests(&a, 5_000_000), digests(&b, 5_000_000));
        // One that is live is not.
        assert_ne!(digests(&a, 0), digests(&b, 0));
        a.app_devices.insert(("a".into(), "d".into()));
        assert_ne!(digests(&a, 0)[4], digests(&b, 0)[4]);
    }
}
