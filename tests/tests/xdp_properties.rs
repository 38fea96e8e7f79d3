//! Properties of the relay program under `BPF_PROG_TEST_RUN`: random and
//! mutated frames (truncated, wrong lengths, options, fragments, odd channel
//! numbers, random bytes) are never sent with `XDP_TX` unless they carry the
//! key of an installed binding that has not expired (an expired one is
//! installed too, and counts as absent), and checksums stay exactly as valid
//! as they came: the incremental updates (RFC 1624) neither repair nor break
//! them.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use bpf_common::KernelConfig;
use proptest::prelude::*;
use tests::packet::{FrameSpec, channel_data, parse_udp_v4, parse_udp_v6};
use tests::xdp::{LoadedRelay, XDP_DROP, XDP_PASS, XDP_TX};

/// A binding: (client, channel, peer, allocation port).
type Binding = (&'static str, u16, &'static str, u16);

/// Bindings installed until long after the test.
const BINDINGS: [Binding; 4] = [
    ("192.0.2.2:40000", 0x4001, "198.51.100.2:9000", 50000),
    ("192.0.2.2:40000", 0x4002, "[2001:db8:3::2]:9000", 50000),
    ("[2001:db8:1::2]:40000", 0x4003, "198.51.100.2:9001", 50001),
    (
        "[2001:db8:1::2]:40000",
        0x4004,
        "[2001:db8:3::2]:9001",
        50001,
    ),
];

/// Bindings installed with an expiry a second before the test started: as
/// good as absent.
const EXPIRED: [Binding; 2] = [
    ("192.0.2.9:40000", 0x4005, "198.51.100.9:9000", 50002),
    (
        "[2001:db8:1::9]:40000",
        0x4006,
        "[2001:db8:3::9]:9000",
        50003,
    ),
];

fn relay() -> &'static LoadedRelay {
    static RELAY: OnceLock<LoadedRelay> = OnceLock::new();
    RELAY.get_or_init(|| {
        let relay = LoadedRelay::load().unwrap();
        relay
            .configure(
                &KernelConfig::new(
                    &[3478],
                    (49152, 65535),
                    Some("203.0.113.10".parse().unwrap()),
                    Some("2001:db8:2::10".parse().unwrap()),
                )
                .with_mac_swap(true),
            )
            .unwrap();
        for (client, channel, peer, port) in BINDINGS {
            relay
                .bind(
                    client.parse().unwrap(),
                    channel,
                    peer.parse().unwrap(),
                    port,
                )
                .unwrap();
        }
        let past = tests::kernel_clock_ns().saturating_sub(1_000_000_000);
        for (client, channel, peer, port) in EXPIRED {
            relay
                .bind_until(
                    client.parse().unwrap(),
                    channel,
                    peer.parse().unwrap(),
                    port,
                    past,
                )
                .unwrap();
        }
        relay
    })
}

fn relay_ip(v4: bool) -> IpAddr {
    if v4 {
        "203.0.113.10".parse().unwrap()
    } else {
        "2001:db8:2::10".parse().unwrap()
    }
}

/// Valid frames of every path of `bindings`, to mutate.
fn frames_of(bindings: &[Binding]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for &(client, channel, peer, port) in bindings {
        let (client, peer): (SocketAddr, SocketAddr) =
            (client.parse().unwrap(), peer.parse().unwrap());
        let listener = SocketAddr::new(relay_ip(client.is_ipv4()), 3478);
        let relayed = SocketAddr::new(relay_ip(peer.is_ipv4()), port);
        frames.push(FrameSpec::new(client, listener, &channel_data(channel, b"payload!")).build());
        frames.push(FrameSpec::new(peer, relayed, b"payload!").build());
    }
    frames
}

/// Valid frames of every path, of live and of expired bindings, to mutate.
fn seed_frames() -> Vec<Vec<u8>> {
    [frames_of(&BINDINGS), frames_of(&EXPIRED)].concat()
}

