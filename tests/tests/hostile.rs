//! Hostile input against the real `turn-control` on loopback: floods of unauthenticated
//! Allocate requests from many source addresses, oversized and truncated messages, garbage
//! on TCP, channel numbers outside the range, requests beyond the allocation quota, and
//! peers in every denied range and IPv4-in-IPv6 form, and at every address of the relay's
//! host.
//!
//! No namespace is needed but for the host's addresses (as root, in a namespace of their
//! own): the daemon listens on 127.0.0.1 (and relays on 127.0.0.1 and ::1) and loopback holds
//! all of 127/8 for the many source addresses. Requests are built here
//! with a minimal STUN encoder with long-term credentials (RFC 8489 §9.2), independent of
//! the core's.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failure is a test failure"
)]

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use tests::stun::attr::{
    ADDITIONAL_ADDRESS_FAMILY, CHANNEL_NUMBER, LIFETIME, NONCE, REALM as REALM_ATTR,
    REQUESTED_TRANSPORT, USERNAME, XOR_PEER_ADDRESS, XOR_RELAYED_ADDRESS,
};
use tests::stun::class::{ERROR, REQUEST, SUCCESS};
use tests::stun::method::{ALLOCATE, BINDING, CHANNEL_BIND, CREATE_PERMISSION, REFRESH};
use tests::stun::{Answer, Client, Msg};
use tests::{Netns, RELAY_V4, RELAY_V6, vm_rss_kib};
use tests_harness::daemon::{Daemon, port_range};

const REALM: &str = "hostile.example";
const USER: &str = "mallory";
const PASSWORD: &str = "mallory-pw";
const DEADLINE: Duration = Duration::from_secs(20);

/// The daemon relaying on 127.0.0.1 and ::1, with the tests' realm and user.
fn start(args: &[&str]) -> Daemon {
    let user = format!("{USER}:{PASSWORD}");
    let ports = port_range(64, &["127.0.0.1", "::1"]);
    let relay = ["--relay-ip", "127.0.0.1", "--relay-ip", "::1"];
    let args = [&relay, &["--realm", REALM, "--user", &user][..], args].concat();
    Daemon::spawn("127.0.0.1", ports, "info", &args)
}

/// Checks on the daemon beyond [`Daemon`]'s.
trait Checks {
    /// A UDP Binding request still gets its success response.
    fn answers_binding(&mut self);
    /// The daemon's resident memory.
    fn vm_rss_kib(&self) -> u64;
}

impl Checks for Daemon {
    fn answers_binding(&mut self) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut client = new_client(socket, self.listen);
        let request = Msg::new(BINDING, REQUEST, client.next_txid()).finish(None, false);
        let answer = client
            .exchange(&request)
            .unwrap()
            .expect("Binding answered");
        assert_eq!((answer.method, answer.class), (BINDING, SUCCESS));
        self.alive();
    }

    fn vm_rss_kib(&self) -> u64 {
        vm_rss_kib(self.pid()).unwrap()
    }
}

// ---- a minimal STUN client (tests::stun) ---------------------------------------------------

/// A UDP client of the daemon with the test's long-term credentials.
fn new_client(socket: UdpSocket, server: SocketAddr) -> Client {
    Client::new(socket, server, USER, PASSWORD, Some(REALM)).unwrap()
}

/// Request helpers of the tests.
trait Requests {
    /// An authenticated request that must be answered; follows 401 and 438 for the nonce.
    fn req(&mut self, method: u16, build: impl Fn(&mut Msg) -> &mut Msg) -> Answer;
    /// A dual-stack UDP allocation (RFC 8656 §7.2, ADDITIONAL-ADDRESS-FAMILY).
    fn allocate_dual(&mut self) -> Answer;
}

impl Requests for Client {
    fn req(&mut self, method: u16, build: impl Fn(&mut Msg) -> &mut Msg) -> Answer {
        self.request(method, build).expect("request answered")
    }

    fn allocate_dual(&mut self) -> Answer {
        self.req(ALLOCATE, |m| {
            m.attr(REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0])
        })
    }
}

fn client(daemon: &Daemon) -> Client {
    new_client(UdpSocket::bind("127.0.0.1:0").unwrap(), daemon.listen)
}

fn ok(answer: &Answer) {
    assert_eq!(answer.class, SUCCESS, "expected success, got {answer:?}");
}

// ---- tests ------------------------------------------------------------------------------

