//! What the XDP program counts per channel binding and how it holds a
//! binding to its rate limits, seen from outside: real sockets in the lab's
//! namespaces send and receive, and the agent's answers (ListChannelBindings,
//! GetChannelBinding, ListUsage, RemoveChannelBinding, Counters) must show
//! exactly what crossed, and what a meter dropped.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test: failures should panic"
)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::v1::{ChannelBinding, Traffic, Usage};
use tests::agent::{self, Agent, binding, lasting, limited, same_binding, usage};
use tests::packet::channel_data;
use tests::{CLIENT_V4, LISTEN_PORT, Lab, PEER_V4, RELAY_V4, wait_for};

const DEADLINE: Duration = Duration::from_secs(5);
/// The rate the limited tests set: 1 Mbit/s of application bytes.
const RATE: u64 = 125_000;
/// Their datagrams' application bytes.
const DATAGRAM: usize = 1_000;
/// Their meters' burst: 100 ms of the rate.
const BURST: u64 = RATE / 10;

fn start(lab: &mut Lab, extra: &[&str]) -> Agent {
    let mut args = vec!["--xdp-mode", "native"];
    args.extend_from_slice(extra);
    let socket = lab.start_xdp_agent(&agent::with_lab_peers(&args)).unwrap();
    Agent::connect(&socket).unwrap()
}

/// A lab with its agent, a client and a peer socket, and the binding of channel 0x4001
/// between them on relay port 50000, not installed yet.
struct Direct {
    lab: Lab,
    agent: Agent,
    client: UdpSocket,
    peer: UdpSocket,
    binding: ChannelBinding,
}

fn direct() -> Direct {
    let mut lab = Lab::new().unwrap();
    let agent = start(&mut lab, &[]);
    let (client, peer) = (udp(&lab.client, CLIENT_V4), udp(&lab.peer, PEER_V4));
    let binding = binding(
        client.local_addr().unwrap(),
        0x4001,
        peer.local_addr().unwrap(),
        50000,
    );
    Direct {
        lab,
        agent,
        client,
        peer,
        binding,
    }
}

/// A socket whose receive buffer holds a second of the tests' streams: a reader thread
/// that a loaded machine does not schedule for a while must not lose datagrams the
/// kernel counted as relayed.
fn udp(netns: &tests::Netns, ip: std::net::Ipv4Addr) -> UdpSocket {
    let socket = netns.enter(|| Ok(UdpSocket::bind((ip, 0))?)).unwrap();
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::RcvBufForce,
        &RECEIVE_BUFFER,
    )
    .unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    socket
}

/// [`udp`]'s receive buffer, in bytes (the kernel doubles it for its bookkeeping; a
/// 100-byte datagram takes about 1 KiB of it).
const RECEIVE_BUFFER: usize = 16 << 20;

fn listener() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(RELAY_V4), LISTEN_PORT)
}

fn relayed(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(RELAY_V4), port)
}

/// A ChannelData message padded to a multiple of four bytes, as RFC 8656
/// section 12.5 lets a client send it over UDP: the padding is framing,
/// not application data.
fn padded_channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut message = channel_data(channel, data);
    message.resize(message.len().next_multiple_of(4), 0);
    message
}

/// Application data of `len` bytes that tells datagrams apart.
fn data(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| (i + seed) as u8).collect()
}

fn figures(traffic: Option<&Traffic>) -> (u64, u64) {
    traffic.map_or((0, 0), |traffic| (traffic.packets, traffic.bytes))
}

/// One direction's (packets, bytes) relayed, and dropped.
type Both = ((u64, u64), (u64, u64));

/// (packets, bytes) relayed client to peer, and dropped that way.
fn client_to_peer(usage: &Usage) -> Both {
    (
        figures(usage.client_to_peer.as_ref()),
        figures(usage.dropped_client_to_peer.as_ref()),
    )
}

/// (packets, bytes) relayed peer to client, and dropped that way.
fn peer_to_client(usage: &Usage) -> Both {
    (
        figures(usage.peer_to_client.as_ref()),
        figures(usage.dropped_peer_to_client.as_ref()),
    )
}