/// Whether `frame`'s headers, read leniently, name an installed binding
/// that has not expired: (client, channel) towards the listen port or
/// (peer, allocation port).
fn names_a_binding(frame: &[u8]) -> bool {
    let (source, dest_port, udp_payload) = match frame.get(12..14) {
        Some([0x08, 0x00]) if frame.len() >= 42 => {
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let Some(udp) = frame.get(14 + ihl..) else {
                return false;
            };
            if udp.len() < 8 {
                return false;
            }
            let ip = IpAddr::from(<[u8; 4]>::try_from(&frame[26..30]).unwrap());
            (
                SocketAddr::new(ip, u16::from_be_bytes([udp[0], udp[1]])),
                u16::from_be_bytes([udp[2], udp[3]]),
                &udp[8..],
            )
        }
        Some([0x86, 0xdd]) if frame.len() >= 62 => {
            let ip = IpAddr::from(<[u8; 16]>::try_from(&frame[22..38]).unwrap());
            let udp = &frame[54..];
            (
                SocketAddr::new(ip, u16::from_be_bytes([udp[0], udp[1]])),
                u16::from_be_bytes([udp[2], udp[3]]),
                &udp[8..],
            )
        }
        _ => return false,
    };
    BINDINGS.iter().any(|(client, channel, peer, port)| {
        let (client, peer): (SocketAddr, SocketAddr) =
            (client.parse().unwrap(), peer.parse().unwrap());
        (dest_port == 3478
            && source == client
            && udp_payload.get(..2) == Some(&channel.to_be_bytes()[..]))
            || (dest_port == *port && source == peer)
    })
}

/// `Some(true)` for a UDP frame with valid checksums, `Some(false)` for one
/// with a bad checksum or length, `None` for anything else.
fn checksums_valid(frame: &[u8]) -> Option<bool> {
    let parsed = match frame.get(12..14) {
        Some([0x08, 0x00]) => parse_udp_v4(frame).map(|f| f.is_some()),
        Some([0x86, 0xdd]) => parse_udp_v6(frame).map(|f| f.is_some()),
        _ => return None,
    };
    match parsed {
        Ok(true) => Some(true),
        Ok(false) => None,
        Err(_) => Some(false),
    }
}

fn check(frame: &[u8]) -> Result<(), TestCaseError> {
    let (verdict, out) = relay()
        .run(frame)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(
        [XDP_TX, XDP_PASS, XDP_DROP].contains(&verdict),
        "verdict {verdict}"
    );
    if verdict == XDP_TX {
        prop_assert!(
            names_a_binding(frame),
            "relayed a frame that names no binding"
        );
        let (before, after) = (checksums_valid(frame), checksums_valid(&out));
        prop_assert!(after.is_some(), "relayed something that is not a UDP frame");
        prop_assert_eq!(before, after, "checksum validity changed");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_never_relayed(frame in proptest::collection::vec(any::<u8>(), 14..200)) {
        if !tests::privileged() { return Ok(()); }
        check(&frame)?;
    }

    #[test]
    fn mutated_frames_are_relayed_only_for_bindings_and_with_valid_checksums(
        seed in 0usize..2 * (BINDINGS.len() + EXPIRED.len()),
        flips in proptest::collection::vec((0usize..200, any::<u8>()), 0..4),
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        cut in proptest::option::of(14usize..200),
        extra in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        if !tests::privileged() { return Ok(()); }
        let mut frame = seed_frames()[seed].clone();
        for (index, value) in flips {
            if let Some(byte) = frame.get_mut(index) {
                *byte = value;
            }
        }
        if let Some(cut) = cut {
            frame.truncate(cut);
        }
        frame.extend_from_slice(&extra);
        check(&frame)?;
    }
}

/// The model's two sides, unmutated: a live binding's frames are relayed, an
/// expired one's are passed as they came.
#[test]
fn seed_frames_are_relayed_exactly_for_live_bindings() {
    if !tests::privileged() {
        return;
    }
    for (frames, live) in [(frames_of(&BINDINGS), true), (frames_of(&EXPIRED), false)] {
        for frame in frames {
            assert_eq!(names_a_binding(&frame), live);
            let (verdict, out) = relay().run(&frame).unwrap();
            if live {
                assert_eq!(verdict, XDP_TX);
            } else {
                assert_eq!((verdict, out), (XDP_PASS, frame));
            }
        }
    }
}
