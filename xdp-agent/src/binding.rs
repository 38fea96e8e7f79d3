//! Channel bindings as the agent validates and stores them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bpf_common::{ClientKeyV4, ClientKeyV6, ClientTarget, PeerKeyV4, PeerKeyV6, PeerTarget, Pod};

/// Channel numbers 0x4000 through 0x7FFF: RFC 5766 section 11's range, which
/// turn-control accepts for RFC 5766 clients (RFC 8656 section 12 reserves
/// 0x5000-0x7FFF).
const CHANNEL_RANGE: std::ops::RangeInclusive<u32> = 0x4000..=0x7fff;

/// A validated channel binding: channel data from `client` on `channel`
/// goes to `peer` from the relay's `allocation_port`, and the peer's
/// datagrams to that port go back to `client` on `channel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Binding {
    /// The client's transport address as the relay sees it.
    pub client: SocketAddr,
    /// Channel number, 0x4000-0x7FFF.
    pub channel: u16,
    /// The peer's transport address.
    pub peer: SocketAddr,
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
    /// The relay's IPv4 address, if it relays IPv4.
    pub relay_ipv4: Option<Ipv4Addr>,
    /// The relay's IPv6 address, if it relays IPv6.
    pub relay_ipv6: Option<Ipv6Addr>,
}

impl Limits {
    fn is_listener(&self, address: SocketAddr) -> bool {
        let ours = match address.ip() {
            IpAddr::V4(ip) => self.relay_ipv4 == Some(ip),
            IpAddr::V6(ip) => self.relay_ipv6 == Some(ip),
        };
        ours && address.port() == self.listen_port
    }

    fn has_family(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(_) => self.relay_ipv4.is_some(),
            IpAddr::V6(_) => self.relay_ipv6.is_some(),
        }
    }
}

/// Why a binding was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// An address field is not `ip:port`.
    #[error("{field} {value:?} is not an address of the form ip:port or [ip]:port")]
    BadAddress {
        /// The field's name.
        field: &'static str,
        /// What it held.
        value: String,
    },
    /// Port zero cannot be a transport address.
    #[error("{field} {address} has port 0")]
    ZeroPort {
        /// The field's name.
        field: &'static str,
        /// The address.
        address: SocketAddr,
    },
    /// The address is of a family the relay has no address in.
    #[error("{field} {address} is of a family the relay has no address in")]
    FamilyNotRelayed {
        /// The field's name.
        field: &'static str,
        /// The address.
        address: SocketAddr,
    },
    /// The channel lies outside 0x4000-0x7FFF.
    #[error("channel {0:#06x} is outside 0x4000-0x7fff")]
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
    /// The address cannot be a real endpoint: unspecified, broadcast or multicast.
    #[error("{field} {address} is not a unicast address")]
    NotUnicast {
        /// The field's name.
        field: &'static str,
        /// The address.
        address: SocketAddr,
    },
    /// The peer is the relay's own TURN listener: relaying to it would loop.
    #[error("peer {0} is the relay's own listener")]
    PeerIsListener(SocketAddr),
}

impl Binding {
    /// Reads a binding to remove: well-formed, but not checked against the
    /// configuration in force (it may have been installed under another).
    pub fn parse(binding: &proto::v1::ChannelBinding) -> Result<Self, BindingError> {
        let client = parse_address("client", &binding.client)?;
        let peer = parse_address("peer", &binding.peer)?;
        if !CHANNEL_RANGE.contains(&binding.channel) {
            return Err(BindingError::ChannelOutOfRange(binding.channel));
        }
        let port =
            u16::try_from(binding.allocation_port).map_err(|_| BindingError::PortOutOfRange {
                port: binding.allocation_port,
                low: 1,
                high: u16::MAX,
            })?;
        Ok(Self {
            client,
            channel: binding.channel as u16,
            peer,
            allocation_port: port,
        })
    }