/// What ListUsage reports for `bound`; fails if it is not installed.
fn usage_of(agent: &mut Agent, bound: &ChannelBinding) -> Usage {
    agent
        .usage_of(bound)
        .unwrap()
        .unwrap_or_else(|| panic!("ListUsage does not list {bound:?}"))
}

/// How many of the first datagrams' sequence numbers [`Arrivals`] keeps.
const FIRST: usize = 32;

/// The packets and application bytes a socket received, counted by a thread
/// until dropped, and the sequence numbers ([`send_paced`]) of the first
/// [`FIRST`]; `framing` bytes of each datagram are not application data (4:
/// a ChannelData header).
struct Arrivals {
    packets: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    first: Arc<Mutex<Vec<u32>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Arrivals {
    fn count(socket: &UdpSocket, framing: usize) -> Self {
        let socket = socket.try_clone().unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let (packets, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let first = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (packets, bytes, stop) = (packets.clone(), bytes.clone(), stop.clone());
            let first = first.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(len) = socket.recv(&mut buffer) {
                        let mut first = first.lock().unwrap();
                        if first.len() < FIRST
                            && let Some(sequence) = buffer.get(framing..framing + 4)
                        {
                            first.push(u32::from_be_bytes(sequence.try_into().unwrap()));
                        }
                        bytes.fetch_add((len - framing) as u64, Ordering::Relaxed);
                        packets.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Self {
            packets,
            bytes,
            first,
            stop,
            thread: Some(thread),
        }
    }

    fn tally(&self) -> (u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// The sequence numbers of the first datagrams received, in order.
    fn first(&self) -> Vec<u32> {
        self.first.lock().unwrap().clone()
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends `datagram` to `to` `per_second` times a second for `duration`, each
/// at its time on a schedule counted from the start, so that a late send
/// does not delay the ones after it, each with its sequence number (from 0,
/// 4 bytes big-endian) at `stamp_at`; how many it sent.
fn send_paced(
    socket: &UdpSocket,
    to: SocketAddr,
    datagram: &[u8],
    stamp_at: usize,
    per_second: u64,
    duration: Duration,
) -> u64 {
    let mut datagram = datagram.to_vec();
    let period = Duration::from_nanos(1_000_000_000 / per_second);
    let start = Instant::now();
    let end = start + duration;
    let mut sent = 0u32;
    loop {
        let at = start + period * sent;
        if at >= end {
            return u64::from(sent);
        }
        if let Some(early) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(early);
        }
        datagram[stamp_at..stamp_at + 4].copy_from_slice(&sent.to_be_bytes());
        socket.send_to(&datagram, to).unwrap();
        sent += 1;
    }
}

/// Waits until the agent's figures for one direction of `bound` account for
/// every one of the `sent` datagrams of [`DATAGRAM`] bytes, relayed ones
/// equal to what `arrivals` counted: the usage once it is complete.
fn settled(
    agent: &mut Agent,
    bound: &ChannelBinding,
    direction: fn(&Usage) -> Both,
    arrivals: &Arrivals,
    sent: u64,
) -> Usage {
    let mut last = None;
    let result = wait_for("every datagram to be accounted for", DEADLINE, || {
        let usage = usage_of(agent, bound);
        let ((relayed, _), (dropped, _)) = direction(&usage);
        let received = arrivals.tally();
        last = Some((usage, received));
        Ok((relayed == received.0 && relayed + dropped == sent).then_some(usage))
    });
    result.unwrap_or_else(|error| {
        panic!("{error}: sent {sent}, (usage, received) {last:?}");
    })
}

/// Sends channel data of 1 to 1200 bytes from `client` through `bound`'s
/// channel (every other one padded) and checks each reaches `peer` as it
/// was sent; returns (packets, bytes) sent.
fn client_sends(client: &UdpSocket, peer: &UdpSocket, channel: u16, count: usize) -> (u64, u64) {
    let mut buffer = [0u8; 2048];
    let mut bytes = 0;
    for i in 0..count {
        let len = if i == 0 { 1200 } else { 1 + (i * 97) % 1200 };
        let payload = data(len, i);
        let message = if i % 2 == 0 {
            padded_channel_data(channel, &payload)
        } else {
            channel_data(channel, &payload)
        };
        client.send_to(&message, listener()).unwrap();
        let len = peer.recv(&mut buffer).expect("the peer received nothing");
        assert_eq!(&buffer[..len], &payload[..], "datagram {i}");
        bytes += payload.len() as u64;
    }
    (count as u64, bytes)
}

/// Sends datagrams of 1 to 1200 bytes from `peer` to allocation `port` and
/// checks each reaches `client` on `channel`; returns (packets, bytes) sent.
fn peer_sends(
    peer: &UdpSocket,
    client: &UdpSocket,
    channel: u16,
    port: u16,
    count: usize,
) -> (u64, u64) {
    let mut buffer = [0u8; 2048];
    let mut bytes = 0;
    for i in 0..count {
        let len = 1 + (i * 211 + 5) % 1200;
        let payload = data(len, i + 1000);
        peer.send_to(&payload, relayed(port)).unwrap();
        let len = client
            .recv(&mut buffer)
            .expect("the client received nothing");
        assert_eq!(&buffer[..len], &channel_data(channel, &payload)[..]);
        bytes += payload.len() as u64;
    }
    (count as u64, bytes)
}

fn add(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0 + b.0, a.1 + b.1)
}

const NONE: (u64, u64) = (0, 0);

#[test]
fn usage_counts_every_packet_and_byte_each_way_and_the_removal_answers_the_final_figures() {
    if !tests::privileged() {
        return;
    }
    let Direct {
        lab: _lab,
        mut agent,
        client,
        peer,
        binding: bound,
    } = direct();
    agent.install(vec![bound.clone()]).unwrap();
    assert_eq!(usage_of(&mut agent, &bound), usage(NONE, NONE, NONE, NONE));

    let to_peer = client_sends(&client, &peer, 0x4001, 41);
    let to_client = peer_sends(&peer, &client, 0x4001, 50000, 25);
    let expected = usage(to_peer, to_client, NONE, NONE);
    // Counted before the datagram leaves: complete once it has arrived.
    assert_eq!(usage_of(&mut agent, &bound), expected, "ListUsage");
    let listed = agent.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(same_binding(&listed[0], &bound));
    assert_eq!(
        listed[0].usage.as_ref(),
        Some(&expected),
        "ListChannelBindings"
    );
    assert_eq!(
        agent.get(&bound).unwrap().usage,
        Some(expected),
        "GetChannelBinding"
    );
    // All of it crossed in the kernel: the usage is the kernel's whole count.
    assert_eq!(
        agent.counter("relay_client_to_peer_v4_v4").unwrap(),
        to_peer
    );
    assert_eq!(
        agent.counter("relay_peer_to_client_v4_v4").unwrap(),
        to_client
    );

    let removed = agent.remove_with_usage(vec![bound.clone()]).unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(same_binding(&removed[0], &bound), "{removed:?}");
    assert_eq!(removed[0].usage, Some(expected), "the final figures");
    assert!(agent.usage().unwrap().is_empty());
    assert!(
        agent
            .remove_with_usage(vec![bound.clone()])
            .unwrap()
            .is_empty()
    );

    // Installed again: a new life, counted from zero.
    agent.install(vec![bound.clone()]).unwrap();
    assert_eq!(usage_of(&mut agent, &bound), usage(NONE, NONE, NONE, NONE));
    let again = client_sends(&client, &peer, 0x4001, 3);
    assert_eq!(usage_of(&mut agent, &bound), usage(again, NONE, NONE, NONE));
    // A refresh (a new lifetime) keeps counting where it was.
    let refreshed = lasting(&bound, Duration::from_secs(300));
    agent.install(vec![refreshed.clone()]).unwrap();
    let got = agent.get(&bound).unwrap();
    assert!(
        got.lifetime_ms <= 300_000 && got.lifetime_ms > 300_000 - 5_000,
        "the refresh took: {got:?}"
    );
    assert_eq!(got.usage, Some(usage(again, NONE, NONE, NONE)));
    let more = client_sends(&client, &peer, 0x4001, 2);
    let back = peer_sends(&peer, &client, 0x4001, 50000, 2);
    let total = usage(add(again, more), back, NONE, NONE);
    assert_eq!(usage_of(&mut agent, &bound), total);
    let removed = agent.remove_with_usage(vec![refreshed]).unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0].usage, Some(total));
}

#[test]
fn hairpin_counts_once_on_each_binding() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    // The relay's own address is a peer here: opened to the agent as an
    // operator opens it for the hairpin.
    let mut agent = start(&mut lab, &["--allow-peer", "203.0.113.10/32"]);
    let a = udp(&lab.client, CLIENT_V4);
    let b = udp(&lab.client, CLIENT_V4);
    let (port_a, port_b) = (50300, 50400);
    let bound_a = binding(a.local_addr().unwrap(), 0x4030, relayed(port_b), port_a);
    let bound_b = binding(b.local_addr().unwrap(), 0x4031, relayed(port_a), port_b);
    agent
        .install(vec![bound_a.clone(), bound_b.clone()])
        .unwrap();

    let mut buffer = [0u8; 2048];
    let mut exchange = |from: &UdpSocket, to: &UdpSocket, sending: u16, receiving: u16| {
        let mut sent = NONE;
        for i in 0..20 {
            let payload = data(1 + (i * 61) % 1200, i);
            let message = if i % 2 == 0 {
                padded_channel_data(sending, &payload)
            } else {
                channel_data(sending, &payload)
            };
            from.send_to(&message, listener()).unwrap();
            let len = to.recv(&mut buffer).expect("nothing crossed the hairpin");
            assert_eq!(&buffer[..len], &channel_data(receiving, &payload)[..]);
            sent = add(sent, (1, payload.len() as u64));
        }
        sent
    };
    let a_to_b = exchange(&a, &b, 0x4030, 0x4031);
    assert_eq!(
        usage_of(&mut agent, &bound_a),
        usage(a_to_b, NONE, NONE, NONE)
    );
    assert_eq!(
        usage_of(&mut agent, &bound_b),
        usage(NONE, a_to_b, NONE, NONE)
    );
    let b_to_a = exchange(&b, &a, 0x4031, 0x4030);
    let expected_a = usage(a_to_b, b_to_a, NONE, NONE);
    let expected_b = usage(b_to_a, a_to_b, NONE, NONE);
    assert_eq!(usage_of(&mut agent, &bound_a), expected_a);
    assert_eq!(usage_of(&mut agent, &bound_b), expected_b);
    // Relayed once each, in the hairpin, not as traffic to a peer as well.
    assert_eq!(
        agent.counter("relay_hairpin_v4_v4").unwrap(),
        add(a_to_b, b_to_a)
    );
    assert_eq!(agent.counter("relay_client_to_peer_v4_v4").unwrap(), NONE);
    assert_eq!(agent.counter("relay_peer_to_client_v4_v4").unwrap(), NONE);

    let mut removed = agent
        .remove_with_usage(vec![bound_a.clone(), bound_b.clone()])
        .unwrap();
    removed.sort_by_key(|removed| removed.channel);
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(same_binding(&removed[0], &bound_a) && same_binding(&removed[1], &bound_b));
    assert_eq!(removed[0].usage, Some(expected_a));
    assert_eq!(removed[1].usage, Some(expected_b));
}

#[test]
fn a_rate_limit_holds_the_traffic_to_its_rate_and_spares_other_bindings() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let mut agent = start(&mut lab, &[]);
    let (client, peer) = (udp(&lab.client, CLIENT_V4), udp(&lab.peer, PEER_V4));
    let (other_client, other_peer) = (udp(&lab.client, CLIENT_V4), udp(&lab.peer, PEER_V4));
    let bound = limited(
        &binding(
            client.local_addr().unwrap(),
            0x4001,
            peer.local_addr().unwrap(),
            50000,
        ),
        "allocation:test",
        RATE,
    );
    let unlimited = binding(
        other_client.local_addr().unwrap(),
        0x4002,
        other_peer.local_addr().unwrap(),
        50001,
    );
    agent
        .install(vec![bound.clone(), unlimited.clone()])
        .unwrap();

