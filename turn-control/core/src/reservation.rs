//! EVEN-PORT with the R bit and RESERVATION-TOKEN (RFC 8656 §7.2): an Allocate may reserve
//! the odd port next to its even one (RTP and RTCP) under a random token, and a later
//! Allocate of the same user, on any 5-tuple, takes that port with the token.
//!
//! A reservation holds its port in the server's one port index and its socket in the daemon
//! ([`Command::BindRelayPort`]) from the Allocate that makes it until the token is used or
//! [`RESERVATION_LIFETIME`] after that Allocate's success, when the socket is freed. The
//! success, which carries the token, waits for both sockets; until it goes out the pair moves
//! together when a port cannot be bound. After it, the reservation is best effort (RFC 8656
//! §7.2): a socket the daemon loses voids the token.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::RngExt as _;
use rtc_stun::attributes::{ATTR_EVEN_PORT, ATTR_REQUESTED_ADDRESS_FAMILY};

use super::{Auth, Command, Reply, Server, Timer};
use crate::allocation::{Allocation, PortUse, Reservation, ReservationToken};
use crate::config::{RESERVATION_LIFETIME, RESERVATIONS_PER_USER};
use crate::icmp::IcmpBudget;
use crate::stun::{ATTR_ADDITIONAL_ADDRESS_FAMILY, Parsed};
use crate::types::{AllocationPort, FiveTuple, RelayAddr};

impl Server {
    /// Whether the Allocate success of `tuple`'s allocation has gone out: every relay socket
    /// is bound, and so is the port it reserved, if any.
    pub(super) fn is_announced(&self, tuple: &FiveTuple) -> bool {
        self.allocations.get(tuple).is_some_and(|alloc| {
            alloc.announced()
                && alloc
                    .reservation
                    .and_then(|token| self.reservations.get(&token))
                    .is_none_or(|r| r.bound || r.maker != *tuple)
        })
    }

    /// The reservation `tuple`'s allocation made, if its token has not gone out yet: such a
    /// reservation goes with its allocation, while one announced stays until used or expired
    /// (RFC 8656 §7.2 holds it server-wide).
    pub(super) fn unannounced_reservation(&self, tuple: &FiveTuple) -> Option<ReservationToken> {
        let token = self.allocations.get(tuple)?.reservation?;
        let made_here = self
            .reservations
            .get(&token)
            .is_some_and(|r| r.maker == *tuple);
        (made_here && !self.is_announced(tuple)).then_some(token)
    }

    /// Whether `username` may hold one more reservation: [`RESERVATIONS_PER_USER`] each and
    /// [`crate::Config::max_reservations`] in all.
    pub(super) fn may_reserve(&self, username: &str) -> bool {
        let held = self
            .reservations_per_user
            .get(username)
            .copied()
            .unwrap_or(0);
        self.reservations.len() < self.config.max_reservations && held < RESERVATIONS_PER_USER
    }

    /// Draws a free pair of ports N (even) and N + 1 from the range at random, falling back to
    /// a scan from a random start when the range is crowded (as [`Server::pick_port`]).
    pub(super) fn pick_pair(&mut self) -> Option<AllocationPort> {
        let lo = u32::from(*self.config.port_range.start());
        let hi = u32::from(*self.config.port_range.end());
        let first = lo + lo % 2;
        if first + 1 > hi {
            return None;
        }
        let pairs = (hi - 1 - first) / 2 + 1;
        // At most hi - 1, so both N and N + 1 fit in a u16.
        let even = |i: u32| (first + 2 * i) as u16;
        let free = |n: u16, by_port: &HashMap<AllocationPort, PortUse>| {
            !by_port.contains_key(&AllocationPort(n))
                && !by_port.contains_key(&AllocationPort(n + 1))
        };
        for _ in 0..16 {
            let n = even(self.rng.random_range(0..pairs));
            if free(n, &self.by_port) {
                return Some(AllocationPort(n));
            }
        }
        let start = self.rng.random_range(0..pairs);
        (0..pairs)
            .map(|i| even((start + i) % pairs))
            .find(|n| free(*n, &self.by_port))
            .map(AllocationPort)
    }

