//! Admission: whether a listener takes one more connection, and the ticket that gives
//! its share back when the connection ends.
//!
//! Every listener has a [`Gate`] with three caps ([`Caps`]): connections held, those of
//! them not yet authenticated, and unauthenticated ones from one source. A TCP listener's
//! gate also draws one descriptor per connection from the process's [`FdBudget`], which
//! leaves a reserve for the log, the store and outbound clients, so no listener can
//! starve the rest of the process. What a gate refuses is closed at once and counted
//! (`herald_listener_refused_total{listener, reason}`); nothing is logged per refusal.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::fds::FdBudget;

/// A listener's caps. Unit: connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Most connections the listener holds at once.
    pub max_connections: usize,
    /// Most of them not yet authenticated (a device before its CONNACK, a link before its
    /// TLS handshake; every HTTP connection, since HTTP authenticates requests, not
    /// connections).
    pub max_unauthenticated: usize,
    /// Most unauthenticated connections from one source: an IPv4 address, or an IPv6 /64
    /// (one host may hold a whole /64).
    pub max_unauthenticated_per_source: usize,
}

/// Why a gate refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refused {
    /// The listener holds `max_connections`.
    Connections,
    /// The listener holds `max_unauthenticated` connections that have not authenticated.
    Unauthenticated,
    /// The source holds `max_unauthenticated_per_source` of them.
    PerSource,
    /// The process has no file descriptor to spare beyond its reserve.
    Fds,
}

impl Refused {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Connections => "max_connections",
            Refused::Unauthenticated => "max_unauthenticated",
            Refused::PerSource => "max_unauthenticated_per_source",
            Refused::Fds => "reserved_fds",
        }
    }
}

/// Where a connection comes from, as the per-source cap counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source of `peer`: its IPv4 address (also when mapped into IPv6), or the /64
    /// of its IPv6 address.
    pub fn of(peer: SocketAddr) -> Self {
        match peer.ip() {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Source(IpAddr::V6(std::net::Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    held: usize,
    unauthenticated: usize,
    per_source: HashMap<Source, usize>,
}

/// One listener's admission state. Share it in an `Arc`.
#[derive(Debug)]
pub struct Gate {
    name: &'static str,
    caps: Caps,
    fds: Option<FdBudget>,
    counts: Mutex<Counts>,
    /// Whether the accept loop runs and is not backing off from an accept error.
    accepting: AtomicBool,
    /// Refusals since the last summary line, and when that line was written.
    refused_since_log: AtomicUsize,
    last_log_ms: AtomicU64,
}

/// A listener's state, for `/readyz`.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct ListenerHealth {
    /// The listener (`http`, `devices`, `link`, `metrics`).
    pub name: &'static str,
    /// Its accept loop runs and is not backing off from an accept error (such as the
    /// process being out of file descriptors).
    pub accepting: bool,
    /// Connections held.
    pub connections: usize,
    /// Of those, not yet authenticated.
    pub unauthenticated: usize,
    /// `max_connections`.
    pub max_connections: usize,
}

/// How often at most a gate writes its summary of refusals, in milliseconds.
const REFUSAL_LOG_EVERY_MS: u64 = 10_000;

impl Gate {
    /// A gate named `name` (the metric label) with `caps`; a TCP listener's gate takes a
    /// descriptor per connection from `fds`.
    pub fn new(name: &'static str, caps: Caps, fds: Option<FdBudget>) -> Arc<Self> {
        Arc::new(Gate {
            name,
            caps,
            fds,
            counts: Mutex::new(Counts::default()),
            accepting: AtomicBool::new(false),
            refused_since_log: AtomicUsize::new(0),
            last_log_ms: AtomicU64::new(0),
        })
    }

    /// The listener's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its caps.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `peer` as unauthenticated, or says why not (and counts
    /// the refusal). The ticket gives everything back when dropped.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Ticket, Refused> {
        let source = Source::of(peer);
        let result = self.try_admit(source);
        if let Err(why) = result {
            herald_telemetry::metrics::listener_refused(self.name, why.as_str());
            self.note_refusal(why);
        }
        result.map(|fd| {
            herald_telemetry::metrics::listener_connections(self.name, 1);
            Ticket {
                gate: self.clone(),
                source: Some(source),
                fd,
            }
        })
    }

    fn try_admit(&self, source: Source) -> Result<bool, Refused> {
        let mut c = self.counts();
        if c.held >= self.caps.max_connections {
            return Err(Refused::Connections);
        }
        if c.unauthenticated >= self.caps.max_unauthenticated {
            return Err(Refused::Unauthenticated);
        }
        let from_source = c.per_source.get(&source).copied().unwrap_or(0);
        if from_source >= self.caps.max_unauthenticated_per_source {
            return Err(Refused::PerSource);
        }
        let fd = match &self.fds {
            Some(fds) if !fds.try_take() => return Err(Refused::Fds),
            Some(_) => true,
            None => false,
        };
        c.held += 1;
        c.unauthenticated += 1;
        *c.per_source.entry(source).or_insert(0) += 1;
        Ok(fd)
    }

    /// Writes one line about refusals at most every ten seconds, however many there are.
    fn note_refusal(&self, why: Refused) {
        let n = self.refused_since_log.fetch_add(1, Ordering::Relaxed) + 1;
        let now = crate::now_ms();
        let last = self.last_log_ms.load(Ordering::Relaxed);
        // 0: nothing written yet.
        if (last == 0 || now.saturating_sub(last) >= REFUSAL_LOG_EVERY_MS)
            && self
                .last_log_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.refused_since_log.store(0, Ordering::Relaxed);
            tracing::warn!(
                listener = self.name,
                refused = n,
                latest = why.as_str(),
                "refusing connections over the listener's caps (counted in herald_listener_refused_total)"
            );
        }
    }

    fn unauthenticated_done(&self, source: Source) {
        let mut c = self.counts();
        c.unauthenticated = c.unauthenticated.saturating_sub(1);
        if let Some(n) = c.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&source);
            }
        }
    }

    fn release(&self, source: Option<Source>, fd: bool) {
        if let Some(source) = source {
            self.unauthenticated_done(source);
        }
        self.counts().held -= 1;
        if fd && let Some(fds) = &self.fds {
            fds.give_back();
        }
        herald_telemetry::metrics::listener_connections(self.name, -1);
    }

    /// Marks the accept loop as running (or backing off, or stopped).
    pub fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::Relaxed);
    }

    /// The listener's state now.
    pub fn health(&self) -> ListenerHealth {
        let c = self.counts();
        ListenerHealth {
            name: self.name,
            accepting: self.accepting.load(Ordering::Relaxed),
            connections: c.held,
            unauthenticated: c.unauthenticated,
            max_connections: self.caps.max_connections,
        }
    }
}

