//! The allocation, permission and channel tables (RFC 8656 §6, §9, §12).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use rtc_stun::message::TransactionId;

use crate::types::{
    AllocationPort, ChannelBinding, ChannelNumber, Family, FiveTuple, PeerAddr, RelayAddr,
};

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
    /// The key the Allocate was authenticated with, to sign a success re-issued for another
    /// port when the daemon could not bind the first one.
    pub(crate) key: crate::auth::LongTermKey,
    /// The Allocate asked for an even port (EVEN-PORT, RFC 8656 §7.2).
    pub(crate) even_port: bool,
    /// Ports tried for this allocation so far.
    pub(crate) bind_attempts: u8,
    /// Relayed addresses whose socket the daemon has not yet confirmed
    /// ([`crate::Server::relay_bound`]). The Allocate success waits until this is empty, so
    /// that it never announces a port nobody listens on; empty once it went out.
    /// Indexed by [`Family::index`]; kept in two bytes so the table entry does not grow.
    pub(crate) unbound: [bool; 2],
    /// Permission expiry by peer IP address (RFC 8656 §9: ports do not matter).
    pub(crate) permissions: HashMap<IpAddr, Instant>,
    pub(crate) channels: HashMap<ChannelNumber, Channel>,
    /// The reverse of `channels`, for the peer-to-client decision.
    pub(crate) peers: HashMap<PeerAddr, ChannelNumber>,
    /// Expired channels whose number and peer stay reserved for each other (RFC 8656 §12).
    pub(crate) cooldowns: HashMap<ChannelNumber, Cooldown>,
}

/// A channel binding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Channel {
    pub(crate) peer: PeerAddr,
    pub(crate) expires: Instant,
    /// The ChannelBind success has been sent: ChannelData may go to the client.
    pub(crate) confirmed: bool,
    /// An install command is out and no remove has followed: the data plane holds (or is
    /// about to hold) this binding.
    pub(crate) in_kernel: bool,
}

/// A recently expired binding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cooldown {
    pub(crate) peer: PeerAddr,
    pub(crate) until: Instant,
}

impl Allocation {
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
        let by_port = size_of::<(AllocationPort, FiveTuple)>();
        let channel = size_of::<(ChannelNumber, Channel)>();
        let peer = size_of::<(PeerAddr, ChannelNumber)>();
        let permission = size_of::<(IpAddr, Instant)>();
        let cooldown = size_of::<(ChannelNumber, Cooldown)>();
        println!(
            "allocation entry {allocation} B, by_port {by_port} B, channel {channel} B, \
             peer index {peer} B, permission {permission} B, cooldown {cooldown} B"
        );
        assert!(allocation <= 400, "{allocation}");
        assert!(channel + peer <= 128, "{}", channel + peer);
        assert!(permission <= 48, "{permission}");
    }
}