    // Ten times the rate for ten seconds; beside it, the unlimited binding
    // at a tenth of that (the rate itself).
    let offered = RATE * 10 / DATAGRAM as u64;
    let seconds = 10;
    let (arrivals, other_arrivals) = (Arrivals::count(&peer, 0), Arrivals::count(&other_peer, 0));
    let (sent, other_sent) = std::thread::scope(|scope| {
        let other = scope.spawn(|| {
            let message = channel_data(0x4002, &[2; DATAGRAM]);
            let duration = Duration::from_secs(seconds);
            send_paced(
                &other_client,
                listener(),
                &message,
                4,
                offered / 10,
                duration,
            )
        });
        let message = channel_data(0x4001, &[1; DATAGRAM]);
        let duration = Duration::from_secs(seconds);
        let sent = send_paced(&client, listener(), &message, 4, offered, duration);
        (sent, other.join().unwrap())
    });
    let limited_usage = settled(&mut agent, &bound, client_to_peer, &arrivals, sent);
    let other_usage = settled(
        &mut agent,
        &unlimited,
        client_to_peer,
        &other_arrivals,
        other_sent,
    );
    let received = arrivals.tally();
    let (passed, dropped) = client_to_peer(&limited_usage);
    let allowed = RATE * seconds;
    assert!(
        received.1 * 100 >= allowed * 95 && received.1 * 100 <= allowed * 102,
        "the peer received {received:?} of {sent} datagrams; the rate allows {allowed} bytes"
    );
    assert_eq!(passed, received, "the usage counts what the peer received");
    let burst: Vec<u32> = (0..(BURST / DATAGRAM as u64) as u32).collect();
    assert_eq!(arrivals.first()[..burst.len()], burst, "a full burst first");
    let lost = sent - received.0;
    assert_eq!(dropped, (lost, lost * DATAGRAM as u64), "dropped: the rest");
    assert_eq!(peer_to_client(&limited_usage), (NONE, NONE));
    assert_eq!(agent.counter("drop_rate_limited").unwrap().0, lost);
    let other_bytes = other_sent * DATAGRAM as u64;
    assert_eq!(
        other_usage,
        usage((other_sent, other_bytes), NONE, NONE, NONE),
        "the unlimited binding lost nothing"
    );
    assert_eq!(other_arrivals.tally(), (other_sent, other_bytes));
    drop((arrivals, other_arrivals));

