//! The relay program's next hop under `BPF_PROG_TEST_RUN`, in a namespace
//! with real interfaces, routes and neighbours: frames run through the
//! program as if they arrived on one of its interfaces, and the kernel's FIB
//! (the default) or the MAC swap decides where the relayed frame goes. Every
//! relayed frame is compared byte for byte with one built independently by
//! `tests::packet::FrameSpec`; every pass must leave the frame untouched;
//! every frame moves exactly one reason counter.
//!
//! ```text
//!  x0 203.0.113.10/24 2001:db8:2::10/64   forwarding; the relay addresses
//!     gateway .1 / ::1 (static), default routes via it
//!     client on the segment .50 / ::50 (static), .77 / ::77 unresolved
//!     198.18.0.0/24, 2001:db8:10::/64 via the gateway, mtu lock 1280
//!     198.18.1.0/24, 2001:db8:11::/64 unreachable
//!     198.18.2.0/24, 2001:db8:12::/64 via .2 / ::2 (no neighbour)
//!     198.18.3.0/24, 2001:db8:13::/64 blackhole
//!  y0 198.51.100.1/24 2001:db8:3::1/64    forwarding; peer .2 / ::2 (static)
//!  s0 198.18.4.1/24 2001:db8:4::1/64      forwarding, MTU 1280; host .2 / ::2
//!  z0 192.168.77.1/24 2001:db8:77::1/64   forwarding off
//!  m0 192.168.78.1/24 2001:db8:78::1/64   MTU 1280 (MAC-swap mode)
//! ```
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::SocketAddr;

use bpf_common::{KernelConfig, Reason};
use tests::Netns;
use tests::packet::{FrameSpec, channel_data};
use tests::xdp::{LoadedRelay, XDP_PASS, XDP_REDIRECT, XDP_TX};
use tests::xdp::{RELAY4, RELAY6, addr, data, relay_ip};

const LISTEN: u16 = 3478;

/// The gateway on x0, both families.
const GATEWAY_MAC: [u8; 6] = [0x02, 0x5e, 0, 0, 0x01, 0x01];
/// The client on x0's segment, 203.0.113.50.
const NEAR_MAC: [u8; 6] = [0x02, 0x5e, 0, 0, 0x01, 0x50];
/// The client on x0's segment, 2001:db8:2::50.
const NEAR6_MAC: [u8; 6] = [0x02, 0x5e, 0, 0, 0x01, 0x56];
/// The peer behind y0, both families.
const PEER_MAC: [u8; 6] = [0x02, 0x5e, 0, 0, 0x03, 0x02];
/// The host behind s0, both families.
const SMALL_MAC: [u8; 6] = [0x02, 0x5e, 0, 0, 0x04, 0x02];

/// The program loaded and configured: FIB lookup (the default) or MAC swap.
fn relay(mac_swap: bool) -> LoadedRelay {
    let config = KernelConfig::new(
        &[LISTEN],
        (49152, 65535),
        Some(RELAY4.parse().unwrap()),
        Some(RELAY6.parse().unwrap()),
    );
    assert!(!config.mac_swap(), "FIB lookup is the default");
    let relay = LoadedRelay::load().unwrap();
    relay.configure(&config.with_mac_swap(mac_swap)).unwrap();
    relay
}

/// The relay's namespace (see the module's documentation).
struct Host {
    netns: Netns,
}

