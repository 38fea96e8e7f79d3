//! Channel bindings as the agent validates and stores them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use bpf_common::{ClientKeyV4, FAMILY_V4, PeerTarget};

/// RFC 8656 section 12: channel numbers 0x4000 through 0x4FFF.
const CHANNEL_RANGE: std::ops::RangeInclusive<u32> = 0x4000..=0x4fff;

/// A validated IPv4 channel binding: channel data from `client` on `channel`
/// goes to `peer` from the relay's `allocation_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Binding {
    /// The client's transport address as the relay sees it.
    pub client: SocketAddrV4,
    /// Channel number, 0x4000-0x4FFF.
    pub channel: u16,
    /// The peer's transport address.
    pub peer: SocketAddrV4,
    /// The allocation's relay port.
    pub allocation_port: u16,
}

/// What bindings are checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The TURN listen port.
    pub listen_port: u16,
    /// The allocation port range, inclusive.
    pub ports: (u16, u16),
    /// The relay's IPv4 address.
    pub relay_v4: Ipv4Addr,
}

/// Why a binding was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// An address field is not `ip:port`.
    #[error("{field} {value:?} is not an address of the form ip:port")]
    BadAddress {
        /// The field's name.
        field: &'static str,
        /// What it held.
        value: String,
    },
    /// The data plane relays IPv4 bindings only.
    #[error("{field} {address} is IPv6; this data plane relays IPv4 bindings only")]
    Ipv6Unsupported {
        /// The field's name.
        field: &'static str,
        /// The address.
        address: SocketAddr,
    },
    /// Port zero cannot be a transport address.
    #[error("{field} {address} has port 0")]
    ZeroPort {
        /// The field's name.
        field: &'static str,
        /// The address.
        address: SocketAddrV4,
    },
    /// The channel lies outside 0x4000-0x4FFF.
    #[error("channel {0:#06x} is outside 0x4000-0x4fff (RFC 8656 section 12)")]
    ChannelOutOfRange(u32),
    /// The allocation port lies outside the configured range.
    #[error("allocation port {port} is outside the range {low}-{high}")]
    PortOutOfRange {
        /// The port.
        port: u32,
        /// The range's low end.
        low: u16,
        /// The range's high end.
        high: u16,
    },
    /// The peer cannot be a real peer: unspecified, broadcast or multicast.
    #[error("peer {0} is not a unicast address")]
    PeerNotUnicast(SocketAddrV4),
    /// The peer is the relay's own TURN listener: relaying to it would loop.
    #[error("peer {0} is the relay's own listener")]
    PeerIsListener(SocketAddrV4),
}

impl Binding {
    /// Validates a binding received over gRPC.
    pub fn from_proto(
        binding: &proto::v1::ChannelBinding,
        limits: &Limits,
    ) -> Result<Self, BindingError> {
        let client = parse_v4("client", &binding.client)?;
        let peer = parse_v4("peer", &binding.peer)?;
        if !CHANNEL_RANGE.contains(&binding.channel) {
            return Err(BindingError::ChannelOutOfRange(binding.channel));
        }
        let (low, high) = limits.ports;
        let port = binding.allocation_port;
        if !(u32::from(low)..=u32::from(high)).contains(&port) {
            return Err(BindingError::PortOutOfRange { port, low, high });
        }
        let ip = peer.ip();
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return Err(BindingError::PeerNotUnicast(peer));
        }
        if *ip == limits.relay_v4 && peer.port() == limits.listen_port {
            return Err(BindingError::PeerIsListener(peer));
        }
        Ok(Self {
            client,
            channel: binding.channel as u16,
            peer,
            allocation_port: port as u16,
        })
    }

    /// The binding as gRPC sends it.
    pub fn to_proto(self) -> proto::v1::ChannelBinding {
        proto::v1::ChannelBinding {
            client: self.client.to_string(),
            channel: u32::from(self.channel),
            peer: self.peer.to_string(),
            allocation_port: u32::from(self.allocation_port),
        }
    }

    /// The `CLIENT_V4` entry.
    pub fn to_map_v4(self) -> (ClientKeyV4, PeerTarget) {
        let key = ClientKeyV4 {
            client_ip: self.client.ip().octets(),
            client_port: self.client.port().to_be_bytes(),
            channel: self.channel.to_be_bytes(),
        };
        (
            key,
            PeerTarget::v4(*self.peer.ip(), self.peer.port(), self.allocation_port),
        )
    }

    /// The binding a `CLIENT_V4` entry holds, if it is an IPv4 one.
    pub fn from_map_v4(key: &ClientKeyV4, target: &PeerTarget) -> Option<Self> {
        (target.peer_family == FAMILY_V4).then(|| Self {
            client: SocketAddrV4::new(key.client_ip.into(), u16::from_be_bytes(key.client_port)),
            channel: u16::from_be_bytes(key.channel),
            peer: SocketAddrV4::new(
                target.peer_v4().into(),
                u16::from_be_bytes(target.peer_port),
            ),
            allocation_port: u16::from_be_bytes(target.allocation_port),
        })
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ch {:#06x} -> {} via port {}",
            self.client, self.channel, self.peer, self.allocation_port
        )
    }
}

