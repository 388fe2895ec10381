//! The adaptive heartbeat: how often an idle device pings, learned per network.
//!
//! A carrier NAT forgets a mapping that stays idle longer than its timeout (minutes on
//! some networks, half an hour on others) and then drops packets silently: no RST, the
//! connection just stops working. Every ping wakes the phone's radio, so the best
//! interval is the longest one the path keeps alive. The device does not know the
//! timeout; it searches for it:
//!
//! 1. Start from the interval learned on this network before, else the server's
//!    suggestion (the registration's `keep_alive_s`, from herald's table by network
//!    type), else [`HeartbeatOptions::initial`].
//! 2. While pings are answered, lengthen: double the interval after
//!    [`HeartbeatOptions::confirmations`] answered pings at it, up to
//!    [`HeartbeatOptions::max`].
//! 3. A ping not answered within [`HeartbeatOptions::pong_timeout`] means the path
//!    died: the interval that failed is an upper bound. The device reconnects at once
//!    (the pushes that went into the dead path are still in its inbox) and continues
//!    between the longest interval that worked and the shortest that failed
//!    (bisection).
//! 4. When those two are within [`HeartbeatOptions::tolerance`] of each other, settle on
//!    the longest that worked: just under the NAT's timeout. A settled interval that
//!    fails later (the network changed) starts the search again below it.
//!
//! The interval is one of silence: a ping is due an interval after the last packet
//! either way (a push refreshes the NAT's mapping as well as a ping does, so a device
//! that gets pushes pings less), and an answered ping proves the path survives that much
//! silence. This module is the decision only (sans-IO, in the device's time); the driver
//! in `device.rs` sends the pings, times the answers and reconnects.

use std::collections::HashMap;
use std::time::Duration;

/// The adaptive heartbeat's settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HeartbeatOptions {
    /// The network the device is on now (`wifi`, `5g`, `4g`, `3g`, `2g`, `unknown`): what
    /// is learned is kept per network, and the gateway is told (it suggests by it).
    pub network: String,
    /// The first interval on a network nothing is known of, when the server suggests
    /// none.
    pub initial: Duration,
    /// The shortest interval tried.
    pub min: Duration,
    /// The longest interval tried; also the keep-alive the device asks the gateway for,
    /// so that the gateway never closes a connection whose pings it lengthens.
    pub max: Duration,
    /// A ping not answered within this means the path is dead.
    pub pong_timeout: Duration,
    /// Answered pings at an interval before it is lengthened.
    pub confirmations: u32,
    /// Settle when the longest interval that worked is within this fraction of the
    /// shortest that failed (0.1: settle at least 90 % of the way to the NAT's timeout).
    pub tolerance: f64,
    /// Simulations only: every duration above (and the server's suggestion) is
    /// multiplied by this to get real time, so a 30-minute NAT can be simulated in
    /// 30 seconds (`1.0 / 60.0`). Real pings are never closer than 1 s.
    pub time_scale: f64,
}

impl Default for HeartbeatOptions {
    fn default() -> Self {
        HeartbeatOptions {
            network: "unknown".into(),
            initial: Duration::from_secs(240),
            min: Duration::from_secs(60),
            max: Duration::from_secs(3600),
            pong_timeout: Duration::from_secs(10),
            confirmations: 2,
            tolerance: 0.1,
            time_scale: 1.0,
        }
    }
}

