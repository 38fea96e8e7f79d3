//! Channel bindings as the agent checks them against its configuration and
//! lays them out in the kernel's maps.

use std::collections::HashSet;
use std::mem::offset_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bpf_common::{BindingFields, ClientTarget, MapKey, PeerTarget, Pod, TERMS_LEN};
use proto::{Binding, BindingError, Lease};
use tonic::Code;

use crate::peers::{Denied, PeerPolicy};
use crate::usage::MeterRef;

/// Why a binding to install was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// It is malformed, or does not fit the configuration in force.
    #[error(transparent)]
    Invalid(#[from] BindingError),
    /// Its peer or client is an address the kernel must not relay to.
    #[error("{field} {address} is refused by the agent's peer policy: {reason}")]
    Denied {
        /// The field's name.
        field: &'static str,
        /// The address.
        address: SocketAddr,
        /// What the address is.
        reason: Denied,
    },
}

impl Refused {
    /// The gRPC status code of the refusal: INVALID_ARGUMENT for a
    /// malformed binding, PERMISSION_DENIED for one the policy refuses.
    pub fn code(&self) -> Code {
        match self {
            Refused::Invalid(_) => Code::InvalidArgument,
            Refused::Denied { .. } => Code::PermissionDenied,
        }
    }
}

/// What bindings are checked against.
#[derive(Clone, Debug)]
pub struct Limits {
    /// turn-control's listeners, wildcards included.
    pub listeners: Vec<SocketAddr>,
    /// The allocation port range, inclusive.
    pub ports: (u16, u16),
    /// The relay's IPv4 address, if it relays IPv4.
    pub relay_ipv4: Option<Ipv4Addr>,
    /// The relay's IPv6 address, if it relays IPv6.
    pub relay_ipv6: Option<Ipv6Addr>,
    /// The addresses the kernel may relay to.
    pub policy: PeerPolicy,
}

impl Limits {
    /// The relay's address in the family of `ip`.
    fn relay_address(&self, ip: IpAddr) -> Option<IpAddr> {
        match ip {
            IpAddr::V4(_) => self.relay_ipv4.map(IpAddr::V4),
            IpAddr::V6(_) => self.relay_ipv6.map(IpAddr::V6),
        }
    }

    /// The address a binding's listener stands for: itself, or for a
    /// wildcard listener the relay address of its family (the address the
    /// kernel relays on; clients of the host's other addresses are relayed
    /// in user space).
    pub fn resolve_listener(&self, listener: SocketAddr) -> Result<SocketAddr, BindingError> {
        if !listener.ip().is_unspecified() {
            return Ok(listener);
        }
        let ip = self
            .relay_address(listener.ip())
            .ok_or(BindingError::FamilyNotRelayed {
                field: "listener",
                address: listener,
            })?;
        Ok(SocketAddr::new(ip, listener.port()))
    }

    /// Whether `address` (resolved) is one of the listeners.
    pub fn is_listener(&self, address: SocketAddr) -> bool {
        self.listeners.iter().any(|listener| {
            listener.port() == address.port()
                && listener.is_ipv4() == address.is_ipv4()
                && (listener.ip() == address.ip()
                    || (listener.ip().is_unspecified()
                        && self.relay_address(address.ip()) == Some(address.ip())))
        })
    }

    fn has_family(&self, ip: IpAddr) -> bool {
        self.relay_address(ip).is_some()
    }