impl Host {
    fn new() -> Self {
        let netns = Netns::create(tests::unique_name("nexthop")).unwrap();
        let ifaces = ["x0", "y0", "s0", "z0", "m0"];
        for iface in ifaces {
            let other = iface.replace('0', "1");
            netns
                .ip(["link", "add", iface, "type", "veth", "peer", "name", &other])
                .unwrap();
            if iface == "s0" || iface == "m0" {
                for end in [iface, &other] {
                    netns.ip(["link", "set", end, "mtu", "1280"]).unwrap();
                }
            }
            for end in [iface, &other] {
                netns.ip(["link", "set", end, "up"]).unwrap();
            }
        }
        for (iface, v4, v6) in [
            ("x0", "203.0.113.10/24", "2001:db8:2::10/64"),
            ("y0", "198.51.100.1/24", "2001:db8:3::1/64"),
            ("s0", "198.18.4.1/24", "2001:db8:4::1/64"),
            ("z0", "192.168.77.1/24", "2001:db8:77::1/64"),
            ("m0", "192.168.78.1/24", "2001:db8:78::1/64"),
        ] {
            netns.ip(["addr", "add", v4, "dev", iface]).unwrap();
            netns
                .ip(["addr", "add", v6, "dev", iface, "nodad"])
                .unwrap();
        }
        for iface in ["x0", "y0", "s0"] {
            tests::enable_forwarding(&netns, iface).unwrap();
        }
        netns
            .exec(
                "sysctl",
                [
                    "-qw",
                    "net.ipv4.conf.z0.forwarding=0",
                    "net.ipv6.conf.z0.forwarding=0",
                ],
            )
            .unwrap();
        for (ip, mac, iface) in [
            ("203.0.113.1", GATEWAY_MAC, "x0"),
            ("2001:db8:2::1", GATEWAY_MAC, "x0"),
            ("203.0.113.50", NEAR_MAC, "x0"),
            ("2001:db8:2::50", NEAR6_MAC, "x0"),
            ("198.51.100.2", PEER_MAC, "y0"),
            ("2001:db8:3::2", PEER_MAC, "y0"),
            ("198.18.4.2", SMALL_MAC, "s0"),
            ("2001:db8:4::2", SMALL_MAC, "s0"),
        ] {
            netns
                .add_static_neighbour(ip.parse().unwrap(), mac, iface)
                .unwrap();
        }
        let routes: [&[&str]; 10] = [
            &["route", "add", "default", "via", "203.0.113.1"],
            &["-6", "route", "add", "default", "via", "2001:db8:2::1"],
            &[
                "route",
                "add",
                "198.18.0.0/24",
                "via",
                "203.0.113.1",
                "mtu",
                "lock",
                "1280",
            ],
            &[
                "-6",
                "route",
                "add",
                "2001:db8:10::/64",
                "via",
                "2001:db8:2::1",
                "mtu",
                "lock",
                "1280",
            ],
            &["route", "add", "unreachable", "198.18.1.0/24"],
            &["-6", "route", "add", "unreachable", "2001:db8:11::/64"],
            &["route", "add", "198.18.2.0/24", "via", "203.0.113.2"],
            &[
                "-6",
                "route",
                "add",
                "2001:db8:12::/64",
                "via",
                "2001:db8:2::2",
            ],
            &["route", "add", "blackhole", "198.18.3.0/24"],
            &["-6", "route", "add", "blackhole", "2001:db8:13::/64"],
        ];
        for route in routes {
            netns.ip(route).unwrap();
        }
        Self { netns }
    }

    fn mac(&self, iface: &str) -> [u8; 6] {
        self.netns.mac(iface).unwrap()
    }

    /// Runs `frame` through `relay` as arriving on `iface`.
    fn run(&self, relay: &LoadedRelay, iface: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.netns
            .enter(|| relay.run_on(nix::net::if_::if_nametoindex(iface)?, frame))
            .unwrap()
    }

    /// Lets `relay` redirect frames out of `iface` (the devmap resolves the
    /// ifindex in the calling thread's namespace).
    fn allow_egress(&self, relay: &LoadedRelay, iface: &str) {
        self.netns
            .enter(|| relay.allow_egress(nix::net::if_::if_nametoindex(iface)?))
            .unwrap();
    }
}

/// The MACs of a MAC swap of `input`: back where it came from.
fn swapped(input: &FrameSpec) -> ([u8; 6], [u8; 6]) {
    (input.src_mac, input.dst_mac)
}

/// A channel binding of the relay under test.
#[derive(Clone, Copy, Debug)]
struct Binding {
    client: SocketAddr,
    peer: SocketAddr,
    channel: u16,
    port: u16,
}

impl Binding {
    fn new(relay: &LoadedRelay, client: &str, peer: &str, channel: u16) -> Self {
        let binding = Self {
            client: addr(client),
            peer: addr(peer),
            channel,
            port: 50000 + (channel & 0xff),
        };
        relay
            .bind(binding.client, channel, binding.peer, binding.port)
            .unwrap();
        binding
    }

    fn listener(&self) -> SocketAddr {
        SocketAddr::new(relay_ip(self.client), LISTEN)
    }

    fn relayed(&self) -> SocketAddr {
        SocketAddr::new(relay_ip(self.peer), self.port)
    }

    /// Channel data from the client carrying `len` bytes.
    fn client_sends(&self, len: usize) -> FrameSpec {
        FrameSpec::marked(
            self.client,
            self.listener(),
            &channel_data(self.channel, &data(len)),
        )
    }

    /// What the relay sends the peer for `input`, to `macs` (dst, src).
    fn peer_gets(&self, input: &FrameSpec, macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
        let len = input.payload.len() - 4;
        input.relayed((self.relayed(), self.peer), &data(len), macs)
    }

    /// A datagram from the peer carrying `len` bytes.
    fn peer_sends(&self, len: usize) -> FrameSpec {
        FrameSpec::marked(self.peer, self.relayed(), &data(len))
    }

    /// What the relay sends the client for `input`, to `macs` (dst, src).
    fn client_gets(&self, input: &FrameSpec, macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
        let message = channel_data(self.channel, &input.payload);
        input.relayed((self.listener(), self.client), &message, macs)
    }

