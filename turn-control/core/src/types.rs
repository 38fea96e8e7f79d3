//! Role newtypes: every address and number that crosses the core's boundary says what it is.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The transport address of a TURN client as seen by the server (RFC 8656 §2, "client's
/// host transport address" after NAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientAddr(pub SocketAddr);

/// The transport address of a peer that a client talks to through its allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr(pub SocketAddr);

/// A relayed transport address: one of the relay's IP addresses and an [`AllocationPort`]
/// (RFC 8656 §2, "relayed transport address").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayAddr(pub SocketAddr);

/// The UDP port of an allocation. A dual-stack allocation uses the same port on its IPv4
/// and its IPv6 relay address, so the port alone names the allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationPort(pub u16);

/// A TURN channel number, validated to `0x4000..=0x7FFF`: the range of RFC 5766 §11.
/// RFC 8656 §12 narrows it to `0x4000..=0x4FFF` and reserves the rest, but clients built
/// for RFC 5766 (coturn's `turnutils_uclient` among them) still bind numbers up to
/// `0x7FFF`, and coturn accepts them; so does this relay, kernel path included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelNumber(u16);

/// A number outside the channel range (`0x4000..=0x7FFF`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("channel number {0:#06x} is outside 0x4000..=0x7FFF")]
pub struct InvalidChannelNumber(pub u16);

impl ChannelNumber {
    /// The lowest channel number (RFC 8656 §12).
    pub const MIN: u16 = 0x4000;
    /// The highest channel number (RFC 5766 §11; see the type's documentation).
    pub const MAX: u16 = 0x7FFF;

    /// Validates `value` as a channel number.
    pub fn new(value: u16) -> Result<Self, InvalidChannelNumber> {
        if (Self::MIN..=Self::MAX).contains(&value) {
            Ok(Self(value))
        } else {
            Err(InvalidChannelNumber(value))
        }
    }

    /// The number on the wire.
    pub fn value(self) -> u16 {
        self.0
    }
}

/// The transport between a client and the server's listener. Relaying to peers is always
/// UDP (RFC 8656 §3.1); TCP here means TURN over TCP on the client side only. Saved
/// (`--state-dir`) as `"udp"` and `"tcp"`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Plain UDP datagrams: one STUN message or ChannelData message per datagram.
    Udp,
    /// A TCP stream, split into frames with [`crate::frame_len`]; ChannelData is padded to a
    /// multiple of four bytes (RFC 8656 §12.5).
    Tcp,
}

/// An IP address family. Saved (`--state-dir`) as `"v4"` and `"v6"`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// 0 for IPv4, 1 for IPv6: an index into per-family arrays.
    pub fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    /// The family of `ip`, as written (an IPv4-mapped IPv6 address is IPv6).
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The value of this family in REQUESTED-ADDRESS-FAMILY and friends (RFC 8656 §18).
    pub(crate) fn wire(self) -> u8 {
        match self {
            Family::V4 => 0x01,
            Family::V6 => 0x02,
        }
    }
}

/// The client side of an allocation's 5-tuple (RFC 8656 §2): the client's address, the
/// listener it talks to and the transport. The relay side is implied by the allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiveTuple {
    /// The client's (server-reflexive) transport address.
    pub client: ClientAddr,
    /// The listener address the client sends to.
    pub server: SocketAddr,
    /// UDP or TCP between client and server.
    pub transport: Transport,
}

/// Everything the data plane needs to relay one channel in both directions: client
/// ChannelData arriving at `server` from `client` on `channel` goes to `peer` from `relay`,
/// and UDP from `peer` arriving at `relay` goes to `client` from `server` as ChannelData.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelBinding {
    /// The client's transport address.
    pub client: ClientAddr,
    /// The listener the client uses.
    pub server: SocketAddr,
    /// The client-side transport (only UDP bindings are ever sent to the data plane).
    pub transport: Transport,
    /// The relayed transport address used towards this peer.
    pub relay: RelayAddr,
    /// The peer.
    pub peer: PeerAddr,
    /// The channel number.
    pub channel: ChannelNumber,
    /// The allocation asked for DONT-FRAGMENT (RFC 8656 §7.2, §18.9): the data plane sets the
    /// DF bit in the IPv4 header of the datagrams it relays to the peer, as the relay socket
    /// does for user-space relaying (path-MTU discovery). An IPv6 peer needs nothing: IPv6
    /// routers never fragment, and the data plane does not fragment at the source either.
    pub dont_fragment: bool,
}

impl RelayAddr {
    /// The allocation port of this relayed address.
    pub fn port(self) -> AllocationPort {
        AllocationPort(self.0.port())
    }

    /// The address family of this relayed address.
    pub fn family(self) -> Family {
        Family::of(self.0.ip())
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for RelayAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for AllocationPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ChannelNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#06x}", self.0)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        })
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

impl fmt::Display for FiveTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}->{}", self.transport, self.client, self.server)
    }
}

impl fmt::Display for ChannelBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}->{} ch {} via {} to {}{}",
            self.transport,
            self.client,
            self.server,
            self.channel,
            self.relay,
            self.peer,
            if self.dont_fragment { " df" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn channel_number_range() {
        assert!(ChannelNumber::new(0x3FFF).is_err());
        assert_eq!(
            ChannelNumber::new(0x4000).map(ChannelNumber::value),
            Ok(0x4000)
        );
        assert_eq!(
            ChannelNumber::new(0x4FFF).map(ChannelNumber::value),
            Ok(0x4FFF)
        );
        // 0x5000-0x7FFF were valid in RFC 5766 and are reserved in RFC 8656;
        // RFC 5766 clients still use them.
        assert_eq!(
            ChannelNumber::new(0x7FFF).map(ChannelNumber::value),
            Ok(0x7FFF)
        );
        assert_eq!(
            ChannelNumber::new(0x8000),
            Err(InvalidChannelNumber(0x8000))
        );
        assert!(ChannelNumber::new(0xFFFF).is_err());
    }

    #[test]
    fn display_forms() {
        let ch = ChannelNumber::new(0x4001).unwrap();
        assert_eq!(ch.to_string(), "0x4001");
        let relay = RelayAddr("[2001:db8::1]:50000".parse().unwrap());
        assert_eq!(relay.to_string(), "[2001:db8::1]:50000");
        assert_eq!(relay.port(), AllocationPort(50000));
        assert_eq!(relay.family(), Family::V6);
        assert_eq!(Transport::Tcp.to_string(), "tcp");
    }

    proptest! {
        #[test]
        fn channel_number_round_trips(v in any::<u16>()) {
            match ChannelNumber::new(v) {
                Ok(ch) => prop_assert_eq!(ch.value(), v),
                Err(e) => prop_assert!(!(0x4000..=0x7FFF).contains(&e.0)),
            }
        }
    }
}
