//! Every relay path through the real XDP program, attached in native mode to
//! a veth by the real `xdp-agent`, with real sockets in network namespaces:
//! the kernel sockets at the far ends accept only datagrams with correct
//! checksums, and the agent's counters show that XDP, not the stack, relayed.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test: failures should panic"
)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use tests::agent::{Agent, binding};
use tests::packet::channel_data;
use tests::{CLIENT_V4, CLIENT_V6, Lab, PEER_V4, PEER_V6, RELAY_V4, RELAY_V6};

const DEADLINE: Duration = Duration::from_secs(5);
const LISTEN: u16 = 3478;

fn relay_ip(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(RELAY_V4)
    } else {
        IpAddr::V6(RELAY_V6)
    }
}

/// Binds a UDP socket inside `netns` on `ip`, port chosen by the kernel.
fn socket(netns: &tests::Netns, ip: IpAddr) -> UdpSocket {
    let socket = netns.enter(move || Ok(UdpSocket::bind((ip, 0))?)).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    socket
}

fn receive(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buffer = [0u8; 2048];
    let (len, from) = socket.recv_from(&mut buffer).expect("nothing arrived");
    (buffer[..len].to_vec(), from)
}

fn start(lab: &mut Lab, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--xdp-mode",
        "native",
        "--listen",
        "0.0.0.0:3478,[::]:3478",
        "--ports",
        "49152-65535",
    ];
    args.extend_from_slice(extra);
    let socket = lab.start_xdp_agent(&args).unwrap();
    Agent::connect(&socket).unwrap()
}

/// A client and a peer of the given families exchange data both ways through
/// a binding; both directions must be relayed by XDP on the expected path.
fn exchange(lab: &Lab, agent: &mut Agent, client_v4: bool, peer_v4: bool, channel: u16, port: u16) {
    let family = |v4| if v4 { "v4" } else { "v6" };
    let client_ip = if client_v4 {
        IpAddr::V4(CLIENT_V4)
    } else {
        IpAddr::V6(CLIENT_V6)
    };
    let peer_ip = if peer_v4 {
        IpAddr::V4(PEER_V4)
    } else {
        IpAddr::V6(PEER_V6)
    };
    let client = socket(&lab.client, client_ip);
    let peer = socket(&lab.peer, peer_ip);
    let listener = SocketAddr::new(relay_ip(client_v4), LISTEN);
    let relayed = SocketAddr::new(relay_ip(peer_v4), port);
    let (client_address, peer_address) = (client.local_addr().unwrap(), peer.local_addr().unwrap());
    agent
        .install(vec![binding(client_address, channel, peer_address, port)])
        .unwrap();

    let to_peer = format!(
        "relay_client_to_peer_{}_{}",
        family(client_v4),
        family(peer_v4)
    );
    let to_client = format!(
        "relay_peer_to_client_{}_{}",
        family(peer_v4),
        family(client_v4)
    );
    let (to_peer_before, to_client_before) = (
        agent.counter(&to_peer).unwrap(),
        agent.counter(&to_client).unwrap(),
    );

    let payload = format!("{client_address} to {peer_address} on {channel:#x}").into_bytes();
    client
        .send_to(&channel_data(channel, &payload), listener)
        .unwrap();
    let (received, from) = receive(&peer);
    assert_eq!(received, payload, "{to_peer}");
    assert_eq!(
        from, relayed,
        "{to_peer}: the peer sees the allocation's relayed address"
    );

    let answer = format!("{peer_address} answers").into_bytes();
    peer.send_to(&answer, relayed).unwrap();
    let (received, from) = receive(&client);
    assert_eq!(received, channel_data(channel, &answer), "{to_client}");
    assert_eq!(
        from, listener,
        "{to_client}: the client hears from the listener it uses"
    );

    let to_peer_after = agent.counter(&to_peer).unwrap();
    let to_client_after = agent.counter(&to_client).unwrap();
    assert_eq!(
        to_peer_after,
        (
            to_peer_before.0 + 1,
            to_peer_before.1 + payload.len() as u64
        )
    );
    assert_eq!(
        to_client_after,
        (
            to_client_before.0 + 1,
            to_client_before.1 + answer.len() as u64
        )
    );
}

#[test]
fn all_eight_paths_are_relayed_by_xdp_with_real_sockets() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let mut agent = start(&mut lab, &[]);
    let mut channel = 0x4010;
    let mut port = 50100;
    for client_v4 in [true, false] {
        for peer_v4 in [true, false] {
            exchange(&lab, &mut agent, client_v4, peer_v4, channel, port);
            channel += 1;
            port += 1;
        }
    }
}

#[test]
fn tail_adjust_mode_relays_both_ways() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let mut agent = start(&mut lab, &["--tail-adjust"]);
    exchange(&lab, &mut agent, true, true, 0x4020, 50200);
    exchange(&lab, &mut agent, false, true, 0x4021, 50201);
}

/// Two clients of this relay, each with an allocation whose peer is the
/// other's relayed address: their channel data crosses in the kernel.
#[test]
fn two_allocations_on_one_relay_talk_through_the_hairpin() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    // The relay's own addresses are peers here: opened to the agent as an
    // operator opens them for the hairpin.
    let mut agent = start(
        &mut lab,
        &[
            "--allow-peer",
            "203.0.113.10/32",
            "--allow-peer",
            "2001:db8:2::10/128",
        ],
    );
    for (a_v4, b_v4, reason) in [
        (true, true, "relay_hairpin_v4_v4"),
        (false, true, "relay_hairpin_v6_v4"),
        (true, false, "relay_hairpin_v4_v6"),
    ] {
        let a = socket(
            &lab.client,
            if a_v4 {
                IpAddr::V4(CLIENT_V4)
            } else {
                IpAddr::V6(CLIENT_V6)
            },
        );
        let b = socket(
            &lab.client,
            if b_v4 {
                IpAddr::V4(CLIENT_V4)
            } else {
                IpAddr::V6(CLIENT_V6)
            },
        );
        let (port_a, port_b) = (
            50300 + u16::from(a_v4) * 10 + u16::from(b_v4),
            50400 + u16::from(a_v4) * 10 + u16::from(b_v4),
        );
        // Both allocations relay over IPv4.
        let relayed_a = SocketAddr::new(IpAddr::V4(RELAY_V4), port_a);
        let relayed_b = SocketAddr::new(IpAddr::V4(RELAY_V4), port_b);
        agent
            .install(vec![
                binding(a.local_addr().unwrap(), 0x4030, relayed_b, port_a),
                binding(b.local_addr().unwrap(), 0x4031, relayed_a, port_b),
            ])
            .unwrap();
        let before = agent.counter(reason).unwrap().0;

        a.send_to(
            &channel_data(0x4030, b"from a"),
            SocketAddr::new(relay_ip(a_v4), LISTEN),
        )
        .unwrap();
        let (received, from) = receive(&b);
        assert_eq!(received, channel_data(0x4031, b"from a"), "{reason}");
        assert_eq!(from, SocketAddr::new(relay_ip(b_v4), LISTEN));
        assert_eq!(agent.counter(reason).unwrap().0, before + 1, "{reason}");
    }
}