    /// A frame from the client (`to_peer`) or from the peer carrying `len`
    /// bytes, and the reason it is relayed for.
    fn input(&self, to_peer: bool, len: usize) -> (FrameSpec, Reason) {
        if to_peer {
            (self.client_sends(len), self.reason_to_peer())
        } else {
            (self.peer_sends(len), self.reason_to_client())
        }
    }

    /// What the relay sends for `input` of [`Binding::input`].
    fn output(&self, to_peer: bool, input: &FrameSpec, macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
        if to_peer {
            self.peer_gets(input, macs)
        } else {
            self.client_gets(input, macs)
        }
    }

    fn reason_to_peer(&self) -> Reason {
        match (self.client.is_ipv4(), self.peer.is_ipv4()) {
            (true, true) => Reason::RelayClientToPeerV4V4,
            (true, false) => Reason::RelayClientToPeerV4V6,
            (false, true) => Reason::RelayClientToPeerV6V4,
            (false, false) => Reason::RelayClientToPeerV6V6,
        }
    }

    fn reason_to_client(&self) -> Reason {
        match (self.peer.is_ipv4(), self.client.is_ipv4()) {
            (true, true) => Reason::RelayPeerToClientV4V4,
            (true, false) => Reason::RelayPeerToClientV4V6,
            (false, true) => Reason::RelayPeerToClientV6V4,
            (false, false) => Reason::RelayPeerToClientV6V6,
        }
    }
}

/// Every reason's packet count.
fn counts(relay: &LoadedRelay) -> Vec<u64> {
    Reason::ALL
        .iter()
        .map(|reason| relay.counter(*reason).unwrap().packets)
        .collect()
}

/// Runs `frame` in on `iface`, checking that `reason`'s counter, and no
/// other, went up by one; the verdict and the frame after.
fn run_counted(
    host: &Host,
    relay: &LoadedRelay,
    iface: &str,
    frame: &[u8],
    reason: Reason,
    context: &str,
) -> (u32, Vec<u8>) {
    let before = counts(relay);
    let result = host.run(relay, iface, frame);
    let after = counts(relay);
    for (index, counted) in Reason::ALL.iter().enumerate() {
        let wanted = before[index] + u64::from(*counted == reason);
        assert_eq!(
            after[index],
            wanted,
            "{context}: counter {} (expected the frame counted as {}, verdict {})",
            counted.name(),
            reason.name(),
            result.0
        );
    }
    result
}

/// `frame` in on `iface` is passed for `reason`, untouched.
fn assert_passed(
    host: &Host,
    relay: &LoadedRelay,
    iface: &str,
    frame: &FrameSpec,
    reason: Reason,
    context: &str,
) {
    let frame = frame.build();
    let redirected = relay.redirected().unwrap();
    let (verdict, out) = run_counted(host, relay, iface, &frame, reason, context);
    assert_eq!(verdict, XDP_PASS, "{context}: {}", reason.name());
    assert_eq!(
        out,
        frame,
        "{context}: {} must leave the frame untouched",
        reason.name()
    );
    assert_eq!(relay.redirected().unwrap(), redirected, "{context}");
}

/// `frame` in on `iface` is relayed for `reason` with `verdict` (`XDP_TX`
/// or `XDP_REDIRECT`, which alone counts in `REDIRECTED`) as `wanted`.
fn assert_relayed(
    host: &Host,
    relay: &LoadedRelay,
    iface: &str,
    (frame, reason): (&FrameSpec, Reason),
    verdict: u32,
    wanted: &[u8],
    context: &str,
) {
    let redirected = relay.redirected().unwrap();
    let (got, out) = run_counted(host, relay, iface, &frame.build(), reason, context);
    assert_eq!(got, verdict, "{context}: verdict");
    assert_eq!(out, wanted, "{context}: the relayed frame");
    let after = relay.redirected().unwrap();
    if verdict == XDP_REDIRECT {
        // The application bytes: what the relay reason counts.
        let bytes = if matches!(
            reason,
            Reason::RelayClientToPeerV4V4
                | Reason::RelayClientToPeerV4V6
                | Reason::RelayClientToPeerV6V4
                | Reason::RelayClientToPeerV6V6
        ) {
            frame.payload.len() - 4
        } else {
            frame.payload.len()
        };
        assert_eq!(
            (after.packets, after.bytes),
            (redirected.packets + 1, redirected.bytes + bytes as u64),
            "{context}: REDIRECTED"
        );
    } else {
        assert_eq!(after, redirected, "{context}: REDIRECTED");
    }
}