    peer_to_client_has_its_own_budget(&mut agent, &bound, &client, &peer, &limited_usage);
}

/// The other direction has its own budget, untouched so far while the
/// client's was just spent (`before`: the usage so far): the peer's first
/// burst passes whole, and two seconds at ten times the rate get the rate
/// and that burst.
fn peer_to_client_has_its_own_budget(
    agent: &mut Agent,
    bound: &ChannelBinding,
    client: &UdpSocket,
    peer: &UdpSocket,
    before: &Usage,
) {
    let seconds = 2;
    let arrivals = Arrivals::count(client, 4);
    let duration = Duration::from_secs(seconds);
    let offered = RATE * 10 / DATAGRAM as u64;
    let sent = send_paced(peer, relayed(50000), &[3; DATAGRAM], 0, offered, duration);
    let after = settled(agent, bound, peer_to_client, &arrivals, sent);
    let received = arrivals.tally();
    let allowed = RATE * seconds + BURST;
    assert!(
        received.1 * 100 >= allowed * 90 && received.1 * 100 <= allowed * 110,
        "the client received {received:?} of {sent} datagrams; the rate allows {allowed} bytes"
    );
    let burst: Vec<u32> = (0..(BURST / DATAGRAM as u64) as u32).collect();
    assert_eq!(arrivals.first()[..burst.len()], burst, "a full burst first");
    let lost = sent - received.0;
    assert_eq!(
        peer_to_client(&after),
        (received, (lost, lost * DATAGRAM as u64))
    );
    let before = client_to_peer(before);
    assert_eq!(client_to_peer(&after), before, "idle meanwhile");
    assert_eq!(
        agent.counter("drop_rate_limited").unwrap().0,
        before.1.0 + lost
    );
}

