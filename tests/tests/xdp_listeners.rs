//! turn-control on several listeners with the kernel path: a client that
//! allocates through any listener (another port, another address, in either
//! family) has its channel data relayed by XDP both ways, and the peer's data
//! reaches it from exactly the listener it talks to. Real turn-control, real
//! xdp-agent in native mode, the repo's raw TURN client on real sockets.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use tests::agent::Agent;
use tests::stun::{self, attr, channel_data, channel_number, class, method};
use tests::{
    CLIENT_V4, CLIENT_V6, Lab, Netns, PEER_V4, PEER_V6, RELAY_V4, RELAY_V6, Site,
    TURN_CONTROL_METRICS, sample_sum, wait_for,
};

/// Datagrams each way per allocation.
const COUNT: u64 = 100;
/// How long one datagram may take.
const DEADLINE: Duration = Duration::from_secs(2);
/// The second listener port.
const SECOND_PORT: u16 = 443;

/// Binds a UDP socket inside `netns` on `ip`, port chosen by the kernel.
fn udp_socket(netns: &Netns, ip: IpAddr) -> UdpSocket {
    netns.enter(move || Ok(UdpSocket::bind((ip, 0))?)).unwrap()
}

/// Starts the agent in native mode and turn-control with `listen` added to
/// the lab's two listeners; returns the agent's socket once they are linked.
fn start(lab: &mut Lab, listen: &[SocketAddr]) -> std::path::PathBuf {
    let listen: Vec<String> = listen.iter().map(ToString::to_string).collect();
    // The agent takes from turn-control only listeners its own flags name.
    let mut agent_args = vec!["--xdp-mode", "native", "--listen", "0.0.0.0:3478,[::]:3478"];
    for address in &listen {
        agent_args.extend(["--listen", address.as_str()]);
    }
    let socket = lab.start_xdp_agent(&agent_args).unwrap();
    let mut args = Vec::new();
    for address in &listen {
        args.extend(["--listen", address.as_str()]);
    }
    lab.start_turn_control(Some(&socket), &args).unwrap();
    lab.wait_agent_connected(Site::A).unwrap();
    socket
}

/// Adds `ip` to the relay's `x0` and makes the router reach it there.
fn add_relay_address(lab: &Lab, ip: IpAddr) {
    match ip {
        IpAddr::V4(_) => lab
            .relay
            .ip(["addr", "add", &format!("{ip}/24"), "dev", "x0"])
            .unwrap(),
        IpAddr::V6(_) => lab
            .relay
            .ip([
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                "x0",
                "nodad",
            ])
            .unwrap(),
    };
    lab.router
        .add_static_neighbour(ip, lab.relay.mac("x0").unwrap(), "rx")
        .unwrap();
}

/// An allocation made through `listener`, with a channel bound to `peer`.
struct Allocation {
    client: stun::Client,
    listener: SocketAddr,
    relayed: SocketAddr,
    channel: u16,
    peer: SocketAddr,
}

/// Allocates through `listener` over `socket` (a relayed address of the
/// peer's family) and binds `channel` to `peer`.
fn allocate(
    socket: &UdpSocket,
    listener: SocketAddr,
    channel: u16,
    peer: SocketAddr,
) -> Allocation {
    let mut client = stun::Client::new(
        socket.try_clone().unwrap(),
        listener,
        "test",
        "testpass",
        Some("lab.example"),
    )
    .unwrap();
    let family = if peer.is_ipv4() { 1 } else { 2 };
    let answer = client
        .request(method::ALLOCATE, |m| {
            m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::REQUESTED_ADDRESS_FAMILY, &[family, 0, 0, 0])
        })
        .unwrap();
    assert_eq!(
        answer.class,
        class::SUCCESS,
        "Allocate via {listener}: {:?}",
        answer.error_code()
    );
    let relayed = answer.xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap();
    let answer = client
        .request(method::CHANNEL_BIND, |m| {
            m.attr(attr::CHANNEL_NUMBER, &channel_number(channel))
                .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        })
        .unwrap();
    assert_eq!(
        answer.class,
        class::SUCCESS,
        "ChannelBind via {listener}: {:?}",
        answer.error_code()
    );
    Allocation {
        client,
        listener,
        relayed,
        channel,
        peer,
    }
}

/// The agent's bindings, decoded.
fn bindings(agent: &mut Agent) -> Vec<proto::Binding> {
    agent
        .list()
        .unwrap()
        .iter()
        .map(|b| proto::Binding::try_from(b).unwrap())
        .collect()
}

