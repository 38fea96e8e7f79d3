//! The agent's own peer policy: which addresses the kernel may relay to.
//!
//! `XDP_TX` and `XDP_REDIRECT` bypass the host's firewall, so this check is the firewall of
//! the kernel path: a binding whose peer or client it refuses is not installed, whatever
//! turn-control asks (its traffic stays with turn-control, whose own policy decides in user
//! space). The built-in ranges are turn-control's (`turn-control/core/src/policy.rs`, RFC
//! 8656 §21.2, RFC 6156 §9): loopback, unspecified and "this network", RFC 1918 and
//! fc00::/7, 100.64.0.0/10, link-local, multicast and broadcast, and the reserved,
//! documentation and benchmarking ranges; a unit test holds the two lists to the same
//! verdicts. turn-control/core cannot depend on a crate of the daemons (`proto` and `daemon`
//! pull tokio and clap into a sans-IO crate), hence this copy.
//!
//! Order of rules for a peer, as turn-control's:
//! 1. a listener port at a local address (the host's, loopback or unspecified) is refused:
//!    wildcard listeners answer on every local address, and relaying to one would loop;
//! 2. an address of the host is refused unless an `--allow-peer` network covers it, and
//!    then it is open on the allocation ports alone: two allocations of this relay may
//!    reach each other (the hairpin), the host's other services may not;
//! 3. an `--allow-peer` network allows (the only way into a built-in range);
//! 4. the built-in ranges refuse; everything else is allowed.
//!
//! An address is judged by its canonical form: the IPv4 address inside an IPv4-mapped,
//! IPv4-compatible, NAT64 (64:ff9b::/96, RFC 6052) or 6to4 (2002::/16, RFC 3056) address.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;

use ipnet::IpNet;

/// Why an address may not be a binding's peer or client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Loopback: 127.0.0.0/8 or ::1.
    #[error("a loopback address")]
    Loopback,
    /// The unspecified address, or "this network" 0.0.0.0/8 (RFC 791/1122).
    #[error("an unspecified or this-network address")]
    Unspecified,
    /// RFC 1918 private IPv4 or fc00::/7 unique local IPv6.
    #[error("a private address (allow it with --allow-peer)")]
    Private,
    /// Shared address space 100.64.0.0/10 (RFC 6598, carrier-grade NAT).
    #[error("a shared (CGNAT) address (allow it with --allow-peer)")]
    SharedAddressSpace,
    /// Link-local 169.254.0.0/16 or fe80::/10.
    #[error("a link-local address")]
    LinkLocal,
    /// Multicast or broadcast.
    #[error("a multicast or broadcast address")]
    Multicast,
    /// Documentation, benchmarking, protocol-assignment or reserved ranges.
    #[error("a reserved, documentation or test address (allow it with --allow-peer)")]
    Reserved,
    /// An address of this host, outside the `--allow-peer` networks: another of its
    /// services.
    #[error("an address of this host")]
    Host,
    /// An address of this host inside an `--allow-peer` network, on another port than
    /// the allocation ports: another of its services.
    #[error("an address of this host, open to peers on the allocation ports alone")]
    HostPort,
    /// A listener port at a local address.
    #[error("a listener port at a local address")]
    ListenerPort,
}

/// The peer policy: the built-in deny ranges, the host's own addresses and the operator's
/// `--allow-peer` networks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    /// The host's addresses, canonical.
    host: BTreeSet<IpAddr>,
    /// What an allowed address of the host is open on; nothing when `None`.
    relay_ports: Option<RangeInclusive<u16>>,
    /// The listeners' ports, refused at every local address.
    listener_ports: Vec<u16>,
}

impl PeerPolicy {
    /// A policy that allows the `allow` networks inside the built-in ranges and refuses
    /// the `host` addresses (see [`PeerPolicy::with_ports`] for the exception).
    pub fn new(allow: Vec<IpNet>, host: impl IntoIterator<Item = IpAddr>) -> Self {
        Self {
            allow,
            host: host.into_iter().map(canonical_ip).collect(),
            ..Self::default()
        }
    }

    /// The allocation ports, on which an allowed address of the host is open (the
    /// hairpin), and the listener ports, closed at every local address.
    pub fn with_ports(mut self, relay: RangeInclusive<u16>, listeners: Vec<u16>) -> Self {
        self.relay_ports = Some(relay);
        self.listener_ports = listeners;
        self
    }

