//! RFC 8656 §11.5 against the real binary on loopback: an ICMP error about a datagram the
//! relay sent (here Port Unreachable, from a peer port nobody listens on) reaches the client
//! as a Data indication with XOR-PEER-ADDRESS and ICMP, at most the core's cap per second
//! and allocation. The daemon reads it from the relay socket's error queue (IP_RECVERR); the
//! mapping of every kind of error, and DONT-FRAGMENT's socket options, are unit tests of
//! `udp.rs` (a datagram over loopback's MTU of 65536 cannot be relayed at all).

#![expect(clippy::unwrap_used, reason = "tests: a failure is a test failure")]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::Daemon;
use tests_harness::stun::{Answer, Client, Msg, attr, class, method};
use turn_control_core::ICMP_RATE;

const T: Duration = Duration::from_secs(15);

/// The ICMP attribute of ICMPv4 Destination Unreachable / Port Unreachable as the core lays
/// it out (RFC 8656 §18.13, Figure 11): two reserved bytes, the type in the upper 7 bits and
/// the code in the lower 9 of the next two, error data 0.
const PORT_UNREACHABLE_V4: [u8; 8] = [0, 0, 3 << 1, 3, 0, 0, 0, 0];
/// The same for ICMPv6 Destination Unreachable (1) / Port Unreachable (4).
const PORT_UNREACHABLE_V6: [u8; 8] = [0, 0, 1 << 1, 4, 0, 0, 0, 0];

/// The daemon listening and relaying on `ip`, with relay ports no other socket takes.
fn start(ip: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--dev", "--user", "test:testpass"];
    args.extend_from_slice(extra);
    Daemon::start_with_ports(ip, common::quiet_port_range(50), &args)
}

/// A client of `daemon` on `ip` with an allocation of that family (with DONT-FRAGMENT if
/// asked) and a permission for `ip`; the client and the relayed address.
fn allocation(daemon: &Daemon, ip: &str, dont_fragment: bool) -> (Client, SocketAddr) {
    let socket = UdpSocket::bind((ip, 0)).unwrap();
    let mut client = Client::new(socket, daemon.listen, "test", "testpass", None).unwrap();
    let family: u8 = if daemon.listen.is_ipv6() { 2 } else { 1 };
    let answer = client
        .request(method::ALLOCATE, |m| {
            m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::REQUESTED_ADDRESS_FAMILY, &[family, 0, 0, 0]);
            if dont_fragment {
                m.attr(attr::DONT_FRAGMENT, &[]);
            }
            m
        })
        .unwrap();
    assert_eq!(answer.class, class::SUCCESS, "Allocate: {answer:?}");
    let relayed = answer.xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap();
    let peer = SocketAddr::new(ip.parse().unwrap(), 9);
    let answer = client
        .request(method::CREATE_PERMISSION, |m| {
            m.xor_addr(attr::XOR_PEER_ADDRESS, peer)
        })
        .unwrap();
    assert_eq!(answer.class, class::SUCCESS, "CreatePermission: {answer:?}");
    (client, relayed)
}

/// A port on `ip` that nobody listens on (a socket held it a moment ago; ports bound to 0
/// are ephemeral, away from the daemon's quiet range).
fn dead_port(ip: &str) -> SocketAddr {
    UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// A Send indication of `data` to `peer` (RFC 8656 §11.1: not authenticated).
fn send(client: &mut Client, peer: SocketAddr, data: &[u8]) {
    let bytes = Msg::new(method::SEND, class::INDICATION, client.next_txid())
        .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, data)
        .finish(None, false);
    client.socket.send_to(&bytes, client.server).unwrap();
}

/// The Data indications arriving on `socket` until `until`, with their arrival times.
fn data_indications(socket: &UdpSocket, until: Instant) -> Vec<(Instant, Answer)> {
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let mut out = Vec::new();
    while Instant::now() < until {
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        if let Some(answer) = Answer::parse_exact(&buf[..n])
            && (answer.method, answer.class) == (method::DATA, class::INDICATION)
        {
            out.push((Instant::now(), answer));
        }
    }
    out
}

