//! Which peers an allocation may reach (RFC 8656 §21.2 "Security considerations",
//! RFC 6156 §9; coturn CVE-2020-26262 and CVE-2026-27624).
//!
//! Every peer address in CreatePermission, ChannelBind and Send goes through
//! [`PeerPolicy::check`]. The address is first canonicalised: IPv4-mapped (`::ffff:a.b.c.d`),
//! IPv4-compatible (`::a.b.c.d`), NAT64 well-known-prefix (`64:ff9b::/96`, RFC 6052) and
//! 6to4 (`2002::/16`, RFC 3056) forms are judged by the IPv4 address they carry, so
//! `::ffff:127.0.0.1` is loopback like `127.0.0.1`.
//!
//! The relay's host is the first thing to protect: a relayed datagram leaves from the relay's
//! address, so a service of the host bound to `0.0.0.0` or `[::]` (DNS, SNMP, metrics) would
//! take it for local traffic. The policy knows the host's addresses (the relay and listener
//! addresses and, in the daemon, every interface address it follows) and the listeners' ports.
//!
//! Order of rules:
//! 1. a listener port at any local address (one of the host's, loopback or unspecified) is
//!    refused, whatever the operator allows: wildcard listeners answer on every local address,
//!    and relaying to a listener would loop;
//! 2. an operator deny entry denies;
//! 3. an address of the host (loopback aside, see 5) is refused, unless an operator allow entry
//!    covers it, and then only its allocation ports are open
//!    ([`PeerPolicy::with_relay_ports`]): two allocations of this relay may reach each other
//!    (the hairpin), the host's other services may not;
//! 4. an operator allow entry allows (the only way to reach a built-in denied range);
//! 5. the built-in ranges deny, loopback aside in development mode
//!    ([`PeerPolicy::with_loopback`]);
//! 6. everything else is allowed.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;

use ipnet::IpNet;

/// Why a peer address is refused. Every variant maps to 403 (Forbidden).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerDenied {
    /// Loopback: 127.0.0.0/8 or ::1.
    #[error("loopback address")]
    Loopback,
    /// The unspecified address 0.0.0.0 or ::, or "this network" 0.0.0.0/8 (RFC 791/1122).
    #[error("unspecified or this-network address")]
    Unspecified,
    /// RFC 1918 private IPv4 or fc00::/7 unique local IPv6.
    #[error("private address")]
    Private,
    /// Shared address space 100.64.0.0/10 (RFC 6598, carrier-grade NAT).
    #[error("shared (CGNAT) address")]
    SharedAddressSpace,
    /// Link-local 169.254.0.0/16 or fe80::/10.
    #[error("link-local address")]
    LinkLocal,
    /// Multicast or broadcast.
    #[error("multicast or broadcast address")]
    Multicast,
    /// Documentation, benchmarking, protocol-assignment or reserved ranges.
    #[error("reserved, documentation or test address")]
    Reserved,
    /// An address of this host: a listener port at any local address, or an address of the
    /// host (relay, listener or interface address) that the operator does not allow, or a port
    /// of one that it allows outside the allocation ports.
    #[error("address of this relay's host")]
    Relay,
    /// Listed in the operator's deny list.
    #[error("denied by operator policy")]
    Operator,
}

/// The peer policy: built-in deny ranges, the host's own addresses, operator lists.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    /// The host's addresses, canonical (see [`canonical_ip`]).
    host: HashSet<IpAddr>,
    /// The listeners' ports, refused at every local address.
    listener_ports: Vec<u16>,
    /// What an operator-allowed address of the host is open on; nothing when `None`.
    relay_ports: Option<RangeInclusive<u16>>,
    allow_loopback: bool,
}

impl PeerPolicy {
    /// A policy that refuses the built-in ranges, the host's addresses `own_ips` and the
    /// `listeners`' addresses, and the listeners' ports at every local address.
    pub fn new(
        own_ips: impl IntoIterator<Item = IpAddr>,
        listeners: impl IntoIterator<Item = SocketAddr>,
    ) -> Self {
        let mut host: HashSet<IpAddr> = own_ips.into_iter().map(canonical_ip).collect();
        let mut listener_ports = Vec::new();
        for listener in listeners {
            if !listener.ip().is_unspecified() {
                host.insert(canonical_ip(listener.ip()));
            }
            if !listener_ports.contains(&listener.port()) {
                listener_ports.push(listener.port());
            }
        }
        Self {
            host,
            listener_ports,
            ..Self::default()
        }
    }