/// Through the gateway, every family pair both ways: back out of x0
/// (`XDP_TX`) to the gateway's MAC from x0's.
#[test]
fn relayed_frames_leave_for_the_gateways_mac_from_the_ingress_interface() {
    if !tests::privileged() {
        return;
    }
    let host = Host::new();
    let relay = relay(false);
    let to_gateway = (GATEWAY_MAC, host.mac("x0"));
    let bindings = [
        Binding::new(&relay, "192.0.2.2:40000", "100.64.0.2:9000", 0x4001),
        Binding::new(&relay, "192.0.2.2:40000", "[2001:db8:5::2]:9000", 0x4002),
        Binding::new(&relay, "[2001:db8:1::2]:40000", "100.64.0.2:9001", 0x4003),
        Binding::new(
            &relay,
            "[2001:db8:1::2]:40000",
            "[2001:db8:5::2]:9001",
            0x4004,
        ),
    ];
    for binding in bindings {
        for len in [0, 1, 100, 1200] {
            let context = format!("{binding:?}, {len} bytes");
            let input = binding.client_sends(len);
            assert_relayed(
                &host,
                &relay,
                "x0",
                (&input, binding.reason_to_peer()),
                XDP_TX,
                &binding.peer_gets(&input, to_gateway),
                &format!("client to peer: {context}"),
            );
            let input = binding.peer_sends(len);
            assert_relayed(
                &host,
                &relay,
                "x0",
                (&input, binding.reason_to_client()),
                XDP_TX,
                &binding.client_gets(&input, to_gateway),
                &format!("peer to client: {context}"),
            );
        }
    }
}

/// A client on the relay's own segment gets its frames at its own MAC
/// (from the neighbour table), not at the gateway's; its channel data to a
/// peer elsewhere still goes to the gateway. Hairpin too.
#[test]
fn a_client_on_the_relays_segment_gets_frames_at_its_own_mac() {
    if !tests::privileged() {
        return;
    }
    let host = Host::new();
    let relay = relay(false);
    let x0 = host.mac("x0");
    for (binding, client_mac) in [
        (
            Binding::new(&relay, "203.0.113.50:40000", "100.64.0.2:9000", 0x4001),
            NEAR_MAC,
        ),
        (
            Binding::new(
                &relay,
                "[2001:db8:2::50]:40000",
                "[2001:db8:5::2]:9000",
                0x4002,
            ),
            NEAR6_MAC,
        ),
        (
            Binding::new(&relay, "203.0.113.50:40001", "[2001:db8:5::2]:9001", 0x4003),
            NEAR_MAC,
        ),
        (
            Binding::new(&relay, "[2001:db8:2::50]:40001", "100.64.0.2:9001", 0x4004),
            NEAR6_MAC,
        ),
    ] {
        let context = format!("{binding:?}");
        let input = binding.peer_sends(300);
        assert_relayed(
            &host,
            &relay,
            "x0",
            (&input, binding.reason_to_client()),
            XDP_TX,
            &binding.client_gets(&input, (client_mac, x0)),
            &format!("peer to client: {context}"),
        );
        let input = binding.client_sends(300);
        assert_relayed(
            &host,
            &relay,
            "x0",
            (&input, binding.reason_to_peer()),
            XDP_TX,
            &binding.peer_gets(&input, (GATEWAY_MAC, x0)),
            &format!("client to peer: {context}"),
        );
    }

    // Hairpin from a client behind the gateway to the one on the segment.
    let (port_a, port_b) = (50100, 50101);
    let far = addr("192.0.2.2:40000");
    let near = addr("203.0.113.50:40002");
    let relayed = |port| SocketAddr::new(RELAY4.parse().unwrap(), port);
    relay.bind(far, 0x4010, relayed(port_b), port_a).unwrap();
    relay.bind(near, 0x4011, relayed(port_a), port_b).unwrap();
    let listener = SocketAddr::new(RELAY4.parse().unwrap(), LISTEN);
    let payload = data(200);
    let input = FrameSpec::marked(far, listener, &channel_data(0x4010, &payload));
    assert_relayed(
        &host,
        &relay,
        "x0",
        (&input, Reason::RelayHairpinV4V4),
        XDP_TX,
        &input.relayed(
            (listener, near),
            &channel_data(0x4011, &payload),
            (NEAR_MAC, x0),
        ),
        "hairpin to the client on the segment",
    );
}