    /// Whether the kernel may relay to `peer` as a binding's peer.
    pub fn peer(&self, peer: SocketAddr) -> Result<(), Denied> {
        let ip = canonical_ip(peer.ip());
        let port = peer.port();
        let host = self.host.contains(&ip);
        if self.listener_ports.contains(&port) && (host || ip.is_loopback() || ip.is_unspecified())
        {
            return Err(Denied::ListenerPort);
        }
        let allowed = self.allow.iter().any(|net| net.contains(&ip));
        if host {
            if !allowed {
                builtin(ip)?;
                return Err(Denied::Host);
            }
            return match &self.relay_ports {
                Some(ports) if ports.contains(&port) => Ok(()),
                _ => Err(Denied::HostPort),
            };
        }
        if allowed {
            return Ok(());
        }
        builtin(ip)
    }

    /// Whether the kernel may relay to `ip` as a binding's client. Clients are where
    /// turn-control received them from, private networks included, so only what no client
    /// can be is refused: the host itself, loopback and "this network".
    pub fn client(&self, ip: IpAddr) -> Result<(), Denied> {
        let ip = canonical_ip(ip);
        match builtin(ip) {
            Err(denied @ (Denied::Loopback | Denied::Unspecified | Denied::Multicast)) => {
                Err(denied)
            }
            _ if self.host.contains(&ip) => Err(Denied::Host),
            _ => Ok(()),
        }
    }
}

/// The address an IPv6 form stands for: the embedded IPv4 address of IPv4-mapped,
/// IPv4-compatible, NAT64 (64:ff9b::/96) and 6to4 (2002::/16) addresses; `ip` otherwise.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    let o = v6.octets();
    let s = v6.segments();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    // IPv4-compatible (RFC 4291 §2.5.5.1, deprecated), but :: and ::1 keep their IPv6
    // meaning; both are refused either way.
    if s[..6] == [0; 6] && u32::from(tail) > 1 {
        return IpAddr::V4(tail);
    }
    // NAT64 well-known prefix (RFC 6052 §2.1).
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(tail);
    }
    // 6to4 (RFC 3056 §2): 2002:AABB:CCDD::/48 carries AA.BB.CC.DD.
    if s[0] == 0x2002 {
        return IpAddr::V4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    ip
}

/// The built-in verdict on a canonical address.
fn builtin(ip: IpAddr) -> Result<(), Denied> {
    match ip {
        IpAddr::V4(v4) => v4_verdict(v4),
        IpAddr::V6(v6) => v6_verdict(v6),
    }
}

/// IANA IPv4 special-purpose registry entries that are not globally reachable.
fn v4_verdict(ip: Ipv4Addr) -> Result<(), Denied> {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (0, _, _) => Err(Denied::Unspecified),
        (127, _, _) => Err(Denied::Loopback),
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => Err(Denied::Private),
        (100, 64..=127, _) => Err(Denied::SharedAddressSpace),
        (169, 254, _) => Err(Denied::LinkLocal),
        (224..=239, _, _) | (255, 255, 255) => Err(Denied::Multicast),
        // 192.0.0.0/24 protocol assignments, 192.0.2.0/24, 198.51.100.0/24 and
        // 203.0.113.0/24 documentation, 192.88.99.0/24 6to4 relays, 198.18.0.0/15
        // benchmarking, 240.0.0.0/4 reserved.
        (192, 0, 0 | 2) | (192, 88, 99) | (198, 18..=19, _) | (198, 51, 100) | (203, 0, 113) => {
            Err(Denied::Reserved)
        }
        (240..=255, _, _) => Err(Denied::Reserved),
        _ => Ok(()),
    }
}