    /// Sets the operator's allow and deny lists.
    pub fn with_lists(mut self, allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        self.allow = allow;
        self.deny = deny;
        self
    }

    /// The ports an address of the host is open on when the operator allows it: the
    /// allocation ports of the whole relay, so that its allocations can reach each other
    /// (the hairpin). Without this an allowed address of the host stays refused.
    pub fn with_relay_ports(mut self, ports: RangeInclusive<u16>) -> Self {
        self.relay_ports = Some(ports);
        self
    }

    /// Development mode: loopback peers are allowed on every port but the listeners' (so
    /// two allocations on 127.0.0.1 can reach each other).
    pub fn with_loopback(mut self, allow: bool) -> Self {
        self.allow_loopback = allow;
        self
    }

    /// Decides whether `peer` may be reached (ChannelBind, Send, and the address of a
    /// CreatePermission). See the module doc for the order of the rules.
    pub fn check(&self, peer: SocketAddr) -> Result<(), PeerDenied> {
        self.verdict(peer.ip(), Some(peer.port()))
    }

    /// Decides whether some port of `ip` may be reached: what a permission needs, which is
    /// for an IP address only (RFC 8656 §9). The port of each datagram and channel is judged
    /// by [`PeerPolicy::check`].
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), PeerDenied> {
        self.verdict(ip, None)
    }

    fn verdict(&self, raw: IpAddr, port: Option<u16>) -> Result<(), PeerDenied> {
        let ip = canonical_ip(raw);
        if let Some(port) = port
            && self.listener_ports.contains(&port)
            && (self.host.contains(&ip) || ip.is_loopback() || ip.is_unspecified())
        {
            return Err(PeerDenied::Relay);
        }
        if self
            .deny
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&raw))
        {
            return Err(PeerDenied::Operator);
        }
        let allowed = self.allow.iter().any(|net| net.contains(&ip));
        if self.host.contains(&ip) && !ip.is_loopback() {
            if !allowed {
                builtin_verdict(ip)?;
                return Err(PeerDenied::Relay);
            }
            return match (&self.relay_ports, port) {
                (Some(_), None) => Ok(()),
                (Some(ports), Some(port)) if ports.contains(&port) => Ok(()),
                _ => Err(PeerDenied::Relay),
            };
        }
        if allowed {
            return Ok(());
        }
        match builtin_verdict(ip) {
            Err(PeerDenied::Loopback) if self.allow_loopback => Ok(()),
            verdict => verdict,
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
    // IPv4-compatible (RFC 4291 §2.5.5.1, deprecated), but :: and ::1 keep their IPv6 meaning;
    // both are refused either way.
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

fn builtin_verdict(ip: IpAddr) -> Result<(), PeerDenied> {
    match ip {
        IpAddr::V4(v4) => v4_verdict(v4),
        IpAddr::V6(v6) => v6_verdict(v6),
    }
}

/// IANA IPv4 special-purpose registry entries that are not globally reachable.
fn v4_verdict(ip: Ipv4Addr) -> Result<(), PeerDenied> {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (0, _, _) => Err(PeerDenied::Unspecified),
        (127, _, _) => Err(PeerDenied::Loopback),
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => Err(PeerDenied::Private),
        (100, 64..=127, _) => Err(PeerDenied::SharedAddressSpace),
        (169, 254, _) => Err(PeerDenied::LinkLocal),
        (224..=239, _, _) => Err(PeerDenied::Multicast),
        (255, 255, 255) => Err(PeerDenied::Multicast),
        // 192.0.0.0/24 protocol assignments, 192.0.2.0/24, 198.51.100.0/24 and
        // 203.0.113.0/24 documentation, 192.88.99.0/24 6to4 relays, 198.18.0.0/15
        // benchmarking, 240.0.0.0/4 reserved.
        (192, 0, 0 | 2) | (192, 88, 99) | (198, 18..=19, _) | (198, 51, 100) | (203, 0, 113) => {
            Err(PeerDenied::Reserved)
        }
        (240..=255, _, _) => Err(PeerDenied::Reserved),
        _ => Ok(()),
    }
}

