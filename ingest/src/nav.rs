//! Navigation: which gateway a device should connect to.
//!
//! A consistent hash ring with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2016).
//! Every live gateway owns [`VNODES`] points on a 64-bit ring; a device hashes to a point
//! and walks clockwise to the first gateway whose load is under the cap
//! `ceil((1 + ε) · devices / gateways)`. So no gateway holds more than (1 + ε) times the
//! mean, and the walk is short because the ring spreads gateways evenly.
//!
//! The ring remembers where it placed each device, so an answer is stable: a device keeps
//! its gateway for as long as that gateway is live. When a gateway leaves, only its own
//! devices are placed again; everybody else stays where they are. When a gateway joins,
//! nobody moves (no reconnect storm): new placements fill it first, because the others are
//! nearer their caps.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// Points each gateway owns on the ring. More points spread the load more evenly and make
/// the clockwise walk shorter; 128 keep the ring of 100 gateways at 12,800 points.
pub const VNODES: u32 = 128;

/// The default load slack ε: no gateway holds more than 1.1× the mean.
pub const DEFAULT_EPSILON: f64 = 0.1;

/// The ring, with every placement it has made.
#[derive(Debug, Clone)]
pub struct Ring {
    epsilon: f64,
    /// Ring point -> gateway.
    points: BTreeMap<u64, Arc<str>>,
    /// Live gateway -> how many devices it has been given.
    loads: BTreeMap<Arc<str>, usize>,
    /// Device -> its gateway.
    placed: HashMap<Box<str>, Arc<str>>,
}

impl Default for Ring {
    fn default() -> Self {
        Ring::new(DEFAULT_EPSILON)
    }
}

