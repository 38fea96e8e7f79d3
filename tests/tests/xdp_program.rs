//! The relay program under `BPF_PROG_TEST_RUN`: every path and every verdict,
//! each output frame compared byte for byte with one built independently by
//! `tests::packet::FrameSpec` (checksums computed from scratch).
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::SocketAddr;

use bpf_common::{KernelConfig, Reason};
use tests::packet::{FrameSpec, channel_data};
use tests::xdp::{LoadedRelay, XDP_DROP, XDP_PASS, XDP_TX};
use tests::xdp::{RELAY4, RELAY6, addr, data, relay_ip};

const LISTEN: u16 = 3478;

fn config() -> KernelConfig {
    KernelConfig::new(
        &[LISTEN],
        (49152, 65535),
        Some(RELAY4.parse().unwrap()),
        Some(RELAY6.parse().unwrap()),
    )
    .with_mac_swap(true)
}

/// The program loaded and configured; `tail_adjust` selects the header-room mode.
fn relay(tail_adjust: bool) -> LoadedRelay {
    let relay = LoadedRelay::load().unwrap();
    relay
        .configure(&config().with_tail_adjust(tail_adjust))
        .unwrap();
    relay
}

/// The frame the relay must send for `input`, MACs swapped.
fn expected(
    input: &FrameSpec,
    source: SocketAddr,
    destination: SocketAddr,
    payload: &[u8],
) -> Vec<u8> {
    input.relayed(
        (source, destination),
        payload,
        (input.src_mac, input.dst_mac),
    )
}

/// The header types are 2-byte aligned so that the compiler moves words; the
/// verifier's strict mode proves that every access the program makes is
/// aligned to its size, and the relaying still works in that mode.
#[test]
fn every_access_is_aligned_under_the_verifiers_strict_check() {
    if !tests::privileged() {
        return;
    }
    let relay = LoadedRelay::load_with_strict_alignment()
        .expect("the verifier found a misaligned access in strict mode");
    relay.configure(&config()).unwrap();
    let payload = data(97);
    for (client, peer) in [
        ("192.0.2.2:40000", "198.51.100.2:9000"),
        ("[2001:db8:1::2]:40000", "[2001:db8:2::2]:9000"),
    ] {
        let (client, peer) = (addr(client), addr(peer));
        let listener = SocketAddr::new(relay_ip(client), LISTEN);
        let relayed = SocketAddr::new(relay_ip(peer), 50000);
        relay.bind(client, 0x4001, peer, relayed.port()).unwrap();
        let input = FrameSpec::marked(client, listener, &channel_data(0x4001, &payload));
        let (verdict, out) = relay.run(&input.build()).unwrap();
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out, expected(&input, relayed, peer, &payload));
        let input = FrameSpec::marked(peer, relayed, &payload);
        let (verdict, out) = relay.run(&input.build()).unwrap();
        assert_eq!(verdict, XDP_TX);
        let message = channel_data(0x4001, &payload);
        assert_eq!(out, expected(&input, listener, client, &message));
    }
}