/// Only global unicast (2000::/3) outside the special-purpose blocks is reachable.
fn v6_verdict(ip: Ipv6Addr) -> Result<(), Denied> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Err(Denied::Unspecified);
    }
    if ip.is_loopback() {
        return Err(Denied::Loopback);
    }
    match s[0] {
        0xff00..=0xffff => Err(Denied::Multicast),
        0xfe80..=0xfebf => Err(Denied::LinkLocal),
        0xfc00..=0xfdff => Err(Denied::Private),
        // 2001::/23 IETF protocol assignments (Teredo, benchmarking, ORCHID), 2001:db8::/32
        // and 3fff::/20 documentation.
        0x2001 if s[1] < 0x0200 || s[1] == 0x0db8 => Err(Denied::Reserved),
        0x3fff if s[1] < 0x1000 => Err(Denied::Reserved),
        0x2000..=0x3fff => Ok(()),
        // Everything outside 2000::/3 (64:ff9b:1::/48, 100::/64, fec0::/10, the rest of
        // ::/8 ...) is reserved or not globally reachable.
        _ => Err(Denied::Reserved),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use turn_control_core::policy::{PeerDenied, PeerPolicy as TurnPolicy};

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    /// `ip` on port 9.
    fn at(ip: IpAddr) -> SocketAddr {
        SocketAddr::new(ip, 9)
    }

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// What turn-control's policy without own addresses or lists says of `ip`, in our terms.
    fn turn_control(ip: IpAddr) -> Result<(), Denied> {
        TurnPolicy::new([], [])
            .check(at(ip))
            .map_err(|denied| match denied {
                PeerDenied::Loopback => Denied::Loopback,
                PeerDenied::Unspecified => Denied::Unspecified,
                PeerDenied::Private => Denied::Private,
                PeerDenied::SharedAddressSpace => Denied::SharedAddressSpace,
                PeerDenied::LinkLocal => Denied::LinkLocal,
                PeerDenied::Multicast => Denied::Multicast,
                PeerDenied::Reserved => Denied::Reserved,
                other => panic!("{ip}: {other:?} without own addresses or lists"),
            })
    }

    #[test]
    fn the_built_in_ranges_are_turn_control_s() {
        let cases = [
            ("0.1.2.3", Denied::Unspecified),
            ("127.0.0.1", Denied::Loopback),
            ("10.1.2.3", Denied::Private),
            ("172.16.0.1", Denied::Private),
            ("172.31.255.255", Denied::Private),
            ("192.168.0.1", Denied::Private),
            ("100.64.0.1", Denied::SharedAddressSpace),
            ("169.254.169.254", Denied::LinkLocal),
            ("224.0.0.251", Denied::Multicast),
            ("255.255.255.255", Denied::Multicast),
            ("240.0.0.1", Denied::Reserved),
            ("192.0.0.8", Denied::Reserved),
            ("192.0.2.1", Denied::Reserved),
            ("192.88.99.1", Denied::Reserved),
            ("198.18.0.1", Denied::Reserved),
            ("198.51.100.7", Denied::Reserved),
            ("203.0.113.7", Denied::Reserved),
            ("::", Denied::Unspecified),
            ("::1", Denied::Loopback),
            ("fc00::1", Denied::Private),
            ("fd12:3456::1", Denied::Private),
            ("fe80::1", Denied::LinkLocal),
            ("ff02::1", Denied::Multicast),
            ("2001::1", Denied::Reserved),
            ("2001:db8::1", Denied::Reserved),
            ("3fff::1", Denied::Reserved),
            ("100::1", Denied::Reserved),
            ("64:ff9b:1::1", Denied::Reserved),
            ("fec0::1", Denied::Reserved),
            // Embedded IPv4 forms are judged by what they carry.
            ("::ffff:127.0.0.1", Denied::Loopback),
            ("::127.0.0.1", Denied::Loopback),
            ("64:ff9b::7f00:1", Denied::Loopback),
            ("2002:7f00:1::1", Denied::Loopback),
            ("::ffff:10.0.0.1", Denied::Private),
            ("64:ff9b::", Denied::Unspecified),
        ];
        let policy = PeerPolicy::default();
        for (address, denied) in cases {
            assert_eq!(policy.peer(at(ip(address))), Err(denied), "{address}");
            assert_eq!(turn_control(ip(address)), Err(denied), "{address}");
        }
        for address in [
            "8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(policy.peer(at(ip(address))), Ok(()), "{address}");
            assert_eq!(turn_control(ip(address)), Ok(()), "{address}");
        }
    }

    /// A host with 198.51.100.1, 2001:db8:3::1, 10.1.2.3 and loopback, listening on 3478,
    /// allocating 49152-65535, whose operator allows the lab's peer networks and 10/8.
    fn lab_policy() -> PeerPolicy {
        PeerPolicy::new(
            vec![
                net("198.51.100.0/24"),
                net("2001:db8:3::/64"),
                net("10.0.0.0/8"),
            ],
            [
                ip("198.51.100.1"),
                ip("2001:db8:3::1"),
                ip("10.1.2.3"),
                ip("127.0.0.1"),
                ip("::1"),
            ],
        )
        .with_ports(49152..=65535, vec![3478])
    }

    #[test]
    fn allowed_networks_open_the_built_in_ranges() {
        let policy = lab_policy();
        assert_eq!(policy.peer(sa("198.51.100.2:9")), Ok(()));
        assert_eq!(policy.peer(sa("[::ffff:198.51.100.2]:9")), Ok(()));
        assert_eq!(policy.peer(sa("[2001:db8:3::2]:9")), Ok(()));
        assert_eq!(policy.peer(sa("10.9.9.9:9")), Ok(()));
        assert_eq!(
            policy.peer(sa("198.51.101.2:9")),
            Ok(()),
            "not a special range"
        );
        assert_eq!(policy.peer(sa("203.0.113.2:9")), Err(Denied::Reserved));
        assert_eq!(policy.peer(sa("192.168.0.1:9")), Err(Denied::Private));
    }

    #[test]
    fn the_host_is_open_only_on_its_allocation_ports_inside_an_allowed_network() {
        let policy = lab_policy();
        for host in [
            "198.51.100.1",
            "::ffff:198.51.100.1",
            "64:ff9b::c633:6401",
            "2001:db8:3::1",
            "10.1.2.3",
        ] {
            let host = ip(host);
            for port in [22, 53, 161, 9100, 49151] {
                assert_eq!(
                    policy.peer(SocketAddr::new(host, port)),
                    Err(Denied::HostPort),
                    "{host} port {port}"
                );
            }
            // Another allocation of this relay: the hairpin.
            assert_eq!(policy.peer(SocketAddr::new(host, 50000)), Ok(()), "{host}");
            assert_eq!(
                policy.peer(SocketAddr::new(host, 3478)),
                Err(Denied::ListenerPort),
                "{host}"
            );
        }
        // Outside the allowed networks the host is refused on every port; a built-in
        // range says what it is.
        let strict = PeerPolicy::new(Vec::new(), [ip("8.8.8.8"), ip("127.0.0.1")])
            .with_ports(49152..=65535, vec![3478]);
        assert_eq!(strict.peer(sa("8.8.8.8:50000")), Err(Denied::Host));
        assert_eq!(strict.peer(sa("127.0.0.1:50000")), Err(Denied::Loopback));
        // Without ports, nothing of the host is open.
        let closed = PeerPolicy::new(vec![net("8.8.8.0/24")], [ip("8.8.8.8")]);
        assert_eq!(closed.peer(sa("8.8.8.8:50000")), Err(Denied::HostPort));
        assert_eq!(closed.peer(sa("8.8.8.9:50000")), Ok(()));
        // Host addresses given in a mapped form are judged canonically too.
        let mapped = PeerPolicy::new(Vec::new(), [ip("::ffff:8.8.8.8")]);
        assert_eq!(mapped.peer(sa("8.8.8.8:53")), Err(Denied::Host));
    }

    #[test]
    fn listener_ports_are_closed_at_every_local_address() {
        let policy = lab_policy();
        for local in [
            "127.0.0.1:3478",
            "127.9.9.9:3478",
            "[::1]:3478",
            "0.0.0.0:3478",
            "[::]:3478",
            "198.51.100.1:3478",
        ] {
            assert_eq!(policy.peer(sa(local)), Err(Denied::ListenerPort), "{local}");
        }
        // Elsewhere the port is a port like any other.
        assert_eq!(policy.peer(sa("198.51.100.2:3478")), Ok(()));
    }

    #[test]
    fn clients_may_be_private_but_not_the_host_or_loopback() {
        let policy = PeerPolicy::new(Vec::new(), [ip("203.0.113.10"), ip("127.0.0.1")]);
        for client in [
            "192.0.2.2",
            "10.0.0.7",
            "192.168.1.2",
            "fd00::2",
            "2001:db8:1::2",
        ] {
            assert_eq!(policy.client(ip(client)), Ok(()), "{client}");
        }
        for (client, denied) in [
            ("127.0.0.1", Denied::Loopback),
            ("::ffff:127.0.0.1", Denied::Loopback),
            ("::1", Denied::Loopback),
            ("0.0.0.1", Denied::Unspecified),
            ("224.0.0.1", Denied::Multicast),
            ("203.0.113.10", Denied::Host),
            ("::ffff:203.0.113.10", Denied::Host),
        ] {
            assert_eq!(policy.client(ip(client)), Err(denied), "{client}");
        }
    }

    proptest! {
        #[test]
        fn every_ipv4_address_gets_turn_control_s_verdict(raw in any::<u32>()) {
            let v4 = IpAddr::V4(Ipv4Addr::from(raw));
            prop_assert_eq!(PeerPolicy::default().peer(at(v4)), turn_control(v4));
            let mapped = IpAddr::V6(Ipv4Addr::from(raw).to_ipv6_mapped());
            prop_assert_eq!(PeerPolicy::default().peer(at(mapped)), turn_control(mapped));
        }

        #[test]
        fn every_ipv6_address_gets_turn_control_s_verdict(raw in any::<u128>(), top in any::<u16>()) {
            // Random addresses, and random ones under every /16 so that each special
            // block is hit.
            for v6 in [Ipv6Addr::from(raw), Ipv6Addr::from((raw >> 16) | (u128::from(top) << 112))] {
                let v6 = IpAddr::V6(v6);
                prop_assert_eq!(PeerPolicy::default().peer(at(v6)), turn_control(v6));
            }
        }
    }
}