/// A stable 64-bit position on the ring: the same on every platform and in every build.
fn point(bytes: &[u8]) -> u64 {
    let d = Sha256::digest(bytes);
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

fn vnode_point(gateway: &str, i: u32) -> u64 {
    let mut key = Vec::with_capacity(gateway.len() + 5);
    key.extend_from_slice(gateway.as_bytes());
    key.push(0);
    key.extend_from_slice(&i.to_be_bytes());
    point(&key)
}

impl Ring {
    /// An empty ring whose gateways hold at most `(1 + epsilon)` times the mean load.
    /// `epsilon` is clamped to at least 0.01 so a placement always finds room.
    pub fn new(epsilon: f64) -> Self {
        Ring {
            epsilon: if epsilon.is_finite() {
                epsilon.max(0.01)
            } else {
                DEFAULT_EPSILON
            },
            points: BTreeMap::new(),
            loads: BTreeMap::new(),
            placed: HashMap::new(),
        }
    }

    /// Adds a live gateway; a gateway already on the ring is left as it is. Nobody moves.
    pub fn add_gateway(&mut self, gateway: &str) {
        if self.loads.contains_key(gateway) {
            return;
        }
        let id: Arc<str> = gateway.into();
        for i in 0..VNODES {
            // Two gateways hashing to one point is a 2^-64 event; the later one yields.
            self.points
                .entry(vnode_point(gateway, i))
                .or_insert(id.clone());
        }
        self.loads.insert(id, 0);
    }

    /// Takes a gateway off the ring and places its devices on the others. Returns the
    /// devices that moved, with their new gateway (none when no gateway is left).
    pub fn remove_gateway(&mut self, gateway: &str) -> Vec<(Box<str>, Option<Arc<str>>)> {
        if self.loads.remove(gateway).is_none() {
            return Vec::new();
        }
        self.points.retain(|_, g| &**g != gateway);
        let mut orphans: Vec<Box<str>> = self
            .placed
            .iter()
            .filter(|(_, g)| &***g == gateway)
            .map(|(d, _)| d.clone())
            .collect();
        // A fixed order, so the same membership history gives the same placements.
        orphans.sort_unstable();
        for d in &orphans {
            self.placed.remove(d);
        }
        orphans
            .into_iter()
            .map(|d| {
                let to = self.place(&d);
                (d, to)
            })
            .collect()
    }

    /// The gateway `device` should use: where it already is, or a new placement. `None`
    /// when no gateway is live.
    pub fn place(&mut self, device: &str) -> Option<Arc<str>> {
        if let Some(g) = self.placed.get(device) {
            return Some(g.clone());
        }
        if self.loads.is_empty() {
            return None;
        }
        let cap = self.cap(self.placed.len() + 1);
        let start = point(device.as_bytes());
        let gateway = self
            .points
            .range(start..)
            .chain(self.points.range(..start))
            .map(|(_, g)| g)
            .find(|g| self.loads.get(&***g).is_some_and(|&l| l < cap))
            .cloned()?;
        if let Some(l) = self.loads.get_mut(&gateway) {
            *l += 1;
        }
        self.placed.insert(device.into(), gateway.clone());
        Some(gateway)
    }

    /// Forgets a device (it was deleted), freeing its place.
    pub fn forget(&mut self, device: &str) {
        if let Some(g) = self.placed.remove(device)
            && let Some(l) = self.loads.get_mut(&g)
        {
            *l = l.saturating_sub(1);
        }
    }

    /// Where `device` was placed, if it was.
    pub fn gateway_of(&self, device: &str) -> Option<&str> {
        self.placed.get(device).map(|g| &**g)
    }

    /// Each live gateway's load.
    pub fn loads(&self) -> impl Iterator<Item = (&str, usize)> {
        self.loads.iter().map(|(g, l)| (&**g, *l))
    }

    /// The live gateways.
    pub fn gateways(&self) -> impl Iterator<Item = &str> {
        self.loads.keys().map(|g| &**g)
    }

    /// The most devices one gateway may hold when `devices` are placed.
    fn cap(&self, devices: usize) -> usize {
        let mean = devices as f64 / self.loads.len() as f64;
        ((1.0 + self.epsilon) * mean).ceil().max(1.0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring_of(gateways: usize) -> Ring {
        let mut r = Ring::default();
        for g in 0..gateways {
            r.add_gateway(&format!("gw-{g}"));
        }
        r
    }

    fn device(i: u64) -> String {
        // UUID-shaped, like the ids herald hands out.
        format!(
            "{:08x}-0000-4000-8000-{:012x}",
            i.wrapping_mul(2654435761),
            i
        )
    }

    #[test]
    fn ten_gateways_and_100k_devices_stay_within_1_1_of_the_mean() {
        let mut r = ring_of(10);
        for i in 0..100_000 {
            assert!(r.place(&device(i)).is_some());
        }
        let max = r.loads().map(|(_, l)| l).max().unwrap_or(0);
        let total: usize = r.loads().map(|(_, l)| l).sum();
        assert_eq!(total, 100_000);
        assert!(max as f64 <= 1.1 * 10_000.0, "busiest gateway holds {max}");
        // And the answer is stable.
        assert_eq!(r.place(&device(7)), r.place(&device(7)));
    }

    #[test]
    fn a_ring_without_gateways_places_nobody() {
        let mut r = Ring::default();
        assert_eq!(r.place("d"), None);
        r.add_gateway("a");
        assert_eq!(r.place("d").as_deref(), Some("a"));
        assert_eq!(r.remove_gateway("a"), vec![("d".into(), None)]);
        assert_eq!(r.gateway_of("d"), None);
    }

    #[test]
    fn a_joining_gateway_moves_nobody_and_takes_new_devices() {
        let mut r = ring_of(4);
        for i in 0..4_000 {
            r.place(&device(i));
        }
        let before: Vec<_> = (0..4_000).map(|i| r.place(&device(i))).collect();
        r.add_gateway("gw-new");
        let after: Vec<_> = (0..4_000).map(|i| r.place(&device(i))).collect();
        assert_eq!(before, after);
        let fresh = (4_000..5_000)
            .filter(|&i| r.place(&device(i)).as_deref() == Some("gw-new"))
            .count();
        assert!(
            fresh > 500,
            "the new gateway got {fresh} of 1,000 new devices"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Removing one gateway moves exactly the devices it held; every other device
        /// keeps its gateway, and the loads stay bounded.
        #[test]
        fn removing_a_gateway_moves_only_its_own_devices(
            gateways in 2usize..12,
            devices in 1u64..5_000,
            leaving in 0usize..12,
            seed in any::<u64>(),
        ) {
            let mut r = ring_of(gateways);
            let ids: Vec<String> = (0..devices).map(|i| device(i ^ seed)).collect();
            for d in &ids {
                r.place(d);
            }
            let leaving = format!("gw-{}", leaving % gateways);
            let before: HashMap<&str, String> =
                ids.iter().map(|d| (d.as_str(), r.gateway_of(d).unwrap_or("").to_string())).collect();
            let moved = r.remove_gateway(&leaving);
            let held = before.values().filter(|g| **g == leaving).count();
            prop_assert_eq!(moved.len(), held);
            for d in &ids {
                let now = r.gateway_of(d).unwrap_or("");
                if before[d.as_str()] == leaving {
                    prop_assert_ne!(now, leaving.as_str());
                } else {
                    prop_assert_eq!(now, before[d.as_str()].as_str());
                }
            }
            let n = ids.len() as f64;
            let m = (gateways - 1) as f64;
            let max = r.loads().map(|(_, l)| l).max().unwrap_or(0);
            prop_assert!(max as f64 <= ((1.1 * n / m).ceil()).max(1.0), "max {max}");
        }
    }
}
