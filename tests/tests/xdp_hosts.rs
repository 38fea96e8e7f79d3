//! The agent's default next hop (`--next-hop fib`) with the real
//! turn-control, the real agent in native mode and real sockets: a client
//! or a peer on the relay's own L2 segment, a relay with an interface for
//! its clients and one for its peers, and datagrams of the links' full MTU.
//! A TURN client allocates, binds a channel and sends ChannelData; the
//! agent's counters show whether the kernel or user space relayed.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::hosts::{
    Hosts, LEGS_CLIENT_V4, LEGS_CLIENT_V6, LEGS_LISTEN_V4, LEGS_LISTEN_V6, LEGS_PEER_V4,
    LEGS_PEER_V6, LEGS_RELAY_V4, LEGS_RELAY_V6, Peer, SEGMENT_FAR_V4, SEGMENT_FAR_V6,
    SEGMENT_NEAR_V4, SEGMENT_NEAR_V6, SEGMENT_RELAY_V4, SEGMENT_RELAY_V6, Session, counter,
    counters, echoes, growth,
};
use tests::{CLIENT_V4, Lab, PEER_V4, PEER_V6, RELAY_V4, Site};

/// How long one message may take to arrive.
const DEADLINE: Duration = Duration::from_secs(1);
/// Messages each way in the echo tests.
const COUNT: u64 = 100;

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "v4" } else { "v6" }
}

/// One client and one peer of a running relay.
struct Case<'a> {
    name: &'a str,
    client_role: &'a str,
    client: IpAddr,
    server: SocketAddr,
    peer_role: &'a str,
    peer: IpAddr,
    channel: u16,
}

/// [`COUNT`] echoes through a channel of `case`; all must arrive both ways
/// and the kernel must have relayed each (its relay counters grew by
/// [`COUNT`] in each direction). Returns the agent's counters before and after.
fn echo_through_the_kernel(
    hosts: &Hosts,
    agent: &Path,
    case: &Case<'_>,
) -> (proto::v1::CountersResponse, proto::v1::CountersResponse) {
    let name = case.name;
    let client_ns = hosts.ns(case.client_role).unwrap();
    let mut session =
        Session::allocate(client_ns, case.client, case.server, case.peer.is_ipv6()).unwrap();
    let peer = Peer::bind(hosts.ns(case.peer_role).unwrap(), case.peer).unwrap();
    session
        .channel_bind(case.channel, peer.address().unwrap(), agent)
        .unwrap();
    let (client_family, peer_family) = (family(case.client), family(case.peer));
    let to_peer = format!("relay_client_to_peer_{client_family}_{peer_family}");
    let to_client = format!("relay_peer_to_client_{peer_family}_{client_family}");
    let before = counters(agent).unwrap();
    let tally = echoes(&session, case.channel, &peer, COUNT, 100, DEADLINE).unwrap();
    let after = counters(agent).unwrap();
    let grown = growth(&before, &after);
    assert_eq!(
        (tally.to_peer, tally.to_client),
        (COUNT, COUNT),
        "{name}: {tally:?} delivered; the agent's counters grew: {grown}\n{}",
        hosts.diagnostics()
    );
    let kernel = |reason: &str| counter(&after, reason).0 - counter(&before, reason).0;
    assert!(
        kernel(&to_peer) >= COUNT && kernel(&to_client) >= COUNT,
        "{name}: the kernel relayed {} to the peer and {} to the client of {COUNT} each; \
         the agent's counters grew: {grown}",
        kernel(&to_peer),
        kernel(&to_client)
    );
    (before, after)
}

/// The segment's relay: listeners and relayed addresses on x0, the near
/// host and the far network allowed as peers.
fn start_segment_relay(hosts: &mut Hosts) -> PathBuf {
    let listen_v4 = format!("{SEGMENT_RELAY_V4}:3478");
    let listen_v6 = format!("[{SEGMENT_RELAY_V6}]:3478");
    let near_v4 = format!("{SEGMENT_NEAR_V4}/32");
    let near_v6 = format!("{SEGMENT_NEAR_V6}/128");
    let agent = hosts
        .start_agent(
            "relay",
            &["x0"],
            &[
                "--allow-peer",
                "198.51.100.0/24",
                "--allow-peer",
                "2001:db8:3::/64",
                "--allow-peer",
                &near_v4,
                "--allow-peer",
                &near_v6,
            ],
        )
        .unwrap();
    hosts
        .start_turn_control(
            "relay",
            &agent,
            &[
                "--listen",
                &listen_v4,
                "--listen",
                &listen_v6,
                "--allow-peer",
                "198.51.100.0/24",
                "--allow-peer",
                "2001:db8:3::/64",
                "--allow-peer",
                &near_v4,
                "--allow-peer",
                &near_v6,
            ],
        )
        .unwrap();
    agent
}

