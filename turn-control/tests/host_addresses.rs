//! The host's own addresses as peers, against the real binary on loopback, unprivileged: the
//! daemon learns every address of the machine it runs on through rtnetlink, and refuses
//! each as a peer even where the operator allows everything (`--allow-peer 0.0.0.0/0` and
//! `::/0`): the addresses `ip address` shows, with the IPv4 broadcast addresses, at a
//! service port, and the listener's port at loopback. A SIGHUP reload keeps them refused.
//! Adding addresses needs root: tests/tests/hostile.rs does it in a namespace of its own.

#![expect(clippy::unwrap_used, reason = "tests: a failure is a test failure")]

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::Daemon;
use tests_harness::stun::{Answer, Client, attr, class, method};

const T: Duration = Duration::from_secs(20);

/// Every address `ip address` shows for this machine, with the IPv4 broadcast addresses,
/// but loopback's. Empty where `ip` is missing.
fn host_addresses() -> Vec<IpAddr> {
    let Ok(output) = Command::new("ip").args(["-o", "address", "show"]).output() else {
        eprintln!("no `ip` command: only loopback is checked");
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let mut addresses = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            let address = match pair {
                ["inet" | "inet6", cidr] => cidr.split('/').next(),
                ["brd", ip] => Some(*ip),
                _ => None,
            };
            if let Some(ip) = address.and_then(|a| a.parse::<IpAddr>().ok())
                && !ip.is_loopback()
            {
                addresses.push(ip);
            }
        }
    }
    addresses
}

/// The answer to CreatePermission for `peer`.
fn create_permission(client: &mut Client, peer: SocketAddr) -> Answer {
    client
        .request(method::CREATE_PERMISSION, |m| {
            m.xor_addr(attr::XOR_PEER_ADDRESS, peer)
        })
        .unwrap()
}

/// The peers of the test that must get 403: every host address at a DNS port, the
/// listener's port at loopback.
fn check_refused(client: &mut Client, daemon: &Daemon, hosts: &[IpAddr]) {
    let listener = SocketAddr::new([127, 0, 0, 1].into(), daemon.listen.port());
    for peer in hosts
        .iter()
        .map(|&ip| SocketAddr::new(ip, 53))
        .chain([listener])
    {
        let answer = create_permission(client, peer);
        assert_eq!(
            (answer.class, answer.error_code()),
            (class::ERROR, Some(403)),
            "{peer}: {answer:?}"
        );
    }
}

#[test]
fn the_hosts_own_addresses_are_refused_whatever_the_operator_allows() {
    let hosts = host_addresses();
    eprintln!("host addresses: {hosts:?}");
    let args = [
        "--user",
        "test:testpass",
        "--relay-ip",
        "127.0.0.1",
        "--relay-ip",
        "::1",
        "--allow-peer",
        "0.0.0.0/0",
        "--allow-peer",
        "::/0",
    ];
    let mut daemon = Daemon::start_with_ports("127.0.0.1", common::quiet_port_range(20), &args);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut client = Client::new(socket, daemon.listen, "test", "testpass", None).unwrap();
    let allocation = client
        .request(method::ALLOCATE, |m| {
            m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0])
        })
        .unwrap();
    assert_eq!(allocation.class, class::SUCCESS, "{allocation:?}");

    check_refused(&mut client, &daemon, &hosts);
    // Public addresses that are not this host's stay reachable.
    for peer in ["8.8.8.8:53", "[2001:4860:4860::8888]:53"] {
        let answer = create_permission(&mut client, peer.parse().unwrap());
        assert_eq!(answer.class, class::SUCCESS, "{peer}: {answer:?}");
    }
    daemon.wait_metric(
        "turn_peers_denied_total",
        |v| v >= (hosts.len() + 1) as f64,
        T,
    );

    // A reload replaces the operator's lists, not what the daemon learned.
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded", T);
    check_refused(&mut client, &daemon, &hosts);
    daemon.alive();
}