/// Waits until the agent holds the binding of every allocation, with the
/// listener its client talks to; returns all the agent's bindings.
fn wait_installed(agent: &mut Agent, allocations: &[&Allocation]) -> Vec<proto::Binding> {
    wait_for("the bindings in the agent", Duration::from_secs(10), || {
        let all = bindings(agent);
        let every = allocations.iter().all(|a| {
            all.contains(&proto::Binding {
                client: a.client.socket.local_addr().unwrap(),
                channel: a.channel,
                peer: a.peer,
                allocation_port: a.relayed.port(),
                listener: a.listener,
                dont_fragment: false,
            })
        });
        Ok(every.then_some(all))
    })
    .unwrap_or_else(|error| panic!("{error}: the agent holds {:?}", bindings(agent)))
}

/// Reads `socket` until `expected` arrives (`None` after [`DEADLINE`]); what
/// else arrives is kept in `strays`.
fn receive(
    socket: &UdpSocket,
    expected: &[u8],
    strays: &mut Vec<(Vec<u8>, SocketAddr)>,
) -> Option<SocketAddr> {
    let start = Instant::now();
    let mut buffer = [0u8; 2048];
    loop {
        let left = DEADLINE.checked_sub(start.elapsed())?;
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match socket.recv_from(&mut buffer) {
            Ok((n, from)) if &buffer[..n] == expected => return Some(from),
            Ok((n, from)) => strays.push((buffer[..n].to_vec(), from)),
            Err(_) => return None,
        }
    }
}

/// What one allocation's exchange gave.
#[derive(Debug, Default)]
struct Tally {
    /// Datagrams the peer got from the relayed address.
    to_peer: u64,
    /// ChannelData the client got from its listener.
    to_client: u64,
    /// Datagrams that arrived from another address than the expected one.
    wrong_sources: Vec<String>,
}

/// [`COUNT`] datagrams each way for every allocation, interleaved: the
/// client's ChannelData to its listener must reach `peer` from the relayed
/// address, the peer's datagram to the relayed address must reach the client
/// as ChannelData on its channel from its listener.
fn exchange(client: &UdpSocket, peer: &UdpSocket, allocations: &[&Allocation]) -> Vec<Tally> {
    let mut tallies: Vec<Tally> = allocations.iter().map(|_| Tally::default()).collect();
    let mut strays = Vec::new();
    for i in 0..COUNT {
        for (index, (a, tally)) in allocations.iter().zip(&mut tallies).enumerate() {
            let up = format!("client to peer {i} via {}", a.listener);
            client
                .send_to(&channel_data(a.channel, up.as_bytes()), a.listener)
                .unwrap();
            match receive(peer, up.as_bytes(), &mut strays) {
                Some(from) if from == a.relayed => tally.to_peer += 1,
                Some(from) => tally
                    .wrong_sources
                    .push(format!("{up}: from {from}, not {}", a.relayed)),
                None => {}
            }
            let down = format!("peer to client {i} to allocation {index}");
            peer.send_to(down.as_bytes(), a.relayed).unwrap();
            match receive(
                client,
                &channel_data(a.channel, down.as_bytes()),
                &mut strays,
            ) {
                Some(from) if from == a.listener => tally.to_client += 1,
                Some(from) => tally
                    .wrong_sources
                    .push(format!("{down}: from {from}, not {}", a.listener)),
                None => {}
            }
        }
    }
    if !strays.is_empty() {
        eprintln!(
            "{} unexpected datagrams, first: {:?}",
            strays.len(),
            &strays[..strays.len().min(3)]
        );
    }
    tallies
}

/// The kernel's (client to peer, peer to client) packet counters of a family pair.
fn kernel_counts(agent: &mut Agent, pair: &str) -> (u64, u64) {
    (
        agent
            .counter(&format!("relay_client_to_peer_{pair}"))
            .unwrap()
            .0,
        agent
            .counter(&format!("relay_peer_to_client_{pair}"))
            .unwrap()
            .0,
    )
}

/// turn-control's relayed packets in user space.
fn userspace_packets(lab: &Lab) -> f64 {
    let body = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS).unwrap();
    sample_sum(&body, "data_relayed_userspace_packets_total")
}