/// A connection's place in its gate: unauthenticated until [`Ticket::authenticated`],
/// given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    /// The source, while the connection is unauthenticated.
    source: Option<Source>,
    /// Whether it holds a descriptor of the budget.
    fd: bool,
}

impl Ticket {
    /// The connection authenticated: it no longer counts against the unauthenticated
    /// caps (it still holds its place among the connections).
    pub fn authenticated(&mut self) {
        if let Some(source) = self.source.take() {
            self.gate.unauthenticated_done(source);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.release(self.source.take(), self.fd);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn caps(max: usize, unauth: usize, per_source: usize) -> Caps {
        Caps {
            max_connections: max,
            max_unauthenticated: unauth,
            max_unauthenticated_per_source: per_source,
        }
    }

    #[test]
    fn each_cap_refuses_at_its_bound_and_gives_back_on_drop() {
        let gate = Gate::new("t", caps(5, 3, 2), None);
        // Per source: the third unauthenticated connection from one address is refused,
        // another address is not.
        let a1 = gate.admit(addr("10.0.0.1:1")).unwrap();
        let mut a2 = gate.admit(addr("10.0.0.1:2")).unwrap();
        assert_eq!(
            gate.admit(addr("10.0.0.1:3")).unwrap_err(),
            Refused::PerSource
        );
        let b1 = gate.admit(addr("10.0.0.2:1")).unwrap();
        // In total: three unauthenticated at most.
        assert_eq!(
            gate.admit(addr("10.0.0.3:1")).unwrap_err(),
            Refused::Unauthenticated
        );
        // Authenticating frees the unauthenticated places, not the connection's.
        a2.authenticated();
        a2.authenticated();
        let a3 = gate.admit(addr("10.0.0.1:3")).unwrap();
        let mut c1 = gate.admit(addr("10.0.0.4:1"));
        assert_eq!(c1.as_ref().unwrap_err(), &Refused::Unauthenticated);
        let mut b1 = b1;
        b1.authenticated();
        c1 = gate.admit(addr("10.0.0.4:1"));
        let mut c1 = c1.unwrap();
        c1.authenticated();
        assert_eq!(gate.health().connections, 5);
        // In all: five connections at most, authenticated or not.
        assert_eq!(
            gate.admit(addr("10.0.0.5:1")).unwrap_err(),
            Refused::Connections
        );
        drop((a1, a3));
        let h = gate.health();
        assert_eq!((h.connections, h.unauthenticated), (3, 0));
        drop((a2, b1, c1));
        let h = gate.health();
        assert_eq!((h.connections, h.unauthenticated), (0, 0));
        assert!(gate.counts().per_source.is_empty());
    }

    #[test]
    fn the_fd_budget_is_shared_by_every_gate_that_draws_on_it() {
        let fds = FdBudget::fixed(2);
        let g1 = Gate::new("one", caps(10, 10, 10), Some(fds.clone()));
        let g2 = Gate::new("two", caps(10, 10, 10), Some(fds.clone()));
        let x = g1.admit(addr("10.0.0.1:1")).unwrap();
        let _y = g2.admit(addr("10.0.0.2:1")).unwrap();
        assert_eq!(g1.admit(addr("10.0.0.3:1")).unwrap_err(), Refused::Fds);
        assert_eq!(g2.admit(addr("10.0.0.3:1")).unwrap_err(), Refused::Fds);
        drop(x);
        assert!(g2.admit(addr("10.0.0.3:1")).is_ok());
        // A gate without the budget (a UDP listener) does not draw on it.
        let udp = Gate::new("udp", caps(10, 10, 10), None);
        assert!(udp.admit(addr("10.0.0.3:1")).is_ok());
    }

    #[test]
    fn sources_are_v4_addresses_and_v6_slash_64s() {
        assert_eq!(
            Source::of(addr("[::ffff:10.1.2.3]:5")),
            Source::of(addr("10.1.2.3:6"))
        );
        assert_eq!(
            Source::of(addr("[2001:db8:1:2:aaaa::1]:5")),
            Source::of(addr("[2001:db8:1:2:bbbb::9]:6"))
        );
        assert_ne!(
            Source::of(addr("[2001:db8:1:2::1]:5")),
            Source::of(addr("[2001:db8:1:3::1]:5"))
        );
    }
}
