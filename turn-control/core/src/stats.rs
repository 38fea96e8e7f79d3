//! Counters the daemon exports as metrics. Plain integers, updated in place: reading them
//! costs nothing on the per-packet path.

use std::collections::BTreeMap;
use std::fmt;

pub use crate::usage::Traffic;
use crate::usage::Usage;

/// A STUN/TURN request method, as counted in [`Stats::responses`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestMethod {
    /// Binding (RFC 8489).
    Binding,
    /// Allocate (RFC 8656 §7).
    Allocate,
    /// Refresh (RFC 8656 §8).
    Refresh,
    /// CreatePermission (RFC 8656 §10).
    CreatePermission,
    /// ChannelBind (RFC 8656 §12).
    ChannelBind,
}

impl RequestMethod {
    /// A lowercase label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestMethod::Binding => "binding",
            RequestMethod::Allocate => "allocate",
            RequestMethod::Refresh => "refresh",
            RequestMethod::CreatePermission => "create_permission",
            RequestMethod::ChannelBind => "channel_bind",
        }
    }
}

impl fmt::Display for RequestMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the core counts.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Responses sent, by method and code (200 for success).
    pub responses: BTreeMap<(RequestMethod, u16), u64>,
    /// Requests refused for credentials: unknown or expired user, bad MESSAGE-INTEGRITY.
    pub auth_failures: u64,
    /// Answers to unauthenticated requests (Binding responses, 401 and 438 challenges,
    /// errors before authentication) not sent because the host-wide backstop
    /// ([`crate::Config::unauthorized_rate`]) was reached.
    pub unauthorized_rate_limited: u64,
    /// Answers to unauthenticated requests not sent because their source (an IPv4 address or
    /// an IPv6 /64) had used its share ([`crate::Config::unauthenticated_per_source`]).
    pub unauthenticated_source_limited: u64,
    /// 438 (Stale Nonce) answers to requests whose MESSAGE-INTEGRITY verified, sent outside
    /// the limits on unauthenticated answers.
    pub stale_nonce_verified: u64,
    /// CreatePermission and ChannelBind requests refused with 508 because the allocation
    /// holds [`crate::Config::max_permissions_per_allocation`] permissions.
    pub permission_cap_reached: u64,
    /// ChannelBind requests refused with 508 because the allocation holds
    /// [`crate::Config::max_channels_per_allocation`] channels.
    pub channel_cap_reached: u64,
    /// Channel bindings kept in user space, not sent to the data plane, because their user
    /// held [`crate::Config::user_kernel_bindings`] there already.
    pub kernel_share_exceeded: u64,
    /// Peer addresses refused by policy (CreatePermission, ChannelBind, Send).
    pub peers_denied: u64,
    /// Allocations currently alive.
    pub allocations_active: u64,
    /// Allocations ever created.
    pub allocations_created: u64,
    /// Permissions currently alive.
    pub permissions_active: u64,
    /// Channel bindings currently alive.
    pub channels_active: u64,
    /// User-space relaying client to peer (ChannelData and Send).
    pub relayed_to_peer: Traffic,
    /// User-space relaying peer to client (ChannelData and Data indications).
    pub relayed_to_client: Traffic,
    /// Relayed and dropped application data of every allocation, both paths: user space as
    /// it relays (what [`Stats::relayed_to_peer`] and [`Stats::relayed_to_client`] count, and
    /// what `max_bps` and `user_max_bps` dropped there) plus the kernel's figures as the
    /// daemon feeds them ([`crate::Server::kernel_usage`], [`crate::Server::channel_removed`]).
    pub usage: Usage,
    /// Packets dropped: not STUN/ChannelData, no allocation, no permission, unbound channel;
    /// ICMP errors of a type not relayed, or for a relayed address without allocation or
    /// permission.
    pub dropped: u64,
    /// Channel bindings the data plane acknowledged.
    pub offload_installed: u64,
    /// Channel bindings the data plane refused; relayed in user space.
    pub offload_failed: u64,
    /// ChannelBind successes sent before the data plane answered; relayed in user space
    /// until (unless) the acknowledgement arrives.
    pub offload_timed_out: u64,
    /// Reserved relay ports this server holds (EVEN-PORT with the R bit, RFC 8656 §7.2), one per
    /// RESERVATION-TOKEN it made. A token used on another server sharing the ledger counts here
    /// until this one learns of it, at the latest when the reservation's time is up;
    /// [`crate::ReservationLedger::total`] has the tokens out right now.
    pub reservations_active: u64,
    /// ICMP errors relayed to clients as Data indications (RFC 8656 §11.5).
    pub icmp_relayed: u64,
    /// ICMP errors not relayed because their allocation's rate cap ([`crate::ICMP_RATE`]) was
    /// reached.
    pub icmp_rate_limited: u64,
    /// Allocates redirected (300, or 508 without an alternate) because the server drains.
    pub redirected_drain: u64,
    /// Allocates redirected (300, or 508 without an alternate) because the allocations
    /// reached [`crate::Config::shed_allocations`].
    pub redirected_load: u64,
}