#[test]
fn two_bindings_naming_one_meter_share_its_rate() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let mut agent = start(&mut lab, &[]);
    let client = udp(&lab.client, CLIENT_V4);
    let peers = [udp(&lab.peer, PEER_V4), udp(&lab.peer, PEER_V4)];
    // One allocation, two channels to two peers, its meter on both.
    let bindings: Vec<ChannelBinding> = peers
        .iter()
        .zip([0x4001, 0x4002])
        .map(|(peer, channel)| {
            let bound = binding(
                client.local_addr().unwrap(),
                channel,
                peer.local_addr().unwrap(),
                50000,
            );
            limited(&bound, "allocation:shared", RATE)
        })
        .collect();
    agent.install(bindings.clone()).unwrap();

    let offered = RATE * 10 / DATAGRAM as u64;
    let seconds = 5;
    let arrivals = peers.each_ref().map(|peer| Arrivals::count(peer, 0));
    // Ten times the rate each, give or take a little: a sender in step with
    // the kernel's clock tick (the meters' clock) would be the first after
    // every tick, and win every refill of the shared budget.
    let sent: Vec<u64> = std::thread::scope(|scope| {
        let senders: Vec<_> = bindings
            .iter()
            .zip([offered + 7, offered - 13])
            .map(|(bound, rate)| {
                let client = &client;
                scope.spawn(move || {
                    let channel = u16::try_from(bound.channel).unwrap();
                    let message = channel_data(channel, &[4; DATAGRAM]);
                    let duration = Duration::from_secs(seconds);
                    send_paced(client, listener(), &message, 4, rate, duration)
                })
            })
            .collect();
        senders.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let mut total = 0;
    for ((bound, arrivals), sent) in bindings.iter().zip(&arrivals).zip(&sent) {
        let usage = settled(&mut agent, bound, client_to_peer, arrivals, *sent);
        let received = arrivals.tally();
        let lost = sent - received.0;
        assert_eq!(
            client_to_peer(&usage),
            (received, (lost, lost * DATAGRAM as u64)),
            "{bound:?}"
        );
        total += received.1;
    }
    let allowed = RATE * seconds;
    assert!(
        total * 100 >= allowed * 95 && total * 100 <= allowed * 105,
        "together {total} bytes; the shared rate allows {allowed}"
    );
    // Both drew on it: neither was shut out by the other.
    for arrivals in &arrivals {
        assert!(
            arrivals.tally().1 * 4 >= total,
            "{:?} of {total} bytes",
            arrivals.tally()
        );
    }
}

#[test]
fn usage_survives_an_agent_restart() {
    if !tests::privileged() {
        return;
    }
    let Direct {
        mut lab,
        mut agent,
        client,
        peer,
        binding: bound,
    } = direct();
    agent.install(vec![bound.clone()]).unwrap();
    let to_peer = client_sends(&client, &peer, 0x4001, 30);
    let to_client = peer_sends(&peer, &client, 0x4001, 50000, 20);
    assert_eq!(
        usage_of(&mut agent, &bound),
        usage(to_peer, to_client, NONE, NONE)
    );

    lab.take_process("xdp-agent")
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    drop(agent);
    // The pinned program keeps relaying, and counting, without its agent.
    let while_dead = client_sends(&client, &peer, 0x4001, 10);
    let mut agent = start(&mut lab, &[]);
    let to_peer = add(to_peer, while_dead);
    assert_eq!(
        usage_of(&mut agent, &bound),
        usage(to_peer, to_client, NONE, NONE),
        "the adopted binding kept its counts"
    );

    // A binding installed now gets a slot of its own, from zero: the
    // adopted one's stays its own.
    let (other_client, other_peer) = (udp(&lab.client, CLIENT_V4), udp(&lab.peer, PEER_V4));
    let other = binding(
        other_client.local_addr().unwrap(),
        0x4002,
        other_peer.local_addr().unwrap(),
        50001,
    );
    agent.install(vec![other.clone()]).unwrap();
    assert_eq!(usage_of(&mut agent, &other), usage(NONE, NONE, NONE, NONE));
    let other_sent = client_sends(&other_client, &other_peer, 0x4002, 5);
    assert_eq!(
        usage_of(&mut agent, &other),
        usage(other_sent, NONE, NONE, NONE)
    );

    // Traffic after the restart adds to the counts, and a refresh keeps
    // them, whether an install or the Sync of a reconnecting turn-control.
    agent
        .install(vec![lasting(&bound, Duration::from_secs(300))])
        .unwrap();
    let synced = agent.sync(1, &[bound.clone(), other.clone()]).unwrap();
    assert_eq!((synced.added, synced.removed), (0, 0));
    let to_peer = add(to_peer, client_sends(&client, &peer, 0x4001, 7));
    let to_client = add(to_client, peer_sends(&peer, &client, 0x4001, 50000, 6));
    let expected = usage(to_peer, to_client, NONE, NONE);
    assert_eq!(usage_of(&mut agent, &bound), expected);
    let removed = agent.remove_with_usage(vec![bound]).unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0].usage, Some(expected));
    assert_eq!(
        usage_of(&mut agent, &other),
        usage(other_sent, NONE, NONE, NONE)
    );
}

