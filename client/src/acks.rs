//! Acknowledgement order for one connection: entries are acknowledged in the order they
//! arrived, each once the app is done with it and every earlier entry is done too.
//! A pure queue; the connection's ack task sends what [`AckOrder::take_ready`] returns.

use std::collections::VecDeque;

/// The entries of one connection that the gateway waits to hear about, oldest first.
/// Its length is bounded by the gateway's in-flight window: the gateway sends no more
/// entries than that without an acknowledgement.
#[derive(Debug)]
pub(crate) struct AckOrder<T> {
    /// The token of `slots[0]`.
    front_token: u64,
    slots: VecDeque<Slot<T>>,
}

#[derive(Debug)]
struct Slot<T> {
    item: T,
    done: bool,
}

impl<T> AckOrder<T> {
    pub(crate) fn new() -> Self {
        AckOrder {
            front_token: 0,
            slots: VecDeque::new(),
        }
    }

    /// Queues an arrived entry; the token names it in [`done`](Self::done).
    pub(crate) fn push(&mut self, item: T) -> u64 {
        let token = self.front_token + self.slots.len() as u64;
        self.slots.push_back(Slot { item, done: false });
        token
    }

    /// Marks an entry done. A token already sent, or never issued, is ignored.
    pub(crate) fn done(&mut self, token: u64) {
        if let Some(i) = token.checked_sub(self.front_token)
            && let Ok(i) = usize::try_from(i)
            && let Some(slot) = self.slots.get_mut(i)
        {
            slot.done = true;
        }
    }

    /// Removes and returns the done entries at the front, in arrival order.
    pub(crate) fn take_ready(&mut self) -> Vec<T> {
        let mut ready = Vec::new();
        while self.slots.front().is_some_and(|s| s.done) {
            if let Some(slot) = self.slots.pop_front() {
                ready.push(slot.item);
                self.front_token += 1;
            }
        }
        ready
    }

    /// Entries not yet returned by [`take_ready`](Self::take_ready).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_wait_for_every_earlier_entry() {
        let mut q = AckOrder::new();
        let a = q.push('a');
        let b = q.push('b');
        let c = q.push('c');
        q.done(c);
        assert!(q.take_ready().is_empty(), "c waits for a and b");
        q.done(a);
        assert_eq!(q.take_ready(), vec!['a']);
        q.done(b);
        assert_eq!(q.take_ready(), vec!['b', 'c']);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn tokens_stay_valid_after_the_front_moves() {
        let mut q = AckOrder::new();
        let a = q.push(1);
        q.done(a);
        assert_eq!(q.take_ready(), vec![1]);
        let b = q.push(2);
        assert_eq!(b, 1);
        // A repeated or unknown token changes nothing.
        q.done(a);
        q.done(99);
        assert!(q.take_ready().is_empty());
        q.done(b);
        assert_eq!(q.take_ready(), vec![2]);
    }
}
