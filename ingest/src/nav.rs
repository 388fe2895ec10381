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

    /// The gateway `device` should use: where it already is, or a new placement, which is
    /// remembered. `None` when no gateway is live.
    pub fn place(&mut self, device: &str) -> Option<Arc<str>> {
        if let Some(g) = self.placed.get(device) {
            return Some(g.clone());
        }
        let gateway = self.choose(device)?;
        if let Some(l) = self.loads.get_mut(&gateway) {
            *l += 1;
        }
        self.placed.insert(device.into(), gateway.clone());
        Some(gateway)
    }

    /// Where `device` is, or would be placed now, remembering nothing (for ids that may
    /// not belong to a device at all).
    pub fn peek(&self, device: &str) -> Option<Arc<str>> {
        match self.placed.get(device) {
            Some(g) => Some(g.clone()),
            None => self.choose(device),
        }
    }

    /// The first gateway clockwise from `device` with room under the cap.
    fn choose(&self, device: &str) -> Option<Arc<str>> {
        if self.loads.is_empty() {
            return None;
        }
        let cap = self.cap(self.placed.len() + 1);
        let start = point(device.as_bytes());
        self.points
            .range(start..)
            .chain(self.points.range(..start))
            .map(|(_, g)| g)
            .find(|g| self.loads.get(&***g).is_some_and(|&l| l < cap))
            .cloned()
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

/// Where a device should connect: the gateway's id and addresses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Placement {
    /// The gateway's id.
    pub gateway_id: String,
    /// MQTT over TCP, e.g. `mqtt://host:9493`.
    pub mqtt: String,
    /// MQTT over WebSocket, e.g. `ws://host:8083/mqtt`.
    pub ws: String,
}

/// A gateway navigation has heard from.
#[derive(Debug, Clone)]
struct Known {
    mqtt: String,
    ws: String,
    last_seen: std::time::Instant,
    interval: std::time::Duration,
}

/// Heartbeats missed before a gateway is taken off the ring.
pub const MISSED_HEARTBEATS: u32 = 3;

/// How many records back from the log's end navigation reads at start-up, to learn the
/// gateways that are alive without waiting for their next heartbeat.
pub const FOLLOW_BACK: u64 = 50_000;

/// Navigation: the ring over the gateways whose heartbeats arrived lately.
pub struct Navigator {
    state: std::sync::Mutex<(Ring, HashMap<String, Known>)>,
    fallback: Placement,
}

impl std::fmt::Debug for Navigator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Navigator")
            .field("gateways", &self.live())
            .finish()
    }
}

