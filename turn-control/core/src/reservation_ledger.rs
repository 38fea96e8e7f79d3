//! RESERVATION-TOKENs (RFC 8656 §7.2) held across every [`crate::Server`] of one daemon. A
//! token is server-wide: the Allocate that brings it may come from another client socket, which
//! the kernel may steer to another core than the one that made the reservation. So the token
//! and the address it names live here, shared, while the port stays in the port index of the
//! core that made it (so that core never hands it out) until that core learns the token was
//! used. Touched only when a reservation is made, announced, used or ended, never per packet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::allocation::ReservationToken;
use crate::types::RelayAddr;

/// The reservations of every core that shares it, by token, with the bounds that hold across
/// them. Clone the [`Arc`] into every [`crate::Config::reservations`] among whose servers a
/// token must be good.
#[derive(Debug, Default)]
pub struct ReservationLedger {
    tokens: Mutex<Tokens>,
}

#[derive(Debug, Default)]
struct Tokens {
    by_token: HashMap<ReservationToken, ReservedAddress>,
    per_user: HashMap<Arc<str>, usize>,
}

/// A reserved relayed address as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReservedAddress {
    /// The reserved address: the relay IP of the allocation that made it, and its port + 1.
    pub(crate) relay: RelayAddr,
    /// Only this user's Allocate may use the token.
    pub(crate) username: Arc<str>,
    /// The core that made it ([`crate::Config::core_index`]): the port is from its slice.
    pub(crate) maker_core: u32,
    /// When the token lapses; `None` until the success that carries it goes out, so that no
    /// Allocate can use it before its socket is bound.
    pub(crate) expires: Option<Instant>,
}

impl ReservationLedger {
    /// An empty ledger, ready to share.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Reservations held, over every core and user.
    pub fn total(&self) -> usize {
        self.lock().by_token.len()
    }

    /// Reservations `username` holds.
    pub fn user(&self, username: &str) -> usize {
        self.lock().per_user.get(username).copied().unwrap_or(0)
    }

    /// Enters `reserved` under a new token from `draw` (drawn again while it is taken), unless
    /// its user holds `max_per_user` already or the ledger `max_total`. Not usable until
    /// [`ReservationLedger::publish`].
    pub(crate) fn insert(
        &self,
        reserved: ReservedAddress,
        (max_per_user, max_total): (usize, usize),
        mut draw: impl FnMut() -> ReservationToken,
    ) -> Option<ReservationToken> {
        let mut tokens = self.lock();
        let held = tokens
            .per_user
            .get(&reserved.username)
            .copied()
            .unwrap_or(0);
        if held >= max_per_user || tokens.by_token.len() >= max_total {
            return None;
        }
        // A repeat among the few live tokens is as good as impossible but would be redrawn.
        let token =
            std::iter::repeat_with(&mut draw).find(|token| !tokens.by_token.contains_key(token))?;
        tokens.per_user.insert(reserved.username.clone(), held + 1);
        tokens.by_token.insert(token, reserved);
        Some(token)
    }

    /// The success carrying `token` goes out: from now until `expires` an Allocate may use it,
    /// for `relay` (where the reservation ended up after any move).
    pub(crate) fn publish(&self, token: &ReservationToken, relay: RelayAddr, expires: Instant) {
        if let Some(reserved) = self.lock().by_token.get_mut(token) {
            reserved.relay = relay;
            reserved.expires = Some(expires);
        }
    }

    /// Uses up `token` for an Allocate of `username` at `now`: the reserved address if the
    /// token is published, unexpired and that user's, taken out at once so that it serves one
    /// Allocate only, whichever core gets there first. Otherwise nothing changes.
    pub(crate) fn take(
        &self,
        token: &ReservationToken,
        username: &str,
        now: Instant,
    ) -> Option<ReservedAddress> {
        let mut tokens = self.lock();
        let usable = tokens.by_token.get(token).is_some_and(|r| {
            r.expires.is_some_and(|expires| expires > now) && *r.username == *username
        });
        if !usable {
            return None;
        }
        tokens.remove(token)
    }

    /// Takes `token` out, used or not; `None` if it is not here (another core used it).
    pub(crate) fn remove(&self, token: &ReservationToken) -> Option<ReservedAddress> {
        self.lock().remove(token)
    }

    fn lock(&self) -> MutexGuard<'_, Tokens> {
        // A poisoned lock only means another core panicked between two map updates; the
        // counts may be off by one, which the bounds tolerate.
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Tokens {
    fn remove(&mut self, token: &ReservationToken) -> Option<ReservedAddress> {
        let reserved = self.by_token.remove(token)?;
        if let Some(held) = self.per_user.get_mut(&reserved.username) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.per_user.remove(&reserved.username);
            }
        }
        Some(reserved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn reserved(user: &str, port: u16) -> ReservedAddress {
        ReservedAddress {
            relay: RelayAddr(([198, 51, 100, 7], port).into()),
            username: Arc::from(user),
            maker_core: 0,
            expires: None,
        }
    }

    /// The ledger's entry size, for the memory estimate in the crate docs.
    #[test]
    fn entry_size() {
        let entry = std::mem::size_of::<(ReservationToken, ReservedAddress)>();
        println!("ledger entry {entry} B");
        assert!(entry <= 80, "{entry}");
    }

    /// At most two per user and three in all.
    const BOUNDS: (usize, usize) = (2, 3);

    #[test]
    fn a_token_is_usable_once_published_by_its_user_until_it_lapses() {
        let ledger = ReservationLedger::shared();
        let other_core = ledger.clone();
        let now = Instant::now();
        let token = ledger.insert(reserved("alice", 50001), BOUNDS, || [1; 8]);
        let token = token.unwrap();
        assert_eq!(other_core.take(&token, "alice", now), None, "not yet out");
        let moved = reserved("alice", 50003).relay;
        ledger.publish(&token, moved, now + Duration::from_secs(30));
        assert_eq!(other_core.take(&token, "bob", now), None);
        let late = now + Duration::from_secs(30);
        assert_eq!(other_core.take(&token, "alice", late), None);
        let taken = other_core.take(&token, "alice", now).unwrap();
        assert_eq!(taken.relay, moved);
        assert_eq!(ledger.take(&token, "alice", now), None, "single use");
        assert_eq!(ledger.remove(&token), None);
        assert_eq!((ledger.total(), ledger.user("alice")), (0, 0));
    }

    #[test]
    fn bounds_hold_across_sharers_and_a_taken_token_is_redrawn() {
        let ledger = ReservationLedger::shared();
        let other_core = ledger.clone();
        let first = ledger.insert(reserved("alice", 1), BOUNDS, || [1; 8]);
        let first = first.unwrap();
        let mut draws = [[1; 8], [2; 8]].into_iter();
        let second = other_core.insert(reserved("alice", 3), BOUNDS, || draws.next().unwrap());
        assert_eq!(second, Some([2; 8]), "the token drawn first is taken");
        assert_eq!(other_core.user("alice"), 2);
        let over_user = ledger.insert(reserved("alice", 5), BOUNDS, || [3; 8]);
        assert_eq!(over_user, None);
        assert!(
            other_core
                .insert(reserved("bob", 7), BOUNDS, || [4; 8])
                .is_some()
        );
        let over_total = ledger.insert(reserved("carol", 9), BOUNDS, || [5; 8]);
        assert_eq!(over_total, None);
        assert_eq!(ledger.total(), 3);
        other_core.remove(&first);
        assert_eq!(ledger.user("alice"), 1);
        assert!(
            ledger
                .insert(reserved("carol", 9), BOUNDS, || [5; 8])
                .is_some()
        );
    }
}