fn segment_server(client: IpAddr) -> SocketAddr {
    match client {
        IpAddr::V4(_) => SocketAddr::new(SEGMENT_RELAY_V4.into(), 3478),
        IpAddr::V6(_) => SocketAddr::new(SEGMENT_RELAY_V6.into(), 3478),
    }
}

#[test]
fn a_client_on_the_relays_segment_is_relayed_by_the_kernel() {
    if !tests::privileged() {
        return;
    }
    let mut hosts = Hosts::segment().unwrap();
    let agent = start_segment_relay(&mut hosts);
    for (name, client, peer, channel) in [
        (
            "v4 client on the segment",
            SEGMENT_NEAR_V4.into(),
            SEGMENT_FAR_V4.into(),
            0x4001,
        ),
        (
            "v6 client on the segment",
            SEGMENT_NEAR_V6.into(),
            SEGMENT_FAR_V6.into(),
            0x4002,
        ),
    ] {
        echo_through_the_kernel(
            &hosts,
            &agent,
            &Case {
                name,
                client_role: "near",
                client,
                server: segment_server(client),
                peer_role: "far",
                peer,
                channel,
            },
        );
    }
}

#[test]
fn a_peer_on_the_relays_segment_is_relayed_by_the_kernel() {
    if !tests::privileged() {
        return;
    }
    let mut hosts = Hosts::segment().unwrap();
    let agent = start_segment_relay(&mut hosts);
    for (name, client, peer, channel) in [
        (
            "v4 peer on the segment",
            SEGMENT_FAR_V4.into(),
            SEGMENT_NEAR_V4.into(),
            0x4001,
        ),
        (
            "v6 peer on the segment",
            SEGMENT_FAR_V6.into(),
            SEGMENT_NEAR_V6.into(),
            0x4002,
        ),
    ] {
        echo_through_the_kernel(
            &hosts,
            &agent,
            &Case {
                name,
                client_role: "far",
                client,
                server: segment_server(client),
                peer_role: "near",
                peer,
                channel,
            },
        );
    }
}

#[test]
fn a_relay_with_two_interfaces_redirects_between_them() {
    if !tests::privileged() {
        return;
    }
    let mut hosts = Hosts::two_legs().unwrap();
    let agent = hosts
        .start_agent(
            "relay",
            &["x0", "x1"],
            &[
                "--allow-peer",
                "198.51.100.0/24",
                "--allow-peer",
                "2001:db8:3::/64",
            ],
        )
        .unwrap();
    let (listen_v4, listen_v6) = (
        format!("{LEGS_LISTEN_V4}:3478"),
        format!("[{LEGS_LISTEN_V6}]:3478"),
    );
    let (relay_v4, relay_v6) = (LEGS_RELAY_V4.to_string(), LEGS_RELAY_V6.to_string());
    hosts
        .start_turn_control(
            "relay",
            &agent,
            &[
                "--listen",
                &listen_v4,
                "--listen",
                &listen_v6,
                "--relay-ip",
                &relay_v4,
                "--relay-ip",
                &relay_v6,
                "--allow-peer",
                "198.51.100.0/24",
                "--allow-peer",
                "2001:db8:3::/64",
            ],
        )
        .unwrap();
    for (name, client, server, peer, channel) in [
        (
            "v4",
            IpAddr::from(LEGS_CLIENT_V4),
            SocketAddr::new(LEGS_LISTEN_V4.into(), 3478),
            IpAddr::from(LEGS_PEER_V4),
            0x4001,
        ),
        (
            "v6",
            LEGS_CLIENT_V6.into(),
            SocketAddr::new(LEGS_LISTEN_V6.into(), 3478),
            LEGS_PEER_V6.into(),
            0x4002,
        ),
    ] {
        let (before, after) = echo_through_the_kernel(
            &hosts,
            &agent,
            &Case {
                name,
                client_role: "client",
                client,
                server,
                peer_role: "peer",
                peer,
                channel,
            },
        );
        let redirected = after.redirected_packets - before.redirected_packets;
        assert!(
            redirected >= 2 * COUNT,
            "{name}: {redirected} of {} relayed frames were redirected to the other interface; \
             the agent's counters grew: {}",
            2 * COUNT,
            growth(&before, &after)
        );
    }
}