fn parse_v4(field: &'static str, value: &str) -> Result<SocketAddrV4, BindingError> {
    let address: SocketAddr = value.parse().map_err(|_| BindingError::BadAddress {
        field,
        value: value.to_owned(),
    })?;
    let SocketAddr::V4(v4) = address else {
        return Err(BindingError::Ipv6Unsupported { field, address });
    };
    if v4.port() == 0 {
        return Err(BindingError::ZeroPort { field, address: v4 });
    }
    Ok(v4)
}

/// Whether `ip` can serve as the relay's address.
pub fn is_relay_candidate(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        listen_port: 3478,
        ports: (49152, 65535),
        relay_v4: Ipv4Addr::new(203, 0, 113, 1),
    };

    fn request(client: &str, channel: u32, peer: &str, port: u32) -> proto::v1::ChannelBinding {
        proto::v1::ChannelBinding {
            client: client.into(),
            channel,
            peer: peer.into(),
            allocation_port: port,
        }
    }

    #[test]
    fn valid_binding_round_trips_through_the_map_layout() {
        let binding = Binding::from_proto(
            &request("192.0.2.10:40000", 0x4001, "198.51.100.7:9000", 50000),
            &LIMITS,
        )
        .unwrap();
        let (key, target) = binding.to_map_v4();
        assert_eq!(key.client_ip, [192, 0, 2, 10]);
        assert_eq!(key.client_port, 40000u16.to_be_bytes());
        assert_eq!(key.channel, [0x40, 0x01]);
        assert_eq!(Binding::from_map_v4(&key, &target), Some(binding));
        assert_eq!(
            binding.to_proto(),
            request("192.0.2.10:40000", 0x4001, "198.51.100.7:9000", 50000)
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let refuse = |r| Binding::from_proto(&r, &LIMITS).unwrap_err();
        assert!(matches!(
            refuse(request("nonsense", 0x4001, "198.51.100.7:9000", 50000)),
            BindingError::BadAddress {
                field: "client",
                ..
            }
        ));
        assert!(matches!(
            refuse(request(
                "[2001:db8::1]:5",
                0x4001,
                "198.51.100.7:9000",
                50000
            )),
            BindingError::Ipv6Unsupported { .. }
        ));
        assert!(matches!(
            refuse(request("192.0.2.10:0", 0x4001, "198.51.100.7:9000", 50000)),
            BindingError::ZeroPort { .. }
        ));
        assert_eq!(
            refuse(request("192.0.2.10:1", 0x3fff, "198.51.100.7:9000", 50000)),
            BindingError::ChannelOutOfRange(0x3fff)
        );
        assert_eq!(
            refuse(request("192.0.2.10:1", 0x5000, "198.51.100.7:9000", 50000)),
            BindingError::ChannelOutOfRange(0x5000)
        );
        assert!(matches!(
            refuse(request("192.0.2.10:1", 0x4000, "198.51.100.7:9000", 3478)),
            BindingError::PortOutOfRange { .. }
        ));
        assert!(matches!(
            refuse(request("192.0.2.10:1", 0x4000, "198.51.100.7:9000", 70000)),
            BindingError::PortOutOfRange { .. }
        ));
        assert!(matches!(
            refuse(request("192.0.2.10:1", 0x4000, "0.0.0.0:9000", 50000)),
            BindingError::PeerNotUnicast(_)
        ));
        assert!(matches!(
            refuse(request("192.0.2.10:1", 0x4000, "203.0.113.1:3478", 50000)),
            BindingError::PeerIsListener(_)
        ));
        let message = refuse(request("192.0.2.10:1", 0x4fff, "198.51.100.7:9000", 1)).to_string();
        assert_eq!(
            message,
            "allocation port 1 is outside the range 49152-65535"
        );
    }
}
