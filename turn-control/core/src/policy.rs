//! Which peers an allocation may reach (RFC 8656 §21.2 "Security considerations",
//! RFC 6156 §9; coturn CVE-2020-26262 and CVE-2026-27624).
//!
//! Every peer address in CreatePermission, ChannelBind and Send goes through
//! [`PeerPolicy::check`]. The address is first canonicalised: IPv4-mapped (`::ffff:a.b.c.d`),
//! IPv4-compatible (`::a.b.c.d`), NAT64 well-known-prefix (`64:ff9b::/96`, RFC 6052) and
//! 6to4 (`2002::/16`, RFC 3056) forms are judged by the IPv4 address they carry, so
//! `::ffff:127.0.0.1` is loopback like `127.0.0.1`.
//!
//! Order of rules: an operator deny entry denies; an operator allow entry allows (this is
//! the only way to reach a built-in denied range); then the built-in ranges and the relay's
//! own addresses deny; everything else is allowed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
    /// One of the relay's own listener or relay addresses.
    #[error("address of this relay")]
    Relay,
    /// Listed in the operator's deny list.
    #[error("denied by operator policy")]
    Operator,
}

/// The peer policy: built-in deny ranges, the relay's own addresses, operator lists.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    own_ips: Vec<IpAddr>,
    own_sockets: Vec<SocketAddr>,
    allow_loopback: bool,
}

impl PeerPolicy {
    /// A policy that refuses the built-in ranges and `own_ips` (the listener and relay
    /// addresses, see [`PeerDenied::Relay`]). `listeners` are refused by exact socket address
    /// too, which matters in development mode where loopback peers are allowed.
    pub fn new(
        own_ips: impl IntoIterator<Item = IpAddr>,
        listeners: impl IntoIterator<Item = SocketAddr>,
    ) -> Self {
        Self {
            own_ips: own_ips.into_iter().map(canonical_ip).collect(),
            own_sockets: listeners
                .into_iter()
                .map(|s| SocketAddr::new(canonical_ip(s.ip()), s.port()))
                .collect(),
            ..Self::default()
        }
    }

    /// Sets the operator's allow and deny lists.
    pub fn with_lists(mut self, allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        self.allow = allow;
        self.deny = deny;
        self
    }

    /// Development mode: loopback peers are allowed, and the relay's own loopback addresses
    /// are refused only at the exact listener socket addresses (so two allocations on
    /// 127.0.0.1 can reach each other).
    pub fn with_loopback(mut self, allow: bool) -> Self {
        self.allow_loopback = allow;
        self
    }

    /// Decides whether `peer` may be reached.
    ///
    /// The relay's own listeners are never a peer, whatever the operator allows:
    /// relaying to them would loop. The relay's other addresses are refused unless the
    /// operator allows them, which two allocations of this relay reaching each other
    /// (the hairpin) needs.
    pub fn check(&self, peer: SocketAddr) -> Result<(), PeerDenied> {
        let raw = peer.ip();
        let ip = canonical_ip(raw);
        let canonical = SocketAddr::new(ip, peer.port());
        if self.own_sockets.contains(&canonical) {
            return Err(PeerDenied::Relay);
        }
        if self
            .deny
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&raw))
        {
            return Err(PeerDenied::Operator);
        }
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match builtin_verdict(ip) {
            Err(PeerDenied::Loopback) if self.allow_loopback => return Ok(()),
            verdict => verdict?,
        }
        if self.own_ips.contains(&ip) {
            return Err(PeerDenied::Relay);
        }
        Ok(())
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

    #[test]
    fn the_listener_is_refused_even_inside_an_allowed_network() {
        let listener: SocketAddr = "203.0.113.10:3478".parse().unwrap();
        let policy = PeerPolicy::new([listener.ip()], [listener])
            .with_lists(vec!["203.0.113.0/24".parse().unwrap()], vec![]);
        assert_eq!(policy.check(listener), Err(PeerDenied::Relay));
        let mapped: SocketAddr = "[::ffff:203.0.113.10]:3478".parse().unwrap();
        assert_eq!(policy.check(mapped), Err(PeerDenied::Relay));
        // Another allocation of this relay, allowed by the operator: the hairpin.
        assert_eq!(policy.check("203.0.113.10:50000".parse().unwrap()), Ok(()));
        // Without the allow list the relay's own address stays refused.
        let own: SocketAddr = "192.0.2.77:50000".parse().unwrap();
        let strict = PeerPolicy::new([own.ip()], [])
            .with_lists(vec!["192.0.2.0/24".parse().unwrap()], vec![]);
        assert_eq!(strict.check(own), Ok(()), "the operator allowed it");
        let strict = PeerPolicy::new(["8.8.8.8".parse().unwrap()], []);
        assert_eq!(
            strict.check("8.8.8.8:50000".parse().unwrap()),
            Err(PeerDenied::Relay)
        );
    }

    #[test]
    fn dev_mode_allows_loopback_but_not_the_listener() {
        let p = PeerPolicy::new([IpAddr::from([127, 0, 0, 1])], [sa("127.0.0.1:3478")])
            .with_loopback(true);
        assert_eq!(p.check(sa("127.0.0.1:50000")), Ok(()));
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