impl Stats {
    pub(crate) fn response(&mut self, method: RequestMethod, code: u16) {
        *self.responses.entry((method, code)).or_default() += 1;
    }

    /// Responses sent for `method` with `code` (200 for success).
    pub fn responses_for(&self, method: RequestMethod, code: u16) -> u64 {
        self.responses.get(&(method, code)).copied().unwrap_or(0)
    }

    /// Adds `other`'s counts to these: the totals of a daemon that runs several servers.
    pub fn accumulate(&mut self, other: &Stats) {
        // Destructured so that a new counter cannot be forgotten here.
        let Stats {
            responses,
            auth_failures,
            unauthorized_rate_limited,
            unauthenticated_source_limited,
            stale_nonce_verified,
            permission_cap_reached,
            channel_cap_reached,
            kernel_share_exceeded,
            peers_denied,
            allocations_active,
            allocations_created,
            permissions_active,
            channels_active,
            relayed_to_peer,
            relayed_to_client,
            usage,
            dropped,
            offload_installed,
            offload_failed,
            offload_timed_out,
            reservations_active,
            icmp_relayed,
            icmp_rate_limited,
            redirected_drain,
            redirected_load,
        } = other;
        for (key, count) in responses {
            *self.responses.entry(*key).or_default() += count;
        }
        self.auth_failures += auth_failures;
        self.unauthorized_rate_limited += unauthorized_rate_limited;
        self.unauthenticated_source_limited += unauthenticated_source_limited;
        self.stale_nonce_verified += stale_nonce_verified;
        self.permission_cap_reached += permission_cap_reached;
        self.channel_cap_reached += channel_cap_reached;
        self.kernel_share_exceeded += kernel_share_exceeded;
        self.peers_denied += peers_denied;
        self.allocations_active += allocations_active;
        self.allocations_created += allocations_created;
        self.permissions_active += permissions_active;
        self.channels_active += channels_active;
        for (sum, part) in [
            (&mut self.relayed_to_peer, relayed_to_peer),
            (&mut self.relayed_to_client, relayed_to_client),
        ] {
            sum.packets = sum.packets.wrapping_add(part.packets);
            sum.bytes = sum.bytes.wrapping_add(part.bytes);
        }
        self.usage += *usage;
        self.dropped += dropped;
        self.offload_installed += offload_installed;
        self.offload_failed += offload_failed;
        self.offload_timed_out += offload_timed_out;
        self.reservations_active += reservations_active;
        self.icmp_relayed += icmp_relayed;
        self.icmp_rate_limited += icmp_rate_limited;
        self.redirected_drain += redirected_drain;
        self.redirected_load += redirected_load;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulate_adds_every_counter() {
        let mut one = Stats::default();
        one.response(RequestMethod::Allocate, 200);
        one.relayed_to_peer.count(100);
        one.allocations_active = 2;
        one.offload_installed = 3;
        let mut two = one.clone();
        two.response(RequestMethod::ChannelBind, 403);
        two.dropped = 5;
        let mut sum = Stats::default();
        sum.accumulate(&one);
        sum.accumulate(&two);
        assert_eq!(sum.responses_for(RequestMethod::Allocate, 200), 2);
        assert_eq!(sum.responses_for(RequestMethod::ChannelBind, 403), 1);
        assert_eq!(
            sum.relayed_to_peer,
            Traffic {
                packets: 2,
                bytes: 200
            }
        );
        assert_eq!(
            (sum.allocations_active, sum.offload_installed, sum.dropped),
            (4, 6, 5)
        );
    }
}