impl HeartbeatOptions {
    /// Checks the options; the reason names the field.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.min.is_zero() || self.max < self.min {
            return Err("heartbeat: min must be positive and max at least min".into());
        }
        if !(self.initial >= self.min && self.initial <= self.max) {
            return Err("heartbeat: initial must be between min and max".into());
        }
        if self.pong_timeout.is_zero() || self.pong_timeout >= self.min {
            return Err("heartbeat: pong_timeout must be positive and below min".into());
        }
        if self.confirmations == 0 {
            return Err("heartbeat: confirmations must be at least 1".into());
        }
        if !(self.tolerance > 0.0 && self.tolerance < 1.0) {
            return Err("heartbeat: tolerance must be between 0 and 1".into());
        }
        if !(self.time_scale > 0.0 && self.time_scale <= 1.0) {
            return Err("heartbeat: time_scale must be in (0, 1]".into());
        }
        if self.real(self.max) > Duration::from_secs(u64::from(u16::MAX)) {
            return Err("heartbeat: max (times time_scale) must be at most 65535 s".into());
        }
        Ok(())
    }

    /// `d` in real time.
    pub fn real(&self, d: Duration) -> Duration {
        d.mul_f64(self.time_scale)
    }
}

/// What is known of one network's path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Learned {
    /// The longest interval whose pings were answered.
    pub good: Option<Duration>,
    /// The shortest interval whose ping went unanswered.
    pub bad: Option<Duration>,
    /// The search is over: the interval is `good`.
    pub settled: bool,
}

/// The heartbeat's state across connections.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    opts: HeartbeatOptions,
    learned: HashMap<String, Learned>,
    /// The interval in force (device time).
    interval: Duration,
    /// Answered pings at `interval` since it was set.
    answered: u32,
}

impl Heartbeat {
    /// A heartbeat that knows nothing yet.
    pub fn new(opts: HeartbeatOptions) -> Self {
        let interval = opts.initial;
        Heartbeat {
            opts,
            learned: HashMap::new(),
            interval,
            answered: 0,
        }
    }

    /// The options.
    pub fn options(&self) -> &HeartbeatOptions {
        &self.opts
    }

    /// The interval in force, in device time.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The interval in force, in real time (never below 1 s).
    pub fn real_interval(&self) -> Duration {
        self.opts.real(self.interval).max(Duration::from_secs(1))
    }

    /// What is known of the current network.
    pub fn learned(&self) -> Learned {
        self.learned
            .get(&self.opts.network)
            .copied()
            .unwrap_or_default()
    }

    /// The device moved to another network: what was learned of the old one is kept.
    pub fn set_network(&mut self, network: &str, suggestion: Option<Duration>) {
        self.opts.network = network.to_owned();
        self.start(suggestion);
    }

    /// A connection came up; `suggestion` is the server's interval for this network,
    /// if it gave one. Picks the interval to start from.
    pub fn start(&mut self, suggestion: Option<Duration>) {
        let l = self.learned();
        self.answered = 0;
        self.interval = match (l.good, l.bad) {
            (Some(good), _) if l.settled => good,
            (Some(good), Some(bad)) => self.between(good, bad),
            (Some(good), None) => good,
            (None, Some(bad)) => self.clamp(bad / 2),
            (None, None) => self.clamp(suggestion.unwrap_or(self.opts.initial)),
        };
    }

    /// A ping at the current interval was answered.
    pub fn on_pong(&mut self) {
        let interval = self.interval;
        let l = self.learned_mut();
        l.good = Some(l.good.map_or(interval, |g| g.max(interval)));
        if l.bad.is_some_and(|b| b <= interval) {
            // Worked now where it failed before: the earlier failure was something else.
            l.bad = None;
        }
        if l.settled {
            return;
        }
        self.answered += 1;
        if self.answered < self.opts.confirmations {
            return;
        }
        self.answered = 0;
        let l = self.learned();
        let good = l.good.unwrap_or(interval);
        self.interval = match l.bad {
            Some(bad) if self.close_enough(good, bad) => {
                self.learned_mut().settled = true;
                good
            }
            Some(bad) => self.between(good, bad),
            None if interval >= self.opts.max => {
                self.learned_mut().settled = true;
                self.opts.max
            }
            None => self.clamp(interval * 2),
        };
    }

