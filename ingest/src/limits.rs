//! Per-app rate limits: token buckets for pushes per second and broadcasts per minute.
//!
//! An app's limits are in its projection (`App::limits`, set by the admin with an
//! `AppLimitsSet` event), each unset one taken from the deployment's defaults
//! ([`crate::IngestConfig::default_limits`]). The buckets are this process's memory:
//! with several `herald ingest` processes behind a load balancer, each enforces its share
//! of the rate (`1 / share` of it, [`crate::IngestConfig::rate_share`]). With the load
//! spread evenly the total stays within the limit except for the bursts: every bucket
//! starts full, so over any window the processes together admit at most the limit plus
//! one window's worth (what the buckets hold). A client that reaches only some of the
//! processes gets less than its limit, never more.
//!
//! Time is passed in, so the buckets are tested without a clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a bucket limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rate {
    /// Pushes of any kind, per second; the bucket holds one second's worth.
    Pushes,
    /// Broadcasts, per minute; the bucket holds one minute's worth.
    Broadcasts,
}

impl Rate {
    fn window(self) -> Duration {
        match self {
            Rate::Pushes => Duration::from_secs(1),
            Rate::Broadcasts => Duration::from_secs(60),
        }
    }

    /// The metric label and the config key's stem.
    pub fn as_str(self) -> &'static str {
        match self {
            Rate::Pushes => "pushes_per_s",
            Rate::Broadcasts => "broadcasts_per_min",
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Every app's buckets in this process.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<(String, Rate), Bucket>>,
}

impl Limiter {
    /// Takes one token from `app_id`'s `rate` bucket, which admits `per_window` per
    /// window (this process's share of it: `per_window / share`, at least one). `Err`
    /// says how long until a token is there.
    pub fn take(
        &self,
        app_id: &str,
        rate: Rate,
        per_window: u32,
        share: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        let capacity = (f64::from(per_window) / f64::from(share.max(1))).max(1.0);
        let per_s = capacity / rate.window().as_secs_f64();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry((app_id.to_owned(), rate)).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_s).min(capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / per_s))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_burst_gets_one_window_then_the_rate() {
        let l = Limiter::default();
        let t0 = Instant::now();
        // 10 a second: ten at once, the eleventh waits a tenth of a second.
        for _ in 0..10 {
            assert!(l.take("a", Rate::Pushes, 10, 1, t0).is_ok());
        }
        let wait = l.take("a", Rate::Pushes, 10, 1, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        assert!(l.take("a", Rate::Pushes, 10, 1, t0 + wait).is_ok());
        // Another app and another rate have buckets of their own.
        assert!(l.take("b", Rate::Pushes, 10, 1, t0).is_ok());
        assert!(l.take("a", Rate::Broadcasts, 2, 1, t0).is_ok());
        assert!(l.take("a", Rate::Broadcasts, 2, 1, t0).is_ok());
        let wait = l.take("a", Rate::Broadcasts, 2, 1, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(30));
    }

    #[test]
    fn over_a_long_run_the_rate_holds() {
        let l = Limiter::default();
        let t0 = Instant::now();
        // 2,000 tries over 10 s against 50 a second: 50 at once, then 50 a second.
        let admitted = (0..2000)
            .filter(|i| {
                l.take("a", Rate::Pushes, 50, 1, t0 + Duration::from_millis(i * 5))
                    .is_ok()
            })
            .count();
        assert!((549..=551).contains(&admitted), "{admitted}");
    }

    #[test]
    fn each_process_takes_its_share() {
        let l = Limiter::default();
        let t0 = Instant::now();
        let admitted = (0..100)
            .filter(|_| l.take("a", Rate::Pushes, 100, 4, t0).is_ok())
            .count();
        assert_eq!(admitted, 25);
        // A share never rounds down to nothing.
        let l = Limiter::default();
        assert!(l.take("a", Rate::Pushes, 1, 4, t0).is_ok());
    }
}