/// A flood of unauthenticated Allocate requests from 1,000 source addresses creates no
/// allocation and no per-source state (memory stays flat), and the 401 answers are capped.
#[test]
fn allocate_flood_from_many_sources_creates_no_state() {
    let mut daemon = start(&[]);
    let sockets: Vec<UdpSocket> = (0..1000u32)
        .map(|i| {
            let ip = format!(
                "127.{}.{}.{}",
                1 + i / 250 / 250,
                (i / 250) % 250,
                1 + i % 250
            );
            let socket = UdpSocket::bind((ip.as_str(), 0)).unwrap();
            socket.set_nonblocking(true).unwrap();
            socket
        })
        .collect();
    let listen = daemon.listen;
    let round = |n: u8| {
        let mut sent = 0u64;
        for (i, socket) in sockets.iter().enumerate() {
            for j in 0..10u8 {
                let mut txid = [n; 12];
                txid[..4].copy_from_slice(&(i as u32).to_be_bytes());
                txid[4] = j;
                let mut msg = Msg::new(ALLOCATE, REQUEST, txid);
                msg.attr(REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
                if j % 2 == 1 {
                    // Claims a user, a stale nonce and a wrong MESSAGE-INTEGRITY.
                    msg.attr(USERNAME, USER.as_bytes())
                        .attr(REALM_ATTR, REALM.as_bytes())
                        .attr(NONCE, b"bogus-nonce");
                }
                let request = msg.finish((j % 2 == 1).then_some(&[0u8; 16][..]), false);
                // A full socket buffer drops the datagram, like a real flood would.
                if socket.send_to(&request, listen).is_ok() {
                    sent += 1;
                }
            }
            let mut buf = [0u8; 1500];
            while socket.recv(&mut buf).is_ok() {}
        }
        sent
    };
    // A first round grows buffers and allocator arenas to their working size.
    round(1);
    daemon.answers_binding();
    let rss_before = daemon.vm_rss_kib();
    let mut sent = 0;
    for n in 2..6 {
        sent += round(n);
    }
    daemon.answers_binding();
    let rss_after = daemon.vm_rss_kib();
    eprintln!("flood: {sent} requests from 1000 sources; VmRSS {rss_before} -> {rss_after} KiB");
    assert!(sent > 30_000, "only {sent} requests sent");
    assert!(
        rss_after <= rss_before + 2048,
        "memory grew under an unauthenticated flood: {rss_before} -> {rss_after} KiB"
    );
    daemon.wait_metric(
        "turn_unauthorized_rate_limited_total",
        |v| v > 0.0,
        DEADLINE,
    );
    assert_eq!(daemon.metric("turn_allocations_active"), 0.0);
    assert_eq!(daemon.metric("turn_allocations_created_total"), 0.0);
}

/// Truncated, oversized and inconsistent messages are dropped; the daemon lives on.
#[test]
fn oversized_and_truncated_messages_are_dropped() {
    let mut daemon = start(&[]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let binding = Msg::new(BINDING, REQUEST, [7; 12]).finish(None, false);
    let mut cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0],
        binding[..10].to_vec(),
        binding[..19].to_vec(),
    ];
    // The length field claims more than the datagram holds, or is not a multiple of 4.
    for len in [4u16, 8, 1000, 0xFFFC, 3, 0xFFFF] {
        let mut m = binding.clone();
        m[2..4].copy_from_slice(&len.to_be_bytes());
        cases.push(m);
    }
    // An attribute whose length runs past the end.
    let mut m = Msg::new(ALLOCATE, REQUEST, [8; 12])
        .attr(REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .finish(None, false);
    m[22..24].copy_from_slice(&0x0400u16.to_be_bytes());
    cases.push(m);
    // The largest UDP datagram: a valid header and 65,000 bytes of attributes.
    let mut big = Msg::new(ALLOCATE, REQUEST, [9; 12]);
    for _ in 0..(65_000 / 1004) {
        big.attr(0x7FFF, &[0xAA; 1000]);
    }
    cases.push(big.finish(None, false));
    cases.push(vec![0xFF; 65_507]);
    // Thousands of tiny attributes.
    let mut many = Msg::new(BINDING, REQUEST, [10; 12]);
    for _ in 0..8000 {
        many.attr(0x8022, &[]);
    }
    cases.push(many.finish(None, false));
    // ChannelData without an allocation, truncated and oversized.
    cases.push(vec![0x40, 0x00, 0x00, 0x10, 1, 2]);
    cases.push([&[0x40u8, 0x00, 0xFF, 0xFF][..], &[0; 60_000]].concat());
    for case in &cases {
        let _ = socket.send_to(case, daemon.listen);
    }
    // Over TCP: a frame claiming 65,532 bytes, delivered in part, then the connection closes.
    let mut tcp = TcpStream::connect(daemon.listen).unwrap();
    let mut head = binding.clone();
    head[2..4].copy_from_slice(&0xFFFCu16.to_be_bytes());
    tcp.write_all(&head).unwrap();
    tcp.write_all(&[0; 30_000]).unwrap();
    drop(tcp);
    daemon.answers_binding();
    daemon.wait_metric("turn_packets_dropped_total", |v| v > 0.0, DEADLINE);
    daemon.answers_binding();
}

/// Garbage on a TCP connection closes that connection; the daemon still answers others.
#[test]
fn tcp_garbage_closes_the_connection() {
    let mut daemon = start(&[]);
    // What a TLS, HTTP/2 or random client sends first. (ASCII text such as "GET / HTTP/1.1"
    // frames as ChannelData, which cannot come first on a connection: tcp_hygiene.rs.)
    let garbage: [&[u8]; 4] = [
        // TLS ClientHello: a STUN-looking header whose length (0x0102) is not a multiple of 4.
        &[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03,
        ],
        // HTTP/2 preface byte pattern and random high bits: neither STUN nor ChannelData.
        &[0x80, 0x00, 0x00, 0x04, 0, 0, 0, 0],
        &[0xFF; 64],
        // A STUN length that is not a multiple of 4.
        &[0x00, 0x01, 0x00, 0x03, 0x21, 0x12, 0xA4, 0x42],
    ];
    for bytes in garbage {
        let mut tcp = TcpStream::connect(daemon.listen).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        tcp.write_all(bytes).unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 512];
        loop {
            match tcp.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("read: {e}"),
            }
            assert!(
                start.elapsed() < DEADLINE,
                "connection sending {bytes:?} stays open"
            );
        }
    }
    // A well-behaved TCP client still gets its Binding success.
    let mut tcp = TcpStream::connect(daemon.listen).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    tcp.write_all(&Msg::new(BINDING, REQUEST, [3; 12]).finish(None, false))
        .unwrap();
    let mut head = [0u8; 20];
    tcp.read_exact(&mut head).unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]]))];
    tcp.read_exact(&mut body).unwrap();
    let answer = Answer::parse(&[&head[..], &body].concat()).unwrap();
    assert_eq!((answer.method, answer.class), (BINDING, SUCCESS));
    daemon.answers_binding();
}

