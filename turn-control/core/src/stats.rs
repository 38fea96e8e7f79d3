//! Counters the daemon exports as metrics. Plain integers, updated in place: reading them
//! costs nothing on the per-packet path.

use std::collections::BTreeMap;
use std::fmt;

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

/// Packet and byte counts of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets relayed.
    pub packets: u64,
    /// Payload bytes relayed (application data, without TURN framing).
    pub bytes: u64,
}

impl Traffic {
    pub(crate) fn add(&mut self, bytes: usize) {
        self.packets = self.packets.wrapping_add(1);
        self.bytes = self.bytes.wrapping_add(bytes as u64);
    }
}

/// Everything the core counts.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Responses sent, by method and code (200 for success).
    pub responses: BTreeMap<(RequestMethod, u16), u64>,
    /// Requests refused for credentials: unknown or expired user, bad MESSAGE-INTEGRITY.
    pub auth_failures: u64,
    /// 401 answers not sent because the rate cap was reached.
    pub unauthorized_rate_limited: u64,
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
    /// Packets dropped: not STUN/ChannelData, no allocation, no permission, unbound channel.
    pub dropped: u64,
    /// Channel bindings the data plane acknowledged.
    pub offload_installed: u64,
    /// Channel bindings the data plane refused; relayed in user space.
    pub offload_failed: u64,
    /// ChannelBind successes sent before the data plane answered; relayed in user space
    /// until (unless) the acknowledgement arrives.
    pub offload_timed_out: u64,
}

impl Stats {
    pub(crate) fn response(&mut self, method: RequestMethod, code: u16) {
        *self.responses.entry((method, code)).or_default() += 1;
    }

    /// Responses sent for `method` with `code` (200 for success).
    pub fn responses_for(&self, method: RequestMethod, code: u16) -> u64 {
        self.responses.get(&(method, code)).copied().unwrap_or(0)
    }
}