/// A route out of y0 for a frame that came in on x0 (and back): redirected
/// through `EGRESS` with y0's MACs when y0 is in it, passed untouched when
/// it is not.
#[test]
fn a_route_through_another_interface_redirects_only_to_an_attached_one() {
    if !tests::privileged() {
        return;
    }
    let host = Host::new();
    let relay = relay(false);
    let (x0, y0) = (host.mac("x0"), host.mac("y0"));
    let bindings = [
        Binding::new(&relay, "192.0.2.2:40000", "198.51.100.2:9000", 0x4001),
        Binding::new(
            &relay,
            "[2001:db8:1::2]:40000",
            "[2001:db8:3::2]:9000",
            0x4002,
        ),
        Binding::new(&relay, "192.0.2.2:40000", "[2001:db8:3::2]:9001", 0x4003),
        Binding::new(&relay, "[2001:db8:1::2]:40000", "198.51.100.2:9001", 0x4004),
    ];
    for binding in bindings {
        let context = format!("nothing attached, {binding:?}");
        assert_passed(
            &host,
            &relay,
            "x0",
            &binding.client_sends(500),
            Reason::PassEgressNotAttached,
            &format!("client to peer: {context}"),
        );
        assert_passed(
            &host,
            &relay,
            "y0",
            &binding.peer_sends(500),
            Reason::PassEgressNotAttached,
            &format!("peer to client: {context}"),
        );
    }

    host.allow_egress(&relay, "y0");
    for binding in bindings {
        let context = format!("y0 attached, {binding:?}");
        let input = binding.client_sends(500);
        assert_relayed(
            &host,
            &relay,
            "x0",
            (&input, binding.reason_to_peer()),
            XDP_REDIRECT,
            &binding.peer_gets(&input, (PEER_MAC, y0)),
            &format!("client to peer: {context}"),
        );
        // x0 is not attached: the way back stays in the stack.
        assert_passed(
            &host,
            &relay,
            "y0",
            &binding.peer_sends(500),
            Reason::PassEgressNotAttached,
            &format!("peer to client: {context}"),
        );
    }

    host.allow_egress(&relay, "x0");
    for binding in bindings {
        let context = format!("x0 and y0 attached, {binding:?}");
        let input = binding.peer_sends(500);
        assert_relayed(
            &host,
            &relay,
            "y0",
            (&input, binding.reason_to_client()),
            XDP_REDIRECT,
            &binding.client_gets(&input, (GATEWAY_MAC, x0)),
            &format!("peer to client: {context}"),
        );
        let input = binding.client_sends(500);
        assert_relayed(
            &host,
            &relay,
            "x0",
            (&input, binding.reason_to_peer()),
            XDP_REDIRECT,
            &binding.peer_gets(&input, (PEER_MAC, y0)),
            &format!("client to peer: {context}"),
        );
    }
    // Out of the ingress interface is still XDP_TX, attached or not.
    let binding = Binding::new(&relay, "192.0.2.2:40001", "100.64.0.2:9000", 0x4005);
    let input = binding.client_sends(500);
    assert_relayed(
        &host,
        &relay,
        "x0",
        (&input, binding.reason_to_peer()),
        XDP_TX,
        &binding.peer_gets(&input, (GATEWAY_MAC, x0)),
        "client to peer through the gateway, x0 attached",
    );
}

/// A next hop without a neighbour entry, a gateway or the destination
/// itself on the segment: passed untouched, for the stack to resolve.
#[test]
fn an_unresolved_next_hop_passes_the_frame() {
    if !tests::privileged() {
        return;
    }
    let host = Host::new();
    let relay = relay(false);
    let x0 = host.mac("x0");
    // Peers behind a gateway without a neighbour entry.
    for binding in [
        Binding::new(&relay, "192.0.2.2:40000", "198.18.2.2:9000", 0x4001),
        Binding::new(
            &relay,
            "[2001:db8:1::2]:40000",
            "[2001:db8:12::2]:9000",
            0x4002,
        ),
        Binding::new(&relay, "192.0.2.2:40000", "[2001:db8:12::2]:9001", 0x4003),
    ] {
        assert_passed(
            &host,
            &relay,
            "x0",
            &binding.client_sends(100),
            Reason::PassNoNeighbour,
            &format!("client to peer: {binding:?}"),
        );
    }
    // Clients on the segment without a neighbour entry; their channel data
    // to a peer through the (resolved) gateway is relayed.
    for binding in [
        Binding::new(&relay, "203.0.113.77:40000", "100.64.0.2:9000", 0x4004),
        Binding::new(
            &relay,
            "[2001:db8:2::77]:40000",
            "[2001:db8:5::2]:9000",
            0x4005,
        ),
        Binding::new(&relay, "203.0.113.77:40001", "[2001:db8:5::2]:9001", 0x4006),
    ] {
        assert_passed(
            &host,
            &relay,
            "x0",
            &binding.peer_sends(100),
            Reason::PassNoNeighbour,
            &format!("peer to client: {binding:?}"),
        );
        let input = binding.client_sends(100);
        assert_relayed(
            &host,
            &relay,
            "x0",
            (&input, binding.reason_to_peer()),
            XDP_TX,
            &binding.peer_gets(&input, (GATEWAY_MAC, x0)),
            &format!("client to peer: {binding:?}"),
        );
    }
    // The lookups did not resolve anything behind the stack's back.
    let neighbours = host.netns.ip(["neigh", "show", "dev", "x0"]).unwrap()
        + &host.netns.ip(["-6", "neigh", "show", "dev", "x0"]).unwrap();
    for unresolved in [
        "203.0.113.2 ",
        "2001:db8:2::2 ",
        "203.0.113.77",
        "2001:db8:2::77",
    ] {
        assert!(
            !neighbours.contains(unresolved),
            "{unresolved} in\n{neighbours}"
        );
    }
}