    /// Checks a binding to install received over gRPC, its lifetime
    /// included, and resolves its listener; then its client and peer against
    /// the peer policy.
    pub fn check(&self, wire: &proto::v1::ChannelBinding) -> Result<Lease, Refused> {
        let Lease {
            mut binding,
            lifetime,
            rate_limits,
        } = Lease::try_from(wire)?;
        self.check_endpoint("client", binding.client)?;
        self.check_endpoint("peer", binding.peer)?;
        let (low, high) = self.ports;
        if !(low..=high).contains(&binding.allocation_port) {
            return Err(BindingError::PortOutOfRange {
                port: u32::from(binding.allocation_port),
                low,
                high,
            }
            .into());
        }
        if self.is_listener(binding.peer) {
            return Err(BindingError::PeerIsListener(binding.peer).into());
        }
        binding.listener = self.resolve_listener(binding.listener)?;
        if !self.is_listener(binding.listener) {
            return Err(BindingError::UnknownListener(binding.listener).into());
        }
        let denied = |field, address: SocketAddr| {
            move |reason| Refused::Denied {
                field,
                address,
                reason,
            }
        };
        self.policy
            .client(binding.client.ip())
            .map_err(denied("client", binding.client))?;
        self.policy
            .peer(binding.peer)
            .map_err(denied("peer", binding.peer))?;
        Ok(Lease {
            binding,
            lifetime,
            rate_limits,
        })
    }

    /// Reads a binding to remove: well-formed, its listener resolved, but
    /// not checked further (it may have been installed under another
    /// configuration).
    pub fn parse(&self, wire: &proto::v1::ChannelBinding) -> Result<Binding, BindingError> {
        let mut binding = Binding::try_from(wire)?;
        binding.listener = self.resolve_listener(binding.listener)?;
        Ok(binding)
    }

    fn check_endpoint(&self, field: &'static str, address: SocketAddr) -> Result<(), BindingError> {
        if address.port() == 0 {
            return Err(BindingError::ZeroPort { field, address });
        }
        let unicast = match address.ip() {
            IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()),
            IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
        };
        if !unicast {
            return Err(BindingError::NotUnicast { field, address });
        }
        if !self.has_family(address.ip()) {
            return Err(BindingError::FamilyNotRelayed { field, address });
        }
        Ok(())
    }
}

/// A checked binding as the maps hold it: until `expires_at_ns` on the
/// kernel's coarse monotonic clock ([`ClientTarget::expires_at_ns`]),
/// counted in its usage slot and held to its meters' rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Installed {
    /// The binding, its listener resolved.
    pub binding: Binding,
    /// When its authorisation ends; the program ignores it from then on.
    pub expires_at_ns: u64,
    /// Its `USAGE` slot: 0 until the maps give it one.
    pub usage_slot: u32,
    /// Its allocation's and its user's meters (key 0: none).
    pub meters: [MeterRef; 2],
}

impl Installed {
    /// `lease` installed at `now_ns`: until now plus its lifetime, at its
    /// rate limits (a checked lease has at most two).
    pub fn new(lease: &Lease, now_ns: u64) -> Self {
        let lifetime = u64::try_from(lease.lifetime.as_nanos()).unwrap_or(u64::MAX);
        let mut meters = [MeterRef::default(); 2];
        for (meter, limit) in meters.iter_mut().zip(&lease.rate_limits) {
            *meter = MeterRef::of(limit);
        }
        Self {
            binding: lease.binding,
            expires_at_ns: now_ns.saturating_add(lifetime),
            usage_slot: 0,
            meters,
        }
    }

    /// What is left of its lifetime at `now_ns`: zero once it has passed.
    pub fn remaining(&self, now_ns: u64) -> Duration {
        Duration::from_nanos(self.expires_at_ns.saturating_sub(now_ns))
    }

    /// The map fields of both its entries.
    pub fn fields(&self) -> BindingFields {
        BindingFields {
            usage_slot: self.usage_slot,
            meters: self.meters.map(|meter| meter.key),
            ..fields(&self.binding, self.expires_at_ns)
        }
    }
}

/// The map fields of a checked binding (its listener resolved) that expires
/// at `expires_at_ns`; a binding to remove or compare can give any expiry,
/// [`identity`] leaves it out.
pub fn fields(binding: &Binding, expires_at_ns: u64) -> BindingFields {
    BindingFields {
        client: binding.client,
        listener: binding.listener,
        channel: binding.channel,
        peer: binding.peer,
        allocation_port: binding.allocation_port,
        dont_fragment: binding.dont_fragment,
        usage_slot: 0,
        meters: [0; 2],
        expires_at_ns,
    }
}

