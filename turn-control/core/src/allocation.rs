//! The allocation, permission and channel tables (RFC 8656 §6, §9, §12).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use rtc_stun::message::TransactionId;

use crate::icmp::IcmpBudget;
use crate::types::{
    AllocationPort, ChannelBinding, ChannelNumber, Family, FiveTuple, PeerAddr, RelayAddr,
};
use crate::usage::{RateMeter, Usage};

/// A RESERVATION-TOKEN (RFC 8656 §18.10): eight random bytes, so that it tells nothing about
/// the port it holds nor lets anyone guess another client's.
pub(crate) type ReservationToken = [u8; 8];

/// What holds an allocation port: an allocation, or a reservation waiting for its token
/// (RFC 8656 §7.2). Every port in use is in the one index, so no port is handed out twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortUse {
    /// The allocation of this 5-tuple.
    Allocation(FiveTuple),
    /// The reservation under this token.
    Reserved(ReservationToken),
}

/// A relayed transport address held for a later Allocate that brings its token (RFC 8656
/// §7.2: EVEN-PORT with the R bit reserves port N+1 next to the allocation's even port N), as
/// the core that made it holds it; the token itself is in the shared
/// [`crate::ReservationLedger`]. The daemon keeps its socket bound meanwhile, so that no other
/// process takes the port.
#[derive(Debug)]
pub(crate) struct Reservation {
    /// The reserved address: the relay IP of the allocation that made it, and its port + 1.
    pub(crate) relay: RelayAddr,
    /// The allocation whose Allocate made the reservation. Until that Allocate's success has
    /// gone out, the reservation moves with the allocation when a port cannot be bound.
    pub(crate) maker: FiveTuple,
    /// When this core ends the reservation (and learns whether another core used it).
    pub(crate) expires: Instant,
    /// The daemon confirmed the socket ([`crate::Server::relay_bound`]).
    pub(crate) bound: bool,
    /// The socket was bound with DONT-FRAGMENT: the maker asked for it.
    pub(crate) dont_fragment: bool,
}

/// One allocation: its relayed addresses, owner and the permission and channel tables.
#[derive(Debug)]
pub(crate) struct Allocation {
    pub(crate) port: AllocationPort,
    pub(crate) relay_v4: Option<RelayAddr>,
    pub(crate) relay_v6: Option<RelayAddr>,
    /// The family the client asked for as ADDITIONAL-ADDRESS-FAMILY but did not get
    /// (reported with ADDRESS-ERROR-CODE, RFC 8656 §7.2).
    pub(crate) refused_family: Option<Family>,
    pub(crate) username: Arc<str>,
    pub(crate) expires: Instant,
    /// The Allocate transaction, so a retransmission gets the same success (RFC 8656 §7.2).
    pub(crate) allocate_txid: TransactionId,
    /// The key and integrity attribute the Allocate was authenticated with, to sign a
    /// success re-issued for another port when the daemon could not bind the first one.
    /// Boxed: 34 bytes in place would push the table entry past its budget (`entry_sizes`).
    pub(crate) key: Box<crate::auth::SigningKey>,
    /// The Allocate asked for an even port (EVEN-PORT, RFC 8656 §7.2).
    pub(crate) even_port: bool,
    /// Ports tried for this allocation so far.
    pub(crate) bind_attempts: u8,
    /// Relayed addresses whose socket the daemon has not yet confirmed
    /// ([`crate::Server::relay_bound`]). The Allocate success waits until this is empty, so
    /// that it never announces a port nobody listens on; empty once it went out.
    /// Indexed by [`Family::index`]; kept in two bytes so the table entry does not grow.
    pub(crate) unbound: [bool; 2],
    /// The Allocate asked for DONT-FRAGMENT (RFC 8656 §7.2): relay sockets and data-plane
    /// bindings set DF towards peers.
    pub(crate) dont_fragment: bool,
    /// The token of the port this allocation's Allocate reserved (EVEN-PORT with R), kept for
    /// the success and its retransmissions. While that success has not gone out it also
    /// waits for the reserved port's socket.
    pub(crate) reservation: Option<ReservationToken>,
    /// ICMP errors relayed to the client (RFC 8656 §11.5), rate-limited.
    pub(crate) icmp: IcmpBudget,
    /// Permission expiry by peer IP address (RFC 8656 §9: ports do not matter).
    pub(crate) permissions: HashMap<IpAddr, Instant>,
    pub(crate) channels: HashMap<ChannelNumber, Channel>,
    /// The reverse of `channels`, for the peer-to-client decision.
    pub(crate) peers: HashMap<PeerAddr, ChannelNumber>,
    /// Expired channels whose number and peer stay reserved for each other (RFC 8656 §12).
    pub(crate) cooldowns: HashMap<ChannelNumber, Cooldown>,
    /// Usage, limits and accounting. Boxed: the table entry stays small for the lookups of
    /// the per-packet paths.
    pub(crate) account: Box<Account>,
}