/// The route's MTU (locked at 1280) or the egress interface's bounds the
/// relayed datagram, whose size differs from the incoming one: a datagram
/// of exactly the MTU is relayed, one byte more is passed untouched.
#[test]
fn the_route_mtu_bounds_the_relayed_datagram() {
    if !tests::privileged() {
        return;
    }
    let host = Host::new();
    let relay = relay(false);
    let x0 = host.mac("x0");
    let to_gateway = (GATEWAY_MAC, x0);
    // (binding, client to peer?, the data length whose relayed datagram is
    // exactly 1280 bytes). Only the relayed datagram counts, not the incoming one.
    let cases = [
        // IPv4 to IPv4: 20 + 8 + 1252; in 4 bytes more.
        (
            Binding::new(&relay, "192.0.2.2:40000", "198.18.0.2:9000", 0x4001),
            true,
            1252,
        ),
        // Peer to client grows by the ChannelData header: 20 + 8 + 4 + 1248,
        // from 1276 bytes in.
        (
            Binding::new(&relay, "198.18.0.7:40000", "100.64.0.2:9000", 0x4002),
            false,
            1248,
        ),
        // IPv4 to IPv6 grows by 20 header bytes (less the ChannelData
        // header's 4): 40 + 8 + 1232, from 1264 bytes in.
        (
            Binding::new(&relay, "192.0.2.2:40001", "[2001:db8:10::2]:9000", 0x4003),
            true,
            1232,
        ),
        // IPv6 to IPv6: 40 + 8 + 1232.
        (
            Binding::new(
                &relay,
                "[2001:db8:1::2]:40000",
                "[2001:db8:10::2]:9001",
                0x4004,
            ),
            true,
            1232,
        ),
        // IPv6 peer to IPv4 client shrinks: 20 + 8 + 4 + 1248 from 1296
        // bytes in, more than the route's MTU.
        (
            Binding::new(&relay, "198.18.0.7:40001", "[2001:db8:5::2]:9001", 0x4005),
            false,
            1248,
        ),
        // IPv6 peer to IPv6 client: 40 + 8 + 4 + 1228.
        (
            Binding::new(
                &relay,
                "[2001:db8:10::7]:40000",
                "[2001:db8:5::2]:9002",
                0x4006,
            ),
            false,
            1228,
        ),
    ];
    for (binding, to_peer, fits) in cases {
        let context = format!("client to peer {to_peer}, {binding:?}");
        let (input, reason) = binding.input(to_peer, fits);
        assert_relayed(
            &host,
            &relay,
            "x0",
            (&input, reason),
            XDP_TX,
            &binding.output(to_peer, &input, to_gateway),
            &format!("{fits} bytes, {context}"),
        );
        assert_passed(
            &host,
            &relay,
            "x0",
            &binding.input(to_peer, fits + 1).0,
            Reason::PassMtuExceeded,
            &format!("{} bytes, {context}", fits + 1),
        );
    }

    // Other destinations keep x0's MTU of 1500.
    let binding = Binding::new(&relay, "192.0.2.2:40002", "100.64.0.2:9003", 0x4007);
    let input = binding.client_sends(1472);
    assert_relayed(
        &host,
        &relay,
        "x0",
        (&input, binding.reason_to_peer()),
        XDP_TX,
        &binding.peer_gets(&input, to_gateway),
        "client to peer, 1500 bytes, x0's MTU",
    );
    assert_passed(
        &host,
        &relay,
        "x0",
        &binding.client_sends(1473),
        Reason::PassMtuExceeded,
        "client to peer, 1501 bytes, x0's MTU",
    );

    // An egress interface of MTU 1280: its MTU is checked before whether
    // the program may redirect there.
    let s0 = (SMALL_MAC, host.mac("s0"));
    let small = [
        Binding::new(&relay, "192.0.2.2:40003", "198.18.4.2:9000", 0x4008),
        Binding::new(&relay, "192.0.2.2:40003", "[2001:db8:4::2]:9000", 0x4009),
    ];
    for binding in small {
        let fits = if binding.peer.is_ipv4() { 1252 } else { 1232 };
        assert_passed(
            &host,
            &relay,
            "x0",
            &binding.client_sends(fits),
            Reason::PassEgressNotAttached,
            &format!("s0 not attached, {binding:?}"),
        );
        assert_passed(
            &host,
            &relay,
            "x0",
            &binding.client_sends(fits + 1),
            Reason::PassMtuExceeded,
            &format!("s0 not attached, {binding:?}"),
        );
    }
    host.allow_egress(&relay, "s0");
    for binding in small {
        let fits = if binding.peer.is_ipv4() { 1252 } else { 1232 };
        let input = binding.client_sends(fits);
        assert_relayed(
            &host,
            &relay,
            "x0",
            (&input, binding.reason_to_peer()),
            XDP_REDIRECT,
            &binding.peer_gets(&input, s0),
            &format!("s0 attached, {binding:?}"),
        );
        assert_passed(
            &host,
            &relay,
            "x0",
            &binding.client_sends(fits + 1),
            Reason::PassMtuExceeded,
            &format!("s0 attached, {binding:?}"),
        );
    }
}

