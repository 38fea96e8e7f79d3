//! DONT-FRAGMENT in the kernel path (RFC 8656 section 7.2) under
//! `BPF_PROG_TEST_RUN`: the channel data of an allocation that asked for it
//! leaves for an IPv4 peer with DF set, from an IPv4 or an IPv6 client, with
//! a header checksum that is right when recomputed from scratch and the
//! payload byte for byte. Without the flag the relay behaves as before (an
//! IPv4 client's DF bit is kept, a datagram from an IPv6 client gets DF), and
//! the flag changes nothing for an IPv6 peer, in the peer-to-client
//! direction, or on the hairpin between two allocations of this relay.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::SocketAddr;

use bpf_common::{BindingFields, KernelConfig, Reason};
use tests::packet::{FrameSpec, channel_data, parse_udp_v4};
use tests::xdp::{LoadedRelay, NEVER, XDP_TX};
use tests::xdp::{RELAY4, RELAY6, addr, data, relay_ip};

const LISTEN: u16 = 3478;
/// Where an IPv4 header's flags and fragment offset lie in a frame.
const FRAG_OFF: usize = 14 + 6;

fn listener(client: SocketAddr) -> SocketAddr {
    SocketAddr::new(relay_ip(client), LISTEN)
}

/// The program loaded and configured (MAC swap: no FIB needed);
/// `tail_adjust` selects the header-room mode.
fn relay(tail_adjust: bool) -> LoadedRelay {
    let relay = LoadedRelay::load().unwrap();
    let config = KernelConfig::new(
        &[LISTEN],
        (49152, 65535),
        Some(RELAY4.parse().unwrap()),
        Some(RELAY6.parse().unwrap()),
    )
    .with_mac_swap(true)
    .with_tail_adjust(tail_adjust);
    relay.configure(&config).unwrap();
    relay
}

/// Installs the binding of `client`'s `channel` to `peer` through
/// `allocation_port`, of an allocation with or without DONT-FRAGMENT.
fn bind(
    relay: &LoadedRelay,
    client: SocketAddr,
    channel: u16,
    peer: SocketAddr,
    allocation_port: u16,
    dont_fragment: bool,
) {
    relay
        .install(&BindingFields {
            client,
            listener: listener(client),
            channel,
            peer,
            allocation_port,
            dont_fragment,
            usage_slot: 0,
            meters: [0; 2],
            expires_at_ns: NEVER,
        })
        .unwrap();
}

/// The frame the relay must send to an IPv4 peer for `input` of a flagged
/// allocation, built from scratch: as [`FrameSpec::relayed`] derives it
/// (MACs swapped, TTL less one, ...), DF set whatever the client sent.
fn expected_with_df(
    input: &FrameSpec,
    (source, destination): (SocketAddr, SocketAddr),
    payload: &[u8],
) -> Vec<u8> {
    let with_df = FrameSpec {
        ipv4_df: true,
        ..input.clone()
    };
    with_df.relayed(
        (source, destination),
        payload,
        (input.src_mac, input.dst_mac),
    )
}

/// Checks an IPv4 frame the relay sent on its own terms: DF as `df` and no
/// fragment bits, a header checksum (and UDP checksum) right when summed
/// again, and `payload` as its UDP payload.
fn assert_ipv4(out: &[u8], df: bool, payload: &[u8], context: &str) {
    let flags = u16::from_be_bytes([out[FRAG_OFF], out[FRAG_OFF + 1]]);
    assert_eq!(
        flags,
        if df { 0x4000 } else { 0 },
        "flags and offset: {context}"
    );
    let parsed = parse_udp_v4(out)
        .unwrap_or_else(|error| panic!("{error}: {context}"))
        .unwrap_or_else(|| panic!("not IPv4 UDP: {context}"));
    assert_eq!(parsed.payload, payload, "payload: {context}");
}

