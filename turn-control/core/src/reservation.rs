//! EVEN-PORT with the R bit and RESERVATION-TOKEN (RFC 8656 §7.2): an Allocate may reserve
//! the odd port next to its even one (RTP and RTCP) under a random token, and a later
//! Allocate of the same user, on any 5-tuple, takes that port with the token.
//!
//! A token is server-wide, and the later Allocate (another client socket) may reach another
//! core of the daemon than the one that made the reservation. So the token, the address it
//! names and the bounds live in the shared [`crate::ReservationLedger`], while the making core
//! keeps the port in its own port index (its slice of the range, so it never hands it out) and
//! has the daemon bind its socket and keep it aside, unread ([`Command::ReservePort`]).
//!
//! - The success of the reserving Allocate, which carries the token, waits for both sockets;
//!   until it goes out the pair moves together when a port cannot be bound, and the token
//!   cannot be used. From then on the reservation is best effort (RFC 8656 §7.2): a socket the
//!   daemon loses voids the token.
//! - Whichever core gets the Allocate with the token takes it out of the ledger (single use,
//!   the user must match), makes the allocation on the reserved port although it is not of its
//!   own slice, and has its event loop adopt the socket ([`Command::AdoptReservedPort`]).
//! - The making core learns of that lazily: [`RESERVATION_LIFETIME`] after its success, if the
//!   ledger still holds the token it ends it and releases the socket
//!   ([`Command::ReleaseReservedPort`]); if not, it only forgets the port. Picked again later
//!   while the other core's allocation still holds it, the port fails to bind and the new
//!   allocation moves on ([`Server::relay_bind_failed`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::RngExt as _;
use rtc_stun::attributes::{ATTR_EVEN_PORT, ATTR_REQUESTED_ADDRESS_FAMILY};

