//! A binding's expiry under `BPF_PROG_TEST_RUN`, in a namespace whose FIB
//! gives the relay its next hop (the default mode): an entry whose
//! `expires_at_ns` the kernel's coarse monotonic clock has reached is absent
//! for the program, on the client side (channel data to a peer), the peer
//! side (a peer's datagram) and the hairpin lookup (channel data to another
//! allocation of this relay); the frame goes to the stack untouched and
//! counts as `pass_expired` alone. Entries that have not expired are relayed
//! as before, and one that expires while traffic flows stops being relayed
//! once the clock passes its expiry, until a refresh installs a later one.
//!
//! ```text
//!  x0 203.0.113.10/24 2001:db8:2::10/64   forwarding; the relay addresses
//!     gateway .1 / ::1 (static), default routes via it
//! ```
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bpf_common::{KernelConfig, Reason};
use tests::kernel_clock_ns;
use tests::packet::{FrameSpec, channel_data};
use tests::xdp::{LoadedRelay, XDP_PASS, XDP_TX};
use tests::xdp::{RELAY4, RELAY6, addr, data, relay_ip};

const LISTEN: u16 = 3478;
const GATEWAY_MAC: [u8; 6] = [0x02, 0x5e, 0, 0, 0x01, 0x01];

const MILLISECOND: u64 = 1_000_000;
const SECOND: u64 = 1_000 * MILLISECOND;
/// A tick of the coarse clock at the lowest `HZ` (100): the margin past an
/// expiry after which the program's reading has passed it too.
const TICK: u64 = 10 * MILLISECOND;
/// The lifetime of a binding that expires while the test runs: long enough that a loaded
/// machine runs the frames meant for before the expiry in time (the test checks that it
/// did), short enough not to make the test wait long.
const SHORT_LIFETIME: u64 = 1_500 * MILLISECOND;

/// The client and peer of each family pair.
const FAMILIES: [(&str, &str); 4] = [
    ("192.0.2.2:40000", "198.51.100.2:9000"),
    ("192.0.2.2:40000", "[2001:db8:3::2]:9000"),
    ("[2001:db8:1::2]:40000", "198.51.100.2:9001"),
    ("[2001:db8:1::2]:40000", "[2001:db8:3::2]:9001"),
];

/// The relay's namespace and the program, configured for it.
struct Relay {
    netns: tests::Netns,
    program: LoadedRelay,
    /// x0's MAC address: the source of every relayed frame.
    mac: [u8; 6],
}

impl Relay {
    fn new() -> Self {
        let netns = tests::Netns::create(tests::unique_name("expiry")).unwrap();
        netns
            .ip(["link", "add", "x0", "type", "veth", "peer", "name", "x1"])
            .unwrap();
        for end in ["x0", "x1"] {
            netns.ip(["link", "set", end, "up"]).unwrap();
        }
        netns
            .ip(["addr", "add", "203.0.113.10/24", "dev", "x0"])
            .unwrap();
        netns
            .ip(["addr", "add", "2001:db8:2::10/64", "dev", "x0", "nodad"])
            .unwrap();
        tests::enable_forwarding(&netns, "x0").unwrap();
        for gateway in ["203.0.113.1", "2001:db8:2::1"] {
            netns
                .add_static_neighbour(gateway.parse().unwrap(), GATEWAY_MAC, "x0")
                .unwrap();
        }
        netns
            .ip(["route", "add", "default", "via", "203.0.113.1"])
            .unwrap();
        netns
            .ip(["-6", "route", "add", "default", "via", "2001:db8:2::1"])
            .unwrap();
        let program = LoadedRelay::load().unwrap();
        program
            .configure(&KernelConfig::new(
                &[LISTEN],
                (49152, 65535),
                Some(RELAY4.parse().unwrap()),
                Some(RELAY6.parse().unwrap()),
            ))
            .unwrap();
        let mac = netns.mac("x0").unwrap();
        Self {
            netns,
            program,
            mac,
        }
    }

    /// Every reason's packet count.
    fn counts(&self) -> Vec<u64> {
        Reason::ALL
            .iter()
            .map(|reason| self.program.counter(*reason).unwrap().packets)
            .collect()
    }

    /// Runs `frame` in on x0, checking that `reason`'s counter, and no other,
    /// went up by one; the verdict and the frame after.
    fn run(&self, frame: &[u8], reason: Reason, context: &str) -> (u32, Vec<u8>) {
        let before = self.counts();
        let result = self
            .netns
            .enter(|| {
                self.program
                    .run_on(nix::net::if_::if_nametoindex("x0")?, frame)
            })
            .unwrap();
        let after = self.counts();
        for (index, counted) in Reason::ALL.iter().enumerate() {
            assert_eq!(
                after[index],
                before[index] + u64::from(*counted == reason),
                "{context}: counter {} (expected the frame counted as {}, verdict {})",
                counted.name(),
                reason.name(),
                result.0
            );
        }
        result
    }