    /// Reserves `relay` (a free port) for `username` under a new random token and asks the
    /// daemon to bind its socket. The deadline restarts when the maker's success goes out.
    pub(super) fn reserve(
        &mut self,
        now: Instant,
        maker: &FiveTuple,
        relay: RelayAddr,
        username: &Arc<str>,
        dont_fragment: bool,
    ) -> ReservationToken {
        // Drawn from the CSPRNG, so a token says nothing about its port or about other tokens;
        // a repeat among the few live ones is as good as impossible but would be redrawn.
        let token = loop {
            let mut token = ReservationToken::default();
            self.rng.fill(&mut token);
            if !self.reservations.contains_key(&token) {
                break token;
            }
        };
        let expires = now + RESERVATION_LIFETIME;
        self.reservations.insert(
            token,
            Reservation {
                relay,
                username: username.clone(),
                maker: *maker,
                expires,
                bound: false,
                dont_fragment,
            },
        );
        *self
            .reservations_per_user
            .entry(username.clone())
            .or_default() += 1;
        self.by_port.insert(relay.port(), PortUse::Reserved(token));
        self.timers
            .push(Reverse((expires, Timer::Reservation(token))));
        self.commands.push_back(Command::BindRelayPort {
            relay,
            dont_fragment,
        });
        self.stats.reservations_active += 1;
        tracing::debug!(client = %maker.client, %relay, "port reserved");
        token
    }

    /// An Allocate with RESERVATION-TOKEN (RFC 8656 §7.2) takes the relayed address reserved
    /// under it, whatever its 5-tuple (the reservation is server-wide), if the same user made
    /// the reservation. The token is used up.
    pub(super) fn allocate_reserved(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        req: &Parsed<'_>,
        auth: &Auth,
        token: &[u8],
        dont_fragment: bool,
    ) -> Result<Reply, u16> {
        // The token names the address: a family or an even port asked for besides is 400.
        if req.has(ATTR_EVEN_PORT)
            || req.has(ATTR_REQUESTED_ADDRESS_FAMILY)
            || req.has(ATTR_ADDITIONAL_ADDRESS_FAMILY)
        {
            return Err(400);
        }
        let Ok(token) = ReservationToken::try_from(token) else {
            return Err(400);
        };
        let lifetime = self
            .desired_lifetime(req)?
            .max(self.config.default_lifetime);
        // Unknown, expired, lost its socket, or another user's: 508 alike (RFC 8656 §7.2 has
        // 508 for a token that is not valid), so a token tells nothing to those it was not
        // given to.
        let valid = self
            .reservations
            .get(&token)
            .is_some_and(|r| r.bound && r.expires > now && *r.username == *auth.username);
        if !valid {
            return Err(508);
        }
        let username: Arc<str> = Arc::from(auth.username.as_str());
        if !self.config.quotas.try_reserve(
            &username,
            self.config.user_quota,
            self.config.total_quota,
        ) {
            return Err(486);
        }
        let Some(reservation) = self.remove_reservation(token) else {
            self.config.quotas.release(&username);
            return Err(508);
        };
        let relay = reservation.relay;
        let mut alloc = Allocation::new(
            relay.port(),
            username,
            now + lifetime,
            req.transaction_id(),
            auth.key,
            IcmpBudget::new(self.icmp_tick(now)),
        );
        alloc.dont_fragment = dont_fragment;
        alloc.set_relay(relay);
        // The socket was bound with the maker's DONT-FRAGMENT; with another one it is bound
        // again, and the success waits for that.
        let rebind = reservation.dont_fragment != dont_fragment;
        if rebind {
            alloc.await_binds();
            self.commands.push_back(Command::FreeRelayPort { relay });
            self.commands.push_back(Command::BindRelayPort {
                relay,
                dont_fragment,
            });
        }
        self.insert_allocation(tuple, alloc, lifetime);
        if rebind {
            return Ok(Reply::AwaitBind);
        }
        Ok(Reply::Now(self.allocate_success(
            now,
            tuple,
            req.transaction_id(),
        )))
    }