/// The FIB answers only for an ingress interface that forwards in the
/// relayed datagram's family.
#[test]
fn an_ingress_interface_without_forwarding_passes_the_frame() {
    if !tests::privileged() {
        return;
    }
    let host = Host::new();
    let relay = relay(false);
    let bindings = [
        Binding::new(&relay, "192.0.2.2:40000", "100.64.0.2:9000", 0x4001),
        Binding::new(
            &relay,
            "[2001:db8:1::2]:40000",
            "[2001:db8:5::2]:9000",
            0x4002,
        ),
        Binding::new(&relay, "192.0.2.2:40000", "[2001:db8:5::2]:9001", 0x4003),
        Binding::new(&relay, "[2001:db8:1::2]:40000", "100.64.0.2:9001", 0x4004),
    ];
    let check = |v4_forwarding: bool, v6_forwarding: bool| {
        for binding in bindings {
            let context =
                format!("z0 forwarding v4 {v4_forwarding} v6 {v6_forwarding}, {binding:?}");
            let forwarding = if binding.peer.is_ipv4() {
                v4_forwarding
            } else {
                v6_forwarding
            };
            // Forwarding on, the route leaves through x0, not attached.
            let reason = if forwarding {
                Reason::PassEgressNotAttached
            } else {
                Reason::PassForwardingDisabled
            };
            assert_passed(
                &host,
                &relay,
                "z0",
                &binding.client_sends(100),
                reason,
                &format!("client to peer: {context}"),
            );
            let forwarding = if binding.client.is_ipv4() {
                v4_forwarding
            } else {
                v6_forwarding
            };
            let reason = if forwarding {
                Reason::PassEgressNotAttached
            } else {
                Reason::PassForwardingDisabled
            };
            assert_passed(
                &host,
                &relay,
                "z0",
                &binding.peer_sends(100),
                reason,
                &format!("peer to client: {context}"),
            );
        }
    };
    check(false, false);
    host.netns
        .exec("sysctl", ["-qw", "net.ipv4.conf.z0.forwarding=1"])
        .unwrap();
    check(true, false);
    host.netns
        .exec(
            "sysctl",
            [
                "-qw",
                "net.ipv4.conf.z0.forwarding=0",
                "net.ipv6.conf.z0.forwarding=1",
            ],
        )
        .unwrap();
    check(false, true);
}

/// Unreachable, blackhole, local and missing routes: passed untouched.
#[test]
fn a_destination_without_a_forwarding_route_passes_the_frame() {
    if !tests::privileged() {
        return;
    }
    let host = Host::new();
    let relay = relay(false);
    let x0 = host.mac("x0");
    for (peer, channel) in [
        ("198.18.1.2:9000", 0x4001),
        ("[2001:db8:11::2]:9000", 0x4002),
        ("198.18.3.2:9000", 0x4003),
        ("[2001:db8:13::2]:9000", 0x4004),
        // Local: the relay's own addresses, not an allocation port.
        ("203.0.113.10:53", 0x4005),
        ("[2001:db8:2::10]:53", 0x4006),
        ("198.51.100.1:9000", 0x4007),
    ] {
        for client in ["192.0.2.2:40000", "[2001:db8:1::2]:40000"] {
            let binding = Binding::new(&relay, client, peer, channel);
            assert_passed(
                &host,
                &relay,
                "x0",
                &binding.client_sends(100),
                Reason::PassNoRoute,
                &format!("client to peer: {binding:?}"),
            );
        }
    }
    for (client, channel) in [
        ("198.18.1.7:40000", 0x4010),
        ("[2001:db8:11::7]:40000", 0x4011),
        ("198.18.3.7:40000", 0x4012),
        ("[2001:db8:13::7]:40000", 0x4013),
    ] {
        let binding = Binding::new(&relay, client, "100.64.0.2:9000", channel);
        assert_passed(
            &host,
            &relay,
            "x0",
            &binding.peer_sends(100),
            Reason::PassNoRoute,
            &format!("peer to client: {binding:?}"),
        );
    }

    // With the default routes, relayed; without any route, passed.
    let bindings = [
        Binding::new(&relay, "203.0.113.50:40000", "100.64.0.2:9001", 0x4020),
        Binding::new(
            &relay,
            "[2001:db8:2::50]:40000",
            "[2001:db8:5::2]:9001",
            0x4021,
        ),
    ];
    for binding in bindings {
        let input = binding.client_sends(100);
        assert_relayed(
            &host,
            &relay,
            "x0",
            (&input, binding.reason_to_peer()),
            XDP_TX,
            &binding.peer_gets(&input, (GATEWAY_MAC, x0)),
            &format!("with a default route: {binding:?}"),
        );
    }
    host.netns.ip(["route", "del", "default"]).unwrap();
    host.netns.ip(["-6", "route", "del", "default"]).unwrap();
    for binding in bindings {
        assert_passed(
            &host,
            &relay,
            "x0",
            &binding.client_sends(100),
            Reason::PassNoRoute,
            &format!("without a default route: {binding:?}"),
        );
        // The client on the segment is still reachable.
        let input = binding.peer_sends(100);
        let near = if binding.client.is_ipv4() {
            NEAR_MAC
        } else {
            NEAR6_MAC
        };
        assert_relayed(
            &host,
            &relay,
            "x0",
            (&input, binding.reason_to_client()),
            XDP_TX,
            &binding.client_gets(&input, (near, x0)),
            &format!("without a default route: {binding:?}"),
        );
    }
}

