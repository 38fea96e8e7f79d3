//! Bandwidth shared by every [`crate::Server`] of one daemon: the reservations of
//! `bps_capacity` (coturn's name: the server-wide bytes per second the allocations' `max_bps`
//! may add up to) and each user's meters of `user_max_bps`, which all of its allocations share
//! whichever core holds them.
//!
//! The capacity is touched when an allocation is made or ends. The user meters are touched
//! per packet, but only by the user-space path of allocations whose user has a
//! `user_max_bps`, and only briefly (a token bucket under a mutex); the kernel path has its
//! own meters, by name ([`crate::usage::RateLimits`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::usage::{Direction, RateMeter};

/// Capacity reserved by the allocations' `max_bps`, and the users' shared meters. Clone the
/// [`Arc`] into every [`crate::Config::bandwidth`] that must share them.
#[derive(Debug, Default)]
pub struct BandwidthLedger {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes per second reserved by the allocations alive.
    reserved: u64,
    /// The meters of users with a `user_max_bps` (users without one are absent).
    users: HashMap<Arc<str>, UserMeters>,
}

#[derive(Debug)]
struct UserMeters {
    /// Allocations of the user that joined: the meters go with the last.
    allocations: usize,
    /// Indexed by [`Direction::index`].
    meters: [RateMeter; 2],
}

/// No bandwidth is left for a new allocation's `max_bps` (RFC 8656 §7.2: 486 Allocation Quota
/// Reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bps_capacity reached")]
pub struct CapacityReached;

impl BandwidthLedger {
    /// An empty ledger, ready to share.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Reserves a new allocation's `max_bps` (`None`: unlimited, reserves nothing) out of
    /// `capacity` (`None`: no bps_capacity). What is granted: all of it, or what is left when
    /// less is (coturn's behaviour); nothing left is [`CapacityReached`].
    pub fn reserve(
        &self,
        max_bps: Option<u64>,
        capacity: Option<u64>,
    ) -> Result<Option<u64>, CapacityReached> {
        let Some(wanted) = max_bps else {
            return Ok(None);
        };
        let mut state = self.lock();
        let granted = match capacity {
            None => wanted,
            Some(capacity) => {
                let left = capacity.saturating_sub(state.reserved);
                if left == 0 {
                    return Err(CapacityReached);
                }
                wanted.min(left)
            }
        };
        state.reserved = state.reserved.saturating_add(granted);
        Ok(Some(granted))
    }

    /// Reserves `max_bps` whatever is left: an allocation restored after a restart, which has
    /// it already.
    pub fn reserve_anyway(&self, max_bps: Option<u64>) {
        if let Some(rate) = max_bps {
            let mut state = self.lock();
            state.reserved = state.reserved.saturating_add(rate);
        }
    }

    /// Releases what [`BandwidthLedger::reserve`] granted an allocation that ended.
    pub fn release(&self, max_bps: Option<u64>) {
        if let Some(rate) = max_bps {
            let mut state = self.lock();
            state.reserved = state.reserved.saturating_sub(rate);
        }
    }

    /// Bytes per second reserved in all.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved
    }

    /// Counts an allocation of `user`, whose `user_max_bps` is `rate`, towards the user's
    /// meters, making them (full) for the user's first.
    pub(crate) fn join(&self, user: &str, rate: u64, now: Instant) {
        let mut state = self.lock();
        match state.users.get_mut(user) {
            Some(meters) => meters.allocations += 1,
            None => {
                let meter = RateMeter::new(rate, now);
                state.users.insert(
                    Arc::from(user),
                    UserMeters {
                        allocations: 1,
                        meters: [meter.clone(), meter],
                    },
                );
            }
        }
    }

    /// An allocation of `user` that joined ended; the meters go with the user's last.
    pub(crate) fn leave(&self, user: &str) {
        let mut state = self.lock();
        if let Some(meters) = state.users.get_mut(user) {
            meters.allocations = meters.allocations.saturating_sub(1);
            if meters.allocations == 0 {
                state.users.remove(user);
            }
        }
    }

    /// Whether `user`'s meter of `direction` lets a packet of `bytes` through
    /// ([`RateMeter::admit`]); a user without meters is not limited.
    pub(crate) fn admit(&self, user: &str, direction: Direction, now: Instant, bytes: u64) -> bool {
        self.lock()
            .users
            .get_mut(user)
            .is_none_or(|m| m.meters[direction.index()].admit(now, bytes))
    }

    /// Charges `user`'s meter of `direction` with `bytes` relayed by the kernel
    /// ([`RateMeter::charge`]).
    pub(crate) fn charge(&self, user: &str, direction: Direction, now: Instant, bytes: u64) {
        if let Some(m) = self.lock().users.get_mut(user) {
            m.meters[direction.index()].charge(now, bytes);
        }
    }

    /// Users with meters.
    pub fn metered_users(&self) -> usize {
        self.lock().users.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another core panicked mid-update of a few integers.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_grants_what_is_left_then_refuses() {
        let ledger = BandwidthLedger::shared();
        let other_core = ledger.clone();
        assert_eq!(ledger.reserve(Some(100), Some(250)), Ok(Some(100)));
        assert_eq!(other_core.reserve(Some(100), Some(250)), Ok(Some(100)));
        assert_eq!(ledger.reserve(Some(100), Some(250)), Ok(Some(50)));
        assert_eq!(ledger.reserve(Some(100), Some(250)), Err(CapacityReached));
        assert_eq!(ledger.reserve(None, Some(250)), Ok(None), "unlimited");
        other_core.release(Some(100));
        assert_eq!(ledger.reserve(Some(100), Some(250)), Ok(Some(100)));
        ledger.reserve_anyway(Some(1000));
        assert_eq!(ledger.reserved(), 1250);
        assert_eq!(ledger.reserve(Some(1), None), Ok(Some(1)));
    }

    #[test]
    fn user_meters_are_shared_and_go_with_the_last_allocation() {
        let ledger = BandwidthLedger::shared();
        let now = Instant::now();
        ledger.join("alice", 10_000, now);
        ledger.join("alice", 10_000, now);
        assert!(ledger.admit("alice", Direction::ClientToPeer, now, 2000));
        assert!(!ledger.admit("alice", Direction::ClientToPeer, now, 2000));
        assert!(ledger.admit("alice", Direction::PeerToClient, now, 2000));
        assert!(ledger.admit("bob", Direction::ClientToPeer, now, 1 << 20));
        ledger.leave("alice");
        assert_eq!(ledger.metered_users(), 1);
        ledger.charge("alice", Direction::PeerToClient, now, 1_000_000);
        assert!(!ledger.admit("alice", Direction::PeerToClient, now, 1));
        ledger.leave("alice");
        assert_eq!(ledger.metered_users(), 0);
    }
}