/// Three bursts' worth of [`DATAGRAM`]-byte channel data from `client` on
/// `channel`, back to back: how many were sent.
fn blast(client: &UdpSocket, channel: u16) -> u64 {
    let count = 3 * BURST / DATAGRAM as u64;
    for i in 0..count {
        let payload = data(DATAGRAM, i as usize);
        client
            .send_to(&channel_data(channel, &payload), listener())
            .unwrap();
    }
    count
}

/// What a burst lets through of a blast: the bucket holds 100 ms of the
/// rate, and the packet that reaches its brim passes; a tick of the
/// kernel's clock during the blast may add one.
fn within_a_burst(packets: u64) -> bool {
    let burst = BURST / DATAGRAM as u64;
    (burst..=burst + 2).contains(&packets)
}

#[test]
fn a_limit_installed_again_without_it_is_lifted_and_the_counts_go_on() {
    if !tests::privileged() {
        return;
    }
    let Direct {
        lab: _lab,
        mut agent,
        client,
        peer,
        binding: plain,
    } = direct();
    let bound = limited(&plain, "allocation:test", RATE);
    agent.install(vec![bound.clone()]).unwrap();
    let listed = agent.get(&bound).unwrap().rate_limits;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].bytes_per_second, RATE);

    let arrivals = Arrivals::count(&peer, 0);
    let sent = blast(&client, 0x4001);
    let first = settled(&mut agent, &bound, client_to_peer, &arrivals, sent);
    let ((passed, _), (dropped, _)) = client_to_peer(&first);
    assert!(within_a_burst(passed), "{passed} of {sent} passed");
    assert_eq!(passed + dropped, sent);

    // The same binding without the limit: nothing is dropped any more, and
    // it counts on where it was.
    agent.install(vec![plain.clone()]).unwrap();
    assert!(agent.get(&plain).unwrap().rate_limits.is_empty());
    let more = blast(&client, 0x4001);
    let after = settled(&mut agent, &plain, client_to_peer, &arrivals, sent + more);
    assert_eq!(
        client_to_peer(&after),
        (
            (passed + more, (passed + more) * DATAGRAM as u64),
            (dropped, dropped * DATAGRAM as u64)
        )
    );
    assert_eq!(agent.counter("drop_rate_limited").unwrap().0, dropped);
}