/// ChannelBind with a number outside 0x4000-0x7FFF gets 400 (RFC 8656 §12.2).
#[test]
fn channel_numbers_outside_the_range_are_refused() {
    let daemon = start(&[]);
    let mut c = client(&daemon);
    ok(&c.allocate_dual());
    let peer: SocketAddr = "8.8.8.8:5000".parse().unwrap();
    for number in [0x0000u16, 0x0001, 0x3FFF, 0x8000, 0x8001, 0xBFFF, 0xFFFF] {
        let answer = c.req(CHANNEL_BIND, |m| {
            m.attr(CHANNEL_NUMBER, &[(number >> 8) as u8, number as u8, 0, 0])
                .xor_addr(XOR_PEER_ADDRESS, peer)
        });
        assert_eq!(
            (answer.class, answer.error_code()),
            (ERROR, Some(400)),
            "channel {number:#06x}"
        );
    }
    // The edges of the range are fine.
    for (number, port) in [(0x4000u16, 5000), (0x7FFF, 5001)] {
        let peer = SocketAddr::new(peer.ip(), port);
        ok(&c.req(CHANNEL_BIND, |m| {
            m.attr(CHANNEL_NUMBER, &[(number >> 8) as u8, number as u8, 0, 0])
                .xor_addr(XOR_PEER_ADDRESS, peer)
        }));
    }
}

/// With `--user-quota 1` a second allocation of the same user gets 486 (RFC 8656 §7.2);
/// after the first is deleted, a new one succeeds.
#[test]
fn allocations_beyond_the_quota_get_486() {
    let daemon = start(&["--user-quota", "1"]);
    let mut first = client(&daemon);
    ok(&first.allocate_dual());
    for _ in 0..3 {
        let mut other = client(&daemon);
        let answer = other.allocate_dual();
        assert_eq!((answer.class, answer.error_code()), (ERROR, Some(486)));
    }
    ok(&first.req(REFRESH, |m| m.attr(LIFETIME, &0u32.to_be_bytes())));
    let mut later = client(&daemon);
    ok(&later.allocate_dual());
    daemon.wait_metric("turn_allocations_active", |v| v == 1.0, DEADLINE);
}

