//! The process's file descriptors: how many its connections may hold, so that a reserve
//! always stays for the log, the store, outbound clients and the listeners themselves.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The descriptors every TCP listener's connections draw from. Cloning shares it.
#[derive(Debug, Clone)]
pub struct FdBudget {
    inner: Arc<Budget>,
}

#[derive(Debug)]
struct Budget {
    capacity: usize,
    taken: AtomicUsize,
}

/// What the process may open, and what that leaves connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    /// The open-files limit in force (after raising the soft limit to the hard one).
    pub limit: u64,
    /// Descriptors kept out of the connections' budget.
    pub reserved: u64,
}

/// Raises the soft open-files limit to the hard one (what a server should run with) and
/// returns it. The hard limit is the machine's to set (`ulimit -Hn`, systemd's
/// `LimitNOFILE`).
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (l.current, l.maximum)
        && cur < max
    {
        l.current = Some(max);
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::warn!(error = %e, soft = cur, hard = max, "cannot raise the open-files limit");
            return cur;
        }
    }
    // No limit at all is as good as a very large one.
    l.current.unwrap_or(u64::from(u32::MAX))
}

impl FdBudget {
    /// A budget of `capacity` descriptors.
    pub fn fixed(capacity: usize) -> Self {
        FdBudget {
            inner: Arc::new(Budget {
                capacity,
                taken: AtomicUsize::new(0),
            }),
        }
    }

    /// The budget of this process: its open-files limit (raised to the hard limit) less
    /// `reserved`. Fails, naming the key, when the reserve leaves fewer than 64.
    pub fn for_process(reserved: u64) -> Result<(Self, FdLimits), String> {
        let limit = raise_open_files_limit();
        let capacity = limit.saturating_sub(reserved);
        if capacity < 64 {
            return Err(format!(
                "reserved_fds ({reserved}) leaves {capacity} of the process's {limit} open files for connections; lower reserved_fds or raise the open-files limit (ulimit -n)"
            ));
        }
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        Ok((Self::fixed(capacity), FdLimits { limit, reserved }))
    }

    /// Takes one descriptor, if one is left.
    pub fn try_take(&self) -> bool {
        self.inner
            .taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t < self.inner.capacity).then_some(t + 1)
            })
            .is_ok()
    }

    /// Gives one back.
    pub fn give_back(&self) {
        let before = self.inner.taken.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "a descriptor given back was taken");
    }

    /// How many connections may hold one.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// How many are taken now.
    pub fn taken(&self) -> usize {
        self.inner.taken.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn takes_up_to_capacity() {
        let b = FdBudget::fixed(2);
        assert!(b.try_take() && b.try_take());
        assert!(!b.try_take());
        b.give_back();
        assert!(b.try_take());
        assert_eq!((b.taken(), b.capacity()), (2, 2));
    }

    #[test]
    fn the_process_budget_leaves_the_reserve() {
        let (b, limits) = FdBudget::for_process(100).unwrap();
        assert_eq!(b.capacity() as u64, limits.limit - 100);
        let e = FdBudget::for_process(limits.limit).unwrap_err();
        assert!(e.contains("reserved_fds"), "{e}");
    }
}