/// The hairpin's receiving allocation has a limit of its own: what it
/// drops is its peer-to-client traffic, dropped; the sender's usage counts
/// what was relayed.
#[test]
fn a_limit_on_the_receiving_allocation_holds_hairpin_traffic_to_it() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let mut agent = start(&mut lab, &["--allow-peer", "203.0.113.10/32"]);
    let (a, b) = (udp(&lab.client, CLIENT_V4), udp(&lab.client, CLIENT_V4));
    let (port_a, port_b) = (50300, 50400);
    let bound_a = binding(a.local_addr().unwrap(), 0x4030, relayed(port_b), port_a);
    let bound_b = limited(
        &binding(b.local_addr().unwrap(), 0x4031, relayed(port_a), port_b),
        "allocation:b",
        RATE,
    );
    agent
        .install(vec![bound_a.clone(), bound_b.clone()])
        .unwrap();
    let arrivals = Arrivals::count(&b, 4);
    let sent = blast(&a, 0x4030);
    let usage_b = settled(&mut agent, &bound_b, peer_to_client, &arrivals, sent);
    let (received, dropped) = peer_to_client(&usage_b);
    assert!(within_a_burst(received.0), "{received:?} of {sent}");
    assert_eq!(
        dropped,
        (sent - received.0, (sent - received.0) * DATAGRAM as u64)
    );
    assert_eq!(client_to_peer(&usage_b), (NONE, NONE));
    assert_eq!(
        usage_of(&mut agent, &bound_a),
        usage(received, NONE, NONE, NONE)
    );
    assert_eq!(agent.counter("drop_rate_limited").unwrap().0, dropped.0);
}