/// An allocation's usage, limits and accounting records.
#[derive(Debug)]
pub(crate) struct Account {
    /// The random id that names the allocation in accounting records and the data plane's
    /// meters (saved across restarts).
    pub(crate) id: u64,
    /// When the allocation was made, Unix milliseconds.
    pub(crate) started_unix_ms: u64,
    /// Its user ([`crate::usage::user_of`]).
    pub(crate) user: Arc<str>,
    /// The granted `max_bps`, reserved from `bps_capacity`; `None`: unlimited.
    pub(crate) max_bps: Option<u64>,
    /// The user's `user_max_bps`, whose meters the allocation joined in the shared ledger.
    pub(crate) user_max_bps: Option<u64>,
    /// The `max_bps` meters, client to peer and peer to client.
    pub(crate) meters: Option<[RateMeter; 2]>,
    /// Relayed and dropped, both paths.
    pub(crate) usage: Usage,
    /// The kernel's part of `usage`.
    pub(crate) kernel: Usage,
    /// The sequence number of the next accounting record (0: no start record went out yet).
    pub(crate) sequence: u64,
    /// When the next interim record is due, once the start went out.
    pub(crate) next_interim: Option<Instant>,
    /// Per channel, the kernel's last cumulative reading taken into account.
    pub(crate) kernel_seen: HashMap<ChannelNumber, Usage>,
    /// Bindings removed from the data plane whose final figures have not come back.
    pub(crate) removing: HashSet<ChannelBinding>,
    /// A removal was answered without figures: the kernel's part is not complete.
    pub(crate) kernel_incomplete: bool,
}

impl Account {
    /// A fresh account: no usage, no records.
    pub(crate) fn new(id: u64, started_unix_ms: u64, user: Arc<str>) -> Self {
        Self {
            id,
            started_unix_ms,
            user,
            max_bps: None,
            user_max_bps: None,
            meters: None,
            usage: Usage::default(),
            kernel: Usage::default(),
            sequence: 0,
            next_interim: None,
            kernel_seen: HashMap::new(),
            removing: HashSet::new(),
            kernel_incomplete: false,
        }
    }
}

/// A channel binding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Channel {
    pub(crate) peer: PeerAddr,
    pub(crate) expires: Instant,
    /// The expiry in the last install command for this binding, while no remove has
    /// followed: the data plane holds (or is about to hold) it until then. `None` when the
    /// data plane does not hold it (a TCP client, a refused install, a lapsed permission).
    pub(crate) kernel_expires: Option<Instant>,
    /// The ChannelBind success has been sent: ChannelData may go to the client.
    pub(crate) confirmed: bool,
    /// An install of this binding may have reached the data plane since the last removal
    /// (the data plane answered one, or its answer was lost on the way): taking the channel
    /// out of the kernel then needs a removal. False while every install since was one the
    /// daemon could not send ([`crate::OffloadError::Unavailable`]).
    pub(crate) maybe_in_kernel: bool,
}

/// A recently expired binding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cooldown {
    pub(crate) peer: PeerAddr,
    pub(crate) until: Instant,
}

impl Allocation {
    /// An allocation on `port` with no relayed address yet, no permissions and no channels.
    pub(crate) fn new(
        port: AllocationPort,
        username: Arc<str>,
        expires: Instant,
        allocate_txid: TransactionId,
        key: crate::auth::SigningKey,
        icmp: IcmpBudget,
        account: Account,
    ) -> Self {
        Self {
            port,
            relay_v4: None,
            relay_v6: None,
            refused_family: None,
            username,
            expires,
            allocate_txid,
            key: Box::new(key),
            even_port: false,
            bind_attempts: 0,
            unbound: [false; 2],
            dont_fragment: false,
            reservation: None,
            icmp,
            permissions: HashMap::new(),
            channels: HashMap::new(),
            peers: HashMap::new(),
            cooldowns: HashMap::new(),
            account: Box::new(account),
        }
    }