/// The binding a client-side map entry describes, and when it expires.
pub fn from_client_entry(key: &[u8], target: &PeerTarget) -> Option<Installed> {
    let fields = BindingFields::from_client_entry(key, target)?;
    Some(Installed {
        binding: Binding {
            client: fields.client,
            channel: fields.channel,
            peer: fields.peer,
            allocation_port: fields.allocation_port,
            listener: fields.listener,
            dont_fragment: fields.dont_fragment,
        },
        expires_at_ns: fields.expires_at_ns,
        usage_slot: fields.usage_slot,
        meters: fields.meters.map(|key| MeterRef {
            key,
            bytes_per_second: 0,
        }),
    })
}

/// Bytes of the expiry that ends both kinds of map value.
const EXPIRY_BYTES: usize = size_of::<u64>();

// `identity` and `expiry` read the terms and the expiry as the last bytes
// of every value.
const _: () =
    assert!(offset_of!(PeerTarget, expires_at_ns) + EXPIRY_BYTES == size_of::<PeerTarget>());
const _: () =
    assert!(offset_of!(ClientTarget, expires_at_ns) + EXPIRY_BYTES == size_of::<ClientTarget>());
const _: () = assert!(offset_of!(PeerTarget, usage_slot) + TERMS_LEN == size_of::<PeerTarget>());
const _: () =
    assert!(offset_of!(ClientTarget, usage_slot) + TERMS_LEN == size_of::<ClientTarget>());

/// A map value (a [`PeerTarget`] or a [`ClientTarget`]) without its terms
/// (usage slot, meters, expiry): what makes it this binding's half. A
/// refresh or a new limit changes the terms alone, so every comparison of
/// entries (removals, displaced halves, orphans, whether a binding is
/// installed) compares these. The client-side value's DONT-FRAGMENT flag is
/// part of it, as it is of a [`Binding`]: installing the other value
/// replaces the binding, and a removal must name the value it was installed
/// with.
fn identity(value: &[u8]) -> &[u8] {
    // A value too short to end in terms is compared whole.
    match value.len().checked_sub(TERMS_LEN) {
        Some(end) => &value[..end],
        None => value,
    }
}

/// The usage slot and meter keys a map value (either kind) names; `None`
/// for a value too short to be one.
pub fn terms(value: &[u8]) -> Option<(u32, [u64; 2])> {
    let at = value.len().checked_sub(TERMS_LEN)?;
    let word = |offset: usize| -> Option<[u8; 8]> {
        value.get(at + offset..at + offset + 8)?.try_into().ok()
    };
    let slot = u32::from_ne_bytes(value.get(at..at + 4)?.try_into().ok()?);
    Some((
        slot,
        [u64::from_ne_bytes(word(8)?), u64::from_ne_bytes(word(16)?)],
    ))
}

/// When a map value expires; `None` for a value too short to be one.
pub fn expiry(value: &[u8]) -> Option<u64> {
    let at = value.len().checked_sub(EXPIRY_BYTES)?;
    let bytes = value.get(at..)?.try_into().ok()?;
    Some(u64::from_ne_bytes(bytes))
}

/// Whether two map values are the same binding's half, whatever their expiries.
pub fn same_half(a: &[u8], b: &[u8]) -> bool {
    identity(a) == identity(b)
}

/// The keys of `entries` (key and value bytes) whose expiry has passed at
/// `now_ns`: the program already treats them as absent
/// (`pass_expired`), the agent deletes them.
pub fn expired<'a>(
    entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    now_ns: u64,
) -> Vec<Vec<u8>> {
    entries
        .into_iter()
        .filter(|(_, value)| expiry(value).is_some_and(|expires| now_ns >= expires))
        .map(|(key, _)| key.to_vec())
        .collect()
}

/// An entry to delete only while it still holds `value` (whatever its
/// expiry): the half of an older binding that a new one cut off. Should it
/// hold anything else by then, it belongs to yet another binding, which
/// must keep it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Displaced {
    /// The entry's key.
    pub key: MapKey,
    /// The value it must hold to be deleted.
    pub value: Vec<u8>,
}