/// MAC-swap mode looks nothing up: the frame goes back where it came from
/// whatever the routes, forwarding or neighbours say, as long as the
/// relayed datagram fits the ingress interface's MTU.
#[test]
fn mac_swap_mode_checks_only_the_ingress_mtu() {
    if !tests::privileged() {
        return;
    }
    let host = Host::new();
    let relay = relay(true);
    // (binding, client to peer?, the data length whose relayed datagram is
    // exactly 1280 bytes).
    let cases = [
        (
            Binding::new(&relay, "192.0.2.2:40000", "100.64.0.2:9000", 0x4001),
            true,
            1252,
        ),
        (
            Binding::new(&relay, "192.0.2.2:40000", "100.64.0.2:9000", 0x4001),
            false,
            1248,
        ),
        (
            Binding::new(&relay, "192.0.2.2:40001", "[2001:db8:5::2]:9000", 0x4002),
            true,
            1232,
        ),
        (
            Binding::new(&relay, "192.0.2.2:40001", "[2001:db8:5::2]:9000", 0x4002),
            false,
            1248,
        ),
        (
            Binding::new(
                &relay,
                "[2001:db8:1::2]:40000",
                "[2001:db8:5::2]:9001",
                0x4003,
            ),
            false,
            1228,
        ),
    ];
    for (binding, to_peer, fits) in cases {
        for len in [fits, fits + 1] {
            let context = format!("{len} bytes, client to peer {to_peer}: {binding:?}");
            let (input, reason) = binding.input(to_peer, len);
            let wanted = binding.output(to_peer, &input, swapped(&input));
            // m0's MTU is 1280.
            if len == fits {
                assert_relayed(
                    &host,
                    &relay,
                    "m0",
                    (&input, reason),
                    XDP_TX,
                    &wanted,
                    &format!("m0, {context}"),
                );
            } else {
                assert_passed(
                    &host,
                    &relay,
                    "m0",
                    &input,
                    Reason::PassMtuExceeded,
                    &format!("m0, {context}"),
                );
            }
            // x0's and z0's is 1500; z0 does not forward.
            for iface in ["x0", "z0"] {
                assert_relayed(
                    &host,
                    &relay,
                    iface,
                    (&input, reason),
                    XDP_TX,
                    &wanted,
                    &format!("{iface}, {context}"),
                );
            }
        }
    }
    // Routes are not looked up: unreachable, unresolved or through another
    // interface, the frame goes back where it came from.
    for peer in [
        "198.18.1.2:9000",
        "[2001:db8:11::2]:9000",
        "198.18.2.2:9000",
        "198.51.100.2:9000",
    ] {
        let binding = Binding::new(&relay, "192.0.2.2:40002", peer, 0x4010);
        let input = binding.client_sends(100);
        assert_relayed(
            &host,
            &relay,
            "x0",
            (&input, binding.reason_to_peer()),
            XDP_TX,
            &binding.peer_gets(&input, swapped(&input)),
            &format!("{binding:?}"),
        );
    }
    // x0's MTU bounds what it relays.
    let binding = Binding::new(&relay, "192.0.2.2:40003", "100.64.0.2:9004", 0x4011);
    assert_passed(
        &host,
        &relay,
        "x0",
        &binding.client_sends(1473),
        Reason::PassMtuExceeded,
        "1501 bytes on x0",
    );
}