    /// Validates a binding received over gRPC.
    pub fn from_proto(
        binding: &proto::v1::ChannelBinding,
        limits: &Limits,
    ) -> Result<Self, BindingError> {
        let client = parse_endpoint("client", &binding.client, limits)?;
        let peer = parse_endpoint("peer", &binding.peer, limits)?;
        if !CHANNEL_RANGE.contains(&binding.channel) {
            return Err(BindingError::ChannelOutOfRange(binding.channel));
        }
        let (low, high) = limits.ports;
        let port = binding.allocation_port;
        if !(u32::from(low)..=u32::from(high)).contains(&port) {
            return Err(BindingError::PortOutOfRange { port, low, high });
        }
        if limits.is_listener(peer) {
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

    /// The client-side entry (`CLIENT_V4` or `CLIENT_V6`): key and value.
    pub fn client_entry(&self) -> (MapKey, PeerTarget) {
        let client_port = self.client.port().to_be_bytes();
        let channel = self.channel.to_be_bytes();
        let key = match self.client.ip() {
            IpAddr::V4(ip) => MapKey::ClientV4(ClientKeyV4 {
                client_ip: ip.octets(),
                client_port,
                channel,
            }),
            IpAddr::V6(ip) => MapKey::ClientV6(ClientKeyV6 {
                client_ip: ip.octets(),
                client_port,
                channel,
            }),
        };
        (
            key,
            PeerTarget::new(self.peer.ip(), self.peer.port(), self.allocation_port),
        )
    }

    /// The peer-side entry (`PEER_V4` or `PEER_V6`): key and value.
    pub fn peer_entry(&self) -> (MapKey, ClientTarget) {
        let peer_port = self.peer.port().to_be_bytes();
        let allocation_port = self.allocation_port.to_be_bytes();
        let key = match self.peer.ip() {
            IpAddr::V4(ip) => MapKey::PeerV4(PeerKeyV4 {
                peer_ip: ip.octets(),
                peer_port,
                allocation_port,
            }),
            IpAddr::V6(ip) => MapKey::PeerV6(PeerKeyV6 {
                peer_ip: ip.octets(),
                peer_port,
                allocation_port,
            }),
        };
        (
            key,
            ClientTarget::new(self.client.ip(), self.client.port(), self.channel),
        )
    }

    /// The binding a client-side entry describes.
    pub fn from_client_entry(key: &[u8], target: &PeerTarget) -> Option<Self> {
        let (client, channel) = if let Some(key) = ClientKeyV4::from_bytes(key) {
            (
                SocketAddr::new(
                    IpAddr::from(key.client_ip),
                    u16::from_be_bytes(key.client_port),
                ),
                key.channel,
            )
        } else {
            let key = ClientKeyV6::from_bytes(key)?;
            (
                SocketAddr::new(
                    IpAddr::from(key.client_ip),
                    u16::from_be_bytes(key.client_port),
                ),
                key.channel,
            )
        };
        Some(Self {
            client,
            channel: u16::from_be_bytes(channel),
            peer: SocketAddr::new(target.peer()?, u16::from_be_bytes(target.peer_port)),
            allocation_port: u16::from_be_bytes(target.allocation_port),
        })
    }
}

/// A key of one of the four binding maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKey {
    /// `CLIENT_V4`.
    ClientV4(ClientKeyV4),
    /// `CLIENT_V6`.
    ClientV6(ClientKeyV6),
    /// `PEER_V4`.
    PeerV4(PeerKeyV4),
    /// `PEER_V6`.
    PeerV6(PeerKeyV6),
}

impl MapKey {
    /// Whether this is the client-side entry (one per binding).
    pub fn is_client(&self) -> bool {
        matches!(self, MapKey::ClientV4(_) | MapKey::ClientV6(_))
    }

    /// The key's bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            MapKey::ClientV4(key) => key.as_bytes(),
            MapKey::ClientV6(key) => key.as_bytes(),
            MapKey::PeerV4(key) => key.as_bytes(),
            MapKey::PeerV6(key) => key.as_bytes(),
        }
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ch {:#06x} <-> {} via port {}",
            self.client, self.channel, self.peer, self.allocation_port
        )
    }
}

/// Parses `ip:port`, canonicalising `::ffff:a.b.c.d` (the kernel sees such
/// an endpoint as IPv4).
pub fn parse_address(field: &'static str, value: &str) -> Result<SocketAddr, BindingError> {
    let address: SocketAddr = value.parse().map_err(|_| BindingError::BadAddress {
        field,
        value: value.to_owned(),
    })?;
    Ok(SocketAddr::new(address.ip().to_canonical(), address.port()))
}