    /// A ping at the current interval went unanswered: the path died (the device
    /// reconnects). Returns the interval to use from now on.
    pub fn on_dead(&mut self) -> Duration {
        let interval = self.interval;
        let min = self.opts.min;
        let l = self.learned_mut();
        l.settled = false;
        l.bad = Some(l.bad.map_or(interval, |b| b.min(interval)));
        if l.good.is_some_and(|g| g >= interval) {
            // What worked before fails now: the path changed. Search again below.
            l.good = None;
        }
        let l = *l;
        self.answered = 0;
        self.interval = match (l.good, l.bad) {
            (Some(good), Some(bad)) if self.close_enough(good, bad) => {
                self.learned_mut().settled = true;
                good
            }
            (Some(good), Some(bad)) => self.between(good, bad),
            (_, Some(bad)) => self.clamp(bad / 2).max(min),
            (_, None) => self.clamp(interval / 2),
        };
        self.interval
    }

    fn close_enough(&self, good: Duration, bad: Duration) -> bool {
        bad <= good || (bad - good).as_secs_f64() <= self.opts.tolerance * bad.as_secs_f64()
    }

    fn between(&self, good: Duration, bad: Duration) -> Duration {
        self.clamp((good + bad) / 2)
    }

    fn clamp(&self, d: Duration) -> Duration {
        d.clamp(self.opts.min, self.opts.max)
    }

    fn learned_mut(&mut self) -> &mut Learned {
        self.learned.entry(self.opts.network.clone()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Drives a heartbeat against a path that forgets after `nat` idle: a ping at an
    /// interval below it is answered, at or above it is not. Returns the settled interval
    /// and the number of dead paths on the way.
    fn settle(nat: Duration, suggestion: Option<Duration>) -> (Duration, u32) {
        let mut hb = Heartbeat::new(HeartbeatOptions::default());
        hb.start(suggestion);
        let mut deaths = 0;
        for _ in 0..200 {
            if hb.learned().settled {
                return (hb.interval(), deaths);
            }
            if hb.interval() < nat {
                hb.on_pong();
            } else {
                hb.on_dead();
                deaths += 1;
                hb.start(suggestion);
            }
        }
        panic!("never settled: {:?}", hb.learned());
    }

    #[test]
    fn settles_just_under_the_nat_timeout() {
        for nat_min in [5u64, 15, 30] {
            let nat = secs(nat_min * 60);
            let (settled, deaths) = settle(nat, Some(secs(300)));
            assert!(settled < nat, "{nat_min} min: {settled:?}");
            assert!(
                settled.as_secs_f64() >= 0.85 * nat.as_secs_f64(),
                "{nat_min} min: settled at {settled:?}"
            );
            assert!(deaths <= 4, "{nat_min} min: {deaths} dead paths");
        }
    }

    #[test]
    fn remembers_each_network_and_starts_over_when_a_path_changes() {
        let mut hb = Heartbeat::new(HeartbeatOptions::default());
        hb.start(None);
        // Learn wifi up to its ceiling: everything is answered.
        for _ in 0..20 {
            hb.on_pong();
        }
        assert!(hb.learned().settled);
        assert_eq!(hb.interval(), secs(3600));
        // On 3g, start from the suggestion; wifi's interval is kept.
        hb.set_network("3g", Some(secs(240)));
        assert_eq!(hb.interval(), secs(240));
        hb.set_network("unknown", None);
        assert_eq!(hb.interval(), secs(3600));
        // The settled interval dies: search below it.
        let next = hb.on_dead();
        assert_eq!(next, secs(1800));
        assert!(!hb.learned().settled);
    }

    #[test]
    fn never_leaves_its_bounds() {
        let mut hb = Heartbeat::new(HeartbeatOptions::default());
        hb.start(Some(secs(5)));
        assert_eq!(hb.interval(), secs(60));
        for _ in 0..10 {
            hb.on_dead();
            assert!(hb.interval() >= secs(60));
        }
        hb.start(Some(secs(100_000)));
        assert!(hb.interval() <= secs(3600));
    }
}