    /// `case`'s frame is relayed as it should be.
    fn assert_relayed(&self, case: &Case, context: &str) {
        let frame = case.input.build();
        let (verdict, out) = self.run(&frame, case.reason, context);
        assert_eq!(verdict, XDP_TX, "{context}: verdict");
        let (source, destination, payload) = &case.output;
        let wanted = case
            .input
            .relayed((*source, *destination), payload, (GATEWAY_MAC, self.mac));
        assert_eq!(out, wanted, "{context}: the relayed frame");
    }

    /// `case`'s frame goes to the stack untouched, counted as `pass_expired`.
    fn assert_expired(&self, case: &Case, context: &str) {
        let frame = case.input.build();
        let (verdict, out) = self.run(&frame, Reason::PassExpired, context);
        assert_eq!(verdict, XDP_PASS, "{context}: verdict");
        assert_eq!(
            out, frame,
            "{context}: an expired binding's frame must stay as it came"
        );
    }
}

/// A frame of one path and what the relay makes of it while its binding lasts.
struct Case {
    name: String,
    input: FrameSpec,
    reason: Reason,
    /// Source, destination and UDP payload of the relayed frame.
    output: (SocketAddr, SocketAddr, Vec<u8>),
}

/// One channel binding, as the tests install it.
#[derive(Clone, Copy, Debug)]
struct Binding {
    client: SocketAddr,
    channel: u16,
    peer: SocketAddr,
    port: u16,
}

impl Binding {
    fn install(&self, relay: &Relay, expires_at_ns: u64) {
        relay
            .program
            .bind_until(
                self.client,
                self.channel,
                self.peer,
                self.port,
                expires_at_ns,
            )
            .unwrap();
    }

    fn listener(&self) -> SocketAddr {
        SocketAddr::new(relay_ip(self.client), LISTEN)
    }

    fn relayed(&self) -> SocketAddr {
        SocketAddr::new(relay_ip(self.peer), self.port)
    }

    /// Channel data from the client, relayed to the peer.
    fn towards_peer(&self) -> Case {
        let payload = data(100);
        let reason = match (self.client.is_ipv4(), self.peer.is_ipv4()) {
            (true, true) => Reason::RelayClientToPeerV4V4,
            (true, false) => Reason::RelayClientToPeerV4V6,
            (false, true) => Reason::RelayClientToPeerV6V4,
            (false, false) => Reason::RelayClientToPeerV6V6,
        };
        Case {
            name: format!("client {} to peer {}", self.client, self.peer),
            input: FrameSpec::marked(
                self.client,
                self.listener(),
                &channel_data(self.channel, &payload),
            ),
            reason,
            output: (self.relayed(), self.peer, payload),
        }
    }

    /// A datagram from the peer, relayed to the client as channel data.
    fn towards_client(&self) -> Case {
        let payload = data(100);
        let reason = match (self.peer.is_ipv4(), self.client.is_ipv4()) {
            (true, true) => Reason::RelayPeerToClientV4V4,
            (true, false) => Reason::RelayPeerToClientV4V6,
            (false, true) => Reason::RelayPeerToClientV6V4,
            (false, false) => Reason::RelayPeerToClientV6V6,
        };
        Case {
            name: format!("peer {} to client {}", self.peer, self.client),
            input: FrameSpec::marked(self.peer, self.relayed(), &payload),
            reason,
            output: (
                self.listener(),
                self.client,
                channel_data(self.channel, &payload),
            ),
        }
    }
}

/// The bindings of every family pair, channels from `first_channel` on.
fn direct(first_channel: u16) -> Vec<Binding> {
    FAMILIES
        .iter()
        .zip(first_channel..)
        .map(|((client, peer), channel)| Binding {
            client: addr(client),
            channel,
            peer: addr(peer),
            port: 50000 + (channel & 0xff),
        })
        .collect()
}

/// Two allocations of this relay whose clients have channels to each
/// other's relayed address, in `family`'s family ("v4" or "v6"): `a`'s
/// channel data reaches `b`'s client through the hairpin lookup of `b`'s
/// peer-side entry. Ports from `port` on.
struct Hairpin {
    a: Binding,
    b: Binding,
}

impl Hairpin {
    fn new(v4: bool, port: u16) -> Self {
        let (client_a, client_b) = if v4 {
            (addr("192.0.2.2:41000"), addr("192.0.2.3:41000"))
        } else {
            (addr("[2001:db8:1::2]:41000"), addr("[2001:db8:1::3]:41000"))
        };
        let relayed = |port| SocketAddr::new(relay_ip(client_a), port);
        Self {
            a: Binding {
                client: client_a,
                channel: 0x4100 + (port & 0xff),
                peer: relayed(port + 1),
                port,
            },
            b: Binding {
                client: client_b,
                channel: 0x4101 + (port & 0xff),
                peer: relayed(port),
                port: port + 1,
            },
        }
    }