/// A datagram to a dead port comes back to the client as ICMP, and the relay goes on
/// relaying to a live peer.
fn port_unreachable(ip: &str, extra: &[&str], dont_fragment: bool, expected: [u8; 8]) {
    let daemon = start(ip, extra);
    let (mut client, _relayed) = allocation(&daemon, ip, dont_fragment);
    let dead = dead_port(ip);
    send(&mut client, dead, b"anyone there?");
    let got = data_indications(&client.socket, Instant::now() + Duration::from_secs(2));
    let [(_, indication)] = got.as_slice() else {
        panic!("{} Data indications, one expected: {got:?}", got.len());
    };
    assert_eq!(indication.xor_addr(attr::XOR_PEER_ADDRESS), Some(dead));
    assert_eq!(indication.attr(attr::ICMP), Some(&expected[..]));
    assert_eq!(indication.attr(attr::DATA), None, "RFC 8656 §11.5: no DATA");
    daemon.wait_metric("turn_icmp_relayed_total", |v| v == 1.0, T);

    let live = UdpSocket::bind((ip, 0)).unwrap();
    live.set_read_timeout(Some(T)).unwrap();
    send(&mut client, live.local_addr().unwrap(), b"hello");
    let mut buf = [0u8; 64];
    let n = live.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
}

#[test]
fn port_unreachable_reaches_the_client() {
    port_unreachable("127.0.0.1", &[], false, PORT_UNREACHABLE_V4);
}

#[test]
fn port_unreachable_reaches_the_client_over_ipv6() {
    port_unreachable("::1", &[], false, PORT_UNREACHABLE_V6);
}

/// DONT-FRAGMENT changes the relay socket's options (`IP_PMTUDISC_DO`), not its error queue.
#[test]
fn port_unreachable_reaches_the_client_with_dont_fragment() {
    port_unreachable("127.0.0.1", &[], true, PORT_UNREACHABLE_V4);
}

/// Behind a 1:1 NAT the relay socket is bound to the local address and the core knows the
/// external one: the error still finds its allocation.
#[test]
fn port_unreachable_reaches_the_client_behind_a_one_to_one_nat() {
    port_unreachable(
        "127.0.0.1",
        &["--external-ip", "192.0.2.1"],
        false,
        PORT_UNREACHABLE_V4,
    );
}

/// A flood of datagrams to a dead port (200 per second for 2 s, each answered by the
/// kernel's Port Unreachable) reaches the client as at most [`ICMP_RATE`] Data indications
/// per second after a burst of as many; the rest is counted as rate-limited.
#[test]
fn a_flood_of_errors_is_capped_per_allocation() {
    let daemon = start("127.0.0.1", &[]);
    let (mut client, _relayed) = allocation(&daemon, "127.0.0.1", false);
    let dead = dead_port("127.0.0.1");
    let receiver = client.socket.try_clone().unwrap();
    let started = Instant::now();
    let flood = Duration::from_secs(2);
    let collector = std::thread::spawn(move || {
        data_indications(&receiver, started + flood + Duration::from_millis(500))
    });
    let mut sent = 0u32;
    while started.elapsed() < flood {
        send(&mut client, dead, b"flood");
        sent += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let got = collector.join().unwrap();
    let rate = usize::from(ICMP_RATE);
    let times: Vec<Instant> = got.iter().map(|(at, _)| *at).collect();
    let busiest_second = times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| **u >= *t && **u - *t < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    eprintln!(
        "{sent} sent, {} Data indications, at most {busiest_second} in a second",
        got.len()
    );
    assert!(
        got.iter()
            .all(|(_, a)| a.attr(attr::ICMP) == Some(&PORT_UNREACHABLE_V4[..]))
    );
    // The burst, then one per tick of 1/ICMP_RATE s over the 2 s (one tick of slack for
    // where the first error falls in its tick).
    assert!(
        got.len() >= rate && got.len() <= rate + 2 * rate + 1,
        "{} Data indications",
        got.len()
    );
    assert!(
        busiest_second <= 2 * rate + 1,
        "{busiest_second} in one second"
    );
    let relayed = daemon.wait_metric("turn_icmp_relayed_total", |v| v == got.len() as f64, T);
    let limited = daemon.wait_metric("turn_icmp_rate_limited_total", |v| v > 0.0, T);
    eprintln!("turn_icmp_relayed_total {relayed}, turn_icmp_rate_limited_total {limited}");
}