/// Every client/peer family pair, both directions, in both header-room modes.
#[test]
fn every_family_pair_is_relayed_both_ways_byte_for_byte() {
    if !tests::privileged() {
        return;
    }
    let pairs = [
        (
            "192.0.2.2:40000",
            "198.51.100.2:9000",
            Reason::RelayClientToPeerV4V4,
            Reason::RelayPeerToClientV4V4,
        ),
        (
            "192.0.2.2:40000",
            "[2001:db8:3::2]:9000",
            Reason::RelayClientToPeerV4V6,
            Reason::RelayPeerToClientV6V4,
        ),
        (
            "[2001:db8:1::2]:40000",
            "198.51.100.2:9001",
            Reason::RelayClientToPeerV6V4,
            Reason::RelayPeerToClientV4V6,
        ),
        (
            "[2001:db8:1::2]:40000",
            "[2001:db8:3::2]:9001",
            Reason::RelayClientToPeerV6V6,
            Reason::RelayPeerToClientV6V6,
        ),
    ];
    for tail_adjust in [false, true] {
        let relay = relay(tail_adjust);
        for (index, (client, peer, to_peer, to_client)) in pairs.into_iter().enumerate() {
            let (client, peer) = (addr(client), addr(peer));
            let channel = 0x4001 + index as u16;
            let allocation_port = 50000 + index as u16;
            relay.bind(client, channel, peer, allocation_port).unwrap();
            let listener = SocketAddr::new(relay_ip(client), LISTEN);
            let relayed = SocketAddr::new(relay_ip(peer), allocation_port);
            for len in [0, 1, 2, 3, 100, 1200] {
                let context =
                    format!("{client} <-> {peer}, {len} bytes, tail_adjust {tail_adjust}");
                let payload = data(len);

                let before = relay.counter(to_peer).unwrap();
                let input = FrameSpec::marked(client, listener, &channel_data(channel, &payload));
                let (verdict, out) = relay.run(&input.build()).unwrap();
                assert_eq!(verdict, XDP_TX, "client to peer: {context}");
                assert_eq!(
                    out,
                    expected(&input, relayed, peer, &payload),
                    "client to peer: {context}"
                );
                let after = relay.counter(to_peer).unwrap();
                assert_eq!(
                    (after.packets, after.bytes),
                    (before.packets + 1, before.bytes + len as u64)
                );

                // Padded to a multiple of four (RFC 8656 section 12.5), as some
                // clients always send: the padding stays behind the relayed
                // datagram as a trailer, outside its lengths and checksum.
                let pad = (4 - len % 4) % 4;
                if pad > 0 {
                    let pad_bytes = &[0xa5u8, 0x5a, 0xff][..pad];
                    let mut message = channel_data(channel, &payload);
                    message.extend_from_slice(pad_bytes);
                    let input = FrameSpec::marked(client, listener, &message);
                    let (verdict, out) = relay.run(&input.build()).unwrap();
                    assert_eq!(verdict, XDP_TX, "padded client to peer: {context}");
                    let mut wanted = expected(&input, relayed, peer, &payload);
                    wanted.extend_from_slice(pad_bytes);
                    assert_eq!(out, wanted, "padded client to peer: {context}");
                }

                let before = relay.counter(to_client).unwrap();
                let input = FrameSpec::marked(peer, relayed, &payload);
                let (verdict, out) = relay.run(&input.build()).unwrap();
                assert_eq!(verdict, XDP_TX, "peer to client: {context}");
                let message = channel_data(channel, &payload);
                assert_eq!(
                    out,
                    expected(&input, listener, client, &message),
                    "peer to client: {context}"
                );
                let after = relay.counter(to_client).unwrap();
                assert_eq!(
                    (after.packets, after.bytes),
                    (before.packets + 1, before.bytes + len as u64)
                );
            }
        }
    }
}