impl Navigator {
    /// A navigator that answers `fallback` until it has heard from a gateway.
    pub fn new(fallback: Placement) -> Self {
        Navigator {
            state: std::sync::Mutex::new((Ring::default(), HashMap::new())),
            fallback,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Ring, HashMap<String, Known>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A gateway said it is alive, `age` ago.
    pub fn heard(
        &self,
        hb: &herald_schemas::events::GatewayHeartbeat,
        age: std::time::Duration,
        now: std::time::Instant,
    ) {
        if hb.gateway_id.is_empty() || hb.mqtt_url.is_empty() {
            return;
        }
        let interval = std::time::Duration::from_millis(u64::from(hb.interval_ms.max(100)));
        let last_seen = now.checked_sub(age).unwrap_or(now);
        if age > interval * MISSED_HEARTBEATS {
            return;
        }
        let mut st = self.lock();
        let (ring, known) = &mut *st;
        if !known.contains_key(&hb.gateway_id) {
            tracing::info!(gateway = %hb.gateway_id, mqtt = %hb.mqtt_url, "gateway joined navigation");
            ring.add_gateway(&hb.gateway_id);
        }
        let entry = known.entry(hb.gateway_id.clone()).or_insert(Known {
            mqtt: hb.mqtt_url.clone(),
            ws: hb.ws_url.clone(),
            last_seen,
            interval,
        });
        entry.mqtt.clone_from(&hb.mqtt_url);
        entry.ws.clone_from(&hb.ws_url);
        entry.interval = interval;
        entry.last_seen = entry.last_seen.max(last_seen);
    }

    /// Takes gateways that missed [`MISSED_HEARTBEATS`] heartbeats off the ring; returns
    /// their ids. Only their devices move.
    pub fn expire(&self, now: std::time::Instant) -> Vec<String> {
        let mut st = self.lock();
        let (ring, known) = &mut *st;
        let gone: Vec<String> = known
            .iter()
            .filter(|(_, k)| {
                now.saturating_duration_since(k.last_seen) > k.interval * MISSED_HEARTBEATS
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            known.remove(id);
            let moved = ring.remove_gateway(id);
            tracing::warn!(gateway = %id, moved = moved.len(), "gateway left navigation (heartbeats stopped)");
        }
        gone
    }

    /// The gateway `device_id` should use; the placement is remembered (for devices
    /// that exist: remembering every id asked about would let anyone grow it).
    pub fn place(&self, device_id: &str) -> Placement {
        let mut st = self.lock();
        let (ring, known) = &mut *st;
        let g = ring.place(device_id);
        Self::answer(g, known, &self.fallback)
    }

    /// Where `device_id` would be placed now, remembering nothing.
    pub fn peek(&self, device_id: &str) -> Placement {
        let st = self.lock();
        let (ring, known) = &*st;
        Self::answer(ring.peek(device_id), known, &self.fallback)
    }

    fn answer(
        gateway: Option<Arc<str>>,
        known: &HashMap<String, Known>,
        fallback: &Placement,
    ) -> Placement {
        match gateway.and_then(|g| known.get(&*g).map(|k| (g, k))) {
            Some((g, k)) => Placement {
                gateway_id: g.to_string(),
                mqtt: k.mqtt.clone(),
                ws: k.ws.clone(),
            },
            None => fallback.clone(),
        }
    }

    /// The gateways on the ring, with their loads.
    pub fn live(&self) -> Vec<(String, usize)> {
        self.lock()
            .0
            .loads()
            .map(|(g, l)| (g.to_string(), l))
            .collect()
    }

    /// Follows the log: learns gateways from their heartbeats (starting a little before
    /// the end, so gateways alive now are known at once) and expires silent ones, until
    /// `shutdown`.
    pub async fn follow(
        self: std::sync::Arc<Self>,
        log: std::sync::Arc<dyn herald_eventlog::EventLog>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), herald_eventlog::Error> {
        use herald_schemas::events::{self, Kind};
        let mut end = log.durable_end();
        let mut from = end.borrow().saturating_sub(FOLLOW_BACK);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            let records = log.read(from, 4096).await?;
            if let Some(last) = records.last() {
                from = last.offset + 1;
            }
            let now = std::time::Instant::now();
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            for r in &records {
                if let Ok(ev) = events::decode(&r.value)
                    && let Some(Kind::GatewayHeartbeat(hb)) = &ev.kind
                {
                    let age = std::time::Duration::from_millis(wall.saturating_sub(ev.ts_ms));
                    self.heard(hb, age, now);
                }
            }
            self.expire(now);
            if records.is_empty() {
                tokio::select! {
                    r = end.changed() => if r.is_err() { return Ok(()) },
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => if *shutdown.borrow() { return Ok(()) },
                }
            }
        }
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

    fn hb(id: &str) -> herald_schemas::events::GatewayHeartbeat {
        herald_schemas::events::GatewayHeartbeat {
            gateway_id: id.into(),
            mqtt_url: format!("mqtt://{id}:9493"),
            ws_url: format!("ws://{id}:8083/mqtt"),
            connected: 0,
            interval_ms: 1000,
        }
    }

    #[test]
    fn navigation_follows_heartbeats_and_moves_only_a_silent_gateways_devices() {
        use std::time::{Duration, Instant};
        let fallback = Placement {
            gateway_id: "self".into(),
            mqtt: "mqtt://self:9493".into(),
            ws: "ws://self:8083/mqtt".into(),
        };
        let nav = Navigator::new(fallback.clone());
        assert_eq!(
            nav.place("d"),
            fallback,
            "no gateway heard yet: the fallback"
        );
        let t0 = Instant::now();
        for g in ["a", "b", "c"] {
            nav.heard(&hb(g), Duration::ZERO, t0);
        }
        // A heartbeat too old to count is ignored.
        nav.heard(&hb("stale"), Duration::from_secs(10), t0);
        assert_eq!(nav.live().len(), 3);
        // Asking about an id remembers nothing; placing does, and both agree.
        let asked = nav.peek(&device(0));
        assert_eq!(nav.live().iter().map(|(_, l)| l).sum::<usize>(), 0);
        assert_eq!(nav.place(&device(0)), asked);
        let before: Vec<Placement> = (0..300).map(|i| nav.place(&device(i))).collect();
        assert!(
            before
                .iter()
                .all(|p| p.mqtt == format!("mqtt://{}:9493", p.gateway_id))
        );
        // b and c keep beating; a goes quiet.
        let t1 = t0 + Duration::from_millis(2500);
        for g in ["b", "c"] {
            nav.heard(&hb(g), Duration::ZERO, t1);
        }
        assert!(
            nav.expire(t1).is_empty(),
            "2.5 s of silence is under three intervals"
        );
        let t2 = t0 + Duration::from_millis(3500);
        for g in ["b", "c"] {
            nav.heard(&hb(g), Duration::ZERO, t2);
        }
        assert_eq!(nav.expire(t2), vec!["a".to_string()]);
        for (i, was) in before.iter().enumerate() {
            let now = nav.place(&device(i as u64));
            if was.gateway_id == "a" {
                assert_ne!(now.gateway_id, "a");
            } else {
                assert_eq!(&now, was, "a device of a live gateway stays");
            }
        }
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
