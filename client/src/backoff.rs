//! Reconnect delays: exponential, bounded and jittered, without I/O or a clock.
//!
//! The driver asks for the next delay after each failed or lost connection and resets
//! the schedule once a connection has proved healthy. Randomness comes from a seed so a
//! failing run can be replayed.

use std::time::Duration;

/// Reconnect schedule settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackoffOptions {
    /// The delay before the first retry (before jitter). Doubles with each further
    /// failure.
    pub initial_delay: Duration,
    /// The longest delay between two attempts (before jitter).
    pub max_delay: Duration,
    /// How long a connection must stay up for the schedule to start again from
    /// `initial_delay` once it breaks; shorter connections keep backing off. Zero (the
    /// default) starts again after every established connection, so each outage is
    /// retried from `initial_delay` however often the gateway restarts. A few
    /// seconds here makes two processes that keep taking one device's connection over
    /// from each other (a takeover looks like any lost connection) slow down instead of
    /// flapping, at the cost of slower recovery from a gateway that restarts often.
    pub reset_after: Duration,
    /// Seed of the jitter; `None` draws one at start. Set it to replay a run.
    pub jitter_seed: Option<u64>,
}

impl Default for BackoffOptions {
    fn default() -> Self {
        BackoffOptions {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            reset_after: Duration::ZERO,
            jitter_seed: None,
        }
    }
}

/// The delay schedule: attempt `n` (from 0) waits a uniformly drawn time in
/// `[d/2, d]`, where `d = min(initial_delay * 2^n, max_delay)`. Half of the delay is
/// jitter so that many devices cut off by one gateway restart do not all come back in
/// the same millisecond, and half is kept so that none retries at once.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial_delay: Duration,
    max_delay: Duration,
    attempt: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// A schedule starting at `initial_delay`, bounded by `max_delay`, with jitter drawn
    /// from `seed`.
    pub fn new(initial_delay: Duration, max_delay: Duration, seed: u64) -> Backoff {
        Backoff {
            initial_delay,
            max_delay: max_delay.max(initial_delay),
            attempt: 0,
            rng: SplitMix64(seed),
        }
    }

    /// The delay to wait before the next attempt; each call moves one step along the
    /// schedule.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        // Stop counting once the ceiling is reached, so the shift below never overflows.
        if ceiling < self.max_delay {
            self.attempt += 1;
        }
        let half = ceiling / 2;
        let span_ns = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter_ns = if span_ns == 0 {
            0
        } else {
            self.rng.next() % (span_ns + 1)
        };
        let delay = half + Duration::from_nanos(jitter_ns);
        debug_assert!(delay <= ceiling && delay >= half);
        delay
    }

    /// Starts the schedule again from `initial_delay`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The upper bound of the next delay.
    fn ceiling(&self) -> Duration {
        // 2^20 * initial exceeds any sensible maximum; past it the maximum applies.
        let factor = 1u32 << self.attempt.min(20);
        self.initial_delay
            .checked_mul(factor)
            .map_or(self.max_delay, |d| d.min(self.max_delay))
    }
}

/// A small, fast generator; good enough for jitter, not for secrets.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A seed from the standard library's per-process random hasher keys, so the crate
/// needs no random-number dependency.
pub(crate) fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    RandomState::new().hash_one(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_within_jitter_bounds_and_stops_at_the_maximum() {
        let mut b = Backoff::new(100 * MS, 30_000 * MS, 7);
        let mut ceiling = 100 * MS;
        for _ in 0..40 {
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside [{ceiling:?}/2, {ceiling:?}]"
            );
            ceiling = (ceiling * 2).min(30_000 * MS);
        }
        // Far along the schedule every delay is within the last band.
        let d = b.next_delay();
        assert!(d >= 15_000 * MS && d <= 30_000 * MS, "{d:?}");
    }

    #[test]
    fn reset_starts_again_from_the_initial_delay() {
        let mut b = Backoff::new(100 * MS, 30_000 * MS, 1);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        let d = b.next_delay();
        assert!(d >= 50 * MS && d <= 100 * MS, "{d:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let mut a = Backoff::new(100 * MS, 30_000 * MS, 42);
        let mut b = Backoff::new(100 * MS, 30_000 * MS, 42);
        let mut c = Backoff::new(100 * MS, 30_000 * MS, 43);
        let xs: Vec<_> = (0..10).map(|_| a.next_delay()).collect();
        let ys: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        let zs: Vec<_> = (0..10).map(|_| c.next_delay()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn jitter_spreads_devices_apart() {
        let firsts: std::collections::HashSet<_> = (0..50)
            .map(|seed| Backoff::new(100 * MS, 30_000 * MS, seed).next_delay())
            .collect();
        assert!(firsts.len() > 40, "{} distinct of 50", firsts.len());
    }

    #[test]
    fn a_maximum_below_the_initial_delay_is_raised_to_it() {
        let mut b = Backoff::new(100 * MS, 10 * MS, 3);
        for _ in 0..5 {
            assert!(b.next_delay() <= 100 * MS);
        }
    }

    #[test]
    fn zero_delays_are_allowed() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO, 3);
        assert_eq!(b.next_delay(), Duration::ZERO);
    }
}