/// With the flag, channel data from an IPv4 or an IPv6 client leaves for an
/// IPv4 peer with DF set, whatever the client's DF bit, in both header-room
/// modes, and the binding's counters are the usual ones.
#[test]
fn dont_fragment_sets_df_towards_an_ipv4_peer_from_either_family() {
    if !tests::privileged() {
        return;
    }
    let cases = [
        ("192.0.2.2:40000", Reason::RelayClientToPeerV4V4),
        ("[2001:db8:1::2]:40000", Reason::RelayClientToPeerV6V4),
    ];
    for tail_adjust in [false, true] {
        let relay = relay(tail_adjust);
        for (index, (client, reason)) in cases.into_iter().enumerate() {
            let client = addr(client);
            let peer = addr("198.51.100.2:9000");
            let channel = 0x4001 + index as u16;
            let relayed = SocketAddr::new(relay_ip(peer), 50000 + index as u16);
            bind(&relay, client, channel, peer, relayed.port(), true);
            for (client_df, checksum) in [(false, true), (true, true), (false, false)] {
                for len in [0, 1, 3, 100, 1200] {
                    let context = format!(
                        "{client} -> {peer}, {len} bytes, client DF {client_df}, \
                         UDP checksum {checksum}, tail_adjust {tail_adjust}"
                    );
                    let payload = data(len);
                    let mut input = FrameSpec::marked(
                        client,
                        listener(client),
                        &channel_data(channel, &payload),
                    );
                    input.ipv4_df = client_df;
                    input.udp_checksum = checksum || client.is_ipv6();
                    let before = relay.counter(reason).unwrap();
                    let (verdict, out) = relay.run(&input.build()).unwrap();
                    assert_eq!(verdict, XDP_TX, "{context}");
                    assert_ipv4(&out, true, &payload, &context);
                    assert_eq!(
                        out,
                        expected_with_df(&input, (relayed, peer), &payload),
                        "{context}"
                    );
                    let after = relay.counter(reason).unwrap();
                    assert_eq!(
                        (after.packets, after.bytes),
                        (before.packets + 1, before.bytes + len as u64),
                        "{context}"
                    );
                }
            }
        }
    }
}

/// The header checksum stays right for every value it can take: the IPv4
/// identification, which the relay keeps, runs through all 65 536 values,
/// and with it the checksum the incremental update starts from.
#[test]
fn the_header_checksum_is_right_for_every_identification() {
    if !tests::privileged() {
        return;
    }
    let relay = relay(false);
    let (client, peer) = (addr("192.0.2.2:40000"), addr("198.51.100.2:9000"));
    let relayed = SocketAddr::new(relay_ip(peer), 50000);
    bind(&relay, client, 0x4001, peer, relayed.port(), true);
    let payload = data(20);
    let mut input = FrameSpec::marked(client, listener(client), &channel_data(0x4001, &payload));
    input.ipv4_df = false;
    for id in 0..=u16::MAX {
        input.ipv4_id = id;
        let (verdict, out) = relay.run(&input.build()).unwrap();
        assert_eq!(verdict, XDP_TX, "id {id:#06x}");
        let wanted = expected_with_df(&input, (relayed, peer), &payload);
        if out != wanted {
            assert_ipv4(&out, true, &payload, &format!("id {id:#06x}"));
            panic!("id {id:#06x}: {out:02x?} instead of {wanted:02x?}");
        }
    }
}

/// Without the flag the relay does as it did: an IPv4 client's DF bit goes
/// through as it came, a datagram from an IPv6 client gets DF (the relay
/// builds its header fresh, as the sender of an IPv6 datagram expects).
#[test]
fn without_the_flag_df_is_as_before() {
    if !tests::privileged() {
        return;
    }
    for tail_adjust in [false, true] {
        let relay = relay(tail_adjust);
        let peer = addr("198.51.100.2:9000");
        for (index, client) in ["192.0.2.2:40000", "[2001:db8:1::2]:40000"]
            .into_iter()
            .enumerate()
        {
            let client = addr(client);
            let channel = 0x4001 + index as u16;
            let relayed = SocketAddr::new(relay_ip(peer), 50000 + index as u16);
            bind(&relay, client, channel, peer, relayed.port(), false);
            for client_df in [false, true] {
                let context = format!("{client}, client DF {client_df}, tail_adjust {tail_adjust}");
                let payload = data(100);
                let mut input =
                    FrameSpec::marked(client, listener(client), &channel_data(channel, &payload));
                input.ipv4_df = client_df;
                let (verdict, out) = relay.run(&input.build()).unwrap();
                assert_eq!(verdict, XDP_TX, "{context}");
                let df = client_df || client.is_ipv6();
                assert_ipv4(&out, df, &payload, &context);
                // Exactly what the relay sent before the flag existed.
                assert_eq!(
                    out,
                    input.relayed((relayed, peer), &payload, (input.src_mac, input.dst_mac)),
                    "{context}"
                );
            }
        }
    }
}

