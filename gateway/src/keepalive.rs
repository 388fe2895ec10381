//! The keep-alive policy: which interval herald asks of a device, by the network type
//! it reports, and the bounds every interval is held to.
//!
//! A carrier NAT forgets an idle mapping after a few minutes on some networks and half
//! an hour on others, and every heartbeat wakes the phone's radio: the right interval is
//! the longest one the path allows. The table gives a safe start per network; the SDK's
//! adaptive heartbeat learns the rest.

use std::collections::BTreeMap;

pub use herald_schemas::events::NETWORKS;

/// The keep-alive policy of a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepAlivePolicy {
    /// The interval suggested per network type, in seconds (`unknown` for the rest).
    pub by_network: BTreeMap<String, u16>,
    /// No keep-alive is shorter than this, in seconds.
    pub min_s: u16,
    /// No keep-alive is longer than this, in seconds.
    pub max_s: u16,
}

impl Default for KeepAlivePolicy {
    fn default() -> Self {
        let by_network = [
            ("wifi", 300),
            ("5g", 300),
            ("4g", 300),
            ("3g", 240),
            ("2g", 180),
            ("unknown", 240),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_owned(), s))
        .collect();
        KeepAlivePolicy {
            by_network,
            min_s: 30,
            max_s: 3600,
        }
    }
}

impl KeepAlivePolicy {
    /// The network type a device reported, or `unknown` if it named none herald knows.
    pub fn network(reported: Option<&str>) -> &'static str {
        reported
            .and_then(|r| NETWORKS.iter().copied().find(|n| n.eq_ignore_ascii_case(r)))
            .unwrap_or("unknown")
    }

    /// The interval suggested for `network`, within the bounds.
    pub fn suggest(&self, network: &str) -> u16 {
        let s = self
            .by_network
            .get(network)
            .or_else(|| self.by_network.get("unknown"))
            .copied()
            .unwrap_or(self.min_s);
        self.clamp(s)
    }

    /// The keep-alive an MQTT 5 device gets (its CONNACK's Server Keep Alive): the one
    /// it asked for held to the bounds, or, if it asked for none (0), the table's.
    pub fn settle(&self, requested_s: u16, network: &str) -> u16 {
        if requested_s == 0 {
            self.suggest(network)
        } else {
            self.clamp(requested_s)
        }
    }

    /// The keep-alive herald enforces on an MQTT 3.1.1 device, which cannot be told
    /// another: its own, never below the lower bound (a longer wait is always safe); 0
    /// stays "none", as 3.1.1 says.
    pub fn settle_v311(&self, requested_s: u16) -> u16 {
        if requested_s == 0 {
            0
        } else {
            requested_s.max(self.min_s)
        }
    }

    fn clamp(&self, s: u16) -> u16 {
        s.clamp(self.min_s, self.max_s.max(self.min_s))
    }

    /// Checks the policy, naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_s == 0 {
            return Err("keep_alive_min_s must be at least 1".into());
        }
        if self.max_s < self.min_s {
            return Err("keep_alive_max_s must not be below keep_alive_min_s".into());
        }
        for (network, s) in &self.by_network {
            if !NETWORKS.contains(&network.as_str()) {
                return Err(format!(
                    "keep_alive: unknown network {network:?} (one of {})",
                    NETWORKS.join(", ")
                ));
            }
            if *s < self.min_s || *s > self.max_s {
                return Err(format!(
                    "keep_alive.{network} = {s} is outside keep_alive_min_s..=keep_alive_max_s"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_and_the_bounds() {
        let p = KeepAlivePolicy::default();
        assert_eq!(p.settle(0, "2g"), 180);
        assert_eq!(p.settle(0, "wifi"), 300);
        assert_eq!(p.settle(0, KeepAlivePolicy::network(Some("LTE"))), 240);
        assert_eq!(p.settle(5, "wifi"), 30);
        assert_eq!(p.settle(60_000, "wifi"), 3600);
        assert_eq!(p.settle(900, "3g"), 900);
        assert_eq!(p.settle_v311(0), 0);
        assert_eq!(p.settle_v311(10), 30);
        assert_eq!(p.settle_v311(60_000), 60_000);
        assert_eq!(KeepAlivePolicy::network(Some("WiFi")), "wifi");
        assert!(p.validate().is_ok());
        let bad = KeepAlivePolicy {
            min_s: 200,
            ..KeepAlivePolicy::default()
        };
        assert!(bad.validate().is_err());
    }
}
