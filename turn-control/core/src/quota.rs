//! Allocation quotas (RFC 8656 §7.2: 486 Allocation Quota Reached) and each user's share of
//! the data plane's bindings, counted across every [`crate::Server`] of one daemon. A daemon
//! that runs one core per CPU (each owning the clients the kernel steers to it) shares one
//! ledger between them, so that `user_quota`, `total_quota` and `user_kernel_bindings` mean
//! the same as with a single core. Touched only when an allocation is created or deleted or a
//! binding enters or leaves the data plane, never per packet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Allocations alive per username and in total, and channel bindings in the data plane per
/// username. Clone the [`Arc`] into every [`crate::Config::quotas`] that must share the
/// limits.
#[derive(Debug, Default)]
pub struct QuotaLedger {
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    per_user: HashMap<Arc<str>, u32>,
    total: u32,
    /// Bindings each user holds in the data plane (users holding none are absent).
    kernel_bindings: HashMap<Arc<str>, usize>,
}

impl QuotaLedger {
    /// An empty ledger, ready to share.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts one more allocation for `username` unless that would exceed `user_quota` or
    /// `total_quota` (`None`: no limit). Returns whether it was counted.
    pub fn try_reserve(
        &self,
        username: &Arc<str>,
        user_quota: Option<u32>,
        total_quota: Option<u32>,
    ) -> bool {
        // A poisoned lock only means another core panicked mid-update of two integers.
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if total_quota.is_some_and(|q| counts.total >= q) {
            return false;
        }
        let user = counts.per_user.get(username).copied().unwrap_or(0);
        if user_quota.is_some_and(|q| user >= q) {
            return false;
        }
        counts.per_user.insert(username.clone(), user + 1);
        counts.total += 1;
        true
    }

    /// Releases one allocation of `username` counted by [`QuotaLedger::try_reserve`].
    pub fn release(&self, username: &Arc<str>) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.per_user.get_mut(username) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.per_user.remove(username);
            }
            counts.total = counts.total.saturating_sub(1);
        }
    }

    /// Counts one more data-plane binding for `username` unless it holds `limit` already.
    /// Returns whether it was counted.
    pub fn try_add_kernel_binding(&self, username: &Arc<str>, limit: usize) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let held = counts.kernel_bindings.get(username).copied().unwrap_or(0);
        if held >= limit {
            return false;
        }
        counts.kernel_bindings.insert(username.clone(), held + 1);
        true
    }

    /// Releases `count` data-plane bindings of `username` counted by
    /// [`QuotaLedger::try_add_kernel_binding`].
    pub fn remove_kernel_bindings(&self, username: &Arc<str>, count: usize) {
        if count == 0 {
            return;
        }
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = counts.kernel_bindings.get_mut(username) {
            *held = held.saturating_sub(count);
            if *held == 0 {
                counts.kernel_bindings.remove(username);
            }
        }
    }

    /// Data-plane bindings counted for `username`.
    pub fn kernel_bindings(&self, username: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.kernel_bindings.get(username).copied().unwrap_or(0)
    }

    /// Allocations counted for `username`.
    pub fn user(&self, username: &str) -> u32 {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.per_user.get(username).copied().unwrap_or(0)
    }

    /// Allocations counted in total.
    pub fn total(&self) -> u32 {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_across_sharers_and_release_frees_them() {
        let ledger = QuotaLedger::shared();
        let other_core = ledger.clone();
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        assert!(ledger.try_reserve(&alice, Some(2), Some(3)));
        assert!(other_core.try_reserve(&alice, Some(2), Some(3)));
        assert!(!ledger.try_reserve(&alice, Some(2), Some(3)), "user quota");
        assert!(other_core.try_reserve(&bob, Some(2), Some(3)));
        assert!(!ledger.try_reserve(&bob, Some(2), Some(3)), "total quota");
        assert_eq!((ledger.user("alice"), ledger.total()), (2, 3));
        other_core.release(&alice);
        assert!(ledger.try_reserve(&bob, Some(2), Some(3)));
        ledger.release(&alice);
        ledger.release(&alice);
        assert_eq!((ledger.user("alice"), ledger.total()), (0, 2));
    }

    #[test]
    fn kernel_bindings_are_capped_per_user_across_sharers() {
        let ledger = QuotaLedger::shared();
        let other_core = ledger.clone();
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        assert!(ledger.try_add_kernel_binding(&alice, 2));
        assert!(other_core.try_add_kernel_binding(&alice, 2));
        assert!(!ledger.try_add_kernel_binding(&alice, 2));
        assert!(
            ledger.try_add_kernel_binding(&bob, 2),
            "another user's share"
        );
        other_core.remove_kernel_bindings(&alice, 1);
        assert!(ledger.try_add_kernel_binding(&alice, 2));
        ledger.remove_kernel_bindings(&alice, 5);
        assert_eq!(
            (
                ledger.kernel_bindings("alice"),
                ledger.kernel_bindings("bob")
            ),
            (0, 1)
        );
        assert_eq!(ledger.total(), 0, "allocations are counted apart");
    }

    #[test]
    fn no_limits_count_anyway() {
        let ledger = QuotaLedger::shared();
        let carol: Arc<str> = Arc::from("carol");
        for _ in 0..100 {
            assert!(ledger.try_reserve(&carol, None, None));
        }
        assert_eq!(ledger.total(), 100);
    }
}