    /// [`Server::relay_bound`] for a reserved port: the success of the Allocate that made the
    /// reservation goes out once its own sockets are bound too.
    pub(super) fn reservation_bound(
        &mut self,
        now: Instant,
        token: ReservationToken,
        relay: RelayAddr,
    ) {
        let Some(r) = self
            .reservations
            .get_mut(&token)
            .filter(|r| r.relay == relay)
        else {
            // The other family on a reserved port: an answer for a socket nobody needs.
            self.commands.push_back(Command::FreeRelayPort { relay });
            return;
        };
        if r.bound {
            return;
        }
        r.bound = true;
        let maker = r.maker;
        if self
            .allocations
            .get(&maker)
            .is_some_and(|a| a.reservation == Some(token))
            && self.is_announced(&maker)
        {
            self.announce_allocation(now, &maker);
        }
    }

    /// [`Server::relay_bind_failed`] for a reserved port. Returns the allocation to move with
    /// its reservation when its success has not gone out; otherwise the token is void.
    pub(super) fn reserved_bind_failed(
        &mut self,
        token: ReservationToken,
        relay: RelayAddr,
    ) -> Option<FiveTuple> {
        let r = self.reservations.get(&token).filter(|r| r.relay == relay)?;
        let maker = r.maker;
        if !r.bound
            && self
                .allocations
                .get(&maker)
                .is_some_and(|a| a.reservation == Some(token))
        {
            return Some(maker);
        }
        tracing::debug!(%relay, "reserved relay port lost; its token is void");
        self.free_reservation(token);
        None
    }

    /// The reservation of an allocation that moves lets go of its port: its socket is freed
    /// if bound, or its queued bind dropped (an answer still under way finds no reservation
    /// and frees its socket).
    pub(super) fn release_reserved_port(&mut self, token: ReservationToken) {
        let Some(r) = self.reservations.get_mut(&token) else {
            return;
        };
        let relay = r.relay;
        let bound = std::mem::replace(&mut r.bound, false);
        if self.by_port.get(&relay.port()) == Some(&PortUse::Reserved(token)) {
            self.by_port.remove(&relay.port());
        }
        self.release_socket(relay, bound);
    }

    /// Puts a released reservation on `port` + 1, next to its allocation's new `port` (from
    /// [`Server::pick_pair`]), and binds its socket.
    pub(super) fn move_reservation(&mut self, token: ReservationToken, port: AllocationPort) {
        let Some(r) = self.reservations.get_mut(&token) else {
            return;
        };
        let next = AllocationPort(port.0.saturating_add(1));
        r.relay = RelayAddr(SocketAddr::new(r.relay.0.ip(), next.0));
        r.bound = false;
        let (relay, dont_fragment) = (r.relay, r.dont_fragment);
        self.by_port.insert(next, PortUse::Reserved(token));
        self.commands.push_back(Command::BindRelayPort {
            relay,
            dont_fragment,
        });
    }

    /// Takes a reservation out of the tables (its port and the user's count); its socket is
    /// the caller's.
    pub(super) fn remove_reservation(&mut self, token: ReservationToken) -> Option<Reservation> {
        let r = self.reservations.remove(&token)?;
        if self.by_port.get(&r.relay.port()) == Some(&PortUse::Reserved(token)) {
            self.by_port.remove(&r.relay.port());
        }
        if let Some(held) = self.reservations_per_user.get_mut(r.username.as_ref()) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.reservations_per_user.remove(r.username.as_ref());
            }
        }
        self.stats.reservations_active = self.stats.reservations_active.saturating_sub(1);
        Some(r)
    }

    /// Ends a reservation unused and lets go of its socket.
    pub(super) fn free_reservation(&mut self, token: ReservationToken) {
        if let Some(r) = self.remove_reservation(token) {
            self.release_socket(r.relay, r.bound);
        }
    }

    /// Frees the socket of `relay` if bound; otherwise drops its queued bind.
    fn release_socket(&mut self, relay: RelayAddr, bound: bool) {
        if bound {
            self.commands.push_back(Command::FreeRelayPort { relay });
        } else {
            self.commands
                .retain(|c| !matches!(c, Command::BindRelayPort { relay: r, .. } if *r == relay));
        }
    }
}