use super::{Auth, Command, RELAY_BIND_ATTEMPTS, Reply, Server, Timer};
use crate::allocation::{Allocation, PortUse, Reservation, ReservationToken};
use crate::config::{RESERVATION_LIFETIME, RESERVATIONS_PER_USER};
use crate::icmp::IcmpBudget;
use crate::reservation_ledger::ReservedAddress;
use crate::stun::Parsed;
use crate::types::{AllocationPort, FiveTuple, RelayAddr};
use crate::usage::user_of;

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

    /// Counts a new allocation of `username` against the quotas and reserves its `max_bps`
    /// from `bps_capacity` (486 beyond either) and, when it reserves `reserved`, enters that in
    /// the shared ledger within its bounds (508 beyond): the reservation's token and the
    /// granted `max_bps`.
    pub(super) fn admit(
        &mut self,
        username: &Arc<str>,
        reserved: Option<RelayAddr>,
    ) -> Result<(Option<ReservationToken>, Option<u64>), u16> {
        let token = reserved
            .map(|relay| self.enter_reservation(relay, username).ok_or(508u16))
            .transpose()?;
        let (user_quota, total_quota) = (self.config.user_quota, self.config.total_quota);
        if !self
            .config
            .quotas
            .try_reserve(username, user_quota, total_quota)
        {
            if let Some(token) = token {
                self.config.reservations.remove(&token);
            }
            return Err(486);
        }
        match self.reserve_bandwidth(username) {
            Ok(max_bps) => Ok((token, max_bps)),
            Err(code) => {
                self.config.quotas.release(username);
                if let Some(token) = token {
                    self.config.reservations.remove(&token);
                }
                Err(code)
            }
        }
    }

    /// Reserves the `max_bps` of a new allocation of `username` (its user's override, else the
    /// server-wide default) from `bps_capacity`: what is granted, or 486 (Allocation Quota
    /// Reached, RFC 8656 §7.2, as coturn answers) when nothing is left.
    pub(super) fn reserve_bandwidth(&self, username: &str) -> Result<Option<u64>, u16> {
        let wanted = self.config.limits_of(user_of(username)).max_bps;
        self.config
            .bandwidth
            .reserve(wanted, self.config.bps_capacity)
            .map_err(|_| {
                tracing::debug!(%username, "bps_capacity reached");
                486u16
            })
    }

    /// Enters a reservation of `relay` for `username` in the shared ledger under a new random
    /// token, unless [`RESERVATIONS_PER_USER`] or [`crate::Config::max_reservations`] would be
    /// exceeded.
    fn enter_reservation(
        &mut self,
        relay: RelayAddr,
        username: &Arc<str>,
    ) -> Option<ReservationToken> {
        let reserved = ReservedAddress {
            relay,
            username: username.clone(),
            maker_core: self.config.core_index,
            expires: None,
        };
        let bounds = (RESERVATIONS_PER_USER, self.config.max_reservations);
        let rng = &mut self.rng;
        // Drawn from the CSPRNG, so a token says nothing about its port or about other tokens.
        self.config.reservations.insert(reserved, bounds, || {
            let mut token = ReservationToken::default();
            rng.fill(&mut token);
            token
        })
    }

    /// Holds the port `relay` of the reservation `maker`'s Allocate made under `token` (in the
    /// ledger already): in the port index, with its timer, its socket bound and kept aside.
    /// The deadline restarts when the maker's success goes out.
    pub(super) fn hold_reservation(
        &mut self,
        now: Instant,
        maker: &FiveTuple,
        token: ReservationToken,
        relay: RelayAddr,
        dont_fragment: bool,
    ) {
        let expires = now + RESERVATION_LIFETIME;
        self.reservations.insert(
            token,
            Reservation {
                relay,
                maker: *maker,
                expires,
                bound: false,
                dont_fragment,
            },
        );
        self.by_port.insert(relay.port(), PortUse::Reserved(token));
        self.timers.schedule(Timer::Reservation(token), expires);
        self.commands.push_back(Command::ReservePort {
            relay,
            dont_fragment,
        });
        self.stats.reservations_active += 1;
        tracing::debug!(client = %maker.client, %relay, "port reserved");
    }

    /// The success of `maker`'s Allocate, which carries `token`, goes out: the reservation is
    /// held for [`RESERVATION_LIFETIME`] from now (RFC 8656 §7.2), and from now on an Allocate
    /// with the token may take it on any core.
    pub(super) fn publish_reservation(
        &mut self,
        now: Instant,
        maker: &FiveTuple,
        token: ReservationToken,
    ) {
        let Some(r) = self
            .reservations
            .get_mut(&token)
            .filter(|r| r.maker == *maker)
        else {
            return;
        };
        r.expires = now + RESERVATION_LIFETIME;
        self.config.reservations.publish(&token, r.relay, r.expires);
    }

    /// An Allocate with RESERVATION-TOKEN (RFC 8656 §7.2) takes the relayed address reserved
    /// under it, whatever its 5-tuple and whichever core made the reservation (a token is
    /// server-wide), if the same user made it. The token is used up; the success waits until
    /// the daemon has adopted the reserved socket ([`Command::AdoptReservedPort`]).
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
            || req.additional_address_family().is_some()
        {
            return Err(400);
        }
        let Ok(token) = ReservationToken::try_from(token) else {
            return Err(400);
        };
        let lifetime = self
            .desired_lifetime(req)?
            .max(self.config.default_lifetime);
        let username: Arc<str> = Arc::from(auth.username.as_str());
        if !self.config.quotas.try_reserve(
            &username,
            self.config.user_quota,
            self.config.total_quota,
        ) {
            return Err(486);
        }
        let max_bps = match self.reserve_bandwidth(&username) {
            Ok(max_bps) => max_bps,
            Err(code) => {
                self.config.quotas.release(&username);
                return Err(code);
            }
        };
        // Unknown, expired, used, lost its socket, or another user's: 508 alike (RFC 8656 §7.2
        // has 508 for a token that is not valid), so a token tells nothing to those it was not
        // given to.
        let Some(reserved) = self.config.reservations.take(&token, &username, now) else {
            self.config.quotas.release(&username);
            self.config.bandwidth.release(max_bps);
            return Err(508);
        };
        // Made here, the port passes from the reservation to the allocation at once; made on
        // another core, that core forgets it when the reservation's time is up.
        self.forget_reservation(token);
        let relay = reserved.relay;
        let account = self.open_account(now, &username, max_bps);
        let mut alloc = Allocation::new(
            relay.port(),
            username,
            now + lifetime,
            req.transaction_id(),
            auth.key,
            IcmpBudget::new(self.icmp_tick(now)),
            account,
        );
        alloc.dont_fragment = dont_fragment;
        alloc.set_relay(relay);
        alloc.await_binds();
        // The token names this one address: if its socket cannot be had there is no other port
        // to move to, and the first failure is the last (508).
        alloc.bind_attempts = RELAY_BIND_ATTEMPTS - 1;
        self.commands.push_back(Command::AdoptReservedPort {
            relay,
            dont_fragment,
        });
        tracing::debug!(
            client = %tuple.client,
            %relay,
            core = self.config.core_index,
            maker_core = reserved.maker_core,
            "reserved port taken"
        );
        self.insert_allocation(tuple, alloc, lifetime);
        Ok(Reply::AwaitBind)
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
        self.end_reservation(token);
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
        let from = r.relay;
        r.relay = RelayAddr(SocketAddr::new(r.relay.0.ip(), next.0));
        r.bound = false;
        let (relay, dont_fragment) = (r.relay, r.dont_fragment);
        tracing::debug!(%from, %relay, "reserved port moved");
        self.by_port.insert(next, PortUse::Reserved(token));
        self.commands.push_back(Command::ReservePort {
            relay,
            dont_fragment,
        });
    }

    /// Takes a reservation out of this core's tables (its port and the gauge), not out of the
    /// ledger; its socket is the caller's.
    pub(super) fn forget_reservation(&mut self, token: ReservationToken) -> Option<Reservation> {
        let r = self.reservations.remove(&token)?;
        self.timers.cancel(Timer::Reservation(token));
        if self.by_port.get(&r.relay.port()) == Some(&PortUse::Reserved(token)) {
            self.by_port.remove(&r.relay.port());
        }
        self.stats.reservations_active = self.stats.reservations_active.saturating_sub(1);
        Some(r)
    }

    /// Ends a reservation this core made: out of the ledger and this core's tables, and its
    /// socket released, unless another core took the token meanwhile; that core's allocation
    /// reads the socket now, and this core only forgets the port.
    pub(super) fn end_reservation(&mut self, token: ReservationToken) {
        let Some(r) = self.forget_reservation(token) else {
            return;
        };
        if self.config.reservations.remove(&token).is_some() {
            self.release_socket(r.relay, r.bound);
        } else {
            tracing::debug!(relay = %r.relay, "reserved port taken on another core; forgotten here");
        }
    }

    /// Releases the socket kept aside for `relay` if bound; otherwise drops its queued bind.
    fn release_socket(&mut self, relay: RelayAddr, bound: bool) {
        if bound {
            self.commands
                .push_back(Command::ReleaseReservedPort { relay });
        } else {
            self.commands
                .retain(|c| !matches!(c, Command::ReservePort { relay: r, .. } if *r == relay));
        }
    }
}
