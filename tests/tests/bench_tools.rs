//! The bench's tools work: a very short run of the live-frames generator and
//! the XDP sink through the floor programs (MAC swap, FIB) and through the
//! relay program (loaded on its own with one binding, in both next-hop modes)
//! delivers frames and the sink counts them, with no frame failing its checks,
//! and the next hop is `rx`'s MAC address; the raw TURN client of the control-plane figures
//! binds channels on a real turn-control. No figure is asserted.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bpf_common::KernelConfig;
use tests::bench::{
    BenchNet, CLIENT, Direction, Handling, PEER, RELAY, case_frames, floor_key, raw,
};
use tests::xdp::{LoadedRelay, Reference};

/// Root is needed for namespaces and XDP; under CI it must be there.
fn privileged() -> bool {
    let ok = tests::privileged();
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true but the bench tools cannot run (not root)"
        );
        eprintln!("SKIPPED: the bench tools need root");
    }
    ok
}

const PORT: u16 = 50000;
const CHANNEL: u16 = 0x4000;

/// Runs both directions for a moment; (generated, counted, bad) per direction.
fn exercise(net: &BenchNet, handling: Handling) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
        let (frame, rule) = case_frames(net, direction, 100, CHANNEL, PORT, handling);
        net.set_rules(&[rule]).unwrap();
        let before = net.counts().unwrap()[0];
        let offered = net
            .generate(&frame, Duration::from_millis(100), None)
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let after = net.counts().unwrap()[0];
        out.push((
            offered.frames,
            after.packets - before.packets,
            after.bad - before.bad,
        ));
    }
    out
}

#[test]
fn generator_and_sink_through_the_floor_program() {
    if !privileged() {
        return;
    }
    let mut net = BenchNet::new().unwrap();
    let keys = [Direction::ClientToPeer, Direction::PeerToClient].map(|direction| {
        floor_key(&case_frames(&net, direction, 100, CHANNEL, PORT, Handling::Mirror).0).unwrap()
    });
    let floor = Reference::floor(&keys).unwrap();
    net.attach_relay(&floor.program().unwrap()).unwrap();
    for (generated, counted, bad) in exercise(&net, Handling::Mirror) {
        assert!(generated > 0);
        assert!(counted > 0, "the sink counted nothing of {generated}");
        assert!(counted <= generated, "{counted} counted of {generated}");
        assert_eq!(bad, 0, "frames failed the sink's checks");
    }
}

/// The FIB floor forwards the frames addressed past the relay to the gateway
/// the relay namespace's routes and static neighbour give: `rx`.
#[test]
fn generator_and_sink_through_the_floor_fib_program() {
    if !privileged() {
        return;
    }
    let mut net = BenchNet::new().unwrap();
    let frames = [Direction::ClientToPeer, Direction::PeerToClient]
        .map(|direction| case_frames(&net, direction, 100, CHANNEL, PORT, Handling::Forward).0);
    let keys = frames.each_ref().map(|frame| floor_key(frame).unwrap());
    let floor = Reference::floor_fib(&keys).unwrap();
    net.attach_relay(&floor.program().unwrap()).unwrap();
    let id = net.relay_prog_id().unwrap();
    for frame in &frames {
        net.check_next_hop(id, frame).unwrap();
    }
    for (generated, counted, bad) in exercise(&net, Handling::Forward) {
        assert!(generated > 0);
        assert!(counted > 0, "the sink counted nothing of {generated}");
        assert!(counted <= generated, "{counted} counted of {generated}");
        assert_eq!(bad, 0, "frames failed the sink's checks");
    }
}

#[test]
fn generator_and_sink_through_the_relay_program() {
    if !privileged() {
        return;
    }
    for mac_swap in [false, true] {
        through_the_relay_program(mac_swap);
    }
}

fn through_the_relay_program(mac_swap: bool) {
    let mut net = BenchNet::new().unwrap();
    let relay = LoadedRelay::load().unwrap();
    relay
        .configure(
            &KernelConfig::new(&[RELAY.port()], (49152, 65535), Some(*RELAY.ip()), None)
                .with_mac_swap(mac_swap),
        )
        .unwrap();
    relay
        .bind(SocketAddr::V4(CLIENT), CHANNEL, SocketAddr::V4(PEER), PORT)
        .unwrap();
    net.attach_relay(relay.program()).unwrap();
    let id = net.relay_prog_id().unwrap();
    for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
        let (frame, _) = case_frames(&net, direction, 100, CHANNEL, PORT, Handling::Relay);
        net.check_next_hop(id, &frame)
            .unwrap_or_else(|e| panic!("mac_swap {mac_swap}, {}: {e:#}", direction.label()));
    }
    for (generated, counted, bad) in exercise(&net, Handling::Relay) {
        assert!(generated > 0);
        assert!(counted > 0, "the sink counted nothing of {generated}");
        assert!(counted <= generated, "{counted} counted of {generated}");
        assert_eq!(bad, 0, "relayed frames failed the sink's checks");
    }
}

/// A UDP port free on 127.0.0.1 right now.
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the daemon when the test ends, also on a panic.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pipelined raw client allocates and binds every channel it asks for on turn-control
/// (user space, loopback; the peer is public, so policy allows it, and nothing is sent to it).
/// Needs no root.
#[test]
fn raw_client_binds_channels_on_turn_control() {
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let base = free_port().min(65535 - 32);
    let _daemon = Killed(
        Command::new(tests::workspace_binary("turn-control").unwrap())
            .args(["--listen", &listen.to_string()])
            .args(["--metrics", &format!("127.0.0.1:{}", free_port())])
            .args(["--relay-ip", "127.0.0.1"])
            .args(["--ports", &format!("{base}-{}", base + 32)])
            .args(["--realm", "lab.example", "--user", "test:testpass"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let mut allocs = loop {
        match raw::allocate(None, Ipv4Addr::LOCALHOST, listen, 3) {
            Ok(allocs) => break allocs,
            Err(error) => {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "no allocation: {error:#}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let figures = raw::bind_channels(
        &mut allocs,
        Ipv4Addr::new(8, 8, 8, 8),
        10000,
        40,
        8,
        Duration::from_millis(250),
        Duration::from_secs(30),
    )
    .unwrap();
    eprintln!("{figures:?}: {:.0}/s", figures.per_second());
    assert_eq!(
        (figures.bound, figures.errors, figures.unanswered),
        (120, 0, 0),
        "{figures:?}"
    );
}