/// The client-side key a peer-side value answers for. The value names the
/// client, listener and channel, which is all a client-side key is made of;
/// the peer fields below only fill the struct and are not part of the key.
pub fn client_key_of(target: &ClientTarget) -> Option<MapKey> {
    let client = target.client()?;
    let fields = BindingFields {
        client,
        listener: target.listener()?,
        channel: u16::from_be_bytes(target.channel),
        peer: client,
        allocation_port: 0,
        dont_fragment: false,
        usage_slot: 0,
        meters: [0; 2],
        expires_at_ns: 0,
    };
    Some(fields.client_entry().0)
}

/// The peer-side key a client-side value points at: the value names the
/// peer and allocation port, which is all a peer-side key is made of; the
/// client fields below only fill the struct.
pub fn peer_key_of(target: &PeerTarget) -> Option<MapKey> {
    let peer = SocketAddr::new(target.peer()?, u16::from_be_bytes(target.peer_port));
    let fields = BindingFields {
        client: peer,
        listener: peer,
        channel: 0,
        peer,
        allocation_port: u16::from_be_bytes(target.allocation_port),
        dont_fragment: false,
        usage_slot: 0,
        meters: [0; 2],
        expires_at_ns: 0,
    };
    Some(fields.peer_entry().0)
}

/// What writing `binding` over the values its keys held (`at_client` at its
/// client-side key, `at_peer` at its peer-side key) leaves without its other
/// half, and so must go with them (a value that differs in its expiry alone
/// is the binding's own, being refreshed):
///
/// - its client key pointed at another peer key: that peer entry, while it
///   still answers for this client key, would go on relaying the old peer's
///   datagrams to the client;
/// - its peer key answered for another client key: that client entry, while
///   it still points at this peer key, would go on relaying one way to a
///   peer whose replies now reach another client.
pub fn displaced(
    binding: &Binding,
    at_client: Option<&PeerTarget>,
    at_peer: Option<&ClientTarget>,
) -> Vec<Displaced> {
    let (client_key, peer_target) = fields(binding, 0).client_entry();
    let (peer_key, client_target) = fields(binding, 0).peer_entry();
    let mut displaced = Vec::new();
    if let Some(old) = at_client.filter(|old| !same_half(old.as_bytes(), peer_target.as_bytes()))
        && let Some(key) = peer_key_of(old)
        && key != peer_key
    {
        displaced.push(Displaced {
            key,
            value: client_target.as_bytes().to_vec(),
        });
    }
    if let Some(old) = at_peer.filter(|old| !same_half(old.as_bytes(), client_target.as_bytes()))
        && let Some(key) = client_key_of(old)
        && key != client_key
    {
        displaced.push(Displaced {
            key,
            value: peer_target.as_bytes().to_vec(),
        });
    }
    displaced
}