/// An IPv6 peer has no DF bit to set: the flag changes nothing there, from
/// either family.
#[test]
fn an_ipv6_peer_is_unaffected() {
    if !tests::privileged() {
        return;
    }
    let relay = relay(false);
    let peer = addr("[2001:db8:3::2]:9000");
    for (index, client) in ["192.0.2.2:40000", "[2001:db8:1::2]:40000"]
        .into_iter()
        .enumerate()
    {
        let client = addr(client);
        let channel = 0x4001 + index as u16;
        let relayed = SocketAddr::new(relay_ip(peer), 50000 + index as u16);
        bind(&relay, client, channel, peer, relayed.port(), true);
        let payload = data(100);
        let mut input =
            FrameSpec::marked(client, listener(client), &channel_data(channel, &payload));
        input.ipv4_df = false;
        let (verdict, out) = relay.run(&input.build()).unwrap();
        assert_eq!(verdict, XDP_TX, "{client}");
        assert_eq!(
            out,
            input.relayed((relayed, peer), &payload, (input.src_mac, input.dst_mac)),
            "{client}"
        );
    }
}

/// The flag is about datagrams to the peer: a peer's datagram reaches an
/// IPv4 client as before (its DF bit kept), and so does the hairpin from a
/// flagged allocation's client to another allocation's client.
#[test]
fn peer_to_client_and_hairpin_are_unaffected() {
    if !tests::privileged() {
        return;
    }
    let relay = relay(false);
    let client = addr("192.0.2.2:40000");
    let peer = addr("198.51.100.2:9000");
    let relayed = SocketAddr::new(relay_ip(peer), 50000);
    bind(&relay, client, 0x4001, peer, relayed.port(), true);
    let payload = data(100);
    let mut input = FrameSpec::marked(peer, relayed, &payload);
    input.ipv4_df = false;
    let (verdict, out) = relay.run(&input.build()).unwrap();
    assert_eq!(verdict, XDP_TX);
    let message = channel_data(0x4001, &payload);
    assert_ipv4(&out, false, &message, "peer to client");
    assert_eq!(
        out,
        input.relayed(
            (listener(client), client),
            &message,
            (input.src_mac, input.dst_mac)
        )
    );

    // Client A's peer is B's relayed address: A's channel data goes straight
    // to client B, as channel data from B's listener.
    let (a, b) = (addr("192.0.2.3:40000"), addr("192.0.2.4:40001"));
    let (relayed_a, relayed_b) = (
        SocketAddr::new(relay_ip(a), 50010),
        SocketAddr::new(relay_ip(b), 50011),
    );
    bind(&relay, a, 0x4005, relayed_b, relayed_a.port(), true);
    bind(&relay, b, 0x4006, relayed_a, relayed_b.port(), false);
    let mut input = FrameSpec::marked(a, listener(a), &channel_data(0x4005, &payload));
    input.ipv4_df = false;
    let (verdict, out) = relay.run(&input.build()).unwrap();
    assert_eq!(verdict, XDP_TX, "hairpin");
    let message = channel_data(0x4006, &payload);
    assert_ipv4(&out, false, &message, "hairpin");
    assert_eq!(
        out,
        input.relayed((listener(b), b), &message, (input.src_mac, input.dst_mac)),
        "hairpin"
    );
    assert_eq!(relay.counter(Reason::RelayHairpinV4V4).unwrap().packets, 1);
}