/// A removal in the middle of a stream answers final figures that hold
/// every datagram the kernel relayed on the binding, the last ones counted
/// by runs still in flight when the entries went.
#[test]
fn the_final_figures_hold_everything_relayed_up_to_the_removal() {
    if !tests::privileged() {
        return;
    }
    let Direct {
        lab,
        mut agent,
        client,
        peer,
        binding: bound,
    } = direct();
    agent.install(vec![bound.clone()]).unwrap();
    let overflows_before = lab.peer.udp_receive_buffer_errors().unwrap();
    let arrivals = Arrivals::count(&peer, 0);
    let message = channel_data(0x4001, &[5; 100]);
    let (sent, removed) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let duration = Duration::from_secs(1);
            send_paced(&client, listener(), &message, 4, 10_000, duration)
        });
        wait_for("the stream to flow", DEADLINE, || {
            Ok((arrivals.tally().0 >= 2_000).then_some(()))
        })
        .unwrap();
        let removed = agent.remove_with_usage(vec![bound.clone()]).unwrap();
        (sender.join().unwrap(), removed)
    });
    assert_eq!(removed.len(), 1, "{removed:?}");
    let final_figures = removed[0].usage.unwrap();
    let (relayed, _) = client_to_peer(&final_figures);
    // Every datagram went one way or the other: relayed by the kernel to
    // the peer, or to the stack once the binding was gone.
    let mut last = None;
    wait_for(
        "every datagram to arrive or reach the stack",
        DEADLINE,
        || {
            let to_stack = agent.counter("pass_unknown_binding")?.0;
            last = Some((arrivals.tally(), to_stack));
            Ok((to_stack == sent - relayed.0 && arrivals.tally() == relayed).then_some(()))
        },
    )
    .unwrap_or_else(|error| {
        let overflows = lab
            .peer
            .udp_receive_buffer_errors()
            .map(|now| now - overflows_before);
        panic!(
            "{error}: sent {sent}, final {relayed:?}, (arrived, to the stack) {last:?}, \
             datagrams the peer's sockets had no room for: {overflows:?}"
        )
    });
    assert!(
        relayed.0 >= 2_000 && relayed.0 < sent,
        "{relayed:?} of {sent}"
    );
    assert_eq!(final_figures, usage(relayed, NONE, NONE, NONE));
    assert_eq!(agent.usage_of(&bound).unwrap(), None);
}

/// A datagram the kernel cannot relay (its next hop is on an interface the
/// program is not attached to) goes to the stack, where user space meters
/// it: the kernel's meter must not be charged for it, nor drop the ones
/// after it.
#[test]
fn a_datagram_passed_to_the_stack_costs_the_kernel_meter_nothing() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    // A network of the relay's host behind an interface without the program.
    lab.add_unattached_network().unwrap();
    lab.relay
        .add_static_neighbour("10.9.0.2".parse().unwrap(), [2, 0, 0, 0, 0, 2], "d0")
        .unwrap();
    let mut agent = start(&mut lab, &["--allow-peer", "10.9.0.0/16"]);
    let client = udp(&lab.client, CLIENT_V4);
    let bound = limited(
        &binding(
            client.local_addr().unwrap(),
            0x4001,
            "10.9.0.2:9000".parse().unwrap(),
            50000,
        ),
        "allocation:test",
        RATE,
    );
    agent.install(vec![bound.clone()]).unwrap();
    let count = blast(&client, 0x4001);
    let passed = wait_for("every datagram to be passed or dropped", DEADLINE, || {
        let passed = agent.counter("pass_egress_not_attached")?.0;
        let dropped = agent.counter("drop_rate_limited")?.0;
        Ok((passed + dropped == count).then_some(passed))
    })
    .unwrap();
    assert_eq!(
        usage_of(&mut agent, &bound),
        usage(NONE, NONE, NONE, NONE),
        "neither relayed nor dropped by the kernel"
    );
    assert_eq!(passed, count, "all of them went to the stack");
}
