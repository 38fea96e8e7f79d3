//! The bench's tools work: a very short run of the live-frames generator and
//! the XDP sink through the floor program and through the relay program
//! (loaded on its own with one binding) delivers frames and the sink counts
//! them, with no frame failing its checks. No figure is asserted.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::SocketAddr;
use std::time::Duration;

use bpf_common::DataPlaneConfig;
use lab::bench::{BenchNet, CLIENT, Direction, PEER, RELAY, case_frames, floor_key};
use lab::xdp::{LoadedRelay, Reference};

/// Root is needed for namespaces and XDP; under CI it must be there.
fn privileged() -> bool {
    let ok = lab::privileged();
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
fn exercise(net: &BenchNet, mirror: bool) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
        let (frame, rule) = case_frames(net, direction, 100, CHANNEL, PORT, mirror);
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
        floor_key(&case_frames(&net, direction, 100, CHANNEL, PORT, true).0).unwrap()
    });
    let floor = Reference::floor(&keys).unwrap();
    net.attach_relay(&floor.program().unwrap()).unwrap();
    for (generated, counted, bad) in exercise(&net, true) {
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
    let mut net = BenchNet::new().unwrap();
    let relay = LoadedRelay::load().unwrap();
    relay
        .configure(&DataPlaneConfig::new(
            RELAY.port(),
            (49152, 65535),
            Some(*RELAY.ip()),
            None,
        ))
        .unwrap();
    relay
        .bind(SocketAddr::V4(CLIENT), CHANNEL, SocketAddr::V4(PEER), PORT)
        .unwrap();
    net.attach_relay(relay.program()).unwrap();
    for (generated, counted, bad) in exercise(&net, false) {
        assert!(generated > 0);
        assert!(counted > 0, "the sink counted nothing of {generated}");
        assert!(counted <= generated, "{counted} counted of {generated}");
        assert_eq!(bad, 0, "relayed frames failed the sink's checks");
    }
}