/// Two allocations of this relay: channel data from client A to A's peer,
/// which is B's relayed address, goes straight to client B on B's channel.
#[test]
fn hairpin_goes_straight_to_the_other_allocations_client() {
    if !tests::privileged() {
        return;
    }
    let cases = [
        (
            "192.0.2.2:40000",
            "192.0.2.3:40001",
            Reason::RelayHairpinV4V4,
        ),
        (
            "192.0.2.2:40000",
            "[2001:db8:1::3]:40001",
            Reason::RelayHairpinV4V6,
        ),
        (
            "[2001:db8:1::2]:40000",
            "192.0.2.3:40001",
            Reason::RelayHairpinV6V4,
        ),
        (
            "[2001:db8:1::2]:40000",
            "[2001:db8:1::3]:40001",
            Reason::RelayHairpinV6V6,
        ),
    ];
    for tail_adjust in [false, true] {
        for (a, b, reason) in cases {
            let relay = relay(tail_adjust);
            let (a, b) = (addr(a), addr(b));
            // Both allocations relay over IPv4: each one's peer is the other's
            // relayed transport address.
            let (port_a, port_b) = (50002, 50010);
            let relayed_a = SocketAddr::new(RELAY4.parse().unwrap(), port_a);
            let relayed_b = SocketAddr::new(RELAY4.parse().unwrap(), port_b);
            relay.bind(a, 0x4005, relayed_b, port_a).unwrap();
            relay.bind(b, 0x4006, relayed_a, port_b).unwrap();

            let payload = data(300);
            let input = FrameSpec::marked(
                a,
                SocketAddr::new(relay_ip(a), LISTEN),
                &channel_data(0x4005, &payload),
            );
            let (verdict, out) = relay.run(&input.build()).unwrap();
            assert_eq!(verdict, XDP_TX, "{a} -> {b}");
            let listener_b = SocketAddr::new(relay_ip(b), LISTEN);
            assert_eq!(
                out,
                expected(&input, listener_b, b, &channel_data(0x4006, &payload)),
                "{a} -> {b}"
            );
            assert_eq!(relay.counter(reason).unwrap().packets, 1, "{a} -> {b}");
        }
    }
}