fn parse_endpoint(
    field: &'static str,
    value: &str,
    limits: &Limits,
) -> Result<SocketAddr, BindingError> {
    let address = parse_address(field, value)?;
    if address.port() == 0 {
        return Err(BindingError::ZeroPort { field, address });
    }
    let ip = address.ip();
    let unicast = match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    };
    if !unicast {
        return Err(BindingError::NotUnicast { field, address });
    }
    if !limits.has_family(ip) {
        return Err(BindingError::FamilyNotRelayed { field, address });
    }
    Ok(address)
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
        relay_ipv4: Some(Ipv4Addr::new(203, 0, 113, 1)),
        relay_ipv6: Some(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1)),
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
    fn bindings_round_trip_through_the_map_layout_in_every_family_pair() {
        for (client, peer) in [
            ("192.0.2.10:40000", "198.51.100.7:9000"),
            ("192.0.2.10:40000", "[2001:db8:3::7]:9000"),
            ("[2001:db8:1::10]:40000", "198.51.100.7:9000"),
            ("[2001:db8:1::10]:40000", "[2001:db8:3::7]:9000"),
        ] {
            let binding =
                Binding::from_proto(&request(client, 0x4001, peer, 50000), &LIMITS).unwrap();
            let (key, target) = binding.client_entry();
            assert_eq!(
                Binding::from_client_entry(key.bytes(), &target),
                Some(binding)
            );
            let (peer_key, client_target) = binding.peer_entry();
            assert_eq!(client_target.client(), Some(binding.client.ip()));
            assert_eq!(client_target.channel, [0x40, 0x01]);
            assert_eq!(
                peer_key.bytes().len(),
                if binding.peer.is_ipv4() { 8 } else { 20 }
            );
            assert_eq!(
                key.bytes().len(),
                if binding.client.is_ipv4() { 8 } else { 20 }
            );
            assert_eq!(binding.to_proto(), request(client, 0x4001, peer, 50000));
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_canonicalised() {
        let binding = Binding::from_proto(
            &request(
                "[::ffff:192.0.2.10]:40000",
                0x4001,
                "198.51.100.7:9000",
                50000,
            ),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(binding.client, "192.0.2.10:40000".parse().unwrap());
    }

    #[test]
    fn refusals_name_the_problem() {
        let refuse = |r| Binding::from_proto(&r, &LIMITS).unwrap_err();
        let peer = "198.51.100.7:9000";
        assert!(matches!(
            refuse(request("nonsense", 0x4001, peer, 50000)),
            BindingError::BadAddress {
                field: "client",
                ..
            }
        ));
        assert!(matches!(
            refuse(request("192.0.2.10:0", 0x4001, peer, 50000)),
            BindingError::ZeroPort { .. }
        ));
        assert_eq!(
            refuse(request("192.0.2.10:1", 0x3fff, peer, 50000)),
            BindingError::ChannelOutOfRange(0x3fff)
        );
        assert_eq!(
            refuse(request("192.0.2.10:1", 0x8000, peer, 50000)),
            BindingError::ChannelOutOfRange(0x8000)
        );
        assert!(matches!(
            refuse(request("192.0.2.10:1", 0x4000, peer, 3478)),
            BindingError::PortOutOfRange { .. }
        ));
        assert!(matches!(
            refuse(request("192.0.2.10:1", 0x4000, peer, 70000)),
            BindingError::PortOutOfRange { .. }
        ));
        assert!(matches!(
            refuse(request("192.0.2.10:1", 0x4000, "0.0.0.0:9000", 50000)),
            BindingError::NotUnicast { field: "peer", .. }
        ));
        assert!(matches!(
            refuse(request("192.0.2.10:1", 0x4000, "[ff02::1]:9000", 50000)),
            BindingError::NotUnicast { field: "peer", .. }
        ));
        assert!(matches!(
            refuse(request("192.0.2.10:1", 0x4000, "203.0.113.1:3478", 50000)),
            BindingError::PeerIsListener(_)
        ));
        assert!(matches!(
            refuse(request(
                "192.0.2.10:1",
                0x4000,
                "[2001:db8:2::1]:3478",
                50000
            )),
            BindingError::PeerIsListener(_)
        ));
        let v4_only = Limits {
            relay_ipv6: None,
            ..LIMITS
        };
        assert!(matches!(
            Binding::from_proto(
                &request("192.0.2.10:1", 0x4000, "[2001:db8::7]:9", 50000),
                &v4_only
            )
            .unwrap_err(),
            BindingError::FamilyNotRelayed { field: "peer", .. }
        ));
        let message = refuse(request("192.0.2.10:1", 0x4fff, peer, 1)).to_string();
        assert_eq!(
            message,
            "allocation port 1 is outside the range 49152-65535"
        );
    }
}