    /// `a`'s channel data to `b`'s relayed address, delivered to `b`'s client.
    fn case(&self) -> Case {
        let payload = data(100);
        Case {
            name: format!("hairpin {} to {}", self.a.client, self.b.client),
            input: FrameSpec::marked(
                self.a.client,
                self.a.listener(),
                &channel_data(self.a.channel, &payload),
            ),
            reason: if self.a.client.is_ipv4() {
                Reason::RelayHairpinV4V4
            } else {
                Reason::RelayHairpinV6V6
            },
            output: (
                self.b.listener(),
                self.b.client,
                channel_data(self.b.channel, &payload),
            ),
        }
    }
}

/// An expiry `offset` from the kernel's coarse clock now, either way.
fn from_now(offset: i64) -> u64 {
    kernel_clock_ns().saturating_add_signed(offset)
}

/// Waits until the kernel's coarse clock has passed `expires_at_ns` by a
/// tick, polling it.
fn wait_past(expires_at_ns: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while kernel_clock_ns() < expires_at_ns + TICK {
        assert!(
            Instant::now() < deadline,
            "the kernel's coarse clock did not reach {expires_at_ns} in 10 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An entry whose expiry lies a second in the past is absent: channel data
/// to a peer, a peer's datagram and a hairpin (whichever allocation's
/// binding expired) all go to the stack untouched as `pass_expired`, and no
/// relay counter moves.
#[test]
fn an_expired_binding_is_absent_on_every_path() {
    if !tests::privileged() {
        return;
    }
    let relay = Relay::new();
    let past = from_now(-(SECOND as i64));
    for binding in direct(0x4001) {
        binding.install(&relay, past);
        for case in [binding.towards_peer(), binding.towards_client()] {
            relay.assert_expired(&case, &case.name);
        }
    }
    for v4 in [true, false] {
        // The other allocation's entry (the hairpin lookup) has expired.
        let pair = Hairpin::new(v4, if v4 { 50100 } else { 50200 });
        pair.a.install(&relay, from_now(60 * SECOND as i64));
        pair.b.install(&relay, past);
        let case = pair.case();
        relay.assert_expired(&case, &format!("{}, the receiving side expired", case.name));
        // The sender's own entry has expired, the other's is live.
        pair.a.install(&relay, past);
        pair.b.install(&relay, from_now(60 * SECOND as i64));
        relay.assert_expired(&case, &format!("{}, the sending side expired", case.name));
    }
}

/// An entry whose expiry lies a minute ahead is relayed as before, on every
/// path.
#[test]
fn a_binding_that_has_not_expired_is_relayed() {
    if !tests::privileged() {
        return;
    }
    let relay = Relay::new();
    let future = from_now(60 * SECOND as i64);
    let mut cases = Vec::new();
    for binding in direct(0x4001) {
        binding.install(&relay, future);
        cases.extend([binding.towards_peer(), binding.towards_client()]);
    }
    for v4 in [true, false] {
        let pair = Hairpin::new(v4, if v4 { 50100 } else { 50200 });
        pair.a.install(&relay, future);
        pair.b.install(&relay, future);
        cases.push(pair.case());
    }
    for case in &cases {
        relay.assert_relayed(case, &case.name);
    }
}

/// Bindings that expire while the test runs: relayed until the kernel's
/// clock passes their expiry, passed as `pass_expired` after it, and relayed
/// again once a refresh installs a later expiry, as turn-control's refresh
/// reaches the kernel.
#[test]
fn a_binding_stops_being_relayed_when_it_expires_until_it_is_refreshed() {
    if !tests::privileged() {
        return;
    }
    let relay = Relay::new();
    let binding = direct(0x4001)[0];
    let pair = Hairpin::new(true, 50100);
    let install = |expires_at_ns| {
        for each in [binding, pair.a, pair.b] {
            each.install(&relay, expires_at_ns);
        }
    };
    let cases = [
        binding.towards_peer(),
        binding.towards_client(),
        pair.case(),
    ];

    let expires_at_ns = from_now(SHORT_LIFETIME as i64);
    install(expires_at_ns);
    for case in &cases {
        relay.assert_relayed(case, &format!("{}, before its expiry", case.name));
    }
    assert!(
        kernel_clock_ns() < expires_at_ns,
        "the relayed frames must have run before the expiry: the machine stalled for {} ms",
        SHORT_LIFETIME / MILLISECOND
    );

    wait_past(expires_at_ns);
    for case in &cases {
        relay.assert_expired(case, &format!("{}, after its expiry", case.name));
    }

    install(from_now(60 * SECOND as i64));
    for case in &cases {
        relay.assert_relayed(case, &format!("{}, refreshed", case.name));
    }
}