/// CreatePermission for a peer in any denied range, in any IPv4-in-IPv6 form, gets 403
/// (RFC 8656 §21.2.2; coturn CVE-2020-26262); public peers of both families are allowed.
#[test]
fn denied_peers_get_403_in_every_form() {
    let daemon = start(&[]);
    let mut c = client(&daemon);
    ok(&c.allocate_dual());
    let denied = [
        // Loopback, also as IPv4-mapped, IPv4-compatible, NAT64 and 6to4.
        "127.0.0.1",
        "127.255.255.254",
        "::1",
        "::ffff:127.0.0.1",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::1",
        // Unspecified and "this network".
        "0.0.0.0",
        "0.1.2.3",
        "::",
        "::ffff:0.0.0.0",
        // Private (RFC 1918) and unique local, also embedded.
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.0.1",
        "192.168.255.254",
        "::ffff:10.0.0.1",
        "::ffff:192.168.1.1",
        "64:ff9b::c0a8:101",
        "2002:ac10:1::1",
        "fc00::1",
        "fd12:3456::1",
        // Shared address space (CGNAT).
        "100.64.0.1",
        "100.127.255.254",
        "::ffff:100.64.0.1",
        // Link-local.
        "169.254.0.1",
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "fe80::1",
        "febf::1",
        // Multicast and broadcast.
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "::ffff:224.0.0.1",
        "ff02::1",
        "ff0e::1",
        // Benchmarking, reserved, documentation.
        "198.18.0.1",
        "198.19.255.254",
        "240.0.0.1",
        "::ffff:198.18.0.1",
        "192.0.2.1",
        "2001:db8::1",
    ];
    let mut wrong = Vec::new();
    for ip in denied {
        let peer = SocketAddr::new(ip.parse().unwrap(), 5000);
        let answer = c.req(CREATE_PERMISSION, |m| m.xor_addr(XOR_PEER_ADDRESS, peer));
        if (answer.class, answer.error_code()) != (ERROR, Some(403)) {
            wrong.push(format!(
                "{ip}: class {} code {:?}",
                answer.class,
                answer.error_code()
            ));
        }
    }
    assert!(wrong.is_empty(), "not refused with 403: {wrong:#?}");
    for ip in ["8.8.8.8", "2001:4860:4860::8888"] {
        let peer = SocketAddr::new(ip.parse().unwrap(), 5000);
        ok(&c.req(CREATE_PERMISSION, |m| m.xor_addr(XOR_PEER_ADDRESS, peer)));
    }
    daemon.wait_metric(
        "turn_peers_denied_total",
        |v| v >= denied.len() as f64,
        DEADLINE,
    );
}

/// The relay's host in a namespace of its own (root only): beside the relay addresses
/// 203.0.113.10 and 2001:db8:2::a, a second IPv4 address and a SLAAC and a temporary-looking
/// IPv6 address of the relay's prefix, on a veth pair (no dummy module needed).
fn host_with_addresses() -> Netns {
    let netns = Netns::create(tests::unique_name("hostaddr")).unwrap();
    netns
        .ip(["link", "add", "h0", "type", "veth", "peer", "name", "h1"])
        .unwrap();
    for iface in ["h0", "h1"] {
        netns.ip(["link", "set", iface, "up"]).unwrap();
    }
    for address in [&format!("{RELAY_V4}/24"), "203.0.113.20/24"] {
        netns.ip(["addr", "add", address, "dev", "h0"]).unwrap();
    }
    for address in [
        &format!("{RELAY_V6}/64"),
        "2001:db8:2::5054:ff:fe12:3456/64",
        "2001:db8:2::8d1c:27a5:b3e0:914f/64",
    ] {
        netns
            .ip(["-6", "addr", "add", address, "dev", "h0", "nodad"])
            .unwrap();
    }
    netns
}

/// Whether CreatePermission for `peer` is refused with 403.
fn refused(c: &mut Client, peer: SocketAddr) -> bool {
    let answer = c.req(CREATE_PERMISSION, |m| m.xor_addr(XOR_PEER_ADDRESS, peer));
    match (answer.class, answer.error_code()) {
        (ERROR, Some(403)) => true,
        (SUCCESS, _) => false,
        _ => panic!("CreatePermission for {peer}: {answer:?}"),
    }
}