/// One frame per pass or drop reason: the verdict, its counter, and for a
/// pass the frame untouched.
#[test]
fn every_verdict_reason_is_taken_and_counted() {
    if !tests::privileged() {
        return;
    }
    let client4 = addr("192.0.2.2:40000");
    let peer4 = addr("198.51.100.2:9000");
    let client6 = addr("[2001:db8:1::2]:40000");
    let peer6 = addr("[2001:db8:3::2]:9000");
    let listener4 = addr("203.0.113.10:3478");
    let listener6 = addr("[2001:db8:2::10]:3478");
    let relay = relay(false);
    relay.bind(client4, 0x4001, peer4, 50000).unwrap();
    relay.bind(client4, 0x4002, peer6, 50001).unwrap();
    relay.bind(client6, 0x4003, peer6, 50002).unwrap();
    relay
        .bind(client4, 0x4004, addr("203.0.113.10:50099"), 50003)
        .unwrap();
    let bound = |channel| FrameSpec::new(client4, listener4, &channel_data(channel, b"data"));
    let with = |spec: FrameSpec, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = spec.build();
        edit(&mut frame);
        frame
    };
    let mut zero_checksum = bound(0x4002);
    zero_checksum.udp_checksum = false;
    let mut ttl_one = bound(0x4001);
    ttl_one.ttl = 1;
    // Padding rounds "abc" up to four bytes; five more bytes are not padding.
    let mut trailing = channel_data(0x4001, b"abc");
    trailing.extend_from_slice(&[0; 6]);
    let stun_binding_request = {
        let mut message = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        message.extend_from_slice(&[7; 12]);
        message
    };
    let cases: Vec<(Reason, Vec<u8>)> = vec![
        (Reason::PassTruncated, bound(0x4001).build()[..30].to_vec()),
        (
            Reason::PassNotIp,
            with(bound(0x4001), &|f| f[12..14].copy_from_slice(&[0x08, 0x06])),
        ),
        (Reason::PassNotUdp, with(bound(0x4001), &|f| f[14 + 9] = 6)),
        (
            Reason::PassIpOptions,
            with(bound(0x4001), &|f| f[14] = 0x46),
        ),
        (
            Reason::PassFragment,
            with(bound(0x4001), &|f| f[14 + 6] = 0x20),
        ),
        (
            Reason::PassFragment,
            with(
                FrameSpec::new(client6, listener6, &channel_data(0x4003, b"x")),
                &|f| f[14 + 6] = 44,
            ),
        ),
        (
            Reason::PassIpv6ExtensionHeaders,
            with(
                FrameSpec::new(client6, listener6, &channel_data(0x4003, b"x")),
                &|f| f[14 + 6] = 0,
            ),
        ),
        (Reason::PassTtlExpired, ttl_one.build()),
        // A listener port on another of the host's addresses: the binding's
        // key holds the listener it was made on.
        (
            Reason::PassUnknownBinding,
            FrameSpec::new(
                client4,
                addr("203.0.113.11:3478"),
                &channel_data(0x4001, b"x"),
            )
            .build(),
        ),
        (
            Reason::PassNotForRelay,
            FrameSpec::new(client4, addr("203.0.113.11:50000"), b"x").build(),
        ),
        (
            Reason::PassNotForRelay,
            FrameSpec::new(
                client4,
                addr("203.0.113.10:53"),
                &channel_data(0x4001, b"x"),
            )
            .build(),
        ),
        (
            Reason::PassNotChannelData,
            FrameSpec::new(client4, listener4, &stun_binding_request).build(),
        ),
        (
            Reason::PassNotChannelData,
            FrameSpec::new(client4, listener4, &[0x40, 0x01]).build(),
        ),
        (
            Reason::PassChannelDataTrailing,
            FrameSpec::new(client4, listener4, &trailing).build(),
        ),
        (Reason::PassUnknownBinding, bound(0x4fff).build()),
        (
            Reason::PassUnknownPeer,
            FrameSpec::new(addr("198.51.100.3:9000"), addr("203.0.113.10:50000"), b"x").build(),
        ),
        (Reason::PassHairpinUnbound, bound(0x4004).build()),
        (Reason::PassZeroChecksumToIpv6, zero_checksum.build()),
        (
            Reason::PassBadHeaderChecksum,
            with(bound(0x4002), &|f| f[15] ^= 0x04),
        ),
        (
            Reason::PassZeroChecksumIpv6,
            with(
                FrameSpec::new(client6, listener6, &channel_data(0x4003, b"x")),
                &|f| f[14 + 40 + 6..14 + 40 + 8].copy_from_slice(&[0, 0]),
            ),
        ),
        (
            Reason::DropChannelDataTruncated,
            FrameSpec::new(client4, listener4, &channel_data(0x4001, b"abcd")[..6]).build(),
        ),
    ];
    for (reason, frame) in &cases {
        let before = relay.counter(*reason).unwrap().packets;
        let (verdict, out) = relay.run(frame).unwrap();
        let expected_verdict = if *reason == Reason::DropChannelDataTruncated {
            XDP_DROP
        } else {
            XDP_PASS
        };
        assert_eq!(verdict, expected_verdict, "{}", reason.name());
        assert_eq!(
            relay.counter(*reason).unwrap().packets,
            before + 1,
            "{}",
            reason.name()
        );
        if verdict == XDP_PASS {
            assert_eq!(
                &out,
                frame,
                "{} must leave the frame untouched",
                reason.name()
            );
        }
    }

    // Without an IPv6 relay address, a binding to an IPv6 peer stays in user space.
    let v4_only = relay_without_v6();
    v4_only.bind(client4, 0x4002, peer6, 50001).unwrap();
    let (verdict, _) = v4_only.run(&bound(0x4002).build()).unwrap();
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        v4_only.counter(Reason::PassNoRelayAddress).unwrap().packets,
        1
    );

    // Unconfigured: everything passes.
    let unconfigured = LoadedRelay::load().unwrap();
    unconfigured.bind(client4, 0x4001, peer4, 50000).unwrap();
    let (verdict, _) = unconfigured.run(&bound(0x4001).build()).unwrap();
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        unconfigured
            .counter(Reason::PassNotConfigured)
            .unwrap()
            .packets,
        1
    );
}

fn relay_without_v6() -> LoadedRelay {
    let relay = LoadedRelay::load().unwrap();
    relay
        .configure(
            &KernelConfig::new(
                &[LISTEN],
                (49152, 65535),
                Some(RELAY4.parse().unwrap()),
                None,
            )
            .with_mac_swap(true),
        )
        .unwrap();
    relay
}