/// One client allocates through `listener` and exchanges [`COUNT`] datagrams
/// each way with a peer of the same family; asserts delivery, sources, the
/// agent's binding and that the kernel carried it all.
fn one_client_through(lab: &Lab, socket: &Path, listener: SocketAddr) {
    let v4 = listener.is_ipv4();
    let (client_ip, peer_ip, pair) = if v4 {
        (IpAddr::V4(CLIENT_V4), IpAddr::V4(PEER_V4), "v4_v4")
    } else {
        (IpAddr::V6(CLIENT_V6), IpAddr::V6(PEER_V6), "v6_v6")
    };
    let client = udp_socket(&lab.client, client_ip);
    let peer = udp_socket(&lab.peer, peer_ip);
    let allocation = allocate(&client, listener, 0x4001, peer.local_addr().unwrap());
    assert_eq!(
        allocation.relayed.ip(),
        if v4 {
            IpAddr::V4(RELAY_V4)
        } else {
            IpAddr::V6(RELAY_V6)
        }
    );
    let mut agent = Agent::connect(socket).unwrap();
    wait_installed(&mut agent, &[&allocation]);

    let before = kernel_counts(&mut agent, pair);
    let userspace_before = userspace_packets(lab);
    let tally = exchange(&client, &peer, &[&allocation]).remove(0);
    let after = kernel_counts(&mut agent, pair);
    let userspace_after = userspace_packets(lab);
    let summary = format!(
        "via {listener}: {tally:?}; kernel relayed {} to the peer, {} back; \
         user space {} packets",
        after.0 - before.0,
        after.1 - before.1,
        userspace_after - userspace_before
    );
    eprintln!("{summary}");
    assert_eq!(
        (tally.to_peer, tally.to_client),
        (COUNT, COUNT),
        "{summary}\nturn-control:\n{}",
        lab.log("turn-control")
    );
    assert!(tally.wrong_sources.is_empty(), "{summary}");
    assert!(
        after.0 - before.0 >= COUNT && after.1 - before.1 >= COUNT,
        "{summary}"
    );
    assert_eq!(userspace_after, userspace_before, "{summary}");
}

#[test]
fn a_client_on_a_second_listener_port_is_relayed_by_xdp_from_that_port() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let listener = SocketAddr::new(IpAddr::V4(RELAY_V4), SECOND_PORT);
    let socket = start(&mut lab, &[listener]);
    one_client_through(&lab, &socket, listener);
}

#[test]
fn a_client_on_a_second_listener_address_is_relayed_by_xdp_from_that_address_v4() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let listener: SocketAddr = "203.0.113.11:3478".parse().unwrap();
    add_relay_address(&lab, listener.ip());
    let socket = start(&mut lab, &[listener]);
    one_client_through(&lab, &socket, listener);
}

#[test]
fn a_client_on_a_second_listener_address_is_relayed_by_xdp_from_that_address_v6() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let listener: SocketAddr = "[2001:db8:2::b]:3478".parse().unwrap();
    add_relay_address(&lab, listener.ip());
    let socket = start(&mut lab, &[listener]);
    one_client_through(&lab, &socket, listener);
}

/// A wildcard listener stands for the relay address of its family: the
/// client talks to 203.0.113.10:443 and hears from it.
#[test]
fn a_client_on_a_wildcard_listener_is_relayed_by_xdp_from_the_relay_address() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let socket = start(&mut lab, &["0.0.0.0:443".parse().unwrap()]);
    one_client_through(
        &lab,
        &socket,
        SocketAddr::new(IpAddr::V4(RELAY_V4), SECOND_PORT),
    );
}

/// One client socket with an allocation through 3478 and another through
/// 443, the same channel number on both, the same peer: two bindings that
/// differ only in their listener (client side) and allocation port (peer
/// side), each direction delivered to its own allocation.
#[test]
fn one_client_socket_with_allocations_on_two_listeners_keeps_them_apart() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let second = SocketAddr::new(IpAddr::V4(RELAY_V4), SECOND_PORT);
    let socket = start(&mut lab, &[second]);
    let first = SocketAddr::new(IpAddr::V4(RELAY_V4), tests::LISTEN_PORT);
    let client = udp_socket(&lab.client, IpAddr::V4(CLIENT_V4));
    let peer = udp_socket(&lab.peer, IpAddr::V4(PEER_V4));
    let peer_address = peer.local_addr().unwrap();
    let channel = 0x4001;
    let a = allocate(&client, first, channel, peer_address);
    let b = allocate(&client, second, channel, peer_address);
    assert_ne!(a.relayed, b.relayed);
    let mut agent = Agent::connect(&socket).unwrap();
    let all = wait_installed(&mut agent, &[&a, &b]);
    assert_eq!(all.len(), 2, "the agent holds {all:?}");

    let before = kernel_counts(&mut agent, "v4_v4");
    let userspace_before = userspace_packets(&lab);
    let tallies = exchange(&client, &peer, &[&a, &b]);
    let after = kernel_counts(&mut agent, "v4_v4");
    let userspace_after = userspace_packets(&lab);
    let summary = format!(
        "{tallies:?}; kernel relayed {} to the peer, {} back; user space {} packets",
        after.0 - before.0,
        after.1 - before.1,
        userspace_after - userspace_before
    );
    eprintln!("{summary}");
    for (tally, allocation) in tallies.iter().zip([&a, &b]) {
        assert_eq!(
            (tally.to_peer, tally.to_client),
            (COUNT, COUNT),
            "via {}: {summary}\nturn-control:\n{}",
            allocation.listener,
            lab.log("turn-control")
        );
        assert!(tally.wrong_sources.is_empty(), "{summary}");
    }
    assert!(
        after.0 - before.0 >= 2 * COUNT && after.1 - before.1 >= 2 * COUNT,
        "{summary}"
    );
    assert_eq!(userspace_after, userspace_before, "{summary}");
}