/// The keys of the peer-side `entries` (key and value bytes, as a peer map
/// holds them) that are not the peer entry of a `wanted` binding, whatever
/// their expiry. Whatever left them (a replaced binding, a crash between
/// two writes, an older agent), they relay a peer to a client nobody asked
/// for.
pub fn orphans<'a>(
    wanted: impl IntoIterator<Item = &'a Binding>,
    entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Vec<Vec<u8>> {
    let kept: HashSet<(Vec<u8>, Vec<u8>)> = wanted
        .into_iter()
        .map(|binding| {
            let (key, target) = fields(binding, 0).peer_entry();
            (key.bytes().to_vec(), identity(target.as_bytes()).to_vec())
        })
        .collect();
    entries
        .into_iter()
        .filter(|(key, value)| !kept.contains(&(key.to_vec(), identity(value).to_vec())))
        .map(|(key, _)| key.to_vec())
        .collect()
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

    fn limits() -> Limits {
        Limits {
            listeners: vec![
                "0.0.0.0:3478".parse().unwrap(),
                "[::]:3478".parse().unwrap(),
                "198.51.100.99:443".parse().unwrap(),
            ],
            ports: (49152, 65535),
            relay_ipv4: Some(Ipv4Addr::new(203, 0, 113, 1)),
            relay_ipv6: Some(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1)),
            policy: PeerPolicy::new(
                vec![
                    "198.51.100.0/24".parse().unwrap(),
                    "2001:db8:3::/64".parse().unwrap(),
                ],
                [
                    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)),
                    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
                ],
            )
            .with_ports(49152..=65535, vec![443, 3478]),
        }
    }

    fn request(client: &str, channel: u32, peer: &str, port: u32) -> proto::v1::ChannelBinding {
        let listener = if client.starts_with('[') {
            "[::]:3478"
        } else {
            "0.0.0.0:3478"
        };
        proto::v1::ChannelBinding {
            client: client.into(),
            channel,
            peer: peer.into(),
            allocation_port: port,
            listener: listener.into(),
            lifetime_ms: 600_000,
            dont_fragment: false,
            ..Default::default()
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
            let lease = limits()
                .check(&request(client, 0x4001, peer, 50000))
                .unwrap();
            assert_eq!(lease.lifetime, Duration::from_secs(600));
            let installed = Installed::new(&lease, 7_000_000_000);
            assert_eq!(installed.expires_at_ns, 607_000_000_000);
            let binding = installed.binding;
            assert!(!binding.listener.ip().is_unspecified(), "resolved");
            let (key, target) = installed.fields().client_entry();
            assert_eq!(from_client_entry(key.bytes(), &target), Some(installed));
            let mut dont_fragment = request(client, 0x4001, peer, 50000);
            dont_fragment.dont_fragment = true;
            let lease = limits().check(&dont_fragment).unwrap();
            assert!(lease.binding.dont_fragment);
            let flagged = Installed::new(&lease, 7_000_000_000);
            let (flagged_key, flagged_target) = flagged.fields().client_entry();
            assert!(flagged_target.dont_fragment());
            assert_eq!(
                from_client_entry(flagged_key.bytes(), &flagged_target),
                Some(flagged)
            );
            let (peer_key, client_target) = installed.fields().peer_entry();
            assert_eq!(client_target.expires_at_ns, installed.expires_at_ns);
            assert_eq!(client_target.client(), Some(binding.client));
            assert_eq!(client_target.listener(), Some(binding.listener));
            assert_eq!(client_target.channel, [0x40, 0x01]);
            assert_eq!(
                peer_key.bytes().len(),
                if binding.peer.is_ipv4() { 8 } else { 20 }
            );
            assert_eq!(
                key.bytes().len(),
                if binding.client.is_ipv4() { 16 } else { 40 }
            );
        }
    }

    #[test]
    fn wildcard_listeners_stand_for_the_relay_address_and_others_are_refused() {
        let limits = limits();
        let binding = limits
            .check(&request("192.0.2.10:1", 0x4001, "198.51.100.7:9000", 50000))
            .unwrap()
            .binding;
        assert_eq!(binding.listener, "203.0.113.1:3478".parse().unwrap());
        let mut on_443 = request("192.0.2.10:1", 0x4001, "198.51.100.7:9000", 50000);
        on_443.listener = "198.51.100.99:443".into();
        assert_eq!(
            limits.check(&on_443).unwrap().binding.listener,
            "198.51.100.99:443".parse().unwrap()
        );
        on_443.listener = "203.0.113.1:443".into();
        assert_eq!(
            limits.check(&on_443).unwrap_err(),
            Refused::Invalid(BindingError::UnknownListener(
                "203.0.113.1:443".parse().unwrap()
            ))
        );
    }

    /// The refusal of a binding that is malformed or outside the configuration.
    fn invalid(limits: &Limits, request: proto::v1::ChannelBinding) -> BindingError {
        match limits.check(&request).unwrap_err() {
            Refused::Invalid(error) => error,
            denied => panic!("{request:?}: {denied}"),
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let limits = limits();
        let refuse = |r| invalid(&limits, r);
        let peer = "198.51.100.7:9000";
        assert!(matches!(
            refuse(request("192.0.2.10:0", 0x4001, peer, 50000)),
            BindingError::ZeroPort { .. }
        ));
        assert!(matches!(
            refuse(request("192.0.2.10:1", 0x4000, peer, 3478)),
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
            refuse(request("192.0.2.10:1", 0x4000, "198.51.100.99:443", 50000)),
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
            ..limits.clone()
        };
        assert!(matches!(
            invalid(
                &v4_only,
                request("192.0.2.10:1", 0x4000, "[2001:db8::7]:9", 50000)
            ),
            BindingError::FamilyNotRelayed { field: "peer", .. }
        ));
        let mut forever = request("192.0.2.10:1", 0x4000, peer, 50000);
        forever.lifetime_ms = 0;
        assert_eq!(refuse(forever.clone()), BindingError::LifetimeOutOfRange(0));
        forever.lifetime_ms = 3_600_001;
        assert_eq!(refuse(forever), BindingError::LifetimeOutOfRange(3_600_001));
        let message = refuse(request("192.0.2.10:1", 0x4fff, peer, 1)).to_string();
        assert_eq!(
            message,
            "allocation port 1 is outside the range 49152-65535"
        );
    }

    #[test]
    fn the_peer_policy_keeps_the_kernel_from_the_host_and_denied_ranges() {
        let limits = limits();
        let deny = |client: &str, peer: &str| {
            let refused = limits
                .check(&request(client, 0x4000, peer, 50000))
                .unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
            match refused {
                Refused::Denied {
                    field,
                    address,
                    reason,
                } => (field, address.to_string(), reason),
                invalid => panic!("{client} -> {peer}: {invalid}"),
            }
        };
        for (peer, reason) in [
            ("127.0.0.1:22", Denied::Loopback),
            ("[::ffff:127.0.0.1]:22", Denied::Loopback),
            ("[::1]:22", Denied::Loopback),
            ("10.0.0.1:53", Denied::Private),
            ("[fd00::1]:53", Denied::Private),
            ("169.254.169.254:80", Denied::LinkLocal),
            ("192.0.2.99:9", Denied::Reserved),
            // The host's addresses: in a denied range, it says so; in an allowed
            // one, only the allocation ports are open.
            ("203.0.113.1:22", Denied::Reserved),
            ("198.51.100.1:9", Denied::HostPort),
            ("198.51.100.1:49151", Denied::HostPort),
            ("198.51.100.1:443", Denied::ListenerPort),
            ("127.0.0.1:3478", Denied::ListenerPort),
        ] {
            let address: SocketAddr = peer.parse().unwrap();
            let canonical = SocketAddr::new(address.ip().to_canonical(), address.port());
            assert_eq!(
                deny("192.0.2.10:1", peer),
                ("peer", canonical.to_string(), reason),
                "{peer}"
            );
        }
        assert_eq!(
            deny("127.0.0.1:5000", "198.51.100.7:9").0,
            "client",
            "a client on loopback"
        );
        assert_eq!(deny("203.0.113.1:5000", "198.51.100.7:9").2, Denied::Host);
        let message = limits
            .check(&request("192.0.2.10:1", 0x4000, "10.0.0.1:53", 50000))
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "peer 10.0.0.1:53 is refused by the agent's peer policy: \
             a private address (allow it with --allow-peer)"
        );
        // The hairpin: another allocation of this relay, in an allowed network.
        assert!(
            limits
                .check(&request(
                    "192.0.2.10:1",
                    0x4000,
                    "198.51.100.1:50001",
                    50000
                ))
                .is_ok()
        );
        // Private clients are clients like any other.
        assert!(
            limits
                .check(&request("10.0.0.7:1", 0x4000, "198.51.100.7:9", 50000))
                .is_ok()
        );
        assert_eq!(
            invalid(&limits, request("192.0.2.10:1", 0x4000, "0.0.0.0:9", 1)).to_string(),
            "peer 0.0.0.0:9 is not a unicast address",
            "malformed before denied"
        );
    }

    fn bound(client: &str, channel: u16, peer: &str, port: u16) -> Binding {
        limits()
            .check(&request(client, u32::from(channel), peer, u32::from(port)))
            .unwrap()
            .binding
    }

    /// The values a binding's two keys hold once it is installed until 1 s.
    fn values(binding: &Binding) -> (PeerTarget, ClientTarget) {
        let fields = fields(binding, 1_000_000_000);
        (fields.client_entry().1, fields.peer_entry().1)
    }

    #[test]
    fn keys_pointed_at_by_values_are_the_bindings_own_in_every_family_pair() {
        for (client, peer) in [
            ("192.0.2.10:40000", "198.51.100.7:9000"),
            ("192.0.2.10:40000", "[2001:db8:3::7]:9000"),
            ("[2001:db8:1::10]:40000", "198.51.100.7:9000"),
            ("[2001:db8:1::10]:40000", "[2001:db8:3::7]:9000"),
        ] {
            let binding = bound(client, 0x4001, peer, 50000);
            let (client_key, peer_target) = fields(&binding, 0).client_entry();
            let (peer_key, client_target) = fields(&binding, 0).peer_entry();
            assert_eq!(peer_key_of(&peer_target), Some(peer_key));
            assert_eq!(client_key_of(&client_target), Some(client_key));
        }
    }

    #[test]
    fn a_replaced_client_key_displaces_the_old_peer_entry_only_if_it_answers_for_it() {
        let old = bound("192.0.2.10:40000", 0x4001, "198.51.100.7:9000", 50000);
        let new = bound("192.0.2.10:40000", 0x4001, "[2001:db8:3::8]:9001", 50001);
        let (old_target, _) = values(&old);
        let displaced = displaced(&new, Some(&old_target), None);
        assert_eq!(
            displaced,
            vec![Displaced {
                key: fields(&old, 0).peer_entry().0,
                // Deleted only while it still answers for the client key.
                value: fields(&new, 0).peer_entry().1.as_bytes().to_vec(),
            }]
        );
        assert!(same_half(&displaced[0].value, values(&old).1.as_bytes()));
        // Writing the same binding again, or refreshing it, displaces nothing.
        let (same_target, same_client) = values(&new);
        assert!(super::displaced(&new, Some(&same_target), Some(&same_client)).is_empty());
        let fields = fields(&new, u64::MAX);
        let (_, later_target) = fields.client_entry();
        let (_, later_client) = fields.peer_entry();
        assert!(super::displaced(&new, Some(&later_target), Some(&later_client)).is_empty());
        assert!(super::displaced(&new, None, None).is_empty());
    }

    #[test]
    fn dont_fragment_is_part_of_the_client_half_and_displaces_nothing() {
        let plain = bound("192.0.2.10:40000", 0x4001, "198.51.100.7:9000", 50000);
        let flagged = Binding {
            dont_fragment: true,
            ..plain
        };
        let (plain_target, plain_client) = values(&plain);
        let (flagged_target, flagged_client) = values(&flagged);
        assert!(!same_half(
            plain_target.as_bytes(),
            flagged_target.as_bytes()
        ));
        assert!(same_half(
            plain_client.as_bytes(),
            flagged_client.as_bytes()
        ));
        // Switching it rewrites the binding's own keys and leaves no other half.
        assert!(displaced(&flagged, Some(&plain_target), Some(&plain_client)).is_empty());
        assert!(displaced(&plain, Some(&flagged_target), Some(&flagged_client)).is_empty());
    }

    #[test]
    fn a_replaced_peer_key_displaces_the_old_client_entry_only_if_it_points_there() {
        let old = bound("192.0.2.10:40000", 0x4001, "198.51.100.7:9000", 50000);
        let new = bound("[2001:db8:1::11]:40001", 0x4002, "198.51.100.7:9000", 50000);
        let (_, old_client) = values(&old);
        let displaced = displaced(&new, None, Some(&old_client));
        assert_eq!(
            displaced,
            vec![Displaced {
                key: fields(&old, 0).client_entry().0,
                value: fields(&new, 0).client_entry().1.as_bytes().to_vec(),
            }]
        );
        assert!(same_half(&displaced[0].value, values(&old).0.as_bytes()));
    }

    #[test]
    fn a_binding_replacing_two_others_displaces_a_half_of_each() {
        let first = bound("192.0.2.10:40000", 0x4001, "198.51.100.7:9000", 50000);
        let second = bound("192.0.2.11:40000", 0x4001, "198.51.100.8:9000", 50001);
        // Takes the first's client key and the second's peer key.
        let new = bound("192.0.2.10:40000", 0x4001, "198.51.100.8:9000", 50001);
        let keys: Vec<MapKey> = displaced(&new, Some(&values(&first).0), Some(&values(&second).1))
            .into_iter()
            .map(|displaced| displaced.key)
            .collect();
        assert_eq!(
            keys,
            vec![
                fields(&first, 0).peer_entry().0,
                fields(&second, 0).client_entry().0
            ]
        );
    }

    #[test]
    fn orphans_are_the_peer_entries_no_wanted_binding_has() {
        let a = bound("192.0.2.10:40000", 0x4001, "198.51.100.7:9000", 50000);
        let b = bound("192.0.2.11:40000", 0x4001, "[2001:db8:3::7]:9000", 50001);
        let gone = bound("192.0.2.12:40000", 0x4001, "198.51.100.9:9000", 50002);
        // As the maps hold them: with expiries the comparison leaves out.
        let entry = |binding: &Binding| {
            let (key, target) = fields(binding, 5).peer_entry();
            (key.bytes().to_vec(), target.as_bytes().to_vec())
        };
        // a's peer key, but answering for another client: not a's entry.
        let (a_key, _) = entry(&a);
        let hijacked = (a_key.clone(), entry(&gone).1);
        let held = [entry(&b), entry(&gone), hijacked];
        let found = orphans(&[a, b], held.iter().map(|(k, v)| (&k[..], &v[..])));
        assert_eq!(found, vec![entry(&gone).0, a_key]);
        let held = [entry(&a), entry(&b)];
        assert!(orphans(&[a, b], held.iter().map(|(k, v)| (&k[..], &v[..]))).is_empty());
    }

    #[test]
    fn the_expiry_is_the_last_bytes_of_every_value_and_no_part_of_its_identity() {
        let binding = bound("192.0.2.10:40000", 0x4001, "[2001:db8:3::7]:9000", 50000);
        let (early_target, early_client) = values(&binding);
        let later = fields(&binding, 2_000_000_000);
        let (_, later_target) = later.client_entry();
        let (_, later_client) = later.peer_entry();
        assert_eq!(expiry(early_target.as_bytes()), Some(1_000_000_000));
        assert_eq!(expiry(later_client.as_bytes()), Some(2_000_000_000));
        assert_eq!(expiry(&[0; 7]), None);
        assert!(same_half(early_target.as_bytes(), later_target.as_bytes()));
        assert!(same_half(early_client.as_bytes(), later_client.as_bytes()));
        let other = bound("192.0.2.10:40000", 0x4001, "[2001:db8:3::7]:9001", 50000);
        assert!(!same_half(
            early_target.as_bytes(),
            values(&other).0.as_bytes()
        ));
    }

    #[test]
    fn entries_expire_once_the_clock_reaches_their_expiry() {
        let binding = bound("192.0.2.10:40000", 0x4001, "198.51.100.7:9000", 50000);
        let (key, target) = fields(&binding, 1_000).client_entry();
        let (peer_key, client_target) = fields(&binding, 2_000).peer_entry();
        let entries = [
            (key.bytes(), target.as_bytes()),
            (peer_key.bytes(), client_target.as_bytes()),
        ];
        assert!(expired(entries, 999).is_empty());
        assert_eq!(expired(entries, 1_000), vec![key.bytes().to_vec()]);
        assert_eq!(expired(entries, 5_000).len(), 2);
        let installed = Installed {
            binding,
            expires_at_ns: 1_500_000,
            usage_slot: 0,
            meters: Default::default(),
        };
        assert_eq!(installed.remaining(500_000), Duration::from_millis(1));
        assert_eq!(installed.remaining(2_000_000), Duration::ZERO);
    }
}
