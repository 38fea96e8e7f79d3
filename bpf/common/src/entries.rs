//! A channel binding's two entries in the kernel's maps, the one layout the
//! agent writes, the program reads and the tests check.

use core::net::{IpAddr, SocketAddr};

use crate::{ClientKeyV4, ClientKeyV6, ClientTarget, PeerKeyV4, PeerKeyV6, PeerTarget, Pod};

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

    /// The map's name, as the program declares (and the agent pins) it.
    pub fn map_name(&self) -> &'static str {
        match self {
            MapKey::ClientV4(_) => "CLIENT_V4",
            MapKey::ClientV6(_) => "CLIENT_V6",
            MapKey::PeerV4(_) => "PEER_V4",
            MapKey::PeerV6(_) => "PEER_V6",
        }
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

/// What a channel binding is made of, as the maps hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingFields {
    /// The client's transport address.
    pub client: SocketAddr,
    /// The listener the client sends to (of the client's family; a specific
    /// address, not a wildcard).
    pub listener: SocketAddr,
    /// The channel number.
    pub channel: u16,
    /// The peer's transport address.
    pub peer: SocketAddr,
    /// The allocation's relay port.
    pub allocation_port: u16,
    /// Whether its IPv4 datagrams to the peer leave with DF set (the
    /// allocation asked for DONT-FRAGMENT); the client-side entry carries
    /// it ([`crate::PEER_DONT_FRAGMENT`]).
    pub dont_fragment: bool,
    /// Its `USAGE` slot (0: not counted); both entries carry it.
    pub usage_slot: u32,
    /// Its allocation's and its user's `METERS` keys (0: none); both
    /// entries carry them.
    pub meters: [u64; 2],
    /// When its authorisation ends, on the kernel's coarse monotonic clock
    /// ([`crate::ClientTarget::expires_at_ns`]); both entries carry it.
    pub expires_at_ns: u64,
}

impl BindingFields {
    /// The client-side entry (`CLIENT_V4` or `CLIENT_V6`): key and value.
    pub fn client_entry(&self) -> (MapKey, PeerTarget) {
        let client_port = self.client.port().to_be_bytes();
        let listener_port = self.listener.port().to_be_bytes();
        let channel = self.channel.to_be_bytes();
        let key = match (self.client.ip(), self.listener.ip()) {
            (IpAddr::V4(client), IpAddr::V4(listener)) => MapKey::ClientV4(ClientKeyV4 {
                client_ip: client.octets(),
                client_port,
                channel,
                listener_ip: listener.octets(),
                listener_port,
                reserved: [0; 2],
            }),
            (client, listener) => MapKey::ClientV6(ClientKeyV6 {
                client_ip: v6_octets(client),
                client_port,
                channel,
                listener_ip: v6_octets(listener),
                listener_port,
                reserved: [0; 2],
            }),
        };
        let mut target = PeerTarget::new(
            self.peer.ip(),
            self.peer.port(),
            self.allocation_port,
            self.expires_at_ns,
        )
        .with_dont_fragment(self.dont_fragment);
        target.usage_slot = self.usage_slot;
        target.meters = self.meters;
        (key, target)
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
        let mut target =
            ClientTarget::new(self.client, self.listener, self.channel, self.expires_at_ns);
        target.usage_slot = self.usage_slot;
        target.meters = self.meters;
        (key, target)
    }

    /// The binding a client-side entry describes (its key's bytes, its value).
    pub fn from_client_entry(key: &[u8], target: &PeerTarget) -> Option<Self> {
        let endpoint = |ip: IpAddr, port: [u8; 2]| SocketAddr::new(ip, u16::from_be_bytes(port));
        let (client, listener, channel) = if let Some(key) = ClientKeyV4::from_bytes(key) {
            (
                endpoint(IpAddr::from(key.client_ip), key.client_port),
                endpoint(IpAddr::from(key.listener_ip), key.listener_port),
                key.channel,
            )
        } else {
            let key = ClientKeyV6::from_bytes(key)?;
            (
                endpoint(IpAddr::from(key.client_ip), key.client_port),
                endpoint(IpAddr::from(key.listener_ip), key.listener_port),
                key.channel,
            )
        };
        Some(Self {
            client,
            listener,
            channel: u16::from_be_bytes(channel),
            peer: endpoint(target.peer()?, target.peer_port),
            allocation_port: u16::from_be_bytes(target.allocation_port),
            dont_fragment: target.dont_fragment(),
            usage_slot: target.usage_slot,
            meters: target.meters,
            expires_at_ns: target.expires_at_ns,
        })
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_entry_carries_the_whole_binding() {
        for dont_fragment in [false, true] {
            let binding = BindingFields {
                client: "192.0.2.10:40000".parse().unwrap(),
                listener: "203.0.113.1:3478".parse().unwrap(),
                channel: 0x4001,
                peer: "198.51.100.7:9000".parse().unwrap(),
                allocation_port: 50000,
                dont_fragment,
                usage_slot: 3,
                meters: [5, 0],
                expires_at_ns: 7,
            };
            let (key, target) = binding.client_entry();
            assert_eq!(target.dont_fragment(), dont_fragment);
            assert_eq!(
                BindingFields::from_client_entry(key.bytes(), &target),
                Some(binding)
            );
            // The peer-side entry has no flag: only datagrams to the peer get DF.
            assert_eq!(
                binding.peer_entry().1,
                BindingFields {
                    dont_fragment: false,
                    ..binding
                }
                .peer_entry()
                .1
            );
        }
    }
}