/// Datagrams as large as the links allow (MTU 1500 everywhere), in the
/// standard lab: what would leave the relay larger than its MTU is passed to
/// user space, which relays it fragmented; what fits stays in the kernel.
#[test]
fn datagrams_too_large_for_the_egress_mtu_are_relayed_by_user_space() {
    if !tests::privileged() {
        return;
    }
    const LARGE: u64 = 10;
    let mut lab = Lab::new().unwrap();
    let socket = lab.start_xdp_agent(&["--xdp-mode", "native"]).unwrap();
    lab.start_turn_control(Some(&socket), &[]).unwrap();
    lab.wait_agent_connected(Site::A).unwrap();
    let server = SocketAddr::new(RELAY_V4.into(), 3478);
    let mtu = "pass_mtu_exceeded";
    let (to_peer, to_client) = ("relay_client_to_peer_v4_v4", "relay_peer_to_client_v4_v4");

    let mut session = Session::allocate(&lab.client, CLIENT_V4.into(), server, false).unwrap();
    let peer = Peer::bind(&lab.peer, PEER_V4.into()).unwrap();
    session
        .channel_bind(0x4001, peer.address().unwrap(), &socket)
        .unwrap();

    // A small datagram each way: the kernel relays it.
    let before = counters(&socket).unwrap();
    let tally = echoes(&session, 0x4001, &peer, 1, 100, DEADLINE).unwrap();
    let after = counters(&socket).unwrap();
    assert_eq!((tally.to_peer, tally.to_client), (1, 1), "small: {tally:?}");
    let grew = |reason: &str| counter(&after, reason).0 - counter(&before, reason).0;
    assert!(
        grew(to_peer) == 1 && grew(to_client) == 1,
        "small datagrams: the agent's counters grew: {}",
        growth(&before, &after)
    );

    // 1472 bytes from the peer fill its 1500-byte IPv4 datagram; as channel
    // data to the client they would need 1504.
    let before = counters(&socket).unwrap();
    let mut delivered = 0;
    for i in 0..LARGE {
        let data = vec![b'a' + i as u8; 1472];
        peer.socket.send_to(&data, session.relayed).unwrap();
        if session.receive(0x4001, &data, DEADLINE).unwrap() {
            delivered += 1;
        }
    }
    let after = counters(&socket).unwrap();
    let grew = |reason: &str| counter(&after, reason).0 - counter(&before, reason).0;
    assert_eq!(
        delivered,
        LARGE,
        "1472 bytes from the peer: {delivered} of {LARGE} reached the client; \
         the agent's counters grew: {}",
        growth(&before, &after)
    );
    assert!(
        grew(mtu) >= LARGE && grew(to_client) == 0,
        "1472 bytes from the peer must pass to user space for the MTU; the agent's \
         counters grew: {}",
        growth(&before, &after)
    );

    // 1468 bytes of channel data fill the client's 1500-byte datagram; to the
    // peer they need 1496: the kernel relays them.
    let before = counters(&socket).unwrap();
    let mut delivered = 0;
    for i in 0..LARGE {
        let data = vec![b'A' + i as u8; 1468];
        session.send(0x4001, &data).unwrap();
        if peer.receive(session.relayed, &data, DEADLINE).unwrap() {
            delivered += 1;
        }
    }
    let after = counters(&socket).unwrap();
    let grew = |reason: &str| counter(&after, reason).0 - counter(&before, reason).0;
    assert_eq!(
        delivered,
        LARGE,
        "1468 bytes from the client: {delivered} of {LARGE} reached the peer; \
         the agent's counters grew: {}",
        growth(&before, &after)
    );
    assert!(
        grew(to_peer) >= LARGE && grew(mtu) == 0,
        "1468 bytes from the client fit: the kernel must relay them; the agent's counters \
         grew: {}",
        growth(&before, &after)
    );

    // The same 1468 bytes to an IPv6 peer need a 1516-byte datagram.
    let mut session_v6 = Session::allocate(&lab.client, CLIENT_V4.into(), server, true).unwrap();
    let peer_v6 = Peer::bind(&lab.peer, PEER_V6.into()).unwrap();
    session_v6
        .channel_bind(0x4002, peer_v6.address().unwrap(), &socket)
        .unwrap();
    let before = counters(&socket).unwrap();
    let mut delivered = 0;
    for i in 0..LARGE {
        let data = vec![b'0' + i as u8; 1468];
        session_v6.send(0x4002, &data).unwrap();
        if peer_v6
            .receive(session_v6.relayed, &data, DEADLINE)
            .unwrap()
        {
            delivered += 1;
        }
    }
    let after = counters(&socket).unwrap();
    let grew = |reason: &str| counter(&after, reason).0 - counter(&before, reason).0;
    assert_eq!(
        delivered,
        LARGE,
        "1468 bytes from an IPv4 client to an IPv6 peer: {delivered} of {LARGE} arrived; \
         the agent's counters grew: {}",
        growth(&before, &after)
    );
    assert!(
        grew(mtu) >= LARGE && grew("relay_client_to_peer_v4_v6") == 0,
        "1468 bytes to an IPv6 peer need 1516: they must pass to user space; the agent's \
         counters grew: {}",
        growth(&before, &after)
    );
}