    /// Sets the relayed address of the family of `relay`.
    pub(crate) fn set_relay(&mut self, relay: RelayAddr) {
        match relay.family() {
            Family::V4 => self.relay_v4 = Some(relay),
            Family::V6 => self.relay_v6 = Some(relay),
        }
    }

    /// The relayed address of `family`, if the allocation has one.
    pub(crate) fn relay(&self, family: Family) -> Option<RelayAddr> {
        match family {
            Family::V4 => self.relay_v4,
            Family::V6 => self.relay_v6,
        }
    }

    /// Whether the Allocate success has gone out (every relay socket is bound).
    pub(crate) fn announced(&self) -> bool {
        self.unbound == [false; 2]
    }

    /// Whether the socket of `relay` (one of this allocation's) awaits its bind.
    pub(crate) fn is_unbound(&self, relay: RelayAddr) -> bool {
        self.unbound[relay.family().index()]
    }

    /// Every relayed address now awaits its bind (a new allocation, or one moved to
    /// another port).
    pub(crate) fn await_binds(&mut self) {
        self.unbound = [self.relay_v4.is_some(), self.relay_v6.is_some()];
    }

    /// Both relayed addresses, IPv4 first.
    pub(crate) fn relays(&self) -> impl Iterator<Item = RelayAddr> + use<> {
        self.relay_v4.into_iter().chain(self.relay_v6)
    }

    pub(crate) fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .get(&ip)
            .is_some_and(|&expires| expires > now)
    }

    /// When relaying on `ch` must stop: the earliest of its own expiry (RFC 8656 §12), the
    /// expiry of the permission for its peer's IP (§9) and the allocation's (§7). This is
    /// what the data plane is told, as it checks no permission or allocation of its own.
    pub(crate) fn effective_expiry(&self, ch: &Channel) -> Instant {
        // A channel without a permission is never in the data plane; its own expiry stands in.
        let permission = self
            .permissions
            .get(&ch.peer.0.ip())
            .copied()
            .unwrap_or(ch.expires);
        ch.expires.min(permission).min(self.expires)
    }

    /// The data-plane view of channel `number` bound to `peer`.
    pub(crate) fn binding(
        &self,
        tuple: &FiveTuple,
        number: ChannelNumber,
        peer: PeerAddr,
    ) -> Option<ChannelBinding> {
        Some(ChannelBinding {
            client: tuple.client,
            server: tuple.server,
            transport: tuple.transport,
            relay: self.relay(Family::of(peer.0.ip()))?,
            peer,
            channel: number,
            dont_fragment: self.dont_fragment,
        })
    }

    /// Whether a cooldown forbids binding `number` to `peer` (RFC 8656 §12: for five minutes
    /// after expiry neither the number nor the peer may be bound to anything else).
    pub(crate) fn cooldown_conflict(
        &self,
        number: ChannelNumber,
        peer: PeerAddr,
        now: Instant,
    ) -> bool {
        self.cooldowns.iter().any(|(n, c)| {
            c.until > now && ((*n == number && c.peer != peer) || (*n != number && c.peer == peer))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// Table entry sizes, for the memory estimate in the crate docs; fails if an entry grows
    /// unexpectedly.
    #[test]
    fn entry_sizes() {
        let allocation = size_of::<(FiveTuple, Allocation)>();
        let by_port = size_of::<(AllocationPort, PortUse)>();
        let reservation = size_of::<(ReservationToken, Reservation)>();
        let channel = size_of::<(ChannelNumber, Channel)>();
        let peer = size_of::<(PeerAddr, ChannelNumber)>();
        let permission = size_of::<(IpAddr, Instant)>();
        let cooldown = size_of::<(ChannelNumber, Cooldown)>();
        println!(
            "allocation entry {allocation} B, by_port {by_port} B, channel {channel} B, \
             peer index {peer} B, permission {permission} B, cooldown {cooldown} B, \
             reservation {reservation} B"
        );
        assert!(allocation <= 416, "{allocation}");
        assert!(by_port <= 72, "{by_port}");
        assert!(channel + peer <= 128, "{}", channel + peer);
        assert!(permission <= 48, "{permission}");
    }
}