/// coturn CVE-2020-26262's class: services bound to the wildcard addresses answer on every
/// address of the relay's host. With wildcard listeners and the operator allowing the relay's
/// networks (so that only the host rule refuses), CreatePermission gets 403 for the host's
/// other addresses of both families, for the relay address at a listener port (of either
/// family's listener) and at a port outside the allocation range, and for an address added
/// while the daemon runs, within a second; the relay address at an allocation port (the
/// hairpin) and other hosts of the allowed networks are allowed.
#[test]
fn peers_at_the_hosts_own_addresses_get_403() {
    if !tests::privileged() {
        return;
    }
    let netns = host_with_addresses();
    netns
        .enter(|| {
            let ports = port_range(64, &[&RELAY_V4.to_string()]);
            let user = format!("{USER}:{PASSWORD}");
            let (relay_v4, relay_v6) = (RELAY_V4.to_string(), RELAY_V6.to_string());
            let args = [
                "--listen",
                "[::]:3478",
                "--relay-ip",
                &relay_v4,
                "--relay-ip",
                &relay_v6,
                "--allow-peer",
                "203.0.113.0/24",
                "--allow-peer",
                "2001:db8:2::/64",
                "--realm",
                REALM,
                "--user",
                &user,
            ];
            let mut daemon = Daemon::spawn("0.0.0.0", ports, "info", &args);
            let listen_port = daemon.listen.port();
            let server = SocketAddr::new(RELAY_V4.into(), listen_port);
            let mut c = new_client(UdpSocket::bind("0.0.0.0:0").unwrap(), server);
            let allocation = c.allocate_dual();
            ok(&allocation);
            let port = allocation
                .xor_addr(XOR_RELAYED_ADDRESS)
                .expect("XOR-RELAYED-ADDRESS")
                .port();
            let mut denied = 0;
            for peer in [
                // The host's other addresses.
                "203.0.113.20:53".to_owned(),
                "[2001:db8:2::5054:ff:fe12:3456]:53".to_owned(),
                "[2001:db8:2::8d1c:27a5:b3e0:914f]:161".to_owned(),
                "[::ffff:203.0.113.20]:53".to_owned(),
                // The wildcard listeners at the relay addresses, either family's port.
                format!("{RELAY_V4}:{listen_port}"),
                format!("{RELAY_V4}:3478"),
                format!("[{RELAY_V6}]:3478"),
                format!("[{RELAY_V6}]:{listen_port}"),
                // The relay addresses, allowed, outside the allocation ports.
                format!("{RELAY_V4}:22"),
                format!("[{RELAY_V6}]:22"),
            ] {
                let peer: SocketAddr = peer.parse().unwrap();
                assert!(refused(&mut c, peer), "{peer} was allowed");
                denied += 1;
            }
            // ChannelBind judges the port as CreatePermission does.
            let answer = c.req(CHANNEL_BIND, |m| {
                m.attr(CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
                    .xor_addr(XOR_PEER_ADDRESS, SocketAddr::new(RELAY_V4.into(), 22))
            });
            assert_eq!((answer.class, answer.error_code()), (ERROR, Some(403)));
            denied += 1;
            // The hairpin, and other hosts of the allowed networks.
            for peer in [
                SocketAddr::new(RELAY_V4.into(), port),
                SocketAddr::new(RELAY_V6.into(), port),
                "203.0.113.99:53".parse().unwrap(),
                "[2001:db8:2::99]:53".parse().unwrap(),
            ] {
                assert!(!refused(&mut c, peer), "{peer} was refused");
            }
            // Addresses added while the daemon runs.
            for (address, peer) in [
                ("203.0.113.30/24", "203.0.113.30:53"),
                ("2001:db8:2::30/64", "[2001:db8:2::30]:53"),
            ] {
                let peer: SocketAddr = peer.parse().unwrap();
                assert!(!refused(&mut c, peer), "{peer} refused before it was added");
                let mut add = vec!["addr", "add", address, "dev", "h0"];
                if peer.is_ipv6() {
                    add.push("nodad");
                }
                netns.ip(add).unwrap();
                let added = Instant::now();
                while !refused(&mut c, peer) {
                    assert!(
                        added.elapsed() < Duration::from_secs(1),
                        "{peer} still allowed a second after it was added"
                    );
                }
                eprintln!("{peer} refused {:?} after it was added", added.elapsed());
                denied += 1;
            }
            daemon.wait_metric(
                "turn_peers_denied_total",
                |v| v >= f64::from(denied),
                DEADLINE,
            );
            daemon.alive();
            Ok(())
        })
        .unwrap();
}