/// Only global unicast (2000::/3) outside the special-purpose blocks is reachable.
fn v6_verdict(ip: Ipv6Addr) -> Result<(), PeerDenied> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Err(PeerDenied::Unspecified);
    }
    if ip.is_loopback() {
        return Err(PeerDenied::Loopback);
    }
    match s[0] {
        0xff00..=0xffff => Err(PeerDenied::Multicast),
        0xfe80..=0xfebf => Err(PeerDenied::LinkLocal),
        0xfc00..=0xfdff => Err(PeerDenied::Private),
        // 2001::/23 IETF protocol assignments (Teredo, benchmarking, ORCHID), 2001:db8::/32
        // and 3fff::/20 documentation.
        0x2001 if s[1] < 0x0200 || s[1] == 0x0db8 => Err(PeerDenied::Reserved),
        0x3fff if s[1] < 0x1000 => Err(PeerDenied::Reserved),
        0x2000..=0x3fff => Ok(()),
        // Everything outside 2000::/3 (64:ff9b:1::/48, 100::/64, fec0::/10, the rest of
        // ::/8 ...) is reserved or not globally reachable.
        _ => Err(PeerDenied::Reserved),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn default_policy() -> PeerPolicy {
        PeerPolicy::new(
            [
                IpAddr::from([203, 0, 114, 1]),
                "2001:4860::1".parse().unwrap(),
            ],
            [sa("203.0.114.1:3478")],
        )
    }

    #[test]
    fn cve_2020_26262_unspecified_and_loopback_forms() {
        let p = default_policy();
        assert_eq!(p.check(sa("0.0.0.0:80")), Err(PeerDenied::Unspecified));
        assert_eq!(p.check(sa("[::]:80")), Err(PeerDenied::Unspecified));
        assert_eq!(p.check(sa("[::1]:80")), Err(PeerDenied::Loopback));
        assert_eq!(p.check(sa("0.1.2.3:80")), Err(PeerDenied::Unspecified));
        assert_eq!(p.check(sa("127.0.0.1:80")), Err(PeerDenied::Loopback));
        assert_eq!(p.check(sa("127.255.0.9:80")), Err(PeerDenied::Loopback));
    }

    #[test]
    fn cve_2026_27624_ipv6_embedded_forms() {
        let p = default_policy();
        for addr in [
            "[::ffff:127.0.0.1]:80",
            "[::ffff:7f00:1]:80",
            "[::127.0.0.1]:80",
            "[64:ff9b::127.0.0.1]:80",
            "[64:ff9b::7f00:1]:80",
            "[2002:7f00:1::1]:80",
        ] {
            assert_eq!(p.check(sa(addr)), Err(PeerDenied::Loopback), "{addr}");
        }
        for addr in ["[::ffff:0.0.0.0]:80", "[::ffff:0:0]:80", "[64:ff9b::]:80"] {
            assert_eq!(p.check(sa(addr)), Err(PeerDenied::Unspecified), "{addr}");
        }
        assert_eq!(
            p.check(sa("[::ffff:10.0.0.1]:80")),
            Err(PeerDenied::Private)
        );
        assert_eq!(
            p.check(sa("[::ffff:169.254.169.254]:80")),
            Err(PeerDenied::LinkLocal)
        );
        assert_eq!(
            p.check(sa("[64:ff9b::192.168.1.1]:80")),
            Err(PeerDenied::Private)
        );
        assert_eq!(
            p.check(sa("[::ffff:100.64.0.1]:80")),
            Err(PeerDenied::SharedAddressSpace)
        );
        assert_eq!(
            p.check(sa("[::ffff:224.0.0.1]:80")),
            Err(PeerDenied::Multicast)
        );
        // The relay's own address in disguise.
        assert_eq!(
            p.check(sa("[::ffff:203.0.114.1]:9")),
            Err(PeerDenied::Relay)
        );
        // A public address in mapped form is judged as that address.
        assert_eq!(p.check(sa("[::ffff:8.8.8.8]:53")), Ok(()));
    }

    #[test]
    fn builtin_ranges() {
        let p = default_policy();
        let cases = [
            ("10.1.2.3:1", PeerDenied::Private),
            ("172.16.0.1:1", PeerDenied::Private),
            ("172.31.255.255:1", PeerDenied::Private),
            ("192.168.0.1:1", PeerDenied::Private),
            ("100.64.0.1:1", PeerDenied::SharedAddressSpace),
            ("100.127.255.254:1", PeerDenied::SharedAddressSpace),
            ("169.254.1.1:1", PeerDenied::LinkLocal),
            ("224.0.0.251:1", PeerDenied::Multicast),
            ("239.1.1.1:1", PeerDenied::Multicast),
            ("255.255.255.255:1", PeerDenied::Multicast),
            ("240.0.0.1:1", PeerDenied::Reserved),
            ("192.0.2.1:1", PeerDenied::Reserved),
            ("192.0.0.8:1", PeerDenied::Reserved),
            ("198.18.0.1:1", PeerDenied::Reserved),
            ("198.51.100.7:1", PeerDenied::Reserved),
            ("203.0.113.7:1", PeerDenied::Reserved),
            ("192.88.99.1:1", PeerDenied::Reserved),
            ("[fc00::1]:1", PeerDenied::Private),
            ("[fd12:3456::1]:1", PeerDenied::Private),
            ("[fe80::1]:1", PeerDenied::LinkLocal),
            ("[ff02::1]:1", PeerDenied::Multicast),
            ("[2001:db8::1]:1", PeerDenied::Reserved),
            ("[2001::1]:1", PeerDenied::Reserved),
            ("[3fff::1]:1", PeerDenied::Reserved),
            ("[100::1]:1", PeerDenied::Reserved),
            ("[64:ff9b:1::1]:1", PeerDenied::Reserved),
            ("[fec0::1]:1", PeerDenied::Reserved),
            ("203.0.114.1:5000", PeerDenied::Relay),
            ("[2001:4860::1]:5000", PeerDenied::Relay),
        ];
        for (addr, want) in cases {
            assert_eq!(p.check(sa(addr)), Err(want), "{addr}");
        }
        for ok in [
            "8.8.8.8:53",
            "100.128.0.1:1",
            "172.32.0.1:1",
            "[2a00:1450::1]:443",
        ] {
            assert_eq!(p.check(sa(ok)), Ok(()), "{ok}");
        }
    }

    #[test]
    fn operator_lists() {
        let p = default_policy().with_lists(
            vec![
                "10.0.0.0/24".parse().unwrap(),
                "127.0.0.1/32".parse().unwrap(),
            ],
            vec![
                "8.8.0.0/16".parse().unwrap(),
                "10.0.0.5/32".parse().unwrap(),
            ],
        );
        assert_eq!(p.check(sa("10.0.0.1:1")), Ok(()));
        assert_eq!(p.check(sa("[::ffff:10.0.0.1]:1")), Ok(()));
        assert_eq!(p.check(sa("10.0.1.1:1")), Err(PeerDenied::Private));
        // Deny wins over allow.
        assert_eq!(p.check(sa("10.0.0.5:1")), Err(PeerDenied::Operator));
        assert_eq!(p.check(sa("8.8.8.8:53")), Err(PeerDenied::Operator));
        assert_eq!(
            p.check(sa("[::ffff:8.8.8.8]:53")),
            Err(PeerDenied::Operator)
        );
        assert_eq!(p.check(sa("127.0.0.1:1")), Ok(()));
    }

    /// The allocation ports of [`hairpin_policy`].
    const RELAY_PORTS: RangeInclusive<u16> = 49152..=65535;

    /// A relay at 203.0.113.10 listening there on 3478, whose operator opens its /24.
    fn hairpin_policy() -> PeerPolicy {
        let listener: SocketAddr = "203.0.113.10:3478".parse().unwrap();
        PeerPolicy::new([listener.ip()], [listener])
            .with_lists(vec!["203.0.113.0/24".parse().unwrap()], vec![])
            .with_relay_ports(RELAY_PORTS)
    }

    #[test]
    fn the_listener_is_refused_even_inside_an_allowed_network() {
        let policy = hairpin_policy();
        let listener = sa("203.0.113.10:3478");
        assert_eq!(policy.check(listener), Err(PeerDenied::Relay));
        let mapped: SocketAddr = "[::ffff:203.0.113.10]:3478".parse().unwrap();
        assert_eq!(policy.check(mapped), Err(PeerDenied::Relay));
        // Another allocation of this relay, allowed by the operator: the hairpin.
        assert_eq!(policy.check(sa("203.0.113.10:50000")), Ok(()));
        // Another host of the allowed network.
        assert_eq!(policy.check(sa("203.0.113.11:22")), Ok(()));
        // Without the allow list the relay's own address stays refused.
        let strict =
            PeerPolicy::new(["8.8.8.8".parse().unwrap()], []).with_relay_ports(RELAY_PORTS);
        assert_eq!(
            strict.check("8.8.8.8:50000".parse().unwrap()),
            Err(PeerDenied::Relay)
        );
        assert_eq!(
            strict.check_ip("8.8.8.8".parse().unwrap()),
            Err(PeerDenied::Relay)
        );
    }

    /// coturn CVE-2020-26262's class: services of the relay's host bound to the wildcard
    /// addresses answer on each of its addresses, whichever the relay address is.
    #[test]
    fn every_address_of_the_host_is_refused() {
        let host: [IpAddr; 6] = [
            "203.0.114.1".parse().unwrap(),
            // A second IPv4 address, and a private one.
            "93.184.216.34".parse().unwrap(),
            "10.1.2.3".parse().unwrap(),
            // The relay's IPv6 address, a SLAAC address and a temporary one of its prefix.
            "2001:4860::1".parse().unwrap(),
            "2001:4860::5054:ff:fe12:3456".parse().unwrap(),
            "2001:4860::8d1c:27a5:b3e0:914f".parse().unwrap(),
        ];
        let wildcard = [sa("0.0.0.0:3478"), sa("[::]:3478")];
        let policy = PeerPolicy::new(host, wildcard)
            .with_lists(vec!["10.0.0.0/8".parse().unwrap()], vec![])
            .with_relay_ports(RELAY_PORTS);
        for ip in host {
            for port in [22, 53, 161, 3478, 9100] {
                let peer = SocketAddr::new(ip, port);
                assert!(policy.check(peer).is_err(), "{peer}");
            }
            // A permission for it is refused too, but for the allowed private address.
            let allowed = ip == IpAddr::from([10, 1, 2, 3]);
            assert_eq!(policy.check_ip(ip).is_ok(), allowed, "{ip}");
        }
        for disguised in [
            "[::ffff:93.184.216.34]:53",
            "[64:ff9b::5db8:d822]:53",
            "[2002:5db8:d822::1]:53",
        ] {
            assert_eq!(
                policy.check(sa(disguised)),
                Err(PeerDenied::Relay),
                "{disguised}"
            );
        }
        // The private address is allowed by the operator's 10/8: its allocation ports only.
        assert_eq!(policy.check(sa("10.1.2.3:50000")), Ok(()));
        assert_eq!(policy.check(sa("10.1.2.4:53")), Ok(()));
        // Not the host's: allowed.
        assert_eq!(policy.check(sa("93.184.216.35:53")), Ok(()));
        assert_eq!(policy.check(sa("[2001:4860::2]:53")), Ok(()));
    }

    /// Wildcard listeners answer on every local address: their ports are refused at each,
    /// at loopback and at the unspecified address, whatever the operator allows.
    #[test]
    fn listener_ports_are_refused_at_every_local_address() {
        let host: [IpAddr; 2] = [
            "203.0.114.1".parse().unwrap(),
            "2001:4860::1".parse().unwrap(),
        ];
        let policy = PeerPolicy::new(host, [sa("0.0.0.0:3478"), sa("[::]:5349")])
            .with_lists(
                vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
                vec![],
            )
            .with_relay_ports(1..=65535)
            .with_loopback(true);
        for peer in [
            "203.0.114.1:3478",
            "203.0.114.1:5349",
            "[2001:4860::1]:3478",
            "[::ffff:203.0.114.1]:3478",
            "127.0.0.1:3478",
            "127.1.2.3:5349",
            "[::1]:3478",
            "0.0.0.0:3478",
            "[::]:5349",
        ] {
            assert_eq!(policy.check(sa(peer)), Err(PeerDenied::Relay), "{peer}");
        }
        assert_eq!(policy.check(sa("203.0.114.1:3479")), Ok(()));
        assert_eq!(policy.check(sa("127.0.0.1:53")), Ok(()));
        // Another host's TURN server is a peer like any other.
        assert_eq!(policy.check(sa("8.8.8.8:3478")), Ok(()));
    }

    /// The hairpin needs the relay's own address allowed: only its allocation ports open.
    #[test]
    fn an_allowed_host_address_opens_only_the_allocation_ports() {
        let policy = hairpin_policy();
        let relay: IpAddr = "203.0.113.10".parse().unwrap();
        for port in [49152, 50000, 65535] {
            assert_eq!(policy.check(SocketAddr::new(relay, port)), Ok(()), "{port}");
        }
        for port in [1, 22, 53, 3478, 49151] {
            assert_eq!(
                policy.check(SocketAddr::new(relay, port)),
                Err(PeerDenied::Relay),
                "{port}"
            );
        }
        // A permission is for the address: some port of it is open.
        assert_eq!(policy.check_ip(relay), Ok(()));
        // Without the relay's ports nothing of it is open.
        let closed = PeerPolicy::new([relay], [])
            .with_lists(vec!["203.0.113.0/24".parse().unwrap()], vec![]);
        assert_eq!(
            closed.check(SocketAddr::new(relay, 50000)),
            Err(PeerDenied::Relay)
        );
        assert_eq!(closed.check_ip(relay), Err(PeerDenied::Relay));
        // The operator's deny list still wins.
        let denied = hairpin_policy().with_lists(
            vec!["203.0.113.0/24".parse().unwrap()],
            vec!["203.0.113.10/32".parse().unwrap()],
        );
        assert_eq!(
            denied.check(SocketAddr::new(relay, 50000)),
            Err(PeerDenied::Operator)
        );
    }

    #[test]
    fn dev_mode_allows_loopback_but_not_the_listener() {
        let p = PeerPolicy::new([IpAddr::from([127, 0, 0, 1])], [sa("127.0.0.1:3478")])
            .with_loopback(true);
        assert_eq!(p.check(sa("127.0.0.1:50000")), Ok(()));
        assert_eq!(
            p.check(sa("127.0.0.1:53")),
            Ok(()),
            "loopback is open in development"
        );
        assert_eq!(p.check(sa("[::1]:50000")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.1:3478")), Err(PeerDenied::Relay));
        assert_eq!(
            p.check(sa("[::ffff:127.0.0.1]:3478")),
            Err(PeerDenied::Relay)
        );
        assert_eq!(p.check(sa("0.0.0.0:1")), Err(PeerDenied::Unspecified));
        assert_eq!(p.check(sa("10.0.0.1:1")), Err(PeerDenied::Private));
    }

    proptest! {
        /// Whatever the operator allows, an address of the host is open on its allocation
        /// ports only, and never on a listener port.
        #[test]
        fn a_host_address_is_open_on_allocation_ports_only(
            v4 in any::<u32>(),
            v6 in any::<u128>(),
            port in any::<u16>(),
        ) {
            let host = [IpAddr::V4(Ipv4Addr::from(v4)), IpAddr::V6(Ipv6Addr::from(v6))];
            let policy = PeerPolicy::new(host, [sa("[::]:50000")])
                .with_lists(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()], vec![])
                .with_relay_ports(RELAY_PORTS)
                .with_loopback(true);
            for ip in host {
                let open = RELAY_PORTS.contains(&port) && port != 50000;
                let verdict = policy.check(SocketAddr::new(ip, port));
                let loopback = canonical_ip(ip).is_loopback();
                if loopback {
                    // Loopback is development mode's: open but for the listener's port.
                    prop_assert_eq!(verdict.is_ok(), port != 50000, "{} {}", ip, port);
                } else {
                    prop_assert_eq!(verdict.is_ok(), open, "{} {}", ip, port);
                }
            }
        }

        #[test]
        fn mapped_form_has_same_verdict(raw in any::<u32>(), port in any::<u16>()) {
            let p = default_policy();
            let v4 = Ipv4Addr::from(raw);
            let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port);
            let nat64 = {
                let o = v4.octets();
                Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0,
                    u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]))
            };
            let plain = p.check(SocketAddr::new(IpAddr::V4(v4), port));
            prop_assert_eq!(p.check(mapped), plain);
            prop_assert_eq!(p.check(SocketAddr::new(IpAddr::V6(nat64), port)), plain);
        }
    }
}
